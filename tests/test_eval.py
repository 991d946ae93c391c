"""eval: its scoring core exactly (summarize, buckets, the markdown report), and as a hostile dataset and a crash
meet it: rows SQLite cannot build are counted with their reason, and a crash while scoring costs no generation."""

import json

import pytest
from typer.testing import CliRunner

from jobs import eval as eval_job
from jobs.cli import app
from jobs.lib.config import EvalConfig
from jobs.lib.generate import Generation
from jobs.lib.report import render_decoding, render_markdown
from jobs.lib.sandbox import Sandbox
from tests.conftest import t2s

MATCH = {"sql_only": True, "exact_match": True, "execution": "match", "execution_detail": ""}
MISMATCH = {"sql_only": True, "exact_match": False, "execution": "mismatch",
            "execution_detail": "database 0: gold gave 1 rows, prediction 2"}
PROSE = {"sql_only": False, "exact_match": False, "execution": "not_sql", "execution_detail": "not one SQL statement"}
GOLD_FAILS = {"sql_only": True, "exact_match": False, "execution": "gold_error",
              "execution_detail": "gold: no such column: x"}
NO_TABLES = {"sql_only": True, "exact_match": True, "execution": "build_error",
             "execution_detail": "SQLite cannot create table t (incomplete input)"}

# Rows that pass prep but that SQLite cannot build, each with the reason eval must give.
UNBUILDABLE = [
    ("CREATE TABLE t (a INTEGER)", "SELECT a FROM t WHERE a = 99999999999999999999",
     "SQLite cannot store the rows of table t (an integer the gold query looks for is beyond SQLite's 64 bits)"),
    ("CREATE TABLE sqlite_stat (a INTEGER)", "SELECT a FROM sqlite_stat",
     "SQLite cannot create table sqlite_stat (object name reserved for internal use: sqlite_stat)"),
    ("CREATE TABLE t ()", "SELECT 1 FROM t", "SQLite cannot create table t (incomplete input)"),
    ("CREATE TABLE t (a ENUM('x', 'y'))", "SELECT a FROM t WHERE a = 'x'",
     "SQLite cannot create table t (near \"'x'\": syntax error)"),
    ("CREATE TABLE t (" + ", ".join(f"c{i} INTEGER" for i in range(2001)) + ")", "SELECT c1 FROM t",
     "SQLite cannot create table t (too many columns on t)"),
]


# ---------- the scoring core, exactly ----------

def test_summarize_leaves_the_examples_fault_out_of_execution_accuracy():
    assert eval_job.summarize([MATCH, MISMATCH, PROSE, GOLD_FAILS, NO_TABLES]) == {
        "n": 5, "sql_only": 0.8, "exact_match": 0.4, "execution_accuracy": 1 / 3, "fails_to_execute": 1 / 3,
        "gold_error": 1, "build_error": 1,
        "execution_outcomes": {"match": 1, "mismatch": 1, "not_sql": 1, "gold_error": 1, "build_error": 1}}
    assert eval_job.summarize([GOLD_FAILS, NO_TABLES])["execution_accuracy"] == 0.0
    assert eval_job.summarize([]) == {"n": 0, "sql_only": 0.0, "exact_match": 0.0, "execution_accuracy": 0.0,
                                      "fails_to_execute": 0.0, "gold_error": 0, "build_error": 0,
                                      "execution_outcomes": {}}


def test_fails_to_execute_counts_every_way_a_prediction_does_not_run():
    ways = [{**MISMATCH, "execution": outcome} for outcome in ("pred_error", "pred_timeout", "pred_refused")]
    assert eval_job.summarize([*ways, PROSE, MATCH, MISMATCH, GOLD_FAILS])["fails_to_execute"] == 4 / 6


@pytest.mark.parametrize("row, names", [
    ({"answer": "SELECT name FROM singer WHERE age > 30", "source": "spider"}, ["source=spider", "tables=1"]),
    ({"answer": "SELECT T1.name, COUNT(*) FROM singer AS T1 JOIN song AS T2 ON T1.id = T2.singer_id "
                "GROUP BY T1.name ORDER BY 2"}, ["source=unknown", "tables=2", "aggregate", "join", "order"]),
    ({"answer": "WITH old AS (SELECT name FROM singer) SELECT name FROM old"}, ["source=unknown", "tables=1"]),
    ({"answer": "SELECT a.x FROM a, b, c, d ORDER BY a.x"}, ["source=unknown", "tables=3+", "join", "order"]),
    ({"answer": "not sql (", "source": "x"}, ["source=x", "tables=0"]),
])
def test_bucket_names(row, names):
    assert eval_job.bucket_names(row) == names


