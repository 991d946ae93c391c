"""SQL judged with a parser (sqlglot), never with regular expressions.

Pure functions shared by prep (row validation), eval (SQL-only, exact match) and ask (output check).
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError

DIALECT = "sqlite"  # the dataset's SQL is SQLite-flavoured, and execution runs in SQLite
COMPARISON_OPERATORS = (exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE, exp.Like, exp.ILike, exp.Glob)


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[tuple[str, str], ...]  # (name, type) in declared order


def parse_statements(text: str) -> list[exp.Expression] | None:
    """Every statement in `text`, or None when it does not parse as SQL. Text in a markdown fence is not SQL:
    sqlglot's SQLite dialect would read the backticks as quoted names."""
    if text.lstrip().startswith("```"):
        return None
    try:
        statements = sqlglot.parse(text, read=DIALECT)
    except (ParseError, TokenError, ValueError, RecursionError):
        return None
    return [s for s in statements if s is not None]


def parse_schema(context: str) -> list[Table] | None:
    """The CREATE TABLE statements of a context, or None if anything else is in it or it does not parse."""
    statements = parse_statements(context)
    if not statements:
        return None
    tables = []
    for statement in statements:
        if not (isinstance(statement, exp.Create) and statement.kind == "TABLE"):
            return None
        schema = statement.this
        if not isinstance(schema, exp.Schema):
            return None
        columns = tuple(
            (col.name, col.args["kind"].sql(DIALECT) if col.args.get("kind") else "")
            for col in schema.expressions
            if isinstance(col, exp.ColumnDef)
        )
        tables.append(Table(name=schema.this.name, columns=columns))
    return tables


def single_query(text: str) -> exp.Expression | None:
    """The query when `text` is exactly one SQL query statement (SELECT / UNION / WITH ...) and nothing else."""
    statements = parse_statements(text)
    if statements is None or len(statements) != 1:
        return None
    statement = statements[0]
    return statement if isinstance(statement, exp.Query) else None


def is_sql_only(response: str) -> bool:
    """The response is one SQL query and nothing else: no prose around it, no fence, no second statement."""
    return single_query(response.strip()) is not None


def comparisons(query: exp.Expression) -> list[tuple[exp.Expression, exp.Expression, exp.Expression]]:
    """(operator, left, right) for every comparison in a query. `x IN (a, b)` gives one triple per listed value
    and `x BETWEEN a AND b` one per bound; `x IN (SELECT ...)` gives none."""
    found = []
    for node in query.find_all(*COMPARISON_OPERATORS, exp.In, exp.Between):
        if isinstance(node, exp.In):
            rights = node.expressions
        elif isinstance(node, exp.Between):
            rights = [node.args["low"], node.args["high"]]
        else:
            rights = [node.expression]
        found.extend((node, node.this, right) for right in rights)
    return found


def is_quoted_name(node: exp.Expression) -> bool:
    """A bare double-quoted name such as "Bob": SQLite reads it as a string when no column has that name."""
    return (isinstance(node, exp.Column) and not node.table
            and isinstance(node.this, exp.Identifier) and node.this.quoted)


def normalize_sql(sql: str) -> str:
    """Canonical text for exact match: the query re-printed by sqlglot. Two queries get the same text when they
    differ only in
    - whitespace, line breaks and comments;
    - keyword case (select / SELECT);
    - identifier quotes: name, "name", `name` and [name] all print as "name" (identifier case still counts);
    - string quotes: a double-quoted value on the right of a comparison, in an IN list or a BETWEEN bound (the
      dataset's `x = "Bob"`, which SQLite reads as the string 'Bob') prints as the string 'Bob';
    - a trailing semicolon.
    Everything else counts: literal values and their case, aliases, clause and operand order.
    Text that is not one query keeps its stripped text, whitespace collapsed and trailing semicolons dropped."""
    query = single_query(sql.strip())
    if query is None:
        return " ".join(sql.strip().rstrip(";").split())
    for _, _, right in comparisons(query):
        if is_quoted_name(right):
            right.replace(exp.Literal.string(right.name))
    return query.sql(dialect=DIALECT, identify=True, comments=False)


def exact_match(predicted: str, gold: str) -> bool:
    return normalize_sql(predicted) == normalize_sql(gold)
