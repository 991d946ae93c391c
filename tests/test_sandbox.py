"""The SQL sandbox: the read-only runner exactly, and its limits against hostile SQL, through both of its users
(eval's scoring and `t2s ask --run`): time bound held, memory bound held, nothing written beside the database."""

import hashlib
import resource
import sqlite3
import sys
import time
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jobs import ask, ask_command, eval as eval_job
from jobs.lib import sandbox
from tests import sandbox_tasks
from jobs.cli import app
from jobs.lib.config import EvalConfig
from jobs.lib.errors import T2SError
from jobs.lib.generate import Generation
from jobs.lib.sandbox import (KILL_GRACE_S, WORKER_MEMORY_BYTES, QueryFailed, QueryRefused, QueryRows, QueryTimeout,
                          Sandbox, run_readonly, schema_from_sqlite)
from jobs.lib.scoring import execution_match
from jobs.lib.sqlcheck import parse_schema

CONTEXT = "CREATE TABLE singer (name VARCHAR, age INTEGER, country VARCHAR, singer_id INTEGER)"
GOLD = "SELECT name FROM singer WHERE age > 30"


def cte_chain(depth: int) -> str:
    """CTEs each reading the one before twice: SQLite expands the statement while it prepares it, before any
    progress handler can run."""
    steps = [f"c{i}(x) AS (SELECT x FROM c{i - 1} UNION ALL SELECT x FROM c{i - 1})" for i in range(1, depth + 1)]
    return f"WITH c0(x) AS (SELECT 1), {', '.join(steps)} SELECT count(*) FROM c{depth}"


PRINTF_BOMB = " UNION ALL ".join(["SELECT printf('%.*c', 2147483647, 'x')"] * 6)  # each call one long C loop
# 100 rows of 130 copies of a 99,000-character string: 1.3 GB, each value under SQLite's length limit
BIG_RESULT = ("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n LIMIT 100), "
              "b(s) AS (SELECT printf('%.*c', 99000, 'x')) SELECT " + ",".join(["s"] * 130) + " FROM n, b")
# one row of 13 values of 100 MB: Python 3.10 has no setlimit, so only the memory cap stops it there
WIDE_ROW = "WITH b(s) AS (SELECT printf('%.*c', 100000000, 'x')) SELECT " + ",".join(["s"] * 13) + " FROM b"


@pytest.fixture
def conn():
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE singer (name TEXT, age INTEGER)")
    conn.executemany("INSERT INTO singer VALUES (?, ?)", [("Ann", 31), ("Bob", 25)])
    conn.commit()
    yield conn
    conn.close()


@pytest.fixture
def songs_db(tmp_path) -> Path:
    path = tmp_path / "songs.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE songs (title VARCHAR, year INTEGER)")
        db.executemany("INSERT INTO songs VALUES (?, ?)", [("blue", 1999), ("river", 2005)])
    db.close()
    return path


def folder_state(folder: Path) -> dict[str, str]:
    """Every file in a folder, by name, with the SHA-256 of its bytes."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def score_in_sandbox(*predictions: str, timeout_s: float) -> list[dict]:
    """eval's scoring of each prediction against GOLD, in a fresh sandbox of one worker."""
    cfg = EvalConfig(query_timeout_s=timeout_s)
    rows = [{"context": CONTEXT, "answer": GOLD}] * len(predictions)
    with Sandbox() as pool:
        scored = eval_job.score_answers(rows, list(predictions), cfg, pool)
        # the cap is what a worker maps at start (some 30 MiB) plus WORKER_MEMORY_BYTES
        assert pool.peak_worker_memory_bytes < WORKER_MEMORY_BYTES + (128 << 20)
    return scored


# ---------- the runner, exactly ----------

def test_run_readonly_returns_rows_and_column_names(conn):
    assert run_readonly(conn, "SELECT name FROM singer WHERE age > 25 ORDER BY name", 1, 10) \
        == QueryRows(["name"], [("Ann",)])
    assert run_readonly(conn, "SELECT lower(name) AS n, count(*) FROM singer GROUP BY 1 ORDER BY 1", 1, 10).rows \
        == [("ann", 1), ("bob", 1)]


