"""Execution accuracy, exactly: which predictions match the gold query on the generated databases, and why not."""

import json
import os
import time
from collections import Counter
from pathlib import Path

import pytest

from jobs.lib.sandbox import QueryFailed, QueryTimeout
from jobs.lib.scoring import OUTCOMES, build_databases, execution_match, score_after_kill, score_answer

CONTEXT = "CREATE TABLE singer (name VARCHAR, age INTEGER, country VARCHAR, singer_id INTEGER); " \
          "CREATE TABLE song (title VARCHAR, singer_id INTEGER, sales INTEGER)"
GOLD = 'SELECT name FROM singer WHERE country = "France" AND age > 30'
SHARED = Path(__file__).resolve().parents[2] / "shared"
VALIDATION = SHARED / "data" / "sql-create-context" / "validation.jsonl"


def outcome(predicted, gold=GOLD, context=CONTEXT, **kwargs):
    return execution_match(context, gold, predicted, **kwargs).outcome


@pytest.mark.parametrize("predicted", [
    GOLD,
    "select  T1.name\nfrom singer as T1\nwhere T1.country = 'France' and T1.age > 30;",  # alias, whitespace, quotes
    "SELECT name FROM singer WHERE age > 30 AND country = 'France'",
    "SELECT s.name FROM singer s WHERE 30 < s.age AND s.country IN ('France')",
])
def test_equivalent_queries_match(predicted):
    assert outcome(predicted) == "match"


@pytest.mark.parametrize("predicted", [
    "SELECT name FROM singer WHERE country = 'Spain' AND age > 30",  # another literal
    "SELECT name FROM singer WHERE country = 'france' AND age > 30",  # literal case
    "SELECT name FROM singer WHERE country = 'France' AND age >= 30",  # an operator off by one
    "SELECT name FROM singer WHERE country LIKE '%France%' AND age > 30",  # = against LIKE
    "SELECT name FROM singer WHERE country = 'France'",  # a condition missing
    "SELECT name, age FROM singer WHERE country = 'France' AND age > 30",  # a column too many
    "SELECT DISTINCT name FROM singer WHERE country = 'France' AND age > 30",
])
def test_different_queries_mismatch(predicted):
    assert outcome(predicted) == "mismatch"


def test_numbers_compare_by_value():
    gold = "SELECT COUNT(*), SUM(sales) FROM song"
    assert outcome("SELECT COUNT(*) * 1.0, SUM(sales) + 0.0 FROM song", gold) == "match"
    assert outcome("SELECT COUNT(*), AVG(sales) FROM song", gold) == "mismatch"


def test_order_matters_only_when_gold_orders():
    ordered = "SELECT name FROM singer ORDER BY age, name"
    assert outcome("SELECT name FROM singer ORDER BY age, name", ordered) == "match"
    assert outcome("SELECT name FROM singer ORDER BY age DESC, name DESC", ordered) == "mismatch"
    assert outcome("SELECT name FROM singer", ordered) == "mismatch"
    assert outcome("SELECT name FROM singer ORDER BY age DESC", "SELECT name FROM singer") == "match"


def test_results_must_agree_on_every_database():
    gold = "SELECT title FROM song WHERE sales > 5"
    # equal on the first database only when its rows happen to agree: three databases tell them apart
    assert outcome("SELECT title FROM song WHERE sales > 5 LIMIT 2", gold, databases=1, rows_per_table=2) == "match"
    assert outcome("SELECT title FROM song WHERE sales > 5 LIMIT 2", gold) == "mismatch"


def test_gold_that_fails_is_its_own_bucket():
    broken = "SELECT nickname FROM singer"  # no such column: a dataset quirk, not the model's fault
    assert outcome("SELECT name FROM singer", broken) == "gold_error"
    assert outcome("I don't know", broken) == "gold_error"
    assert outcome("SELECT name FROM singer", GOLD, context="CREATE TABLE") == "gold_error"


@pytest.mark.parametrize("predicted", [
    f"Here is the query: {GOLD}",
    f"```sql\n{GOLD}\n```",
    f"{GOLD}; SELECT 1",
    "France",
    "",
])
def test_prose_fences_and_two_statements_are_not_sql(predicted):
    assert outcome(predicted) == "not_sql"


@pytest.mark.parametrize("predicted", [
    "DELETE FROM singer",
    "DROP TABLE singer",
    "ATTACH DATABASE ':memory:' AS other",
    "PRAGMA table_info(singer)",
    "SELECT load_extension('/tmp/evil.so')",
])
def test_writes_attach_pragma_and_extensions_are_refused(predicted):
    assert outcome(predicted) == "pred_refused"


def test_an_endless_recursive_cte_times_out_fast():
    endless = "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT COUNT(*) FROM n"
    started = time.monotonic()
    result = execution_match(CONTEXT, GOLD, endless, timeout_s=0.2)
    assert (result.outcome, time.monotonic() - started < 2) == ("pred_timeout", True)


def test_a_huge_cross_join_times_out():
    cross = "SELECT COUNT(*) FROM " + ", ".join(f"singer AS s{i}" for i in range(10))  # 8 ** 10 rows
    assert outcome(cross, timeout_s=0.2) == "pred_timeout"


