"""t2s compare: two runs' reports side by side, and a broken report or a bad --out as one line."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jobs.cli import app

RESULT = {"sql_only": 0.99, "exact_match": 0.6, "execution_accuracy": 0.7, "queries_per_s": 200.0}


def write_report(run: Path, run_id: str, text: str | None = None) -> Path:
    (run / "eval").mkdir(parents=True)
    report = {"run_id": run_id, "split": "validation", "n_examples": 10, "dataset": {"hash": "0123456789abcdef"},
              "results": {"base": {**RESULT, "sql_only": 0.01}, "merged": RESULT}}
    (run / "eval" / "report.json").write_text(text if text is not None else json.dumps(report))
    return run


def compare(tmp_path: Path, a: Path, b: Path, out: Path | None = None):
    return CliRunner().invoke(app, ["compare", str(a), str(b), "--out", str(out or tmp_path / "cmp")])


def test_two_reports_side_by_side(tmp_path):
    result = compare(tmp_path, write_report(tmp_path / "a", "run-a"), write_report(tmp_path / "b", "run-b"))
    assert result.exit_code == 0, result.output
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| run-a:merged | 99.0% | 60.0% | 70.0% | 200.0 |" in table
    assert "| run-b:base | 1.0% |" in table
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0


@pytest.mark.parametrize("text, expected", [
    (None, "not found: run `t2s eval` for that run first"),
    ("{broken", "is not valid JSON"),
    ("[1, 2]", "is not a t2s eval report"),
    (json.dumps({"run_id": "x", "split": "test", "n_examples": 1, "dataset": 3, "results": {}}), "is not a t2s eval report"),
    (json.dumps({"run_id": "x", "split": "test", "n_examples": 1, "dataset": {"hash": "h"}, "results": {"m": {}}}),
     "is not a t2s eval report"),
])
def test_a_broken_report_is_one_line(tmp_path, text, expected):
    good = write_report(tmp_path / "good", "good")
    broken = tmp_path / "broken"
    if text is None:
        broken.mkdir()
    else:
        write_report(broken, "broken", text)
    result = compare(tmp_path, good, broken)
    assert result.exit_code == 2, result.output
    assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_out_onto_a_file_is_one_line_and_the_file_is_kept(tmp_path):
    """A hostile --out: an existing file, or a folder under a file. One line, exit 2, the file byte-identical."""
    a, b = write_report(tmp_path / "a", "run-a"), write_report(tmp_path / "b", "run-b")
    existing = tmp_path / "notes.md"
    existing.write_text("my notes\n")
    for out in (existing, existing / "cmp"):
        result = compare(tmp_path, a, b, out)
        assert result.exit_code == 2, result.output
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
        assert result.stderr.startswith("t2s compare: error: ") and "--out" in result.stderr
        assert existing.read_text() == "my notes\n"


def test_two_runs_that_share_a_run_id_are_both_shown(tmp_path):
    """Issue 31: two runs with one run_id (the same config in two runs_dirs) gave 3 rows instead of 6: one run's rows
    overwrote the other's. Each is named A or B, with its folder."""
    a, b = write_report(tmp_path / "x" / "t", "t"), write_report(tmp_path / "y" / "t", "t")
    report_b = json.loads((b / "eval" / "report.json").read_text())
    report_b["results"]["merged"]["exact_match"] = 0.25
    (b / "eval" / "report.json").write_text(json.dumps(report_b))
    result = compare(tmp_path, a, b)
    assert result.exit_code == 0, result.output
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| A:t:merged | 99.0% | 60.0% |" in table and "| B:t:merged | 99.0% | 25.0% |" in table
    assert "| A:t:base |" in table and "| B:t:base |" in table
    assert f"- `A:t` ({a}): validation split" in table and f"- `B:t` ({b}): validation split" in table


@pytest.mark.parametrize("change", [
    {"run_id": 7}, {"split": ["test"]}, {"n_examples": "ten"}, {"n_examples": 1e300}, {"dataset": {"hash": 12}},
    {"results": {"merged": {**RESULT, "sql_only": "99%"}}}, {"results": {"merged": {**RESULT, "sql_only": 1e300}}},
    {"results": {"merged": {**RESULT, "queries_per_s": 1e300}}},
    {"results": {"merged": {**RESULT, "exact_match": None}}},
    {"results": {"merged": {**RESULT, "queries_per_s": True}}}, {"results": {"merged": [1]}}, {"results": {}},
    {"run_id": "x" * 100_000},
])
def test_a_hostile_report_is_one_line(tmp_path, change):
    good = write_report(tmp_path / "good", "good")
    report = {"run_id": "bad", "split": "validation", "n_examples": 10, "dataset": {"hash": "0123456789abcdef"},
              "results": {"merged": RESULT}, **change}
    hostile = write_report(tmp_path / "hostile", "bad", json.dumps(report))
    result = compare(tmp_path, good, hostile)
    assert result.exit_code == 2, result.output
    assert "is not a t2s eval report" in result.stderr and len(result.stderr.strip().splitlines()) == 1