@pytest.mark.parametrize("sql, refused", [
    ("ATTACH DATABASE '/tmp/other.db' AS other", "ATTACH /tmp/other.db is not allowed"),
    ("DETACH DATABASE main", "DETACH main"),
    ("VACUUM INTO '/tmp/copy.db'", "ATTACH /tmp/copy.db"),
    ("PRAGMA writable_schema = 1", "PRAGMA writable_schema"),
    ("PRAGMA table_info(singer)", "PRAGMA table_info"),
    ("SELECT * FROM pragma_table_info('singer')", "sqlite_master"),  # the pragma's table would write the schema
    ("DELETE FROM singer", "DELETE singer"),
    ("UPDATE singer SET age = 0", "UPDATE singer"),
    ("INSERT INTO singer VALUES ('Eve', 1)", "INSERT singer"),
    ("DROP TABLE singer", "DELETE sqlite_master"),  # SQLite asks about the schema table before the DROP itself
    ("CREATE TABLE t (a)", "INSERT sqlite_master"),
    ("ALTER TABLE singer ADD COLUMN b", "ALTER TABLE"),
    ("SELECT load_extension('/tmp/evil.so')", "load_extension()"),
    ("SELECT randomblob(1000000000)", "randomblob()"),
])
def test_run_readonly_refuses_all_but_reading(conn, sql, refused):
    with pytest.raises(QueryRefused, match=refused):
        run_readonly(conn, sql, 1, 10)
    assert conn.execute("SELECT COUNT(*) FROM singer").fetchone() == (2,)  # untouched, and usable again


def test_run_readonly_limits_time_rows_and_result_size(conn):
    with pytest.raises(QueryTimeout):
        run_readonly(conn, "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT max(x) FROM n",
                     0.1, 10)
    with pytest.raises(QueryFailed, match="exceeds row limit of 10"):
        run_readonly(conn, "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT x FROM n", 1, 10)
    wide = ("WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n LIMIT 600) "
            "SELECT printf('%.*c', 99000, 'x') FROM n")
    with pytest.raises(QueryFailed, match="result exceeds 50 MB"):
        run_readonly(conn, wide, 5, 10_000)
    with pytest.raises(QueryFailed, match="no such column"):
        run_readonly(conn, "SELECT nickname FROM singer", 1, 10)


def test_schema_from_sqlite_gives_a_context(tmp_path):
    path = tmp_path / "music.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE singer (singer_id INTEGER PRIMARY KEY, name VARCHAR(40) NOT NULL, \"my note\")")
        conn.execute("CREATE TABLE song (title TEXT, singer_id INTEGER REFERENCES singer(singer_id))")
    conn.close()
    context = schema_from_sqlite(path)
    assert context == 'CREATE TABLE singer (singer_id INTEGER, name VARCHAR(40), "my note"); ' \
                      "CREATE TABLE song (title TEXT, singer_id INTEGER)"
    assert [table.name for table in parse_schema(context)] == ["singer", "song"]
    assert execution_match(context, "SELECT name FROM singer", "SELECT name FROM singer").outcome == "match"


def test_schema_from_sqlite_explains_a_bad_path(tmp_path):
    with pytest.raises(T2SError, match="no such file"):
        schema_from_sqlite(tmp_path / "missing.db")
    (tmp_path / "notes.txt").write_text("not a database, just some text that is long enough " * 20)
    with pytest.raises(T2SError, match="not a readable SQLite database"):
        schema_from_sqlite(tmp_path / "notes.txt")
    (tmp_path / "empty.db").touch()
    with pytest.raises(T2SError, match="no tables"):
        schema_from_sqlite(tmp_path / "empty.db")


