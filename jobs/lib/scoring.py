"""How eval scores one answer: SQL-only, exact match, and execution accuracy, test-suite style.

A prediction is scored by running it and the gold query on a few small random databases built from the example's
CREATE TABLE context. The rows are seeded with the gold query's literals and near misses of them, so its WHERE
clauses select something and a wrong operator or literal shows; the prediction matches when it returns the same
rows as the gold query on every database. Queries run through jobs.lib.sandbox.run_readonly; eval calls score_answer
in a jobs.lib.sandbox.Sandbox worker, so their limits hold whatever the SQL does.
"""

from __future__ import annotations

import functools
import random
import sqlite3
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import NamedTuple

from sqlglot import exp
from sqlglot.errors import SqlglotError

from jobs.lib import sqlcheck
from jobs.lib.sandbox import QueryError, QueryFailed, QueryRefused, QueryTimeout, run_readonly, working_on
from jobs.lib.sqlcheck import DIALECT, Table

# gold_error: the gold query does not run on the example's tables; build_error: SQLite cannot hold the tables or
# the values the gold query looks for. Neither counts in execution accuracy.
OUTCOMES = ("match", "mismatch", "pred_error", "pred_timeout", "pred_refused", "gold_error", "build_error", "not_sql")
# Statements that are SQL but not queries: run (and refused) rather than scored as prose.
STATEMENTS = tuple(getattr(exp, name) for name in (
    "Query", "DDL", "DML", "Command", "Pragma", "Attach", "Detach", "Drop", "Alter", "Transaction", "Commit",
    "Rollback") if hasattr(exp, name))  # older sqlglot lacks some and parses those statements as Command

# Few values, so joins and GROUP BY find partners; digit strings so a VARCHAR key joins an INTEGER one.
TEXT_WORDS = ("alpha", "beta", "gamma", "delta", "1", "2", "3")
SMALL_INTS = tuple(range(10))
FLIPPED = {exp.GT: exp.LT, exp.LT: exp.GT, exp.GTE: exp.LTE, exp.LTE: exp.GTE}
ATTEMPTS = 5  # fresh draws of one database until the gold query returns something besides nothing, 0 or NULL


class BuildError(Exception):
    """SQLite cannot hold the example's tables or the values planted in them; str() says which and why."""


class Planted(NamedTuple):
    hits: list  # values the gold query's conditions look for
    misses: list  # values close to them that they should not select


@dataclass(frozen=True)
class ExecResult:
    outcome: str  # one of OUTCOMES
    detail: str = ""


def score_answer(context: str, gold_sql: str, response: str, seed: int, *, databases: int, rows_per_table: int,
                 timeout_s: float, row_limit: int) -> dict:
    """One answer's scores: SQL-only, exact match, and its execution outcome against the gold query."""
    working_on("answer")  # parsing it first: an answer that hangs the parser is the model's failure
    scores = {"sql_only": sqlcheck.is_sql_only(response), "exact_match": sqlcheck.exact_match(response, gold_sql)}
    execution = execution_match(context, gold_sql, response, databases=databases, rows_per_table=rows_per_table,
                                seed=seed, timeout_s=timeout_s, row_limit=row_limit)
    return {**scores, "execution": execution.outcome, "execution_detail": execution.detail}


def score_after_kill(task: tuple, error: QueryError) -> dict:
    """score_answer's result for a task (context, gold, response, seed) that a Sandbox killed or lost: what the
    worker was working on decides the outcome (error.role: "answer" for parsing it, "prediction" for running it,
    "gold", or "databases" for building them)."""
    _, gold_sql, response, _ = task
    failed = "pred_timeout" if isinstance(error, QueryTimeout) else "pred_error"
    if error.role == "answer":  # not parsed here again: it is what hung or exhausted the worker
        return {"sql_only": False, "exact_match": False, "execution": failed,
                "execution_detail": f"parsing the answer: {error}"}
    if error.role == "prediction":
        execution = ExecResult(failed, str(error))
    elif error.role == "gold":
        execution = ExecResult("gold_error", f"gold: {error}")
    else:
        execution = ExecResult("build_error", f"building the databases: {error}")
    # the worker parsed the answer before it ran anything, so parsing it here again is safe
    return {"sql_only": sqlcheck.is_sql_only(response), "exact_match": sqlcheck.exact_match(response, gold_sql),
            "execution": execution.outcome, "execution_detail": execution.detail}


