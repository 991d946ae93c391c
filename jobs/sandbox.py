"""Untrusted SQL, run read-only in SQLite; and execution accuracy, test-suite style.

A prediction is scored by running it and the gold query on a few small random databases built from the example's
CREATE TABLE context. The rows are seeded with the gold query's literals and near misses of them, so its WHERE
clauses select something and a wrong operator or literal shows; the prediction matches when it returns the same
rows as the gold query on every database.

Predicted SQL runs under an authorizer that allows reading only, a wall-clock limit and a row limit. Memory is
bounded by those, by SQLite's cap on one value's length and by a cap on the bytes fetched; SQLite's own heap limit
(PRAGMA hard_heap_limit) is process-wide, so it is left alone. One long-running built-in call (a huge LIKE, say)
cannot be interrupted mid-call, but its inputs are capped in length.
"""

from __future__ import annotations

import functools
import random
import sqlite3
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from sqlglot import exp

from jobs import sqlcheck
from jobs.errors import T2SError
from jobs.sqlcheck import DIALECT, Table

OUTCOMES = ("match", "mismatch", "pred_error", "pred_timeout", "pred_refused", "gold_error", "not_sql")

# Functions a query may call: SQLite's core, aggregate, window, date and math functions. Left out on purpose:
# load_extension, random/randomblob/zeroblob (nondeterminism, memory), sqlite_* and changes-style introspection.
SAFE_FUNCTIONS = frozenset("""
    abs avg char coalesce concat concat_ws count cume_dist date datetime dense_rank first_value format glob
    group_concat hex ifnull iif instr julianday lag last_value lead length like likelihood likely lower ltrim max
    min nth_value ntile nullif octet_length percent_rank printf quote rank replace round row_number rtrim sign
    string_agg strftime substr substring sum time total trim typeof unicode unixepoch unlikely upper
    acos asin atan atan2 ceil ceiling cos degrees exp floor ln log log10 log2 mod pi pow power radians sin sqrt tan
    trunc
""".split())
READ_ACTIONS = (sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_RECURSIVE)
ACTION_NAMES = {getattr(sqlite3, f"SQLITE_{name}"): name.replace("_", " ") for name in (
    "ATTACH", "DETACH", "PRAGMA", "INSERT", "UPDATE", "DELETE", "TRANSACTION", "SAVEPOINT", "ANALYZE", "REINDEX",
    "ALTER_TABLE", "CREATE_TABLE", "CREATE_TEMP_TABLE", "CREATE_VIEW", "CREATE_TEMP_VIEW", "CREATE_INDEX",
    "CREATE_TRIGGER", "CREATE_VTABLE", "DROP_TABLE", "DROP_TEMP_TABLE", "DROP_VIEW", "DROP_TEMP_VIEW",
    "DROP_INDEX", "DROP_TRIGGER", "DROP_VTABLE")}
# Statements that are SQL but not queries: run (and refused) rather than scored as prose.
STATEMENTS = tuple(getattr(exp, name) for name in (
    "Query", "DDL", "DML", "Command", "Pragma", "Attach", "Detach", "Drop", "Alter", "Transaction", "Commit",
    "Rollback") if hasattr(exp, name))  # older sqlglot lacks some and parses those statements as Command

PROGRESS_STEPS = 1000  # SQLite VM instructions between wall-clock checks
FETCH_BATCH = 100
MAX_VALUE_BYTES = 100_000  # longest string or blob a query may build
MAX_RESULT_BYTES = 50_000_000
# Few values, so joins and GROUP BY find partners; digit strings so a VARCHAR key joins an INTEGER one.
TEXT_WORDS = ("alpha", "beta", "gamma", "delta", "1", "2", "3")
SMALL_INTS = tuple(range(10))
FLIPPED = {exp.GT: exp.LT, exp.LT: exp.GT, exp.GTE: exp.LTE, exp.LTE: exp.GTE}
ATTEMPTS = 5  # fresh draws of one database until the gold query returns something besides nothing, 0 or NULL


class QueryError(Exception):
    """A query that did not run to the end in the sandbox; str() is a short reason."""


