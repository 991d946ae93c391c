"""A job's logs: live from the pod while it runs, and from the Hub after the pod is gone.

Live: `follow` reads RunPod's log stream, reconnects after drops without showing a line twice
(`LogCursor`), notices the job's exit line (printed by `t2s-infra self-terminate --exit-code N`), and runs
the watchdog between lines. After the run: the pod's entrypoint uploads the run's logs, metrics, eval
report and markers to a private Hub dataset (`upload_run_logs`), and `fetch_run_logs` brings them back
into runs/<id>/ on any machine, with nothing but HF_TOKEN.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError
from huggingface_hub.utils import filter_repo_objects

from jobs.lib.errors import T2SError
from jobs.lib.credentials import known_secrets, redacted_bytes
from jobs.lib.rundir import RunDir
from infra import records, watchdog
from infra.hub_checks import hub_error
from infra import runpod_api as api
from infra.hints import me
from infra.records import Launch
from infra.settings import redactor
from infra.timing import Say, Timing, current_timing

EXIT_LINE = "t2s-infra: job exited with code {code}"
REASON_MARK = " — "  # between the exit code and why the pod stopped it (its caps), when it did
# Ours (`self-terminate --exit-code N [--reason R]`), and the summary line entrypoints/lib.sh prints as the job ends.
_EXIT_LINE = re.compile(r"^(?:t2s-infra: job|== entrypoint \S+: t2s \S+) exited with code (-?\d+)\b"
                        r"(?: — (?P<reason>[^;]+))?")
BACKFILL_LINES = 5000  # the most RunPod's stream replays on connect
GONE_DRAIN_S = 10.0  # the most the follower keeps reading a gone pod's stream for lines still on their way

# What a run leaves on the Hub (paths relative to runs/<id>/): its settings, markers, logs (each job's log and config,
# metrics) and eval report; checkpoints and models stay out. ("metrics.jsonl" and "*/metrics.jsonl": older layouts.)
_LAYOUT = RunDir(Path(""))
UPLOAD_PATTERNS = [_LAYOUT.settings_file.as_posix(), _LAYOUT.marker("*").as_posix(), f"{_LAYOUT.logs.as_posix()}/**",
                   "metrics.jsonl", "*/metrics.jsonl", _LAYOUT.report.with_suffix(".*").as_posix()]


def pod_end_file(run_dir: Path) -> Path:
    """How the pod's job ended: written by `upload-logs --exit-code N`, read by `logs`."""
    return RunDir(run_dir).logs / "pod-end.json"


def exit_code_of(line: str) -> int | None:
    match = _EXIT_LINE.match(line)
    return int(match.group(1)) if match else None


def exit_reason_of(line: str) -> str | None:
    """Why the pod stopped its job (a cap), when the exit line says so."""
    match = _EXIT_LINE.match(line)
    return match.group("reason") if match else None


def exit_line(code: int, reason: str | None = None) -> str:
    return EXIT_LINE.format(code=code) + (f"{REASON_MARK}{reason}" if reason else "")


def end_status(exit_code: int, reason: str | None) -> str:
    """The record's status for a job that reported its exit: a cap's stop is `stopped`, like the watchdog's."""
    return "succeeded" if exit_code == 0 else "stopped" if reason else "failed"


def end_note(exit_code: int, reason: str | None) -> str:
    return f"exit {exit_code}" + (f"; {reason}" if reason else "")


class LogCursor:
    """Which log lines were shown, so a reconnect shows each line once.

    RunPod's event ids are the lines' timestamps: several lines can share one, and a resume from
    Last-Event-ID may replay the lines at that timestamp. The cursor keeps the last timestamp and how many
    lines at it were shown; after a reconnect it skips that many again, and anything older.
    """

    def __init__(self) -> None:
        self.last_id: str | None = None
        self._last_key: tuple | None = None
        self._shown_at_last = 0
        self._to_skip = 0

    def reconnected(self) -> None:
        self._to_skip = self._shown_at_last

    def is_new(self, event_id: str | None) -> bool:
        if event_id is None:
            return True  # without ids there is nothing to compare; RunPod sends them
        key = _timestamp_key(event_id)
        if self._last_key is None or key > self._last_key:
            self.last_id, self._last_key, self._shown_at_last, self._to_skip = event_id, key, 1, 0
            return True
        if key < self._last_key:
            return False
        if self._to_skip:
            self._to_skip -= 1
            return False
        self._shown_at_last += 1
        return True