def execution_match(context: str, gold_sql: str, predicted_sql: str, *, databases: int = 3,
                    rows_per_table: int = 8, seed: int = 0, timeout_s: float = 1.0,
                    row_limit: int = 10_000) -> ExecResult:
    """Whether the prediction returns the gold query's rows on every generated database: as ordered lists when the
    gold query ends in ORDER BY, as multisets otherwise; numbers compare by value (1 == 1.0)."""
    working_on("databases")
    try:
        conns = build_databases(context, gold_sql, databases, rows_per_table, seed)
    except BuildError as error:
        return ExecResult("build_error", str(error))
    except ValueError as error:
        return ExecResult("gold_error", str(error))
    try:
        expected = []
        for conn in conns:
            try:
                expected.append(run_readonly(conn, gold_sql, timeout_s, row_limit, role="gold").rows)
            except QueryError as error:
                return ExecResult("gold_error", f"gold: {error}")
        working_on("prediction")
        statements = sqlcheck.parse_statements(predicted_sql)
        if not statements or len(statements) != 1 or not isinstance(statements[0], STATEMENTS):
            return ExecResult("not_sql", "not one SQL statement")
        ordered = sqlcheck.single_query(gold_sql).args.get("order") is not None
        for index, (conn, gold_rows) in enumerate(zip(conns, expected)):
            try:
                rows = run_readonly(conn, predicted_sql.strip(), timeout_s, row_limit, role="prediction").rows
            except QueryRefused as error:
                return ExecResult("pred_refused", str(error))
            except QueryTimeout as error:
                return ExecResult("pred_timeout", str(error))
            except QueryFailed as error:
                return ExecResult("pred_error", str(error))
            if not same_rows(gold_rows, rows, ordered):
                return ExecResult("mismatch", f"database {index}: gold gave {len(gold_rows)} rows, "
                                              f"prediction {len(rows)}{' (in order)' if ordered else ''}")
        return ExecResult("match")
    finally:
        for conn in conns:
            conn.close()


def same_rows(expected: list[tuple], got: list[tuple], ordered: bool) -> bool:
    expected, got = [comparable(row) for row in expected], [comparable(row) for row in got]
    return expected == got if ordered else Counter(expected) == Counter(got)


def comparable(row: tuple) -> tuple:
    """Numbers as rounded floats: 1 equals 1.0, and sums added up in another order still agree."""
    return tuple(round(float(v), 6) if isinstance(v, (int, float)) else v for v in row)


def build_databases(context: str, gold_sql: str, n: int, rows_per_table: int, seed: int) -> list[sqlite3.Connection]:
    """`n` in-memory databases with the context's tables, filled with random rows typed by column type that include
    the gold query's literals and near misses of them; the same for the same seed. A database on which the gold
    query returns nothing informative is drawn again, a few times at most.
    Raises ValueError when the context is not CREATE TABLE statements or the gold is not one query, BuildError
    when SQLite cannot hold the tables or their values."""
    tables = sqlcheck.parse_schema(context)
    gold = sqlcheck.single_query(gold_sql)
    if tables is None:
        raise ValueError("context is not CREATE TABLE statements")
    if gold is None:
        raise ValueError("gold is not one SQL query")
    tables = merge_duplicate_tables(tables)
    planted = planted_values(gold, tables)
    databases = []
    try:
        for index in range(n):
            for attempt in range(ATTEMPTS):
                conn = random_database(tables, planted, rows_per_table, random.Random(f"{seed}/{index}/{attempt}"))
                try:
                    informative = any(v not in (None, 0, "") for row in
                                      run_readonly(conn, gold_sql, 1.0, 10_000, role="gold").rows for v in row)
                except QueryError:
                    informative = True  # the gold fails on any rows: execution_match reports it as gold_error
                if informative or attempt == ATTEMPTS - 1:
                    break
                conn.close()
            databases.append(conn)
    except BuildError:
        for conn in databases:
            conn.close()
        raise
    return databases


def merge_duplicate_tables(tables: list[Table]) -> list[Table]:
    """One table per name, with the columns of all its declarations: some dataset contexts declare a table twice."""
    merged: dict[str, tuple[str, dict[str, tuple[str, str]]]] = {}
    for table in tables:
        _, columns = merged.setdefault(table.name.lower(), (table.name, {}))
        for name, type_ in table.columns:
            columns.setdefault(name.lower(), (name, type_))
    return [Table(name, tuple(columns.values())) for name, columns in merged.values()]


def planted_values(gold: exp.Expression, tables: list[Table]) -> dict[str, Planted]:
    """Values worth planting per column (lower-cased name): the literals the gold query compares the column with
    (for a LIKE pattern, strings that match it) and near misses of them, so a wrong operator or literal shows."""
    columns = {name.lower() for table in tables for name, _ in table.columns}
    planted: dict[str, Planted] = defaultdict(lambda: Planted([], []))
    for operator, left, right in sqlcheck.comparisons(gold):
        kind = type(operator)
        if not is_column(left, columns):
            left, right, kind = right, left, FLIPPED.get(kind, kind)  # `5 < x` reads as `x > 5`
        value = literal_value(right, columns)
        if not is_column(left, columns) or value is None:
            continue
        hits, misses = planted[left.name.lower()]
        if kind in (exp.Like, exp.ILike) and isinstance(value, str):
            hits += [value.replace("%", "").replace("_", "x"), value.replace("%", " z ").replace("_", "x")]
        elif isinstance(value, str):
            hits.append(value)
            misses += [f"{value} x", value.upper() if value.upper() != value else value.lower()]
        elif kind in (exp.GT, exp.LT):  # the literal itself tells `>` from `>=`
            hits.append(value + 1 if kind is exp.GT else value - 1)
            misses.append(value)
        else:
            hits.append(value)
            misses += [value - 1, value + 1, f"{value} x"]  # the string shows `= 5` against `LIKE '%5%'`
    return planted