def test_sandbox_returns_results_in_order_and_reports_a_failed_query(songs_db):
    with Sandbox(workers=2) as pool:
        assert pool.query_file(songs_db, "SELECT title FROM songs ORDER BY year", 1, 10) \
            == QueryRows(["title"], [("blue",), ("river",)])
        with pytest.raises(QueryRefused, match="DELETE songs"):
            pool.query_file(songs_db, "DELETE FROM songs", 1, 10)
        results = pool.map(sandbox.rows_from_file, [(str(songs_db), f"SELECT {i}", 1, 10) for i in range(20)],
                           if_killed=lambda task, error: error)
        assert [r.rows for r in results] == [[(i,)] for i in range(20)]
        assert pool.kills == 0


# ---------- hostile SQL: the limits hold whatever the SQL does ----------

def test_a_query_stuck_inside_one_sqlite_call_is_killed_at_its_time_limit(songs_db):
    """printf of a 2 GB padding ran 53 s against a 1 s limit and returned NULL rows as if fine; a CTE chain of depth
    22 explodes while SQLite prepares it (9 s at depth 20, MemoryError at 22)."""
    limit = 0.5 + KILL_GRACE_S + 2  # the kill, and slack for a loaded machine
    for sql in (PRINTF_BOMB, cte_chain(22)):
        started = time.monotonic()
        with pytest.raises(T2SError, match="ran past 0.5 s|out of memory"):
            ask.run_on_database(songs_db, sql, timeout_s=0.5, row_limit=10)
        assert time.monotonic() - started < limit, sql[:60]
    started = time.monotonic()
    scored = score_in_sandbox(PRINTF_BOMB, cte_chain(22), GOLD, timeout_s=0.5)
    assert [(s["execution"], s["execution_detail"]) for s in scored[::2]] == [("pred_timeout", "ran past 0.5 s"),
                                                                              ("match", "")]
    assert scored[1]["execution"] in ("pred_timeout", "pred_error")
    assert time.monotonic() - started < 2 * limit + 3  # a worker's start-up, two kills, one fresh worker
    assert ask.run_on_database(songs_db, "SELECT count(*) FROM songs", 1, 10).rows == [(2,)]  # usable after kills


def test_a_query_that_builds_a_huge_result_stays_within_the_memory_bound(songs_db):
    """A 390-character query built 1.3 GB in the job's own process before the size check ran; a row of 13 values
    of 100 MB ran it out of memory on Python 3.10."""
    before = peak_rss_mb()
    with pytest.raises(T2SError, match="result exceeds 50 MB"):
        ask.run_on_database(songs_db, BIG_RESULT, timeout_s=10, row_limit=1000)
    if hasattr(sqlite3.Connection, "setlimit"):  # Python >= 3.11: SQLite's length limit makes printf give NULL
        assert ask.run_on_database(songs_db, WIDE_ROW, timeout_s=10, row_limit=1000).rows == [(None,) * 13]
    else:  # Python 3.10: the worker's memory cap
        with pytest.raises(T2SError, match="out of memory"):
            ask.run_on_database(songs_db, WIDE_ROW, timeout_s=10, row_limit=1000)
    assert peak_rss_mb() - before < 300
    scored = score_in_sandbox(BIG_RESULT, timeout_s=10)  # which asserts the worker stayed under its cap
    assert (scored[0]["execution"], scored[0]["execution_detail"]) == ("pred_error", "result exceeds 50 MB")
    assert peak_rss_mb() - before < 300


