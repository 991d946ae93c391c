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

from jobs import ask, ask_command
from jobs.cli import app
from jobs.lib.checked import Candidate
from jobs.lib.config import load_config
from jobs.lib.errors import T2SError
from jobs.lib.generate import Generation
from jobs.lib.models import load_run_model
from jobs.lib.rundir import RunDir
from tests.conftest import ROOT, SONGS_SCHEMA, t2s, tiny_config, write_config

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
                           new_tokens=3, latency_s=0.002, ended_at_eos=True) for i in range(len(pairs))]


class FakeChecked(FakeGenerator):
    """A FakeGenerator whose checked decoding's search gives hand-made candidates: {greedy reply: [(text, score)]}."""

    def __init__(self, *replies: str, more: dict[str, list[tuple[str, float]]]):
        super().__init__(*replies)
        self.more, self.searched = more, []

    def search(self, pairs, greedy, batch_size):
        self.searched += [g.text for g in greedy]
        return [[Candidate(g.text, "eos", -1.0, 3), *[Candidate(text, "eos", score, 3) for text, score in
                                                       self.more.get(g.text, [])]] for g in greedy]


def ask_with(monkeypatch, generator, *args: str, input: str | None = None):
    """`t2s ask` in-process with `generator` in place of the model; --decoding and --candidates reach it."""

    def load(model, device=None, max_new_tokens=128, decoding="greedy", candidates=ask.CANDIDATES):
        generator.decoding, generator.candidates = decoding, candidates
        return generator

    monkeypatch.setattr(ask, "load", load)
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


@pytest.mark.slow
def test_verbose_says_where_the_time_to_the_first_answer_went(merged_run):
    for decoder in ("dynamic", "static"):
        result = t2s("ask", "--verbose", "--model", str(merged_run), "--schema", SONGS_SCHEMA, "How many songs?",
                     env={"T2S_DECODER": decoder})
        assert result.returncode in (0, 2), result.stderr  # 2: the tiny model's answer may not be SQL
        [line] = [line for line in result.stderr.splitlines() if line.startswith("t2s ask: timing: ")]
        assert "ready to load after" in line and "model loaded in" in line and "(torch, transformers, weights, cpu)" \
            in line and f"by the {decoder} decoder" in line and "s after the process started" in line


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
    (["--db", "{folder}", "q"], None, "a folder, not a file; pass --db the path of a SQLite database file"),
    (["--db", "{text}", "q"], None, "not a readable SQLite database"),
    (["--schema", SONGS_SCHEMA], "", "no question given"),
    (["--schema", SONGS_SCHEMA, "-"], "\n  \n", "no question given"),
    (["--schema", SONGS_SCHEMA, "--db", "{db}", "q"], None, "--schema and --db both give the tables"),
    (["--schema-file", "{empty}", "q"], None, "is empty: give the CREATE TABLE statements"),
    (["--schema-file", "{missing}", "q"], None, "no such file; pass --schema-file"),
    (["q"], None, "no tables given"),
    (["--schema", SONGS_SCHEMA, "--run", "q"], None, "--run executes the SQL on a database: pass --db"),
    (["--schema", SONGS_SCHEMA, "--questions", "{text}"], None, "line 1: not JSON"),
    (["--schema", SONGS_SCHEMA, "--decoding", "checked", "--candidates", "0", "q"], None,
     "the candidate count must be a whole number of at least 1 (got 0)"),
    (["--schema", SONGS_SCHEMA, "--decoding", "beam", "q"], None,
     "unknown decoding 'beam': use one of greedy, checked, vote"),
    (["--schema", "CREATE TABLE songs (title", "--decoding", "checked", "q"], None,
     "--schema does not parse as CREATE TABLE statements"),
    (["--db", "{text}", "--decoding", "checked", "--run", "q"], None, "not a readable SQLite database"),
])
def test_bad_inputs_fail_in_one_line(tmp_path, songs_db, args, input, expected):
    (tmp_path / "empty.sql").write_text("  \n")
    (tmp_path / "notes.txt").write_text("hello\n")
    files = {"missing": tmp_path / "missing.sqlite", "text": tmp_path / "notes.txt", "empty": tmp_path / "empty.sql",
             "db": songs_db, "folder": tmp_path}
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
    assert ask_command.format_table(ask.QueryRows(None, [(1, "a"), (22, None)])) == "1   a\n22  NULL\n(2 rows)"
    assert ask_command.format_table(ask.QueryRows(["n"], [])) == "n\n-\n(0 rows)"


