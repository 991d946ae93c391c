"""SQL judged with a parser (sqlglot), never with regular expressions.

Pure functions shared by prep (row validation), eval (SQL-only, exact match) and ask (output check).
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError

DIALECT = "sqlite"  # the dataset's SQL is SQLite-flavoured, and execution runs in SQLite


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[tuple[str, str], ...]  # (name, type) in declared order


def parse_statements(text: str) -> list[exp.Expression] | None:
    """Every statement in `text`, or None when it does not parse as SQL."""
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
    if text.lstrip().startswith("```"):
        return None  # a markdown fence: sqlglot's SQLite dialect would read backticks as quoted names
    statements = parse_statements(text)
    if statements is None or len(statements) != 1:
        return None
    statement = statements[0]
    return statement if isinstance(statement, exp.Query) else None


def is_sql_only(response: str) -> bool:
    """The response is one SQL query and nothing else: no prose around it, no fence, no second statement."""
    return single_query(response.strip()) is not None


def normalize_sql(sql: str) -> str:
    """Canonical text for exact match: sqlglot re-prints the query, which fixes whitespace, keyword case,
    identifier/string quote style, and drops a trailing semicolon. Unparseable SQL keeps its stripped text."""
    query = single_query(sql.strip())
    if query is None:
        return " ".join(sql.strip().rstrip(";").split())
    return query.sql(dialect=DIALECT, normalize=False, pretty=False)


def exact_match(predicted: str, gold: str) -> bool:
    return normalize_sql(predicted) == normalize_sql(gold)