def test_a_wal_database_is_read_without_writing_anything_beside_it(tmp_path, monkeypatch):
    """A "read-only" run on a WAL-mode database left -wal and -shm files beside it."""
    db = tmp_path / "shop.sqlite"
    with sqlite3.connect(db) as writer:
        writer.execute("PRAGMA journal_mode = WAL")
        writer.execute("CREATE TABLE orders (item VARCHAR, price INTEGER)")
        writer.execute("INSERT INTO orders VALUES ('pen', 3)")
    writer.close()
    before = folder_state(tmp_path)
    assert list(before) == ["shop.sqlite"]

    class Fake(ask.SQLGenerator):
        def respond(self, pairs, batch_size):
            return [Generation("SELECT item, price FROM orders", 3, 0.001) for _ in pairs]

    monkeypatch.setattr(ask, "load", lambda *args, **kwargs: Fake(None, None))
    result = CliRunner().invoke(app, ["ask", "--model", "fake", "--db", str(db), "--run", "What was sold?"])
    assert (result.exit_code, result.stdout.splitlines()[-2:]) == (0, ["pen   3", "(1 row)"]), result.stderr
    assert folder_state(tmp_path) == before

    # another program writing it now: rows only in its -wal are read, and none of its files change
    writer = sqlite3.connect(db)
    writer.execute("PRAGMA wal_autocheckpoint = 0")
    writer.execute("INSERT INTO orders VALUES ('ink', 9)")
    writer.commit()
    before = folder_state(tmp_path)
    assert ask_command.default_context(None, None, db) == "CREATE TABLE orders (item VARCHAR, price INTEGER)"
    assert ask.run_on_database(db, "SELECT sum(price) FROM orders", 1, 10).rows == [(12,)]
    link = tmp_path / "elsewhere" / "link.sqlite"  # through a link, as SQLite follows it
    link.parent.mkdir()
    link.symlink_to(db)
    assert ask.run_on_database(link, "SELECT count(*) FROM orders", 1, 10).rows == [(2,)]
    assert sorted(p.name for p in link.parent.iterdir()) == ["link.sqlite"]
    link.parent.joinpath("link.sqlite").unlink()
    link.parent.rmdir()
    assert folder_state(tmp_path) == before
    writer.close()


def test_sandbox_replaces_a_worker_that_dies_or_overstays_and_names_what_it_was_doing(monkeypatch):
    from tests import sandbox_tasks as tasks

    def killed(task, error):
        return type(error).__name__, error.role, str(error)

    with Sandbox(workers=2, task_budget_s=1.0) as pool:
        assert list(pool.map(tasks.square, [(i,) for i in range(6)], killed)) == [0, 1, 4, 9, 16, 25]
        assert pool.run(tasks.sleep, 0.2) == 0.2  # work between queries within its budget
        assert next(pool.map(tasks.die, [()], killed)) == ("QueryFailed", "prediction",
                                                            "its worker ended (exit code 9)")
        assert next(pool.map(tasks.run_out_of_memory, [()], killed)) == (
            "QueryFailed", "gold", f"out of memory (past the sandbox's {WORKER_MEMORY_BYTES >> 20} MiB)")
        started = time.monotonic()
        assert next(pool.map(tasks.sleep, [(30,)], killed)) == ("QueryTimeout", "prediction",
                                                              "its work between queries ran past 1 s")
        assert time.monotonic() - started < 3
        assert pool.kills == 3
        with pytest.raises(RuntimeError, match="ValueError: a bug"):
            pool.run(tasks.fail)
        only_here = types.ModuleType("t2s_only_in_this_process")  # a task its worker cannot import
        exec("def task():\n    return 1", only_here.__dict__)
        monkeypatch.setitem(sys.modules, only_here.__name__, only_here)
        with pytest.raises(RuntimeError, match="ModuleNotFoundError"):  # not the query's fault: a bug, loudly
            pool.run(only_here.task)
        for result in pool.map(tasks.sleep, [(30,), (30,)], killed):
            break  # a consumer that stops early: no worker stays busy with a task nobody waits for
        assert list(pool.map(tasks.square, [(3,), (4,)], killed)) == [9, 16]
    with Sandbox(workers=1, task_budget_s=1.0) as pool:  # the tasks queued behind a killed one run all the same
        assert list(pool.map(tasks.sleep, [(30,), (0.0,), (0.1,)], killed)) == [
            ("QueryTimeout", "prediction", "its work between queries ran past 1 s"), 0.0, 0.1]