def test_too_many_rows_is_a_scored_failure():
    endless = "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT x FROM n"
    result = execution_match(CONTEXT, GOLD, endless, row_limit=1000)
    assert (result.outcome, result.detail) == ("pred_error", "exceeds row limit of 1000")


@pytest.mark.parametrize("context, gold, reason", [
    ("CREATE TABLE t (a INTEGER)", "SELECT a FROM t WHERE a = 99999999999999999999",
     "SQLite cannot store the rows of table t (an integer the gold query looks for is beyond SQLite's 64 bits)"),
    ("CREATE TABLE sqlite_stat (a INTEGER)", "SELECT a FROM sqlite_stat",
     "SQLite cannot create table sqlite_stat (object name reserved for internal use: sqlite_stat)"),
    ("CREATE TABLE t (" + ", ".join(f"c{i} INTEGER" for i in range(2001)) + ")", "SELECT c1 FROM t",
     "SQLite cannot create table t (too many columns on t)"),
    ("CREATE TABLE t ()", "SELECT 1 FROM t", "SQLite cannot create table t (incomplete input)"),
    ("CREATE TABLE t (a ENUM('x', 'y'))", "SELECT a FROM t WHERE a = 'x'",
     "SQLite cannot create table t (near \"'x'\": syntax error)"),
])
def test_tables_sqlite_cannot_hold_are_a_build_error_with_the_reason(context, gold, reason):
    result = execution_match(context, gold, gold)
    assert (result.outcome, result.detail) == ("build_error", reason)


def test_score_answer_gives_every_score_of_one_answer():
    settings = {"databases": 3, "rows_per_table": 8, "timeout_s": 1.0, "row_limit": 100}
    assert score_answer(CONTEXT, GOLD, "SELECT name FROM singer WHERE age > 30 AND country = 'France'", 0,
                        **settings) == {"sql_only": True, "exact_match": False, "execution": "match",
                                        "execution_detail": ""}
    assert score_answer(CONTEXT, GOLD, f"```sql\n{GOLD}\n```", 0, **settings) == {
        "sql_only": False, "exact_match": False, "execution": "not_sql", "execution_detail": "not one SQL statement"}


@pytest.mark.parametrize("role, error, outcome, detail", [
    ("prediction", QueryTimeout("ran past 1 s"), "pred_timeout", "ran past 1 s"),
    ("prediction", QueryFailed("out of memory"), "pred_error", "out of memory"),
    ("gold", QueryTimeout("ran past 1 s"), "gold_error", "gold: ran past 1 s"),
    ("databases", QueryTimeout("its work between queries ran past 60 s"), "build_error",
     "building the databases: its work between queries ran past 60 s"),
])
def test_a_killed_task_is_scored_by_what_its_worker_was_doing(role, error, outcome, detail):
    error.role = role
    assert score_after_kill((CONTEXT, GOLD, GOLD, 0), error) == {
        "sql_only": True, "exact_match": True, "execution": outcome, "execution_detail": detail}


def test_an_answer_that_hangs_the_parser_is_not_parsed_again_after_the_kill():
    error = QueryTimeout("its work between queries ran past 60 s")
    error.role = "answer"
    assert score_after_kill((CONTEXT, GOLD, GOLD, 0), error) == {
        "sql_only": False, "exact_match": False, "execution": "pred_timeout",
        "execution_detail": "parsing the answer: its work between queries ran past 60 s"}


def test_databases_are_deterministic_and_hold_the_gold_literals():
    def dump(conns):
        return [conn.execute("SELECT * FROM singer").fetchall() for conn in conns]

    first = build_databases(CONTEXT, GOLD, 3, 8, seed=7)
    assert dump(first) == dump(build_databases(CONTEXT, GOLD, 3, 8, seed=7))
    assert dump(first) != dump(build_databases(CONTEXT, GOLD, 3, 8, seed=8))
    for conn in first:
        assert conn.execute(GOLD).fetchall()  # the WHERE clause selects something on every database
        countries = {country for (country,) in conn.execute("SELECT country FROM singer")}
        assert "France" in countries and countries & {"France x", "FRANCE"}  # and near misses are there
        assert [row[0] for row in conn.execute("SELECT typeof(age) FROM singer")] == ["integer"] * 8


@pytest.mark.skipif(not VALIDATION.exists() and os.environ.get("CI") != "true",
                    reason=f"{VALIDATION} is absent (set CI=true to make this an error)")
def test_gold_matches_itself_on_the_real_validation_rows():
    rows = [json.loads(line) for line in VALIDATION.read_text().splitlines()]
    started = time.monotonic()
    outcomes = Counter(execution_match(row["context"], row["answer"], row["answer"]).outcome for row in rows)
    print(f"\n{len(rows)} rows, gold against gold in {time.monotonic() - started:.1f} s: {dict(outcomes)}")
    assert set(outcomes) <= {"match", "gold_error"} and set(OUTCOMES) >= set(outcomes)
    assert outcomes["match"] / len(rows) >= 0.98  # measured 1083 of 1090 (99.4%); the rest are b-mc2 quirks
