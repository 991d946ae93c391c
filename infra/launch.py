"""Launching a job on a RunPod pod: GPU fallback with backoff, then wait for the container to start.

The decisions are plain functions (`capacity_plan`, `pod_request`, `pod_name`) that tests check exactly;
`launch_pod` is the loop that calls RunPod. Once a pod exists, every way out of this module other than
"its container started" terminates it first: no path leaves a pod billing behind the user's back.
"""

from __future__ import annotations

import json
import secrets as random_tokens
import time
from collections.abc import Callable
from dataclasses import dataclass

from jobs.errors import T2SError
from infra import records
from infra import runpod_api as api
from infra.records import Launch
from infra.settings import InfraSettings


@dataclass(frozen=True)
class Timing:
    """Every wait in infra, in one place, so tests can make them tiny."""

    poll_s: float = 5.0  # between pod status reads while it starts
    backoff_s: float = 20.0  # before the second pass over gpu_types; doubles each pass
    backoff_max_s: float = 160.0
    reconnect_s: float = 2.0  # before reopening a dropped log stream; doubles while it keeps failing
    reconnect_max_s: float = 30.0
    stream_read_timeout_s: float = 60.0  # a silent stream is reopened after this (and the watchdog runs)
    watch_every_s: float = 30.0  # watchdog checks while following, and in `t2s-infra watch`
    exit_grace_s: float = 120.0  # after the job's exit: time for its own self-terminate before we terminate


TIMING = Timing()


def current_timing() -> Timing:
    # Looked up at call time, so that tests can swap TIMING for tiny waits.
    return TIMING

Say = Callable[[str], None]


def capacity_plan(gpu_types: list[str], rounds: int, timing: Timing) -> list[tuple[str, float]]:
    """(GPU type, seconds to wait before trying it): the fallback list in order, `rounds` times,
    with an exponential backoff before each pass after the first."""
    plan = []
    for round_index in range(rounds):
        wait = 0.0 if round_index == 0 else min(timing.backoff_s * 2 ** (round_index - 1), timing.backoff_max_s)
        for position, gpu in enumerate(gpu_types):
            plan.append((gpu, wait if position == 0 else 0.0))
    return plan


def pod_name(run_id: str, job: str) -> str:
    # The prefix marks pods t2s-infra owns (`down --all`); the suffix tells two launches of one run apart.
    return f"{api.POD_NAME_PREFIX}{run_id}-{job}-{random_tokens.token_hex(2)}"


def pod_env(settings: InfraSettings, *, run_id: str, job: str, config_text: str, gpu: str,
            price_per_hr: float | None, hf_token: str, runpod_api_key: str) -> dict[str, str]:
    """The environment contract between infra and the image (documented in infra/README.md)."""
    return {
        **settings.env,
        "T2S_JOB": job,
        "T2S_RUN_ID": run_id,
        "T2S_CONFIG_YAML": config_text,
        "T2S_WORKDIR": settings.volume_mount_path,
        "T2S_LOGS_REPO": settings.logs_repo or "",
        "T2S_KEEP_POD": "1" if settings.keep_pod else "0",
        "T2S_MAX_RUNTIME_MIN": f"{settings.max_runtime_min:g}",
        "T2S_HARDWARE": f"{settings.gpu_count}x {gpu} (RunPod {settings.cloud_type.lower()} cloud)",
        "T2S_COST_PER_HOUR_USD": "" if price_per_hr is None else f"{price_per_hr:g}",
        "PYTHONUNBUFFERED": "1",  # so the log stream shows lines as they are printed
        "HF_TOKEN": hf_token,
        "RUNPOD_API_KEY": runpod_api_key,  # for `t2s-infra self-terminate` at the job's end
    }


def pod_request(settings: InfraSettings, *, name: str, gpu: str, env: dict[str, str]) -> dict:
    """Keyword arguments for runpod.create_pod."""
    request = dict(
        name=name,
        image_name=settings.image,
        gpu_type_id=gpu,
        gpu_count=settings.gpu_count,
        cloud_type=settings.cloud_type,
        container_disk_in_gb=settings.container_disk_gb,
        volume_in_gb=0 if settings.network_volume_id else settings.volume_gb,
        volume_mount_path=settings.volume_mount_path,
        # The SDK pastes values between double quotes in its GraphQL text without escaping them, so a
        # multi-line config would break the query: escape them as GraphQL (= JSON) string content.
        env={key: graphql_string_content(value) for key, value in env.items()},
    )
    if settings.network_volume_id:
        request["network_volume_id"] = settings.network_volume_id
    return request


def graphql_string_content(value: str) -> str:
    return json.dumps(value)[1:-1]