def test_buckets_summarize_each_bucket():
    rows = [{"answer": "SELECT a FROM t", "source": "s"}, {"answer": "SELECT COUNT(*) FROM t", "source": "s"}]
    by_bucket = eval_job.buckets(rows, [MATCH, MISMATCH])
    assert list(by_bucket) == ["aggregate", "source=s", "tables=1"]
    assert by_bucket["aggregate"] == eval_job.summarize([MISMATCH])
    assert by_bucket["source=s"] == by_bucket["tables=1"] == eval_job.summarize([MATCH, MISMATCH])


def test_build_error_reasons_count_each_reason():
    other = {**NO_TABLES, "execution_detail": "SQLite cannot create table u (too many columns on u)"}
    assert eval_job.build_error_reasons([NO_TABLES, MATCH, other, NO_TABLES]) == {
        "SQLite cannot create table t (incomplete input)": 2,
        "SQLite cannot create table u (too many columns on u)": 1}


def test_render_markdown():
    result = {**eval_job.summarize([MATCH, MISMATCH, NO_TABLES]), "queries_per_s": 12.345, "tokens_per_s": 987.6}
    checked = {**result, "queries_per_s": 6.0, "decoding": "checked", "candidates": 4, "execution_accuracy": 1.0,
               "fails_to_execute": 0.0, "passed_checks": 0.9, "searched": 0.25}
    report = {"run_id": "r1", "split": "test", "n_examples": 3,
              "models": {"base": "tiny", "finetuned": "runs/r1/merged"},
              "dataset": {"source": "synthetic", "hash": "0123456789abcdef"},
              "results": {"base": result, "merged": {**result, "sql_only": 1.0, "decoding": "greedy"},
                          "merged+checked": checked},
              "buckets": {"base": {"tables=1": eval_job.summarize([MATCH])},
                          "merged": {"tables=1": eval_job.summarize([MISMATCH])},
                          "merged+checked": {"tables=1": eval_job.summarize([MATCH])}},
              "build_errors": {"SQLite cannot create table t (incomplete input)": 1},
              "config": {"databases_per_example": 3, "query_timeout_s": 1.0}}
    assert render_markdown(report) == "\n".join([
        "# t2s eval · run r1 · test split, 3 examples", "",
        "Base model: `tiny` · fine-tuned: `runs/r1/merged` · dataset `synthetic` (hash 0123456789ab)", "",
        "| model | decoding | SQL-only | exact match | execution accuracy | fails to execute | gold fails to run "
        "| tables cannot be built | queries/s | tokens/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        "| base | greedy | 100.0% | 66.7% | 50.0% | 0.0% | 0 | 1 | 12.3 | 988 |",  # no decoding recorded: greedy
        "| merged | greedy | 100.0% | 66.7% | 50.0% | 0.0% | 0 | 1 | 12.3 | 988 |",
        "| merged+checked | checked, up to 4 candidates | 100.0% | 66.7% | 100.0% | 0.0% | 0 | 1 | 6.0 | 988 |", "",
        "Examples whose tables SQLite cannot hold (left out of execution accuracy): "
        "SQLite cannot create table t (incomplete input) (1).", "",
        "## Greedy vs checked decoding", "",
        "Checked decoding answers with the first candidate that finishes, parses, resolves against the schema and "
        "runs on databases built from it: the greedy answer, else a beam search's, best-scored first; when none "
        "passes, the best-scored one (unchecked). Its queries/s include the greedy answers, the checks and the "
        "search.", "",
        "| model | decoding | SQL-only | exact match | execution accuracy | fails to execute | queries/s "
        "| passed the checks | needed the search |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        "| merged | greedy | 100.0% | 66.7% | 50.0% | 0.0% | 12.3 |  |  |",
        "| merged | checked, up to 4 candidates | 100.0% | 66.7% | 100.0% | 0.0% | 6.0 | 90.0% | 25.0% |", "",
        "## By bucket (execution accuracy · SQL-only)", "",
        "| bucket | n | base | merged | merged+checked |", "|---|---:|---:|---:|---:|",
        "| tables=1 | 1 | 100% · 100% | 0% · 100% | 100% · 100% |", "",
        "Exact match compares sqlglot's re-printing of both queries (whitespace, keyword case, quote style and a "
        "trailing semicolon do not count). Execution accuracy runs gold and prediction on 3 generated SQLite "
        "databases per example, read-only, with a 1.0 s limit per query.", ""])
    older = {**report, "results": {"merged": {k: v for k, v in result.items() if k != "fails_to_execute"}},
             "buckets": {"merged": report["buckets"]["merged"]}}
    assert "| merged | greedy | 100.0% | 66.7% | 50.0% | not measured | 0 | 1 |" in render_markdown(older)
    assert "## Greedy vs checked" not in render_markdown(older)


