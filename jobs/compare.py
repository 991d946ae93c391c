"""compare: two runs' eval reports side by side (`t2s compare runs/a runs/b`): one table, one chart."""

from __future__ import annotations

import math
from pathlib import Path

from jobs.lib.errors import T2SError, printable
from jobs.lib.report import METRICS, plot
from jobs.lib.rundir import RunDir, read_json, write_atomic


def _rate(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1


def _speed(value) -> bool:  # queries/s: finite, and within what any machine can do (a number, not a wall of digits)
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
        0 <= value < 1e9


def _short_text(value) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 200


def read_report(run: RunDir) -> dict:
    """A run's eval report with everything compare shows, each of the right type and range; one clear line when it is
    missing or is not one."""
    if not run.report.is_file():
        raise T2SError(f"{run.report} not found: run `t2s eval` for that run first")
    report = read_json(run.report) or {}  # invalid JSON is one line too
    dataset, results, n = report.get("dataset"), report.get("results"), report.get("n_examples")
    complete = (_short_text(report.get("run_id")) and _short_text(report.get("split"))
                and isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 10**12
                and isinstance(dataset, dict) and _short_text(dataset.get("hash")) and isinstance(results, dict)
                and 0 < len(results) <= 100
                and all(_short_text(label) and isinstance(r, dict) and all(_rate(r.get(k)) for k in METRICS)
                        and _speed(r.get("queries_per_s")) for label, r in results.items()))
    if not complete:
        raise T2SError(f"{run.report} is not a t2s eval report: rerun `t2s eval --force` for that run")
    return report


def run_names(reports: list[dict], paths: list[Path]) -> list[str]:
    """What each run's rows are called: its run_id, or, when the two share one, A and B with it (the lines under the
    table say which folder each is)."""
    ids = [printable(report["run_id"]) for report in reports]
    return ids if len(set(ids)) == len(ids) else [f"{letter}:{i}" for letter, i in zip("AB", ids)]


def compare(run_a: Path, run_b: Path, out: Path) -> str:
    """Every result of two runs' reports in one table and one chart, written to the folder `out`."""
    if out.exists() and not out.is_dir():
        raise T2SError(f"--out {out} is a file: pass a folder for compare.md and compare.png (it is made if new)")
    paths = [Path(run_a), Path(run_b)]
    reports = [read_report(RunDir(path)) for path in paths]
    results, lines = {}, []
    for name, report, path in zip(run_names(reports, paths), reports, paths):
        for label, r in report["results"].items():
            results[f"{name}:{printable(label)}"] = r
        lines.append(f"- `{name}` ({printable(str(path))}): {printable(report['split'])} split, "
                     f"{report['n_examples']} examples, dataset hash {printable(report['dataset']['hash'][:12])}")
    table = ["| model | SQL-only | exact match | execution accuracy | queries/s |", "|---|---:|---:|---:|---:|"]
    table += [f"| {k} | {r['sql_only']:.1%} | {r['exact_match']:.1%} | {r['execution_accuracy']:.1%} | "
              f"{r['queries_per_s']:.1f} |" for k, r in results.items()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "compare.md", "\n".join(["# t2s eval comparison", "", *lines, "", *table, ""]))
        plot(results, out / "compare.png", "comparison")
    except OSError as exc:
        raise T2SError(f"cannot write into --out {out} ({exc.strerror or exc}): pass a folder you can write "
                       "to") from None
    return "\n".join(table) + f"\n\nwritten: {out / 'compare.md'}, {out / 'compare.png'}"
