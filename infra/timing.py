"""Every wait in infra, in one place, and the one-line message callback the modules report through.

Its own module so that the watchdog, the log follower and the launcher share it without importing each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

Say = Callable[[str], None]


@dataclass(frozen=True)
class Timing:
    """Every wait in infra, so tests can make them tiny."""

    poll_s: float = 5.0  # between pod status reads while it starts
    backoff_s: float = 20.0  # before the second pass over gpu_types; doubles each pass
    backoff_max_s: float = 160.0
    reconnect_s: float = 2.0  # before reopening a dropped log stream; doubles while it keeps failing
    reconnect_max_s: float = 30.0
    stream_read_timeout_s: float = 60.0  # a silent stream is reopened after this (and the watchdog runs)
    watch_every_s: float = 30.0  # watchdog checks while following, and in `t2s-infra watch`
    exit_grace_s: float = 120.0  # after the job's exit: time for its own self-terminate before we terminate
    # The pod stops itself at its limits (entrypoints/lib.sh: SIGTERM, SIGKILL 120 s later, its own terminate
    # 120 s after that); the watchdog, the second line, steps in only this long after a limit.
    watchdog_grace_s: float = 300.0
    system_log_s: float = 1.0  # while a pod starts: how long to read RunPod's system log each poll
    keep_log_s: float = 5.0  # `down`: how long to read a pod's log (its backlog) before terminating it
    stream_tick_s: float = 1.0  # a follower looks at its clock at least this often, lines or not
    api_attempts: int = 3  # a RunPod read or terminate that fails transiently is tried this often in all...
    api_retry_s: float = 1.0  # ... waiting this long before the second try, doubling after


TIMING = Timing()


def current_timing() -> Timing:
    # Looked up at call time, so that tests can swap TIMING for tiny waits.
    return TIMING