class QueryRefused(QueryError):
    """The query tried something besides reading: a write, ATTACH, PRAGMA, an unsafe function."""


class QueryTimeout(QueryError):
    """The query ran past its time limit."""


class QueryFailed(QueryError):
    """SQLite rejected or failed the query, or its result was over the row or size limit."""


class Planted(NamedTuple):
    hits: list  # values the gold query's conditions look for
    misses: list  # values close to them that they should not select


@dataclass(frozen=True)
class ExecResult:
    outcome: str  # one of OUTCOMES
    detail: str = ""


def run_readonly(conn: sqlite3.Connection, sql: str, timeout_s: float, row_limit: int) -> list[tuple]:
    """Rows of one statement run with reading allowed only, under a wall-clock limit and a row limit.
    Raises QueryRefused, QueryTimeout or QueryFailed. The connection's handlers are removed afterwards."""
    refused: list[str] = []
    timed_out = False
    deadline = time.monotonic() + timeout_s

    def authorize(action, arg1, arg2, db_name, trigger):
        if action in READ_ACTIONS or (action == sqlite3.SQLITE_FUNCTION and arg2.lower() in SAFE_FUNCTIONS):
            return sqlite3.SQLITE_OK
        what = f"{arg2}()" if action == sqlite3.SQLITE_FUNCTION else f"{ACTION_NAMES.get(action, action)} {arg1 or ''}"
        refused.append(what.strip())  # e.g. "DELETE singer", "ATTACH /tmp/x.db", "load_extension()"
        return sqlite3.SQLITE_DENY

    def past_deadline():
        nonlocal timed_out
        timed_out = time.monotonic() > deadline
        return timed_out

    if hasattr(conn, "enable_load_extension"):  # absent when Python's sqlite3 was built without extensions
        conn.enable_load_extension(False)
    # Python 3.10 (the CUDA 11.8 image) has no setlimit: there the result-size cap below still holds.
    old_length = conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES) if hasattr(conn, "setlimit") else None
    conn.set_authorizer(authorize)
    conn.set_progress_handler(past_deadline, PROGRESS_STEPS)
    try:
        cursor = conn.execute(sql)
        rows, size = [], 0
        while batch := cursor.fetchmany(FETCH_BATCH):
            rows.extend(batch)
            size += sum(len(value) for row in batch for value in row if isinstance(value, (str, bytes)))
            if len(rows) > row_limit:
                raise QueryFailed(f"exceeds row limit of {row_limit}")
            if size > MAX_RESULT_BYTES:
                raise QueryFailed(f"result exceeds {MAX_RESULT_BYTES // 1_000_000} MB")
        return rows
    except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError) as error:
        if refused:
            raise QueryRefused(f"{refused[0]} is not allowed") from None
        if timed_out:
            raise QueryTimeout(f"ran past {timeout_s:g} s") from None
        raise QueryFailed(str(error).splitlines()[0] if str(error) else type(error).__name__) from None
    finally:
        conn.set_progress_handler(None, 0)
        # Python 3.10 (the CUDA 11.8 image) takes None as an authorizer that denies everything
        conn.set_authorizer(None if sys.version_info >= (3, 11) else lambda *_: sqlite3.SQLITE_OK)
        if old_length is not None:
            conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, old_length)


