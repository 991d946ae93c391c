"""compare: two runs' eval reports side by side (`t2s compare runs/a runs/b`): one table, one chart."""

from __future__ import annotations

from pathlib import Path

from jobs.errors import T2SError
from jobs.eval import METRICS, plot
from jobs.rundir import RunDir, read_json, write_atomic


def read_report(run: RunDir) -> dict:
    """A run's eval report with everything compare shows; one clear line when it is missing or is not one."""
    if not run.report.is_file():
        raise T2SError(f"{run.report} not found: run `t2s eval` for that run first")
    report = read_json(run.report) or {}  # invalid JSON is one line too
    dataset, results = report.get("dataset"), report.get("results")
    complete = (all(k in report for k in ("run_id", "split", "n_examples"))
                and isinstance(dataset, dict) and "hash" in dataset and isinstance(results, dict)
                and all(isinstance(r, dict) and all(k in r for k in (*METRICS, "queries_per_s"))
                        for r in results.values()))
    if not complete:
        raise T2SError(f"{run.report} is not a t2s eval report: rerun `t2s eval --force` for that run")
    return report


def compare(run_a: Path, run_b: Path, out: Path) -> str:
    """Every result of two runs' reports in one table and one chart, written to the folder `out`."""
    if out.exists() and not out.is_dir():
        raise T2SError(f"--out {out} is a file: pass a folder for compare.md and compare.png (it is made if new)")
    results, lines = {}, []
    for path in (run_a, run_b):
        report = read_report(RunDir(Path(path)))
        for label, r in report["results"].items():
            results[f"{report['run_id']}:{label}"] = r
        lines.append(f"- `{report['run_id']}`: {report['split']} split, {report['n_examples']} examples, "
                     f"dataset hash {report['dataset']['hash'][:12]}")
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