def test_a_device_that_is_not_there_is_one_line(merged_run):
    with pytest.raises(T2SError, match="cannot put the model on device 'nope'.*--device cpu"):
        ask.load(str(merged_run), device="nope")


# ---------- checked decoding ----------

def test_checked_decoding_answers_with_the_first_candidate_that_passes(monkeypatch):
    fake = FakeChecked("SELECT name FROM songs", "SELECT COUNT(*) FROM songs",
                       more={"SELECT name FROM songs": [("SELECT titel FROM songs", -0.2), ("SELECT title FROM songs",
                                                                                           -0.3)]})
    result = ask_with(monkeypatch, fake, "--schema", SONGS_SCHEMA, "--decoding", "checked", "-", input="q1\nq2\n")
    assert (result.exit_code, result.stderr) == (0, "")
    assert result.stdout == "SELECT title FROM songs\nSELECT COUNT(*) FROM songs\n"
    assert fake.searched == ["SELECT name FROM songs"]  # the second greedy answer passed: no search for it

    result = ask_with(monkeypatch, fake, "--schema", SONGS_SCHEMA, "--decoding", "checked", "--json", "-",
                      input="q1\nq2\n")
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["sql"], r["checked"], r["candidates_tried"]) for r in records] == [
        ("SELECT title FROM songs", True, 3), ("SELECT COUNT(*) FROM songs", True, 1)]
    assert all("why_unchecked" not in r for r in records)


def test_checked_decoding_returns_the_best_scored_unchecked_answer_with_a_warning(monkeypatch):
    fake = FakeChecked("SELECT name FROM songs", more={"SELECT name FROM songs": [("SELECT titel FROM songs", -0.2),
                                                                                 ("SELECT nme FROM songs", -1.5)]})
    result = ask_with(monkeypatch, fake, "--schema", SONGS_SCHEMA, "--decoding", "checked", "How many?")
    assert result.exit_code == 0 and result.stdout == "SELECT titel FROM songs\n"
    assert result.stderr == ("t2s ask: warning: the answer is unchecked: none of 3 candidate(s) passed the checks "
                             "(the first fails 'runs': no such column: name)\n")
    result = ask_with(monkeypatch, fake, "--schema", SONGS_SCHEMA, "--decoding", "checked", "--candidates", "1",
                      "--json", "How many?")
    record = json.loads(result.stdout)
    assert (record["sql"], record["checked"], record["candidates_tried"]) == ("SELECT name FROM songs", False, 1)
    assert record["why_unchecked"] == "it fails 'runs': no such column: name"


def test_checked_decoding_on_a_sqlite_file_checks_its_schema_and_leaves_it_untouched(monkeypatch, tmp_path):
    db = tmp_path / "shop.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE orders (id INTEGER, customer VARCHAR, total REAL)")
        conn.executemany("INSERT INTO orders VALUES (?, ?, ?)", [(1, "ann", 9.5), (2, "bob", 20.0)])
        conn.execute("PRAGMA journal_mode = WAL")  # SQLite would write -wal and -shm beside a WAL file it opens
    conn.close()
    before, listing = digest(db), sorted(p.name for p in tmp_path.iterdir())
    greedy = "SELECT customer FROM orders ORDER BY amount DESC LIMIT 1"  # the songs schema has no amount either
    fake = FakeChecked(greedy, more={greedy: [("SELECT title FROM songs", -0.1),
                                              ("SELECT customer FROM orders ORDER BY total DESC LIMIT 1", -0.4)]})
    result = ask_with(monkeypatch, fake, "--db", str(db), "--run", "--decoding", "checked", "Who spent most?")
    assert result.exit_code == 0, result.stderr
    assert fake.asked == [("CREATE TABLE orders (id INTEGER, customer VARCHAR, total REAL)", "Who spent most?")]
    assert result.stdout == ("SELECT customer FROM orders ORDER BY total DESC LIMIT 1\n"
                             "customer\n--------\nbob\n(1 row)\n")
    assert digest(db) == before and sorted(p.name for p in tmp_path.iterdir()) == listing