def test_throughput_leaves_out_graph_capture_and_the_report_names_the_decoder():
    answers = [Generation("SELECT 1", 10, 0.5)] * 4
    speed = eval_job.decoding_speed(answers, 3.0, {"backend": "cudagraph", "compile_s": 1.0, "graphs": 2,
                                                   "fallback": None})
    assert speed == {"queries_per_s": 2.0, "tokens_per_s": 20.0, "latency_ms_mean": 500.0, "generation_s": 3.0,
                     "compile_s": 1.0, "decoder": "cudagraph"}
    fell_back = eval_job.decoding_speed(answers, 2.0, {"backend": "dynamic", "compile_s": 0.0, "graphs": 0,
                                                       "fallback": "capture failed"})
    assert fell_back["queries_per_s"] == 2.0 and fell_back["decoder_fallback"] == "capture failed"
    assert eval_job.decoding_speed(answers, 2.0, {})["decoder"] == "dynamic"  # answers saved by an older t2s
    report = {"results": {"base": fell_back, "merged": speed, "old": {"queries_per_s": 1.0}}}
    assert render_decoding(report) == [
        "", "Decoding (jobs.lib.generate; queries/s leave out the one-time CUDA graph captures): base: dynamic; fell "
        "back: capture failed; merged: cudagraph, 1.0 s of CUDA graph capture."]
    assert render_decoding({"results": {"old": {"queries_per_s": 1.0}}}) == []


def test_saved_generations_are_reused_only_under_the_same_key(tmp_path):
    path, key = tmp_path / "base.json", {"max_new_tokens": 24, "questions_sha256": "ab"}
    answers = [Generation("SELECT 1", 3, 0.5), Generation("no idea", 2, 0.5)]
    path.write_text(json.dumps({"key": key, "generation_s": 1.5, "generations": [vars(g) for g in answers]}))
    assert eval_job.saved_generations(path, key) == (answers, 1.5, {})  # saved before decoders were recorded
    decoding = {"backend": "cudagraph", "compile_s": 0.4, "graphs": 1, "fallback": None}
    path.write_text(json.dumps({"key": key, "generation_s": 1.5, "decoding": decoding,
                                "generations": [vars(g) for g in answers]}))
    assert eval_job.saved_generations(path, key) == (answers, 1.5, decoding)
    assert eval_job.saved_generations(path, {**key, "max_new_tokens": 32}) is None
    assert eval_job.saved_generations(tmp_path / "missing.json", key) is None
    path.write_text('{"key": {"max_new_tokens": 24')  # cut short by a kill
    assert eval_job.saved_generations(path, key) is None