def is_column(node: exp.Expression, columns: set[str]) -> bool:
    return isinstance(node, exp.Column) and node.name.lower() in columns


def literal_value(node: exp.Expression, columns: set[str]) -> str | int | float | None:
    """The value of a literal, a negated number, or a double-quoted name that SQLite reads as a string."""
    if sqlcheck.is_quoted_name(node) and node.name.lower() not in columns:
        return node.name
    negative = isinstance(node, exp.Neg)
    if negative:
        node = node.this
    if not isinstance(node, exp.Literal):
        return None
    if node.is_string:
        return None if negative else node.this
    try:
        number = int(node.this)
    except ValueError:
        try:
            number = float(node.this)
        except ValueError:
            return None
    return -number if negative else number


def random_database(tables: list[Table], planted: dict[str, Planted], rows_per_table: int,
                    rng: random.Random) -> sqlite3.Connection:
    """An in-memory database with the tables and their random rows. Raises BuildError when SQLite refuses a
    table (a reserved name, too many columns, a type it cannot parse) or a value (an integer beyond 64 bits)."""
    conn = sqlite3.connect(":memory:")
    try:
        for table, (create_sql, insert_sql) in zip(tables, table_statements(tuple(tables))):
            try:
                conn.execute(create_sql)
            except sqlite3.Error as error:
                raise BuildError(f"SQLite cannot create table {table.name} ({error})") from None
            try:
                conn.executemany(insert_sql, table_rows(table, planted, rows_per_table, rng))
            except OverflowError:
                raise BuildError(f"SQLite cannot store the rows of table {table.name} (an integer the gold query "
                                 "looks for is beyond SQLite's 64 bits)") from None
            except sqlite3.Error as error:
                raise BuildError(f"SQLite cannot store the rows of table {table.name} ({error})") from None
    except BuildError:
        conn.close()
        raise
    conn.commit()
    return conn


def table_rows(table: Table, planted: dict[str, Planted], count: int, rng: random.Random) -> list[list]:
    """A row with a value each condition looks for, the same row again (so DISTINCT shows), then for each planted
    column a row like it but with a near miss there and fresh values in unplanted columns (so each condition is
    tested on its own, and MIN/MAX/SUM see other values), then random rows."""
    columns = [(type_, planted.get(name.lower())) for name, type_ in table.columns]
    hit_row = [rng.choice(values.hits) if values else random_value(type_, None, rng) for type_, values in columns]
    near_rows = [[rng.choice(values.misses) if j == i else hit if values else random_value(type_, None, rng)
                  for j, ((type_, values), hit) in enumerate(zip(columns, hit_row))]
                 for i, (_, values) in enumerate(columns) if values and values.misses]
    random_rows = [[random_value(type_, values, rng) for type_, values in columns] for _ in range(count)]
    return ([hit_row, hit_row] + near_rows + random_rows)[:count]


@functools.lru_cache(maxsize=64)  # the same tables are created for every database of an example
def table_statements(tables: tuple[Table, ...]) -> tuple[tuple[str, str], ...]:
    """(CREATE TABLE, INSERT with placeholders) for each table, printed by sqlglot for SQLite."""
    statements = []
    for table in tables:
        try:
            columns = [exp.ColumnDef(this=exp.to_identifier(name),
                                     kind=exp.DataType.build(type_, dialect=DIALECT, udt=True) if type_ else None)
                       for name, type_ in table.columns]
        except (SqlglotError, ValueError) as error:
            raise BuildError(f"the column types of table {table.name} do not parse ({error})") from None
        name = exp.Table(this=exp.to_identifier(table.name))
        create = exp.Create(kind="TABLE", this=exp.Schema(this=name, expressions=columns))
        placeholders = ", ".join("?" for _ in table.columns)
        statements.append((create.sql(dialect=DIALECT, identify=True),
                           f"INSERT INTO {name.sql(dialect=DIALECT, identify=True)} VALUES ({placeholders})"))
    return tuple(statements)


def random_value(type_: str, planted: Planted | None, rng: random.Random):
    if planted and rng.random() < 0.8:
        return rng.choice(planted.hits if not planted.misses or rng.random() < 0.5 else planted.misses)
    affinity = type_.upper()  # SQLite's affinity rules look for these substrings in the declared type
    if "INT" in affinity:
        return rng.choice(SMALL_INTS)
    if any(part in affinity for part in ("REAL", "FLOA", "DOUB", "NUM", "DEC")):
        return rng.choice(SMALL_INTS) + rng.choice((0.0, 0.5))
    return rng.choice(TEXT_WORDS)