def execution_match(context: str, gold_sql: str, predicted_sql: str, *, databases: int = 3,
                    rows_per_table: int = 8, seed: int = 0, timeout_s: float = 1.0,
                    row_limit: int = 10_000) -> ExecResult:
    """Whether the prediction returns the gold query's rows on every generated database: as ordered lists when the
    gold query ends in ORDER BY, as multisets otherwise; numbers compare by value (1 == 1.0)."""
    try:
        conns = build_databases(context, gold_sql, databases, rows_per_table, seed)
    except ValueError as error:
        return ExecResult("gold_error", str(error))
    try:
        expected = []
        for conn in conns:
            try:
                expected.append(run_readonly(conn, gold_sql, timeout_s, row_limit))
            except QueryError as error:
                return ExecResult("gold_error", f"gold: {error}")
        statements = None if predicted_sql.lstrip().startswith("```") else sqlcheck.parse_statements(predicted_sql)
        if not statements or len(statements) != 1 or not isinstance(statements[0], STATEMENTS):
            return ExecResult("not_sql", "not one SQL statement")
        ordered = sqlcheck.single_query(gold_sql).args.get("order") is not None
        for index, (conn, gold_rows) in enumerate(zip(conns, expected)):
            try:
                rows = run_readonly(conn, predicted_sql.strip(), timeout_s, row_limit)
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
    Raises ValueError when the context is not CREATE TABLE statements or the gold is not one query."""
    tables = sqlcheck.parse_schema(context)
    gold = sqlcheck.single_query(gold_sql)
    if tables is None:
        raise ValueError("context is not CREATE TABLE statements")
    if gold is None:
        raise ValueError("gold is not one SQL query")
    tables = merge_duplicate_tables(tables)
    planted = planted_values(gold, tables)
    databases = []
    for index in range(n):
        for attempt in range(ATTEMPTS):
            conn = random_database(tables, planted, rows_per_table, random.Random(f"{seed}/{index}/{attempt}"))
            try:
                informative = any(v not in (None, 0, "") for row in run_readonly(conn, gold_sql, 1.0, 10_000)
                                  for v in row)
            except QueryError:
                informative = True  # the gold fails on any rows: execution_match reports it as gold_error
            if informative or attempt == ATTEMPTS - 1:
                break
            conn.close()
        databases.append(conn)
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
    conn = sqlite3.connect(":memory:")
    for table, (create_sql, insert_sql) in zip(tables, table_statements(tuple(tables))):
        conn.execute(create_sql)
        conn.executemany(insert_sql, table_rows(table, planted, rows_per_table, rng))
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
        columns = [exp.ColumnDef(this=exp.to_identifier(name),
                                 kind=exp.DataType.build(type_, dialect=DIALECT, udt=True) if type_ else None)
                   for name, type_ in table.columns]
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


def query_features(gold_sql: str) -> dict:
    """Facts about a gold query for the report's per-bucket breakdown; {} when it is not one query."""
    query = sqlcheck.single_query(gold_sql)
    if query is None:
        return {}
    cte_names = {cte.alias_or_name.lower() for cte in query.find_all(exp.CTE)}
    return {
        "tables": len({table.name.lower() for table in query.find_all(exp.Table)} - cte_names),
        "join": query.find(exp.Join) is not None,
        "aggregate": query.find(exp.AggFunc) is not None,
        "group": query.find(exp.Group) is not None,
        "order": query.find(exp.Order) is not None,
        "nested": query.find(exp.Subquery) is not None,
        "set_operation": query.find(exp.Union, exp.Intersect, exp.Except) is not None,
        "conditions": len(sqlcheck.comparisons(query)),
    }


def schema_from_sqlite(path: str | Path) -> str:
    """The tables of a SQLite file as a context string in the training format, `CREATE TABLE name (column TYPE, ...)`
    joined by "; ", with declared types and no constraints. The file is opened read-only."""
    file = Path(path)
    if not file.is_file():
        raise T2SError(f"{path}: no such file; pass --db the path of a SQLite database file")
    try:
        conn = sqlite3.connect(f"{file.resolve().as_uri()}?mode=ro", uri=True)
        try:
            names = [name for (name,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY rowid")]
            tables = {name: conn.execute("SELECT name, type FROM pragma_table_info(?)", (name,)).fetchall()
                      for name in names}
        finally:
            conn.close()
    except sqlite3.DatabaseError as error:
        raise T2SError(f"{path}: not a readable SQLite database ({error}); pass --db a SQLite file") from None
    if not tables:
        raise T2SError(f"{path}: the database has no tables; pass --db a SQLite file with tables")
    return "; ".join(
        f"CREATE TABLE {identifier(name)} ({', '.join(f'{identifier(c)} {t}'.strip() for c, t in columns)})"
        for name, columns in tables.items())


def identifier(name: str) -> str:
    """A name as the training contexts write it: bare, quoted only where it must be."""
    return exp.to_identifier(name).sql(dialect=DIALECT)
