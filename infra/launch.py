"""Launching a job on a RunPod pod: GPU fallback with backoff, then wait for the container to start.

The decisions are plain functions (`capacity_plan`, `pod_request`, `pod_name`, `start_failure`) that tests
check exactly; `launch_pod` is the loop that calls RunPod. Each request's pod name is recorded before the
request goes out, so a pod whose creation answer is lost (a gateway error, a timeout, Ctrl-C) is found by
that name: here, and later by `ls`, `down` and `watch`. Once a pod exists, every way out of this module other
than "its container started" terminates it first: no path leaves a pod billing behind the user's back.
"""

from __future__ import annotations

import json
import re
import secrets as random_tokens
import time
from collections.abc import Callable

from jobs.lib.errors import T2SError
from infra import records
from infra import runpod_api as api
from infra.hints import me
from infra.records import Launch
from infra.settings import InfraSettings
from infra.timing import Say, Timing, current_timing

# Docker's own words for an image that will never pull, as RunPod's system log may relay them (assumed:
# RunPod documents the system log, not its wording; the EXITED check below does not depend on it). A plain
# "error pulling" is left out: a network hiccup says that too, and the pull may still succeed.
PULL_ERRORS = re.compile(r"manifest unknown|pull access denied|repository does not exist|"
                         r"unauthorized: authentication required|invalid reference format", re.I)


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