@pytest.mark.slow
def test_eval_through_the_static_decoder_scores_the_same_answers_and_names_its_decoder(copy_run):
    predictions, reports = {}, {}
    for decoder in ("dynamic", "static"):
        run, config = copy_run(decoder, eval={"models": ["base"]})
        result = t2s("eval", "--config", str(config), env={"T2S_DECODER": decoder})
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert f"queries/s ({decoder} decoder)" in result.stdout
        reports[decoder] = json.loads((run / "eval" / "report.json").read_text())["results"]["base"]
        predictions[decoder] = [json.loads(line)["predictions"]["base"]["response"]
                                for line in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
        assert f"base: {decoder}." in (run / "eval" / "report.md").read_text()
    assert predictions["static"] == predictions["dynamic"] and len(predictions["static"]) == 12
    assert (reports["dynamic"]["decoder"], reports["static"]["decoder"]) == ("dynamic", "static")
    assert reports["static"]["compile_s"] == 0.0  # nothing is captured or compiled on a CPU


# ---------- a hostile dataset, a crash ----------

def test_rows_sqlite_cannot_build_are_counted_with_their_reason_not_a_traceback(copy_run):
    """Rows that pass prep but crashed eval's database builder after every model had generated."""
    run, config = copy_run("unbuildable", eval={"models": ["base"]})
    test_split = run / "data" / "test.jsonl"
    good = test_split.read_text().splitlines()[:3]
    bad = [{"question": f"hostile {i}?", "context": context, "answer": gold, "source": "hostile"}
           for i, (context, gold, _) in enumerate(UNBUILDABLE[:4])]  # the 2,001 columns make too long a prompt here
    test_split.write_text("\n".join([json.dumps(row) for row in bad] + good) + "\n")

    result = t2s("eval", "--config", str(config))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stdout + result.stderr
    report = json.loads((run / "eval" / "report.json").read_text())
    assert (report["results"]["base"]["n"], report["results"]["base"]["build_error"]) == (7, 4)
    assert report["build_errors"] == {reason: 1 for _, _, reason in UNBUILDABLE[:4]}
    assert report["buckets"]["base"]["source=hostile"]["build_error"] == 4
    predictions = [json.loads(line) for line in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [(p["predictions"]["base"]["execution"], p["predictions"]["base"]["execution_detail"])
            for p in predictions[:4]] == [("build_error", reason) for _, _, reason in UNBUILDABLE[:4]]
    assert "Examples whose tables SQLite cannot hold" in (run / "eval" / "report.md").read_text()

    # all five through eval's scoring, the prompt aside
    rows = [{"context": context, "answer": gold} for context, gold, _ in UNBUILDABLE]
    with Sandbox() as sandbox:
        scored = eval_job.score_answers(rows, [gold for _, gold, _ in UNBUILDABLE], EvalConfig(), sandbox)
    assert [(s["execution"], s["execution_detail"]) for s in scored] == [("build_error", r) for _, _, r in UNBUILDABLE]


def test_a_crash_while_scoring_never_costs_the_generation_again(copy_run, monkeypatch):
    run, config = copy_run("crash", eval={"models": ["base"], "prompt_variants": ["plain", "instructed"]})
    generated = []
    real_generate, real_summarize = eval_job.generate_batched, eval_job.summarize
    monkeypatch.setattr(eval_job, "generate_batched",
                        lambda *args, **kwargs: generated.append(real_generate(*args, **kwargs)) or generated[-1])

    def killed_while_scoring_the_second_model(scored):
        if len(generated) == 2:
            raise KeyboardInterrupt  # what a kill or Ctrl-C does mid-scoring
        return real_summarize(scored)

    monkeypatch.setattr(eval_job, "summarize", killed_while_scoring_the_second_model)
    result = CliRunner().invoke(app, ["eval", "--config", str(config)])
    assert result.exit_code == 130 and not (run / "eval.done").exists(), result.output
    assert len(generated) == 2

    def must_not_run(*args, **kwargs):
        raise AssertionError("the rerun generated again")

    monkeypatch.setattr(eval_job, "summarize", real_summarize)
    monkeypatch.setattr(eval_job, "generate_batched", must_not_run)
    monkeypatch.setattr(eval_job, "load_run_model", must_not_run)
    result = CliRunner().invoke(app, ["eval", "--config", str(config)])
    assert result.exit_code == 0, result.output
    for label in ("base", "base:instructed"):
        assert f"{label}: reusing the 12 answers an interrupted eval saved in" in result.output
    predictions = [json.loads(line) for line in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [p["predictions"]["base"]["response"] for p in predictions] == [g.text for g in generated[0]]
    assert [p["predictions"]["base:instructed"]["response"] for p in predictions] == [g.text for g in generated[1]]
    assert (run / "eval.done").is_file() and not (run / "eval.partial").exists()


@pytest.mark.slow
def test_checked_decoding_beside_greedy_and_a_crash_costs_neither_again(copy_run, monkeypatch):
    """eval.decoding: checked scores the fine-tuned model twice, greedy and checked, side by side; a kill while scoring
    the checked answers costs neither the generation nor the search again."""
    run, config = copy_run("checked", eval={"models": ["adapter"], "candidates": 3, "decoding": "checked"})
    result = t2s("train", "--config", str(config))
    assert result.returncode == 0, result.stderr[-2000:]
    searched, real_search, real_summarize = [], eval_job.candidates.search_with_model, eval_job.summarize
    monkeypatch.setattr(eval_job.candidates, "search_with_model",
                        lambda *args, **kwargs: searched.append(real_search(*args, **kwargs)) or searched[-1])
    summaries = []

    def killed_while_scoring_the_checked_answers(scored):
        summaries.append(scored)
        if len(summaries) == 2:
            raise KeyboardInterrupt
        return real_summarize(scored)

    monkeypatch.setattr(eval_job, "summarize", killed_while_scoring_the_checked_answers)
    result = CliRunner().invoke(app, ["eval", "--config", str(config)])
    assert result.exit_code == 130 and not (run / "eval.done").exists(), result.output
    assert len(searched) == 1  # the tiny model's greedy answers fail their checks: the beam search ran once

    def must_not_run(*args, **kwargs):
        raise AssertionError("the rerun generated or searched again")

    monkeypatch.setattr(eval_job, "summarize", real_summarize)
    for name in ("generate_batched", "load_run_model"):
        monkeypatch.setattr(eval_job, name, must_not_run)
    monkeypatch.setattr(eval_job.candidates, "search_with_model", must_not_run)
    result = CliRunner().invoke(app, ["eval", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "adapter+checked: reusing the 12 answers an interrupted eval saved in" in result.output

    report = json.loads((run / "eval" / "report.json").read_text())
    greedy, checked = report["results"]["adapter"], report["results"]["adapter+checked"]
    assert (greedy["decoding"], checked["decoding"], checked["candidates"]) == ("greedy", "checked", 3)
    assert 0 <= checked["passed_checks"] <= 1 and checked["searched"] == 1 - greedy_passed(run)
    assert checked["queries_per_s"] < greedy["queries_per_s"]  # it starts from the greedy answers, then does more
    assert set(report["buckets"]["adapter+checked"]) == set(report["buckets"]["adapter"])
    predictions = [json.loads(line) for line in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    for p in predictions:
        answer = p["predictions"]["adapter+checked"]
        assert isinstance(answer["checked"], bool) and 1 <= answer["candidates_tried"] <= 3
        assert (answer["why_unchecked"] == "") == answer["checked"]
        assert "checked" not in p["predictions"]["adapter"]
    markdown = (run / "eval" / "report.md").read_text()
    assert "## Greedy vs checked decoding" in markdown and "| adapter | checked, up to 3 candidates |" in markdown


def greedy_passed(run) -> float:
    """The share of the adapter's greedy answers that passed their checks, from the saved checked answers."""
    saved = json.loads((run / "eval" / "generations" / "adapter+checked.json").read_text())
    return 1 - sum(c["greedy_failed_checks"] for c in saved["checks"]) / len(saved["checks"])


def test_saved_answers_name_the_gpu_model_so_another_gpu_type_generates_and_times_its_own(tmp_path, monkeypatch):
    """Issue 31: saved generations recorded the device as "cuda", so an eval resumed on another GPU type reused the
    first GPU's answers and published their throughput under the second GPU's name."""
    import torch

    from jobs.lib.config import load_config
    from jobs.lib.rundir import RunDir

    cfg, run = load_config(None), RunDir(tmp_path)
    rows = [{"context": "CREATE TABLE t (a INTEGER)", "question": "How many?"}]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    keys = {}
    for gpu in ("NVIDIA H100 80GB HBM3", "NVIDIA L4"):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0, gpu=gpu: gpu)
        keys[gpu] = eval_job.generation_key(cfg, run, rows, "merged", "plain")
        assert keys[gpu]["device"] == gpu and eval_job.device_name() == gpu
    path, answers = tmp_path / "merged.json", [Generation("SELECT 1", 3, 0.5)]
    path.write_text(json.dumps({"key": keys["NVIDIA H100 80GB HBM3"], "generation_s": 0.5,
                                "generations": [vars(g) for g in answers]}))
    assert eval_job.saved_generations(path, keys["NVIDIA H100 80GB HBM3"]) == (answers, 0.5, {})
    assert eval_job.saved_generations(path, keys["NVIDIA L4"]) is None  # generated and timed again on the L4
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert eval_job.device_name() == "cpu"