def test_checked_decoding_on_the_tiny_model_and_its_python_api(merged_run):
    with pytest.raises(T2SError, match="candidate count"):
        ask.load("org/never-loaded", decoding="checked", candidates=0)  # before any load
    generator = ask.load(str(merged_run), device="cpu", max_new_tokens=12, decoding="checked", candidates=3)
    pairs = [(SONGS_SCHEMA, "What is the title when the genre is jazz?"), (SONGS_SCHEMA, "How many songs?")]
    answers = generator.answers(pairs, batch_size=2)
    assert [a.question for a in answers] == [q for _, q in pairs]
    for answer in answers:
        assert isinstance(answer.checked, bool) and 1 <= answer.candidates_tried <= 3
        assert (answer.why_unchecked == "") == answer.checked
    greedy = ask.load(str(merged_run), device="cpu", max_new_tokens=12).answers(pairs, batch_size=2)
    assert all(a.checked is None and a.candidates_tried == 0 for a in greedy)
    for g, c in zip(greedy, answers):
        if c.candidates_tried == 1:  # the greedy answer passed, or failed with no other candidate: it is the answer
            assert c.text == g.text


# ---------- what reaches the terminal (issue 16) ----------

OSC52 = "\x1b]52;c;cm0gLXJmIH4=\x07"  # writes "rm -rf ~" to the clipboard in terminals that allow it


def test_a_batch_prints_one_line_per_answer_whatever_the_model_wrote(monkeypatch):
    fake = FakeGenerator("SELECT title\nFROM songs\r\nWHERE year > 2000", "SELECT 'a\\nb' FROM songs",
                         "SELECT 3 FROM songs")
    result = ask_with(monkeypatch, fake, "--schema", SONGS_SCHEMA, "-", input="q1\nq2\nq3\n")
    assert result.exit_code == 0
    assert result.stdout.split("\n") == ["SELECT title\\nFROM songs\\r\\nWHERE year > 2000",
                                         "SELECT 'a\\\\nb' FROM songs", "SELECT 3 FROM songs", ""]
    decoded = [line.encode().decode("unicode_escape") for line in result.stdout.splitlines()]
    assert decoded == fake.replies  # the escapes read back to exactly what the model wrote
    # one question alone: its SQL as written, line breaks and all
    result = ask_with(monkeypatch, FakeGenerator("SELECT title\nFROM songs"), "--schema", SONGS_SCHEMA, "q")
    assert result.stdout == "SELECT title\nFROM songs\n"


def test_escape_sequences_never_reach_the_terminal(monkeypatch, songs_db):
    sql = f"SELECT '{OSC52}' || title || char(27) || '[2J' || char(155) || '31m' AS \"x\u202ey\" FROM songs LIMIT 1"
    result = ask_with(monkeypatch, FakeGenerator(sql), "--db", str(songs_db), "--run", "Show me")
    assert result.exit_code == 0, result.stderr
    for raw in ("\x1b", "\x07", "\x9b", "\u202e"):
        assert raw not in result.stdout
    assert result.stdout.splitlines()[0].startswith("SELECT '\\x1b]52;c;cm0gLXJmIH4=\\x07' || title")
    shown = "\\x1b]52;c;cm0gLXJmIH4=\\x07blue\\x1b[2J\\x9b31m"
    assert result.stdout.splitlines()[1:] == ["x\\u202ey", "-" * len(shown), shown, "(1 row)"]
    multi_line_value = "SELECT 'one' || char(10) || 'two' AS v, 1 AS n FROM songs LIMIT 1"
    result = ask_with(monkeypatch, FakeGenerator(multi_line_value), "--db", str(songs_db), "--run", "Show me")
    assert result.stdout.splitlines()[1:] == ["v         n", "--------  -", "one\\ntwo  1", "(1 row)"]
    # an error line that quotes the model's words
    result = ask_with(monkeypatch, FakeGenerator(f"Sure{OSC52}\x9b2J"), "--schema", SONGS_SCHEMA, "q")
    line = one_error_line(result)
    assert not any(raw in result.stderr for raw in ("\x1b", "\x07", "\x9b")) and "\\x9b2J" in line


def test_json_output_is_strict_json_without_terminal_controls(monkeypatch, songs_db):
    def strict(line: str):
        return json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))

    sql = "SELECT 1e999 AS up, -1e999 AS down, title || char(155) || char(127) AS t FROM songs LIMIT 1"
    result = ask_with(monkeypatch, FakeGenerator(sql + f" -- {OSC52}"), "--db", str(songs_db), "--run", "--json",
                      "Show me")
    assert result.exit_code == 0, result.stderr
    assert not any(raw in result.stdout for raw in ("\x1b", "\x07", "\x9b", "\x7f", "Infinity,"))
    record = strict(result.stdout)
    assert record["rows"] == [["Infinity", "-Infinity", "blue\x9b\x7f"]]
    assert record["sql"] == sql + f" -- {OSC52}"  # the exact text, escaped only in JSON's own way


