"""The local record of every launched pod: one JSON line per change, in ~/.t2s/launches.jsonl.

Append-only, so a crash never loses earlier lines and two t2s-infra processes (a follower and
`t2s-infra watch`) can both write; the latest line for a pod id is its current state.
$T2S_STATE_DIR moves the folder (tests, several checkouts).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path

# Statuses a record moves through; these two mean the pod may still be billing. Then one of: succeeded /
# failed: the job reported its exit code; stopped: the pod's own cap, or t2s-infra (down, watchdog,
# provisioning timeout) stopped it; gone: the pod disappeared without the job's exit being seen.
LIVE_STATUSES = ("provisioning", "running")


@dataclass(frozen=True)
class Launch:
    run_id: str
    pod_id: str
    job: str
    gpu: str
    gpu_count: int
    cost_per_hr: float | None  # USD for the whole pod
    started_at: str  # ISO 8601, UTC: when the pod was created (billing starts then)
    status: str
    ended_at: str | None = None
    cost_usd: float | None = None  # so far (live) or in total (ended)
    note: str = ""  # why it ended, in a few words
    logs_repo: str | None = None
    max_runtime_min: float | None = None
    max_cost_usd: float | None = None
    keep_pod: bool = False

    @property
    def is_live(self) -> bool:
        return self.status in LIVE_STATUSES


def state_dir() -> Path:
    return Path(os.environ.get("T2S_STATE_DIR") or Path.home() / ".t2s")


def records_path() -> Path:
    return state_dir() / "launches.jsonl"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def minutes_between(start_iso: str, end_iso: str) -> float:
    return (datetime.fromisoformat(end_iso) - datetime.fromisoformat(start_iso)).total_seconds() / 60


def cost_so_far(launch: Launch, at_iso: str) -> float | None:
    """Billing runs from creation to termination at the pod's hourly rate."""
    if launch.cost_per_hr is None:
        return None
    end = launch.ended_at or at_iso
    return round(launch.cost_per_hr * max(0.0, minutes_between(launch.started_at, end)) / 60, 4)


def save(launch: Launch) -> Launch:
    path = records_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(asdict(launch)) + "\n")
    return launch


def update(launch: Launch, **changes) -> Launch:
    return save(replace(launch, **changes))


def end(launch: Launch, status: str, note: str = "", at_iso: str | None = None) -> Launch:
    """Records the pod's end with its total cost (from creation until now, or until at_iso when known)."""
    ended = replace(launch, status=status, ended_at=at_iso or now_iso(), note=note)
    return save(replace(ended, cost_usd=cost_so_far(ended, ended.ended_at)))


def load_all() -> list[Launch]:
    """The current state of every launch, oldest first (unreadable lines are skipped, not fatal)."""
    path = records_path()
    if not path.is_file():
        return []
    known = {f.name for f in fields(Launch)}
    latest: dict[str, Launch] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            launch = Launch(**{k: v for k, v in row.items() if k in known})
        except (json.JSONDecodeError, TypeError):
            continue
        latest[launch.pod_id] = launch
    return sorted(latest.values(), key=lambda launch: launch.started_at)


def launches_of(run_id: str) -> list[Launch]:
    return [launch for launch in load_all() if launch.run_id == run_id]


def latest_of(run_id: str) -> Launch | None:
    runs = launches_of(run_id)
    return runs[-1] if runs else None


def format_table(launches: list[Launch], at_iso: str) -> str:
    """`t2s-infra ls`: one row per pod; cost of live pods is counted up to now."""
    header = ("RUN", "JOB", "POD", "GPU", "$/H", "STARTED (UTC)", "ENDED (UTC)", "STATUS", "COST $")
    rows = [header]
    for launch in launches:
        cost = launch.cost_usd if not launch.is_live else cost_so_far(launch, at_iso)
        rows.append((
            launch.run_id,
            launch.job,
            launch.pod_id,
            f"{launch.gpu_count}x {launch.gpu}",
            "?" if launch.cost_per_hr is None else f"{launch.cost_per_hr:.2f}",
            _short_time(launch.started_at),
            _short_time(launch.ended_at) if launch.ended_at else "-",
            launch.status + (f" ({launch.note})" if launch.note else ""),
            "?" if cost is None else f"{cost:.2f}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _short_time(iso: str) -> str:
    return datetime.fromisoformat(iso).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M")
