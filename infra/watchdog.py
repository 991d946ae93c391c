"""The watchdog, the second line: a pod past its run's max runtime or max cost is terminated.

The pod stops itself at those limits (entrypoints/lib.sh); this steps in `Timing.watchdog_grace_s` later if
it has not. `limit_exceeded` is the rule (pure); `check` applies it to one recorded launch and RunPod's view
of its pod; `watch` repeats that for every live launch in the local record. Followers call `check` too, so a
followed run is guarded without a separate `t2s-infra watch`. A launch recorded while its pod was being
created, whose answer never came, is looked up by its pod's name (`settle_creating`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from jobs.lib.errors import T2SError
from infra import records
from infra import runpod_api as api
from infra.records import Launch
from infra.timing import Say, Timing, current_timing

# A create request still in flight (the SDK gives one 30 s) has its answer long before this: a launch still
# "creating" after it, with no pod of its name, made no pod.
CREATING_GRACE_S = 300.0


def settle_creating(launch: Launch, pods: list[api.Pod], at_iso: str) -> Launch:
    """A launch recorded as "creating" squared with RunPod's pods: the pod of its name is adopted (its id
    recorded), or, past the grace, there is none and the record says so; otherwise it is left as it is."""
    if launch.status != "creating":
        return launch
    named = [pod for pod in pods if pod.name == launch.pod_name]
    if named:
        pod = named[0]
        return records.update(launch, pod_id=pod.id, status="running" if pod.started else "provisioning",
                              cost_per_hr=pod.cost_per_hr or launch.cost_per_hr)
    if records.minutes_between(launch.started_at, at_iso) * 60 >= CREATING_GRACE_S:
        return records.not_created(launch, "no pod of this name exists")
    return launch


def limit_exceeded(launch: Launch, at_iso: str, grace_s: float = 0.0) -> str | None:
    """Why this launch must stop now, or None. grace_s: how long past a limit the pod is left to stop itself."""
    minutes = records.minutes_between(launch.started_at, at_iso)
    grace_min = grace_s / 60
    if launch.max_runtime_min is not None and minutes >= launch.max_runtime_min + grace_min:
        return f"ran {minutes:.1f} min, past infra.max_runtime_min={launch.max_runtime_min:g}"
    if launch.max_cost_usd is not None and launch.cost_per_hr:
        cost = records.cost_so_far(launch, at_iso)
        if cost >= launch.max_cost_usd + launch.cost_per_hr * grace_min / 60:
            return f"cost ${cost:.2f}, past infra.max_cost_usd={launch.max_cost_usd:g}"
    return None


def check(launch: Launch, say: Say, timing: Timing | None = None) -> Launch:
    """Reads the pod once and returns the launch's new state: gone, stopped by a limit, or still live.
    A pod RunPod cannot report right now is left alone until the next check."""
    try:
        if launch.status == "creating":
            launch = settle_creating(launch, api.pods_named(launch.pod_name), records.now_iso())
            if launch.status == "creating" or not launch.is_live:
                return launch
        pod = api.get_pod(launch.pod_id)
    except api.ApiUnavailable:
        return launch
    if pod is None:
        return records.end(launch, "gone", "pod no longer exists")
    if launch.status == "running" and not launch.keep_pod and not pod.is_live:
        return _exited_unannounced(launch, pod, say)
    if pod.cost_per_hr is not None and pod.cost_per_hr != launch.cost_per_hr:
        launch = records.update(launch, cost_per_hr=pod.cost_per_hr)
    reason = limit_exceeded(launch, records.now_iso(), (timing or current_timing()).watchdog_grace_s)
    if reason is None:
        return launch
    try:
        api.terminate_pod(launch.pod_id)
    except T2SError as exc:
        say(f"run {launch.run_id}: {reason}, but terminating pod {launch.pod_id} failed ({exc}): "
            "terminate it in the RunPod console")
        return launch
    return records.end(launch, "stopped", reason)


def _exited_unannounced(launch: Launch, pod: api.Pod, say: Say) -> Launch:
    """A running pod RunPod shows EXITED, its job's end line never seen: a spot pod taken back (RunPod gives no
    notice), or one stopped by hand. It is terminated (an exited pod keeps its volume, which bills) and ends `gone`."""
    why = pod.last_status_change or f"status {pod.desired_status}"
    try:
        api.terminate_pod(launch.pod_id)
    except T2SError as exc:
        say(f"run {launch.run_id}: pod {launch.pod_id} exited, but terminating it failed ({exc}): terminate it in the "
            "RunPod console")
    kind = "spot pod taken back by RunPod" if launch.interruptible else "pod stopped"
    return records.end(launch, "gone", f"{kind} without the job's end ({why})")


def watch(say: Say, once: bool, timing: Timing | None = None,
          on_gone: Callable[[Launch], None] | None = None) -> int:
    """Checks every live launch until none is left (or once); returns how many pods it stopped. on_gone hears of
    each launch whose pod ended without the job's end (infra.recovery relaunches it)."""
    timing = timing or current_timing()
    stopped = 0
    while True:
        live = [launch for launch in records.load_all() if launch.is_live]
        for launch in live:
            after = check(launch, say, timing)
            if after.status == "stopped":
                stopped += 1
                say(f"stopped run {after.run_id} (pod {after.pod_id}): {after.note}")
            elif after.status == "gone":
                say(f"run {after.run_id}: pod {after.pod_id} has ended")
                if on_gone is not None:
                    on_gone(after)
        if once or not any(launch.is_live for launch in records.load_all()):
            return stopped
        time.sleep(timing.watch_every_s)