@pytest.mark.parametrize("text, shown", [
    ("plain SELECT 1", "plain SELECT 1"), ("tab\there", "tab\\there"), ("\x1b[31mred", "\\x1b[31mred"),
    ("bell\x07", "bell\\x07"), ("del\x7f", "del\\x7f"), ("csi\x9b", "csi\\x9b"), ("rtl\u202eevil", "rtl\\u202eevil"),
    ("line\u2028sep", "line\\u2028sep"), ("tag\U000e0041", "tag\\U000e0041"), ("naïve ünïcode 表", "naïve ünïcode 表"),
])
def test_printable(text, shown):
    assert ask.printable(text) == shown
    assert ask.printable("a\nb\tc\x1b", multiline=True) == "a\nb\tc\\x1b"


# ---------- limits that hold whatever the input (issue 31) ----------

@pytest.mark.parametrize("args, input, expected", [
    (["--schema", SONGS_SCHEMA, "--timeout-s", "inf", "q"], None, "--timeout-s must be a number of seconds above 0 "
                                                                 "and at most 3600 (got inf)"),
    (["--schema", SONGS_SCHEMA, "--timeout-s", "1e9", "q"], None, "--timeout-s must be a number of seconds"),
    (["--schema", SONGS_SCHEMA, "--questions", "{surrogate}"], None, "line 2: the question is not UTF-8 text"),
    (["--questions", "{surrogate_context}"], None, "line 1: the context is not UTF-8 text"),
    (["--schema", SONGS_SCHEMA, "x" * 200_001], None, "the schema and question are 200,080 characters, more than "
                                                      "the 200,000 a prompt may have"),
    (["--schema", SONGS_SCHEMA, "--decoding", "checked", "-"], "q\n" + "y" * 200_000 + "\n",
     "question 2: the schema and question are 200,079 characters"),
])
def test_inputs_past_the_limits_are_one_line_before_the_model_loads(tmp_path, args, input, expected):
    (tmp_path / "s.jsonl").write_text('{"question": "ok?"}\n{"question": "bad \\ud800 here"}\n')
    (tmp_path / "c.jsonl").write_text('{"question": "q", "context": "CREATE TABLE t (a \\udfff INTEGER)"}\n')
    files = {"surrogate": tmp_path / "s.jsonl", "surrogate_context": tmp_path / "c.jsonl"}
    args = [a.format(**files) if a.startswith("{") else a for a in args]
    result = CliRunner().invoke(app, ["ask", "--model", "org/never-loaded", *args], input=input)
    assert expected in one_error_line(result)  # org/never-loaded: nothing was loaded before the refusal


def test_the_api_checks_the_same_limits_and_memory_failures_are_one_line():
    class OutOfMemory(FakeGenerator):
        def respond(self, pairs, batch_size):
            raise MemoryError()

    for decoding in ("greedy", "checked"):
        generator = FakeGenerator("SELECT 1")
        generator.decoding = decoding
        with pytest.raises(T2SError, match="the question is not UTF-8 text"):
            generator.answers([(SONGS_SCHEMA, "bad \ud800")])
        with pytest.raises(T2SError, match="question 2: the schema and question are 200,079 characters"):
            generator.answers([(SONGS_SCHEMA, "q"), (SONGS_SCHEMA, "y" * 200_000)])
        assert generator.asked == []  # refused before anything was generated
        oom = OutOfMemory()
        oom.decoding = decoding
        with pytest.raises(T2SError, match=r"out of memory while answering 1 question\(s\) \(MemoryError\): lower "):
            oom.answers([(SONGS_SCHEMA, "q")])


def test_one_prompt_length_cap_for_every_decoding_on_the_tiny_model(merged_run):
    question = "How many songs " * 400  # about 2,000 tokens of the tiny model's 1,024-token context
    for decoding in ("greedy", "checked"):
        generator = ask.load(str(merged_run), device="cpu", decoding=decoding)
        with pytest.raises(T2SError, match=r"the prompt \(schema and question\) is [\d,]+ tokens; with up to 128 new "
                                           r"tokens that is more than the model's 1,024-token context"):
            generator.answers([(SONGS_SCHEMA, question)])
        assert generator.answers([(SONGS_SCHEMA, "How many songs?")])[0].text is not None
