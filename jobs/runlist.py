"""`t2s runs`: every run under runs_dir, with its jobs done, its model, its headline metrics and its size on disk
(SkyPilot's `sky status`, LLaMA-Factory's board). Reads only what the jobs wrote: config.resolved.yaml, the
<job>.done markers (eval.done carries each model's scores) and the folder's files.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from jobs.lib.errors import T2SError, printable
from jobs.lib.rundir import JOBS, RunDir, read_json

HEADLINE = ("sql_only", "exact_match", "execution_accuracy")


@dataclass
class RunSummary:
    run_id: str
    path: str
    jobs_done: list[str]
    model: str | None  # the base model the run fine-tunes
    method: str | None  # lora, qlora, full: what train ran (train.done), else what the run is set to do
    finished_at: str | None  # when its latest job finished
    scored_model: str | None  # the eval row the metrics are from: the best fine-tuned one, else the base
    metrics: dict[str, float]  # HEADLINE metrics of that row
    size_bytes: int


# ---------- pure core ----------

def headline(results: dict[str, dict]) -> tuple[str | None, dict[str, float]]:
    """The row to show from eval's results: the fine-tuned one with the best execution accuracy, else the base's."""
    rows = {name: {m: r[m] for m in HEADLINE if _is_score(r.get(m))}
            for name, r in results.items() if isinstance(r, dict)}
    tuned = {name: r for name, r in rows.items() if not name.startswith("base")} or rows
    if not tuned:
        return None, {}
    best = max(tuned, key=lambda name: tuned[name].get("execution_accuracy", 0))
    return best, tuned[best]


def _is_score(value) -> bool:
    """A number a table can show and compare: a marker written by hand or by another t2s may hold anything."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TB"


# ---------- I/O shell ----------

def folder_size(root: Path) -> int:
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                total += (Path(folder) / name).lstat().st_size
            except OSError:  # removed while we walked
                pass
    return total


def is_run(folder: Path) -> bool:
    run = RunDir(folder)
    return folder.is_dir() and (run.settings_file.is_file() or any(run.marker(job).is_file() for job in JOBS))


def summarize_run(folder: Path) -> RunSummary:
    run = RunDir(folder)
    try:
        settings = yaml.safe_load(run.settings_file.read_text()) if run.settings_file.is_file() else {}
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        settings = {}
    settings = settings if isinstance(settings, dict) else {}
    markers = {job: _read_marker(run.marker(job)) for job in JOBS if run.marker(job).is_file()}
    markers = {job: marker if isinstance(marker, dict) else {} for job, marker in markers.items()}
    model = _text(_section(settings, "model").get("name_or_path"))
    method = _text(markers.get("train", {}).get("method") or _section(settings, "train").get("method"))
    scored, metrics = headline(_section(markers.get("eval", {}), "results"))
    finished = [m["finished_at"] for m in markers.values() if isinstance(m.get("finished_at"), str)]
    return RunSummary(run_id=folder.name, path=str(folder), jobs_done=list(markers), model=model, method=method,
                      finished_at=max(finished) if finished else None, scored_model=scored, metrics=metrics,
                      size_bytes=folder_size(folder))


def _read_marker(path: Path) -> dict:
    """A job's marker; one that does not read (written by hand, another t2s) still says the job is done."""
    try:
        return read_json(path) or {}
    except (T2SError, OSError):
        return {}


def _section(mapping: dict, key: str) -> dict:
    value = mapping.get(key)
    return value if isinstance(value, dict) else {}


def _text(value) -> str | None:
    return value if isinstance(value, str) else None


def list_runs(runs_dir: Path) -> list[RunSummary]:
    if not runs_dir.is_dir():
        return []
    return [summarize_run(folder) for folder in sorted(runs_dir.iterdir()) if is_run(folder)]


def as_json(runs: list[RunSummary]) -> list[dict]:
    return [asdict(r) for r in runs]


def render_table(runs: list[RunSummary], runs_dir: Path):
    from rich.table import Table

    table = Table(title=f"runs in {printable(str(runs_dir))}", title_justify="left")
    for column in ("run", "jobs done", "model", "method", "scored", "SQL-only", "exact", "execution", "size",
                   "finished (UTC)"):
        table.add_column(column, justify="right" if column in ("SQL-only", "exact", "execution", "size") else "left")
    for r in runs:
        def pct(key: str) -> str:
            return f"{r.metrics[key]:.1%}" if key in r.metrics else "-"

        table.add_row(printable(r.run_id), " ".join(r.jobs_done) or "-", printable(r.model or "-"), r.method or "-",
                      printable(r.scored_model or "-"), pct("sql_only"), pct("exact_match"),
                      pct("execution_accuracy"), human_size(r.size_bytes), (r.finished_at or "-").replace("T", " "))
    return table