def test_a_wal_database_being_written_is_copied_once_a_state_and_its_old_copies_are_freed(tmp_path):
    """Issue 31: every query on a live WAL database made a new copy and none was freed (1,100 queries on a 5 MB
    database: 10.8 GB). Now one copy a database (its latest state), freed when the next is made; a few databases at
    most; and a database switched to WAL between queries is read as it is now."""
    from jobs.lib.sandbox import MAX_DATABASE_COPIES, Sandbox

    db = tmp_path / "live.sqlite"
    writer = sqlite3.connect(db)
    writer.execute("CREATE TABLE t (a INTEGER, pad TEXT)")
    writer.execute("INSERT INTO t VALUES (0, ?)", ("x" * 100_000,))
    writer.commit()
    with Sandbox() as sandbox:
        private = Path(sandbox._private.name)

        def on_disk() -> int:
            return sum(p.stat().st_size for p in private.rglob("*") if p.is_file())

        assert sandbox.query_file(db, "SELECT count(*) FROM t", 1, 10).rows == [(1,)]  # a rollback-journal file
        writer.execute("PRAGMA journal_mode = WAL")  # switched to WAL mid-run, and written on
        writer.execute("PRAGMA wal_autocheckpoint = 0")
        for n in range(2, 60):
            writer.execute("INSERT INTO t VALUES (?, ?)", (n, "y" * 20_000))
            writer.commit()
            assert sandbox.query_file(db, "SELECT count(*) FROM t", 1, 10).rows == [(n,)]
            assert sandbox.query_file(db, "SELECT max(a) FROM t", 1, 10).rows == [(n,)]  # same state: no new copy
        assert len(list(private.rglob("database.sqlite"))) == 1
        # the one copy and its -wal: about the database's size, not 58 copies of it
        assert on_disk() < 2 * (db.stat().st_size + Path(f"{db}-wal").stat().st_size)
        # the worker closed its connections to the freed copies, so their disk space is given back
        assert sandbox.run(sandbox_tasks.open_connections) <= 2

        others = []
        for i in range(MAX_DATABASE_COPIES + 3):
            other = tmp_path / f"other{i}.sqlite"
            with sqlite3.connect(other) as conn:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("CREATE TABLE t (a INTEGER)")
                conn.execute("INSERT INTO t VALUES (?)", (i,))
            others.append(other)
            assert sandbox.query_file(other, "SELECT a FROM t", 1, 10).rows == [(i,)]
        assert len(list(private.rglob("database.sqlite"))) == MAX_DATABASE_COPIES
    writer.close()


def test_a_query_that_fails_as_the_database_switches_to_wal_runs_again_on_it_as_it_is_now(tmp_path, monkeypatch):
    """Issue 31: a database switched to WAL between the sandbox's look at it and the query failed that query."""
    from jobs.lib.sandbox import Sandbox

    db = tmp_path / "switching.sqlite"
    writer = sqlite3.connect(db)
    writer.execute("CREATE TABLE t (a INTEGER)")
    writer.execute("INSERT INTO t VALUES (1)")
    writer.commit()
    with Sandbox() as sandbox:
        run, paths = sandbox.run, []

        def switched_under_the_first_query(function, path, *args):
            paths.append(path)
            if len(paths) == 1:  # the switch lands while the query runs on the rollback-journal file
                writer.execute("PRAGMA journal_mode = WAL")
                writer.execute("INSERT INTO t VALUES (2)")
                writer.commit()
                raise QueryFailed("unable to open database file")
            return run(function, path, *args)

        monkeypatch.setattr(sandbox, "run", switched_under_the_first_query)
        assert sandbox.query_file(db, "SELECT count(*) FROM t", 1, 10).rows == [(2,)]
        assert paths[0] == str(db.resolve()) and paths[1] != paths[0]  # the second time, on a copy of the WAL state
        with pytest.raises(QueryFailed, match="no such table"):  # a query that fails on a database that stood still
            sandbox.query_file(db, "SELECT * FROM missing_table", 1, 10)
    writer.close()