def _timestamp_key(event_id: str) -> tuple:
    """RFC 3339 timestamps as comparable (UTC seconds, nanoseconds); any other id sorts by its text."""
    match = re.fullmatch(r"(\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|z|[+-]\d\d:\d\d)", event_id)
    if not match:
        return (1, event_id)
    whole, fraction, zone = match.groups()
    stamp = datetime.fromisoformat(whole.replace(" ", "T") + ("+00:00" if zone in "Zz" else zone))
    return (0, int(stamp.astimezone(timezone.utc).timestamp()), int((fraction or "0").ljust(9, "0")))


@dataclass(frozen=True)
class Outcome:
    launch: Launch  # its final record (or still live, for a kept pod)
    exit_code: int | None  # the job's, when its exit line was seen
    reason: str | None = None  # why the pod stopped the job itself (its runtime or cost cap), if it did


def follow(launch: Launch, api_key: str, write_line: Callable[[str], None], say: Say,
           timing: Timing | None = None) -> Outcome:
    """Streams the pod's log until the job exits or the pod ends; guards limits meanwhile.
    KeyboardInterrupt propagates untouched: detaching never stops the job."""
    timing = timing or current_timing()
    cursor = LogCursor()
    redact = redactor()
    exit_code, reason, exit_deadline = None, None, 0.0
    delay = timing.reconnect_s
    next_check = time.monotonic() + timing.watch_every_s
    told_about_drop = False
    # Once the pod is seen gone, the open stream may still hold its last lines (the exit line among them, when the
    # stream lags behind RunPod's state): they are read until the server ends the stream, or this long.
    gone_deadline: float | None = None
    while True:
        try:
            for event in api.stream_logs(launch.pod_id, api_key, cursor.last_id, BACKFILL_LINES,
                                         timing.stream_read_timeout_s, tick_s=timing.stream_tick_s):
                delay = timing.reconnect_s
                if event.line is not None and cursor.is_new(event.id):
                    write_line(redact(event.line))
                    if (code := exit_code_of(event.line)) is not None:
                        reason = reason or exit_reason_of(event.line)  # the last exit line says why, if a cap
                        if exit_code is None:
                            # Lines may still follow (the log upload); the pod should be gone within the grace.
                            exit_code, exit_deadline = code, time.monotonic() + timing.exit_grace_s
                if exit_code is not None:
                    if time.monotonic() >= exit_deadline:
                        break
                elif gone_deadline is not None:
                    if time.monotonic() >= gone_deadline:
                        return Outcome(launch, None)
                elif time.monotonic() >= next_check:
                    launch = watchdog.check(launch, say, timing)
                    if not launch.is_live:
                        gone_deadline = time.monotonic() + min(timing.exit_grace_s, GONE_DRAIN_S)
                    next_check = time.monotonic() + timing.watch_every_s
        except api.ApiUnavailable as exc:
            if not told_about_drop:
                say(f"{exc}; reconnecting (lines already shown are not repeated)")
                told_about_drop = True
        cursor.reconnected()
        if exit_code is not None:
            return Outcome(_after_exit(launch, exit_code, reason, exit_deadline, say, timing), exit_code, reason)
        # The stream ended or dropped: a pod that is gone ends the follow, a live one is watched and reread.
        if not launch.is_live:
            return Outcome(launch, None)
        launch = watchdog.check(launch, say, timing)
        next_check = time.monotonic() + timing.watch_every_s
        if not launch.is_live:
            return Outcome(launch, None)
        time.sleep(delay)
        delay = min(delay * 2, timing.reconnect_max_s)


def _after_exit(launch: Launch, exit_code: int, reason: str | None, deadline: float, say: Say,
                timing: Timing) -> Launch:
    """The job has exited: its entrypoint terminates the pod; if that has not happened within the grace
    period (a broken entrypoint), we do it. A kept pod stays, and stays guarded by the watchdog."""
    status, note = end_status(exit_code, reason), end_note(exit_code, reason)
    if launch.keep_pod:
        return records.update(launch, note=f"job exited {exit_code}; pod kept")
    while not _pod_has_ended(launch.pod_id):
        if time.monotonic() >= deadline:
            break
        time.sleep(timing.poll_s)
    else:
        return records.end(launch, status, note)
    try:
        api.terminate_pod(launch.pod_id)
    except T2SError as exc:
        say(f"the job exited but terminating pod {launch.pod_id} failed ({exc}): `{me()} down {launch.run_id}`")
        return records.update(launch, note=f"job exited {exit_code}; terminate failed")
    return records.end(launch, status, f"{note}; pod terminated by t2s-infra")