def pod_env(settings: InfraSettings, *, job: str, config_text: str, price_per_hr: float | None,
            hf_token: str) -> dict[str, str]:
    """The environment contract between infra and the image (documented in infra/README.md). Your RunPod key
    is not in it: RunPod gives every pod its own pod-scoped RUNPOD_API_KEY, which self-terminate uses."""
    return {
        **settings.env,
        "T2S_JOB": job,
        "T2S_CONFIG_YAML": config_text,
        "T2S_WORKDIR": settings.volume_mount_path,
        "T2S_LOGS_REPO": settings.logs_repo or "",
        "T2S_KEEP_POD": "1" if settings.keep_pod else "0",
        # The pod's own caps (entrypoints/lib.sh); cost = T2S_COST_PER_HOUR_USD × time since the container started.
        "T2S_MAX_RUNTIME_MIN": f"{settings.max_runtime_min:g}",
        "T2S_MAX_COST_USD": "" if settings.max_cost_usd is None else f"{settings.max_cost_usd:g}",
        "T2S_COST_PER_HOUR_USD": "" if price_per_hr is None else f"{price_per_hr:g}",
        "PYTHONUNBUFFERED": "1",  # so the log stream shows lines as they are printed
        "HF_TOKEN": hf_token,
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


def launch_pod(settings: InfraSettings, *, run_id: str, job: str, config_text: Callable[[str, float | None], str],
               prices: dict[str, float | None], hf_token: str, runpod_api_key: str, say: Say,
               timing: Timing | None = None, bid_per_gpu: dict[str, float] | None = None, attempt: int = 1,
               series: str = "") -> Launch:
    """Creates the pod (falling back through gpu_types), records it, and returns once its container runs.
    config_text(gpu, $/h) is the YAML the pod runs on that GPU type (its hardware and price go on the card).
    bid_per_gpu (GPU type -> $/h per GPU): rent spot pods at that bid (prices then hold the bid × GPU count).
    attempt, series: which pod of a recovering launch this is (infra/recovery.py)."""
    timing = timing or current_timing()
    last_problem = ""
    for gpu, wait in capacity_plan(settings.gpu_types, settings.capacity_rounds, timing):
        if wait:
            say(f"no capacity yet; trying {', '.join(settings.gpu_types)} again in {wait:.0f}s")
            time.sleep(wait)
        name = pod_name(run_id, job)
        env = pod_env(settings, job=job, config_text=config_text(gpu, prices[gpu]), price_per_hr=prices[gpu],
                      hf_token=hf_token)
        # Recorded first: from here on a pod of this name is ours, whatever becomes of the answer.
        intent = records.save(Launch(
            run_id=run_id, pod_id="", pod_name=name, job=job, gpu=gpu, gpu_count=settings.gpu_count,
            cost_per_hr=prices[gpu], started_at=records.now_iso(), status="creating",
            logs_repo=settings.logs_repo, max_runtime_min=settings.max_runtime_min,
            max_cost_usd=settings.max_cost_usd, keep_pod=settings.keep_pod,
            interruptible=bid_per_gpu is not None, attempt=attempt, series=series,
        ))
        spot = f", spot at ${bid_per_gpu[gpu]:g}/GPU/h" if bid_per_gpu is not None else ""
        say(f"asking RunPod for {settings.gpu_count}x {gpu} ({settings.cloud_type} cloud{spot})")
        try:
            request = pod_request(settings, name=name, gpu=gpu, env=env)
            pod_id = (api.create_spot_pod(request, bid_per_gpu[gpu]) if bid_per_gpu is not None
                      else api.create_pod(request))
        except api.NoCapacity:
            records.not_created(intent, "no capacity")
            last_problem = f"no {settings.gpu_count}x {gpu} free"
            say(f"{last_problem} in the {settings.cloud_type} cloud")
            continue
        except api.ApiUnavailable as exc:
            # The request may have made the pod on its way, with the answer lost: ask for it by name.
            pod = _pod_created_anyway(intent, say)
            if pod is None:
                last_problem = str(exc)
                say(f"{exc}; RunPod made no pod ({name}); will retry")
                continue
            say(f"{exc}, but RunPod did make pod {pod.id} ({name}): using it")
            pod_id = pod.id
        except KeyboardInterrupt:
            raise T2SError(_interrupted_while_creating(intent, say)) from None
        except T2SError:
            records.not_created(intent, "refused by RunPod")  # a refusal (bad request, bad key) makes no pod
            raise
        try:
            launch = records.update(intent, pod_id=pod_id, status="provisioning")
            say(f"created pod {pod_id} ({name}); waiting for its container to start (image {settings.image})")
        except KeyboardInterrupt:  # the answer came, but not yet into the record: square it by the recorded name
            raise T2SError(_interrupted_while_creating(intent, say)) from None
        return wait_until_started(launch, settings.image, settings.provision_timeout_s, runpod_api_key, say, timing)
    tries = len(settings.gpu_types) * settings.capacity_rounds
    raise T2SError(
        f"could not get {settings.gpu_count}x any of {', '.join(settings.gpu_types)} in the "
        f"{settings.cloud_type} cloud after {tries} tries (last: {last_problem}): add GPU types to "
        "infra.gpu_types, set infra.cloud_type: ALL, ask for fewer --gpus, or try again later"
    )


def _pod_created_anyway(intent: Launch, say: Say) -> api.Pod | None:
    """The pod a create request whose answer was lost made anyway, or None when RunPod has none of its name.
    When RunPod cannot even say (its list fails too), the launch stops here: trying again could make a second
    pod, and the record keeps the name for `down` and `watch` to find it."""
    try:
        named = api.pods_named(intent.pod_name)
    except T2SError as exc:
        raise T2SError(f"RunPod did not answer whether it created pod {intent.pod_name} ({exc}): nothing else "
                       f"is launched; `{me()} down {intent.run_id}` finds it by name and stops it, or "
                       f"`{me()} ls` shows it once RunPod answers") from None
    for extra in named[1:]:  # one request makes one pod; should RunPod have made two, the second goes
        api.terminate_pod(extra.id)
        say(f"terminated pod {extra.id}, a second pod named {intent.pod_name}")
    if not named:
        records.not_created(intent, "the request failed")
        return None
    return named[0]


def _interrupted_while_creating(intent: Launch, say: Say) -> str:
    """Ctrl-C while RunPod was creating the pod: any pod it made is terminated, or left findable by name."""
    try:
        named = api.pods_named(intent.pod_name)
        for pod in named:
            api.terminate_pod(pod.id)
            say(f"terminated pod {pod.id}, created as Ctrl-C came")
    except T2SError:
        return (f"interrupted while RunPod was creating pod {intent.pod_name}, and RunPod did not say whether it "
                f"did: `{me()} down {intent.run_id}` finds it by name and stops it")
    if named:
        records.end(records.update(intent, pod_id=named[0].id), "stopped", "interrupted while creating")
    else:
        records.not_created(intent, "interrupted")
    return "interrupted while RunPod was creating the pod; any pod it made is terminated"


def start_failure(pod: api.Pod | None, system_lines: list[str], image: str) -> str | None:
    """Why a pod whose container never started will not start, from what RunPod shows; None while it may.

    RunPod reports no pull state: `runtime` stays null while the image is fetched, its system log says
    "still fetching image", and a pull that fails for good makes RunPod stop the pod (desiredStatus EXITED,
    lastStatusChange "Exited by Runpod: <date>", the reason not kept). A pull error in the system log
    (Docker's wording) is taken at its word at once.
    """
    pulled_wrong = next((line for line in system_lines if PULL_ERRORS.search(line)), None)
    if pulled_wrong:
        return f"RunPod cannot pull image {image} (its log: {pulled_wrong.strip()[:200]})"
    if pod is not None and not pod.is_live and not pod.started:
        by_runpod = "by runpod" in pod.last_status_change.lower()
        said = f"\"{pod.last_status_change}\"" if pod.last_status_change else f"status {pod.desired_status}"
        if by_runpod:
            return (f"RunPod stopped the pod before its container started ({said}; RunPod names no reason, "
                    f"and the usual one is an image it cannot pull: {image})")
        return f"the pod stopped before its container started ({said})"
    return None


def wait_until_started(launch: Launch, image: str, timeout_s: float, api_key: str, say: Say,
                       timing: Timing) -> Launch:
    """Polls until RunPod reports the container's runtime. RunPod says RUNNING as soon as a host is
    assigned, even while the image is still being pulled; only `runtime` means the job has started.
    Meanwhile RunPod's system log is shown (image pull progress), and a pod that cannot start is ended."""
    deadline = time.monotonic() + timeout_s
    shown: list[str] = []
    try:
        while True:
            try:
                pod, read = api.get_pod(launch.pod_id), True
            except api.ApiUnavailable:
                pod, read = None, False  # a hiccup while polling is not a verdict: ask again
            except T2SError as exc:
                raise T2SError(abandon(launch, f"reading pod {launch.pod_id} failed ({exc})", "unreadable")) from None
            if read and pod is None:
                records.end(launch, "gone", "disappeared while starting")
                raise T2SError(f"pod {launch.pod_id} disappeared while starting (RunPod removed it; nothing "
                               "bills): launch again")
            if pod is not None and pod.started and pod.is_live:
                return records.update(launch, status="running", cost_per_hr=pod.cost_per_hr or launch.cost_per_hr)
            lines = _new_system_lines(launch.pod_id, api_key, shown, timing)
            for line in lines:
                say(f"RunPod: {line}")
            problem = start_failure(pod, lines, image)
            if problem:
                raise T2SError(abandon(launch, f"pod {launch.pod_id} cannot start: {problem}", "failed to start",
                                       fix="check infra.image: published (make push-images) and public?"))
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


def _new_system_lines(pod_id: str, api_key: str, shown: list[str], timing: Timing) -> list[str]:
    """RunPod's system-log lines about this pod not shown yet (a line repeated as is counts once)."""
    new = []
    for line in api.recent_log_lines(pod_id, api_key, "system", timing.system_log_s):
        if line not in shown:
            shown.append(line)
            new.append(line)
    return new


def abandon(launch: Launch, problem: str, note: str, fix: str = "") -> str:
    """Terminates a pod we give up on and records why; returns the user's message."""
    try:
        api.terminate_pod(launch.pod_id)
    except T2SError as exc:
        records.update(launch, note=f"{note}; terminate failed")
        return f"{problem}, and terminating it failed ({exc}): terminate pod {launch.pod_id} in the RunPod console"
    records.end(launch, "stopped", note)
    return f"{problem}; terminated it so it stops billing" + (f": {fix}" if fix else "")