def launch_pod(settings: InfraSettings, *, run_id: str, job: str, config_text: str, hf_token: str,
               runpod_api_key: str, say: Say, timing: Timing | None = None) -> Launch:
    """Creates the pod (falling back through gpu_types), records it, and returns once its container runs."""
    timing = timing or TIMING
    prices = {gpu: api.gpu_price_per_hr(gpu, settings.gpu_count, settings.cloud_type) for gpu in settings.gpu_types}
    last_problem = ""
    for gpu, wait in capacity_plan(settings.gpu_types, settings.capacity_rounds, timing):
        if wait:
            say(f"no capacity yet; trying {', '.join(settings.gpu_types)} again in {wait:.0f}s")
            time.sleep(wait)
        name = pod_name(run_id, job)
        env = pod_env(settings, run_id=run_id, job=job, config_text=config_text, gpu=gpu,
                      price_per_hr=prices[gpu], hf_token=hf_token, runpod_api_key=runpod_api_key)
        say(f"asking RunPod for {settings.gpu_count}x {gpu} ({settings.cloud_type} cloud)")
        try:
            pod_id = api.create_pod(pod_request(settings, name=name, gpu=gpu, env=env))
        except api.NoCapacity:
            last_problem = f"no {settings.gpu_count}x {gpu} free"
            say(f"{last_problem} in the {settings.cloud_type} cloud")
            continue
        except api.ApiUnavailable as exc:
            last_problem = str(exc)
            say(f"{exc}; will retry")
            _terminate_pods_named(name, say)  # a request that failed on its way back may still have made one
            continue
        except KeyboardInterrupt:
            _terminate_pods_named(name, say)  # RunPod may have made it just as Ctrl-C came
            raise T2SError("interrupted while RunPod was creating the pod; any pod it made is terminated") from None
        launch = records.save(Launch(
            run_id=run_id, pod_id=pod_id, job=job, gpu=gpu, gpu_count=settings.gpu_count,
            cost_per_hr=prices[gpu], started_at=records.now_iso(), status="provisioning",
            logs_repo=settings.logs_repo, max_runtime_min=settings.max_runtime_min,
            max_cost_usd=settings.max_cost_usd, keep_pod=settings.keep_pod,
        ))
        say(f"created pod {pod_id} ({name}); waiting for its container to start (image {settings.image})")
        return wait_until_started(launch, settings.provision_timeout_s, say, timing)
    tries = len(settings.gpu_types) * settings.capacity_rounds
    raise T2SError(
        f"could not get {settings.gpu_count}x any of {', '.join(settings.gpu_types)} in the "
        f"{settings.cloud_type} cloud after {tries} tries (last: {last_problem}): add GPU types to "
        "infra.gpu_types, set infra.cloud_type: ALL, ask for fewer --gpus, or try again later"
    )


def wait_until_started(launch: Launch, timeout_s: float, say: Say, timing: Timing) -> Launch:
    """Polls until RunPod reports the container's runtime. RunPod says RUNNING as soon as a host is
    assigned, even while the image is still being pulled; only `runtime` means the job has started."""
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                pod = api.get_pod(launch.pod_id)
            except api.ApiUnavailable:
                pass  # a hiccup while polling is not a verdict: ask again
            except T2SError as exc:
                raise T2SError(abandon(launch, f"reading pod {launch.pod_id} failed ({exc})", "unreadable")) from None
            else:
                if pod is None:
                    records.end(launch, "gone", "disappeared while starting")
                    raise T2SError(f"pod {launch.pod_id} disappeared while starting (RunPod removed it; nothing "
                                   "bills): launch again")
                if pod.started and pod.is_live:
                    return records.update(launch, status="running",
                                          cost_per_hr=pod.cost_per_hr or launch.cost_per_hr)
                if not pod.is_live:
                    raise T2SError(abandon(launch, f"pod {launch.pod_id} stopped (status {pod.desired_status}) "
                                                   "before its container started: check infra.image",
                                           "failed to start"))
            if time.monotonic() >= deadline:
                raise T2SError(abandon(
                    launch,
                    f"pod {launch.pod_id} ({launch.gpu_count}x {launch.gpu}) did not start within {timeout_s:g}s "
                    "(its image still pulling, or a stuck host)", "provisioning timeout",
                    fix="raise infra.provision_timeout_s, or check infra.image"))
            time.sleep(timing.poll_s)
    except KeyboardInterrupt:
        raise T2SError(abandon(launch, f"interrupted while pod {launch.pod_id} was starting",
                               "interrupted while starting")) from None
    except T2SError:
        raise
    except Exception:
        abandon(launch, "", "crashed while starting")
        raise


def abandon(launch: Launch, problem: str, note: str, fix: str = "") -> str:
    """Terminates a pod we give up on and records why; returns the user's message."""
    try:
        api.terminate_pod(launch.pod_id)
    except T2SError as exc:
        records.update(launch, note=f"{note}; terminate failed")
        return f"{problem}, and terminating it failed ({exc}): terminate pod {launch.pod_id} in the RunPod console"
    records.end(launch, "stopped", note)
    return f"{problem}; terminated it so it stops billing" + (f": {fix}" if fix else "")


def _terminate_pods_named(name: str, say: Say) -> None:
    try:
        for pod in api.list_pods():
            if pod.name == name:
                api.terminate_pod(pod.id)
                say(f"terminated pod {pod.id}, created by the request that failed")
    except T2SError:
        pass  # the next attempt reports RunPod's trouble