def _pod_has_ended(pod_id: str) -> bool:
    try:
        pod = api.get_pod(pod_id)
    except api.ApiUnavailable:
        return False  # unknown for now
    return pod is None or not pod.is_live


def upload_run_logs(run_dir: Path, repo_id: str, token: str, say: Say = lambda line: None) -> int:
    """Uploads the run's logs, metrics, report, markers and resolved config to <repo>/<run_id>/ (a private
    Hub dataset, created if missing), every secret in them redacted; returns how many files went up."""
    run_id = run_dir.resolve().name
    files = [p for p in run_dir.rglob("*") if p.is_file() and _uploaded(p.relative_to(run_dir).as_posix())]
    if not files:
        raise T2SError(f"nothing to upload in {run_dir}: no logs/, metrics.jsonl, eval/report.*, *.done")
    hub = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="t2s-upload-") as staging:
        sent = _stage_redacted(run_dir, files, Path(staging), say)
        try:
            hub.create_repo(repo_id, repo_type="dataset", private=True, exist_ok=True)
            hub.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=staging, path_in_repo=run_id,
                              commit_message=f"logs of run {run_id}")
        except Exception as exc:
            raise hub_error(exc, lambda status: f"uploading the logs of run {run_id} to Hub dataset {repo_id} "
                             f"failed (HTTP {status}): check that HF_TOKEN can write there",
                             lambda error: f"cannot reach the Hugging Face Hub to upload the logs of run {run_id} "
                             f"({error})") from None
    return sent


def _stage_redacted(run_dir: Path, files: list[Path], staging: Path, say: Say) -> int:
    """Copies the files to upload into staging, each text file with its secrets hidden (a job may have printed
    one into its log); a binary file holding a known secret stays behind, with a line saying so."""
    known = known_secrets()
    hide = redactor(known)
    sent = 0
    for path in files:
        target = staging / path.relative_to(run_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            hidden = redacted_bytes(path, hide, known)
        except ValueError as exc:
            say(f"not uploaded: {exc}")
            continue
        if hidden is None:
            shutil.copyfile(path, target)
        else:
            target.write_bytes(hidden)
        sent += 1
    return sent


class NoLogs(T2SError):
    """The logs dataset holds nothing of this run (yet): the caller says why, from what it knows of the run."""


def fetch_run_logs(run_id: str, repo_id: str, runs_dir: Path, token: str | None) -> list[str]:
    """Downloads what the run uploaded into runs_dir/<run_id>/; returns the paths fetched (run-relative)."""
    try:
        names = HfApi(token=token).list_repo_files(repo_id, repo_type="dataset")
        wanted = sorted(name.removeprefix(f"{run_id}/") for name in names if name.startswith(f"{run_id}/"))
        if not wanted:
            raise NoLogs(f"Hub dataset {repo_id} has no logs of run {run_id}")
        snapshot_download(repo_id, repo_type="dataset", allow_patterns=[f"{run_id}/*"], local_dir=runs_dir,
                          token=token)
    except NoLogs:
        raise
    except RepositoryNotFoundError:
        raise T2SError(f"Hub dataset {repo_id} not found, or HF_TOKEN cannot read it: check infra.logs_repo "
                       "and HF_TOKEN") from None
    except Exception as exc:
        raise hub_error(exc, lambda status: f"fetching the logs of run {run_id} from Hub dataset {repo_id} failed "
                         f"(HTTP {status}): try again", lambda error: "cannot reach the Hugging Face Hub to fetch the "
                         f"logs of run {run_id} ({error}): check the network and try again") from None
    return wanted


def _uploaded(relative: str) -> bool:
    # The same matching upload_folder applies; a hidden or .tmp file is a write in progress (rundir.write_atomic).
    return any(True for _ in filter_repo_objects([relative], allow_patterns=UPLOAD_PATTERNS,
                                                 ignore_patterns=["*.tmp", ".*", "*/.*"]))
