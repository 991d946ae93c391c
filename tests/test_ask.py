"""t2s ask: the tiny model trained and merged once, a SQLite file made here, and a fake generator for exact output."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jobs import ask
from jobs.cli import app
from jobs.config import load_config
from jobs.errors import T2SError
from jobs.generate import Generation
from jobs.models import load_run_model
from jobs.rundir import RunDir
from tests.conftest import ROOT, t2s, tiny_config, write_config

SONGS_SCHEMA = "CREATE TABLE songs (title VARCHAR, artist VARCHAR, genre VARCHAR, year INTEGER)"
SONGS = [("blue", "nova", "jazz", 1999), ("river", "kite", "rock", 2005), ("echo", None, "jazz", 2020)]


@pytest.fixture(scope="module")
def merged_run(prepared_run, tmp_path_factory) -> Path:
    """A copy of the prepared tiny run, trained and merged once for this module."""
    base = tmp_path_factory.mktemp("ask")
    run = base / "runs" / "t"
    shutil.copytree(prepared_run, run)
    config = write_config(base / "config.yaml", tiny_config(base / "runs", merge={"verify": False}))
    for job in ("train", "merge"):
        result = t2s(job, "--config", str(config))
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return run


@pytest.fixture(scope="module")
def songs_db(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("db") / "songs.sqlite"
    conn = sqlite3.connect(path)
    conn.execute(SONGS_SCHEMA)
    conn.executemany("INSERT INTO songs VALUES (?, ?, ?, ?)", SONGS)
    conn.commit()
    conn.close()
    return path


def t2s_stdin(*args: str, input: str) -> subprocess.CompletedProcess:
    """The CLI in a fresh process, with `input` piped to its stdin."""
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, input=input, capture_output=True,
                          text=True, timeout=300)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class FakeGenerator(ask.SQLGenerator):
    """Answers with fixed replies (one per question, in turn) and records what it was asked."""

    def __init__(self, *replies: str):
        super().__init__(model=None, tokenizer=None)
        self.replies, self.asked = list(replies), []

    def respond(self, pairs, batch_size):
        self.asked += pairs
        return [Generation(text=self.replies[(len(self.asked) - len(pairs) + i) % len(self.replies)],
                           new_tokens=3, latency_s=0.002) for i in range(len(pairs))]


def ask_with(monkeypatch, generator, *args: str, input: str | None = None):
    """`t2s ask` in-process with `generator` in place of the model."""
    monkeypatch.setattr(ask, "load", lambda model, device=None, max_new_tokens=128: generator)
    return CliRunner().invoke(app, ["ask", "--model", "fake", *args], input=input)


def one_error_line(result) -> str:
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("t2s ask: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


# ---------- the tiny model, for real ----------

def test_tiny_model_answers_a_batch_from_stdin_about_a_sqlite_file(merged_run, songs_db):
    questions = ["What is the title when the genre is jazz?", "How many songs have a year greater than 2000?",
                 "What is the artist when the title is blue?"]
    before = digest(songs_db)
    result = t2s_stdin("ask", "--model", str(merged_run), "--db", str(songs_db), "--run", "--json", "--max-new-tokens",
                 "12", "--batch-size", "2", "-", input="\n".join(questions) + "\n")
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["question"] for r in records] == questions
    for r in records:
        assert isinstance(r["sql"], str) and isinstance(r["sql_only"], bool) and r["latency_ms"] > 0
        assert ("rows" in r or "error" in r) if r["sql_only"] else "not one SQL query" in r["error"]
    assert digest(songs_db) == before


def test_python_api_on_the_tiny_model(merged_run):
    generator = ask.load(str(merged_run), device="cpu", max_new_tokens=12)
    pairs = [(SONGS_SCHEMA, "What is the title when the genre is jazz?"), (SONGS_SCHEMA, "How many songs?")]
    answers = generator.answers(pairs, batch_size=2)
    assert [a.question for a in answers] == [q for _, q in pairs]
    try:
        sqls = generator.sql_many(pairs, batch_size=2)
        assert all(ask.sqlcheck.is_sql_only(s) for s in sqls)
    except ask.NotSQLError as error:
        assert error.raw_text in [a.text for a in answers] and "\n" not in str(error)
    with pytest.raises(T2SError, match="CREATE TABLE"):
        generator.sql("DROP TABLE songs", "anything?")


# ---------- exact behaviour, with a fake generator ----------

def test_schema_comes_from_the_sqlite_file_and_run_prints_the_rows(monkeypatch, songs_db):
    query = "SELECT title, artist, year FROM songs WHERE genre = 'jazz' ORDER BY year"
    fake = FakeGenerator(query)
    result = ask_with(monkeypatch, fake, "--db", str(songs_db), "--run", "Which jazz songs are there?")
    assert result.exit_code == 0, result.stderr
    assert fake.asked == [(SONGS_SCHEMA, "Which jazz songs are there?")]
    assert result.stdout == (f"{query}\n"
                             "title  artist  year\n"
                             "-----  ------  ----\n"
                             "blue   nova    1999\n"
                             "echo   NULL    2020\n"
                             "(2 rows)\n")


def test_without_run_only_the_sql_is_printed(monkeypatch, tmp_path):
    schema_file = tmp_path / "schema.sql"
    schema_file.write_text(f"\n{SONGS_SCHEMA};\n")
    fake = FakeGenerator("SELECT COUNT(*) FROM songs")
    result = ask_with(monkeypatch, fake, "--schema-file", str(schema_file), "How many songs?")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "SELECT COUNT(*) FROM songs\n", "")
    assert fake.asked == [(f"{SONGS_SCHEMA};", "How many songs?")]


@pytest.mark.parametrize("hostile", ["DELETE FROM songs", "ATTACH DATABASE 'x.db' AS x",
                                     "SELECT 1; DROP TABLE songs", "SELECT load_extension('evil')",
                                     "SELECT * FROM songs WHERE randomblob(10) IS NOT NULL"])
def test_hostile_answers_are_refused_in_one_line_and_the_database_is_unchanged(monkeypatch, songs_db, hostile):
    before = digest(songs_db)
    result = ask_with(monkeypatch, FakeGenerator(hostile), "--db", str(songs_db), "--run", "Delete everything")
    line = one_error_line(result)
    assert "not one SQL query" in line or "sandbox refused" in line
    assert digest(songs_db) == before


def test_the_sandbox_itself_refuses_writes_attach_and_runaway_queries(songs_db, tmp_path):
    before = digest(songs_db)
    for sql in ("DELETE FROM songs", f"ATTACH DATABASE '{tmp_path / 'x.db'}' AS x", "DROP TABLE songs"):
        with pytest.raises(T2SError, match="sandbox refused"):
            ask.run_on_database(songs_db, sql, timeout_s=1, row_limit=10)
    forever = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT COUNT(*) FROM c"
    with pytest.raises(T2SError, match="ran past 0.2 s.*--timeout-s"):
        ask.run_on_database(songs_db, forever, timeout_s=0.2, row_limit=10)
    with pytest.raises(T2SError, match="row limit of 1.*--row-limit"):
        ask.run_on_database(songs_db, "SELECT * FROM songs", timeout_s=1, row_limit=1)
    assert digest(songs_db) == before and not (tmp_path / "x.db").exists()


def test_prose_is_not_sql_and_carries_the_raw_text(monkeypatch):
    prose = "Sure! Here is the query:\nSELECT title FROM songs"
    with pytest.raises(ask.NotSQLError) as caught:
        FakeGenerator(prose).sql(SONGS_SCHEMA, "Which titles?")
    assert caught.value.raw_text == prose and "\n" not in str(caught.value)
    assert isinstance(caught.value, T2SError)

    line = one_error_line(ask_with(monkeypatch, FakeGenerator(prose), "--schema", SONGS_SCHEMA, "Which titles?"))
    assert "not one SQL query (it is not SQL)" in line and "Sure! Here is the query" in line

    result = ask_with(monkeypatch, FakeGenerator(prose), "--schema", SONGS_SCHEMA, "--json", "Which titles?")
    assert result.exit_code == 0
    record = json.loads(result.stdout)
    assert record["sql_only"] is False and record["sql"] == prose and record["question"] == "Which titles?"


def test_batch_from_stdin_gives_one_line_per_question(monkeypatch):
    fake = FakeGenerator("SELECT 1 FROM songs", "no idea", "SELECT 3 FROM songs")
    result = ask_with(monkeypatch, fake, "--schema", SONGS_SCHEMA, "--batch-size", "2", input="q1\n\nq2\nq3\n")
    assert result.exit_code == 2
    assert result.stdout.split("\n") == ["SELECT 1 FROM songs", "", "SELECT 3 FROM songs", ""]
    assert one_error_line(result).startswith("t2s ask: error: question 2: the model's answer is not one SQL query")
    assert [q for _, q in fake.asked] == ["q1", "q2", "q3"]

    result = ask_with(monkeypatch, FakeGenerator("SELECT 1 FROM songs"), "--schema", SONGS_SCHEMA, "--json", "-",
                      input="q1\nq2\n")
    assert result.exit_code == 0
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["question"], r["sql"], r["sql_only"]) for r in records] == [("q1", "SELECT 1 FROM songs", True),
                                                                         ("q2", "SELECT 1 FROM songs", True)]
    assert all(r["latency_ms"] == 2.0 and "rows" not in r for r in records)


def test_questions_file_with_own_contexts_and_json_rows(monkeypatch, songs_db, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "How many songs?"}) + "\n\n"
                         + json.dumps({"question": "Oldest?", "schema": "CREATE TABLE songs (year INTEGER)"}) + "\n")
    fake = FakeGenerator("SELECT COUNT(*) FROM songs", "SELECT MIN(year) AS oldest FROM songs")
    result = ask_with(monkeypatch, fake, "--db", str(songs_db), "--run", "--json", "--questions", str(questions))
    assert result.exit_code == 0, result.stderr
    assert fake.asked == [(SONGS_SCHEMA, "How many songs?"), ("CREATE TABLE songs (year INTEGER)", "Oldest?")]
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["columns"], r["rows"]) for r in records] == [(["COUNT(*)"], [[3]]), (["oldest"], [[1999]])]


# ---------- bad inputs: one line, exit 2, before any model loads ----------

def test_no_such_model_path_in_a_real_process():
    result = t2s("ask", "--model", "/no/such/run", "--schema", SONGS_SCHEMA, "How many songs?")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == ("t2s ask: error: model path /no/such/run does not exist: pass a run directory, "
                                     "a merged model folder or a Hub id like org/name")


@pytest.mark.parametrize("args, input, expected", [
    (["--schema", "SELECT * FROM songs", "q"], None, "--schema does not parse as CREATE TABLE statements"),
    (["--schema", "this is not sql", "q"], None, "--schema does not parse as CREATE TABLE statements"),
    (["--db", "{missing}", "q"], None, "no such file; pass --db the path of a SQLite database file"),
    (["--db", "{text}", "q"], None, "not a readable SQLite database"),
    (["--schema", SONGS_SCHEMA], "", "no question given"),
    (["--schema", SONGS_SCHEMA, "-"], "\n  \n", "no question given"),
    (["--schema", SONGS_SCHEMA, "--db", "{db}", "q"], None, "--schema and --db both give the tables"),
    (["--schema-file", "{empty}", "q"], None, "is empty: give the CREATE TABLE statements"),
    (["--schema-file", "{missing}", "q"], None, "no such file; pass --schema-file"),
    (["q"], None, "no tables given"),
    (["--schema", SONGS_SCHEMA, "--run", "q"], None, "--run executes the SQL on a database: pass --db"),
    (["--schema", SONGS_SCHEMA, "--questions", "{text}"], None, "line 1: not JSON"),
])
def test_bad_inputs_fail_in_one_line(tmp_path, songs_db, args, input, expected):
    (tmp_path / "empty.sql").write_text("  \n")
    (tmp_path / "notes.txt").write_text("hello\n")
    files = {"missing": tmp_path / "missing.sqlite", "text": tmp_path / "notes.txt", "empty": tmp_path / "empty.sql",
             "db": songs_db}
    args = [a.format(**files) if a.startswith("{") else a for a in args]
    result = CliRunner().invoke(app, ["ask", "--model", "org/never-loaded", *args], input=input)
    assert expected in one_error_line(result)


def test_model_argument_resolution(merged_run, tmp_path):
    merged = ask.ModelSource(str(merged_run / "merged"))
    assert ask.resolve_model(str(merged_run)) == merged
    assert ask.resolve_model(str(merged_run / "merged")) == merged
    assert ask.resolve_model("org/name") == ask.ModelSource("org/name")
    unmerged = tmp_path / "run"
    shutil.copytree(merged_run, unmerged, ignore=shutil.ignore_patterns("merged", "merge.done", "checkpoints"))
    base_and_adapter = ask.ModelSource(str(unmerged / "adapter"), RunDir(unmerged))
    assert ask.resolve_model(str(unmerged)) == base_and_adapter
    assert ask.resolve_model(str(unmerged / "adapter")) == base_and_adapter
    (unmerged / "train.done").unlink()
    with pytest.raises(T2SError, match="needs a finished train .* run `t2s train` first"):
        ask.resolve_model(str(unmerged))
    loose_adapter = shutil.copytree(unmerged / "adapter", tmp_path / "loose")
    with pytest.raises(T2SError, match="is a LoRA adapter outside a t2s run"):
        ask.resolve_model(str(loose_adapter))
    with pytest.raises(T2SError, match="does not exist"):
        ask.resolve_model("./nowhere")


def test_an_unmerged_run_answers_as_its_merged_model_does(merged_run, tmp_path):
    """Before `t2s merge`, ask loads base + adapter: the same greedy answers as the merged model."""
    unmerged = tmp_path / "run"
    shutil.copytree(merged_run, unmerged, ignore=shutil.ignore_patterns("merged", "merge.done", "checkpoints"))
    pairs = [(SONGS_SCHEMA, "How many songs are jazz?"), (SONGS_SCHEMA, "Which artist made river?")]
    from_adapter = ask.load(str(unmerged), device="cpu").answers(pairs)
    from_merged = ask.load(str(merged_run), device="cpu").answers(pairs)
    assert [a.text for a in from_adapter] == [a.text for a in from_merged]
    run = RunDir(unmerged)
    base, tokenizer = load_run_model(load_config(run.settings_file), run, "base")
    from_base = ask.SQLGenerator(base.eval(), tokenizer).answers(pairs)
    assert [a.text for a in from_adapter] != [a.text for a in from_base]  # the adapter was applied


def test_format_table_without_column_names():
    assert ask.format_table(ask.QueryRows(None, [(1, "a"), (22, None)])) == "1   a\n22  NULL\n(2 rows)"
    assert ask.format_table(ask.QueryRows(["n"], [])) == "n\n-\n(0 rows)"


def test_a_device_that_is_not_there_is_one_line(merged_run):
    with pytest.raises(T2SError, match="cannot put the model on device 'nope'.*--device cpu"):
        ask.load(str(merged_run), device="nope")
