"""The local record of every launched pod: one JSON line per change, in ~/.t2s/launches.jsonl.

Append-only, so a crash never loses earlier lines and two t2s-infra processes (a follower and
`t2s-infra watch`) can both write; the latest line for a pod is its current state. A launch is recorded
before its pod is asked for ("creating", under the unique name it will have), so a pod whose creation
answer was lost is still found, by that name, by `ls`, `down` and `watch`. A line that is not a record is
skipped with a warning. $T2S_STATE_DIR moves the folder (tests, several checkouts).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from infra import tables

# Statuses a record moves through; these three mean a pod may be billing (creating: asked for, its id not
# known yet). Then one of: succeeded / failed: the job reported its exit code; stopped: the pod's own cap,
# or t2s-infra (down, watchdog, provisioning timeout) stopped it; gone: the pod disappeared without the job's
# exit being seen; not created: RunPod made no pod for the request (such records are not listed).
LIVE_STATUSES = ("creating", "provisioning", "running")
NOT_CREATED = "not created"
STATUSES = (*LIVE_STATUSES, "succeeded", "failed", "stopped", "gone", NOT_CREATED)


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
    pod_name: str = ""  # chosen before the pod is asked for; "" in records written before names were kept
    interruptible: bool = False  # a spot pod, which RunPod may stop at any time
    attempt: int = 1  # which pod of the launch this is (infra/recovery.py relaunches a pod that ended unannounced)
    series: str = ""  # the first attempt's pod name: what the attempts of one launch share ("": its own)

    @property
    def series_key(self) -> str:
        return self.series or self.key

    @property
    def is_live(self) -> bool:
        return self.status in LIVE_STATUSES

    @property
    def key(self) -> str:
        """What identifies the pod across the record's lines: its name (known first), else its id."""
        return self.pod_name or self.pod_id


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


def not_created(launch: Launch, note: str) -> Launch:
    """The pod asked for was not made: nothing bills, and the record is no longer listed."""
    return save(replace(launch, status=NOT_CREATED, ended_at=now_iso(), note=note, cost_usd=0.0))


_LAUNCH = TypeAdapter(Launch)


def parse_record(line: str) -> Launch:
    """One line of the file as a Launch; ValueError saying why it is not one."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        raise ValueError("not JSON") from None
    if not isinstance(row, dict):
        kind = {type(None): "JSON null", list: "a JSON array", str: "a JSON string", bool: "a JSON boolean"}
        raise ValueError(f"{kind.get(type(row), 'a JSON number')}, not a record")
    known = {f.name for f in fields(Launch)}
    try:
        launch = _LAUNCH.validate_python({k: v for k, v in row.items() if k in known})
    except ValidationError as exc:
        error = exc.errors()[0]
        raise ValueError(f"field {'.'.join(str(p) for p in error['loc']) or '?'}: {error['msg']}") from None
    if launch.status not in STATUSES:
        raise ValueError(f"unknown status {launch.status!r}")
    if not launch.key:
        raise ValueError("no pod id or name")
    for name in ("started_at", "ended_at"):
        value = getattr(launch, name)
        if value is not None and not _has_zone(value):
            raise ValueError(f"{name} {value[:40]!r} is not an ISO 8601 time with a zone")
    return launch


def _has_zone(value: str) -> bool:
    try:
        return datetime.fromisoformat(value).tzinfo is not None
    except ValueError:
        return False


def load_all(warn: Callable[[str], None] | None = None) -> list[Launch]:
    """The current state of every launch, oldest first. A line that is not a record (a crash mid-write, a hand
    edit) is skipped; warn, when given, hears of each one."""
    path = records_path()
    if not path.is_file():
        return []
    latest: dict[str, Launch] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            launch = parse_record(line)
        except ValueError as exc:
            if warn:
                warn(f"warning: skipped line {number} of {path}: {exc}")
            continue
        latest[launch.key] = launch
    current = [launch for launch in latest.values() if launch.status != NOT_CREATED]
    return sorted(current, key=lambda launch: datetime.fromisoformat(launch.started_at))


def launches_of(run_id: str, warn: Callable[[str], None] | None = None) -> list[Launch]:
    return [launch for launch in load_all(warn) if launch.run_id == run_id]


def latest_of(run_id: str, warn: Callable[[str], None] | None = None) -> Launch | None:
    runs = launches_of(run_id, warn)
    return runs[-1] if runs else None


def format_table(launches: list[Launch], at_iso: str) -> str:
    """`t2s-infra ls`: one row per pod; cost of live pods is counted up to now."""
    table = tables.columns("RUN", "JOB", "POD", "GPU", "$/H", "STARTED (UTC)", "ENDED (UTC)", "STATUS", "COST $")
    for launch in launches:
        cost = launch.cost_usd if not launch.is_live else cost_so_far(launch, at_iso)
        tables.add_row(
            table,
            launch.run_id,
            launch.job,
            launch.pod_id or f"({launch.pod_name})",  # asked for, its id not known yet
            f"{launch.gpu_count}x {launch.gpu}" + (" spot" if launch.interruptible else ""),
            "?" if launch.cost_per_hr is None else f"{launch.cost_per_hr:.2f}",
            _short_time(launch.started_at),
            _short_time(launch.ended_at) if launch.ended_at else "-",
            launch.status + (f" ({launch.note})" if launch.note else ""),
            "?" if cost is None else f"{cost:.2f}",
        )
    return "\n".join(tables.plain(table))


def _short_time(iso: str) -> str:
    return datetime.fromisoformat(iso).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M")
