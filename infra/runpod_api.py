"""RunPod behind a small interface: create a pod, read its state, list, terminate, stream its logs.

Pods go through the runpod SDK (GraphQL at $RUNPOD_API_BASE_URL/graphql, read by the SDK on every call);
the log stream is the v2 REST endpoint GET {base}/v2/pods/{id}/logs, Server-Sent Events whose data is
{"source": ..., "line": ..., "ts": ...} and whose event id is the ts (docs.runpod.io, api-reference-v2),
read with httpx-sse. Every SDK failure becomes a T2SError; capacity and transient failures get their own
types because callers retry them, and so does a reply that is not what the API promises (a gateway's
`{"message": "Bad gateway"}` has no `data`): MalformedReply. Reads and terminates are retried (tenacity) a
few times before the caller hears of it; a create never is, since it may have made the pod: infra.launch
looks for it by its name. No message here carries the API key, the env sent to the pod, or the SDK's query
text (which holds both).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import httpx
import requests
from httpx_sse import SSEError, connect_sse
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from jobs.lib.errors import T2SError, first_line
from infra.timing import current_timing

DEFAULT_BASE_URL = "https://api.runpod.io"
POD_NAME_PREFIX = "t2s-"

# What RunPod answers when no machine fits the request (observed wording; matched case-insensitively).
CAPACITY_MESSAGES = (
    "no longer any instances available",
    "no instances available",
    "not enough free gpus",
    "does not have the resources",
)

T = TypeVar("T")
# httpx logs every request at INFO, and the runpod SDK's import turns INFO on: a URL per reconnect is noise.
logging.getLogger("httpx").setLevel(logging.WARNING)


class NoCapacity(T2SError):
    """No machine with this GPU type and count is free right now: try another type, or later."""


class ApiUnavailable(T2SError):
    """RunPod could not be reached or answered with a server error: worth retrying."""


class MalformedReply(ApiUnavailable):
    """RunPod answered, but not with what its API promises (no `data`, a pod without an id): a gateway or server
    error in disguise, so worth retrying too. After a create, whether the pod exists is unknown."""


@dataclass(frozen=True)
class Pod:
    id: str
    name: str
    desired_status: str  # RUNNING, EXITED, TERMINATED (RunPod's desiredStatus)
    started: bool  # the container runs: RunPod reports `runtime` only once the image is pulled and started
    cost_per_hr: float | None
    gpu: str | None
    last_status_change: str = ""  # RunPod's free text, e.g. "Exited by Runpod: <date>" (who stopped it, no reason)

    @property
    def is_live(self) -> bool:
        return self.desired_status not in ("EXITED", "TERMINATED")


@dataclass(frozen=True)
class LogEvent:
    id: str | None
    line: str | None  # None: a heartbeat, the stream is alive but the job printed nothing


def base_url() -> str:
    return os.environ.get("RUNPOD_API_BASE_URL", DEFAULT_BASE_URL).rstrip("/")


def _sdk():
    import runpod  # takes seconds (it loads its serverless half): only commands that call RunPod pay for it

    return runpod


def connect(api_key: str) -> None:
    # The SDK reads its key from this module attribute (or ~/.runpod), not from $RUNPOD_API_KEY.
    _sdk().api_key = api_key


def retried(call: Callable[[], T]) -> T:
    """`call()`, tried again after a short wait while RunPod is unavailable (Timing.api_attempts tries in all)."""
    timing = current_timing()
    retrying = Retrying(retry=retry_if_exception_type(ApiUnavailable), stop=stop_after_attempt(timing.api_attempts),
                        wait=wait_exponential(multiplier=timing.api_retry_s, max=timing.api_retry_s * 8),
                        reraise=True)
    return retrying(call)


def gpu_price_per_hr(gpu_type: str, gpu_count: int, cloud_type: str) -> float | None:
    """RunPod's listed on-demand price for gpu_count GPUs of this type, or None when it lists none."""
    def look_up() -> dict:
        with _calling(f"looking up GPU type {gpu_type!r}"):
            try:
                gpu = _sdk().get_gpu(gpu_type, gpu_count)
            except ValueError as exc:  # the SDK's way of saying "no such GPU type"...
                if isinstance(exc, requests.exceptions.JSONDecodeError):
                    raise  # ...unless it is an unreadable server error, which _calling reports
                raise T2SError(
                    f"RunPod has no GPU type {gpu_type!r}: use a GPU id as RunPod spells it, e.g. 'NVIDIA L4'"
                ) from None
        if not isinstance(gpu, dict):
            raise MalformedReply(f"RunPod described GPU type {gpu_type!r} without its fields")
        return gpu

    gpu = retried(look_up)
    prices = {"SECURE": [gpu.get("securePrice")], "COMMUNITY": [gpu.get("communityPrice")],
              "ALL": [gpu.get("securePrice"), gpu.get("communityPrice")]}[cloud_type]
    listed = [p for p in prices if isinstance(p, (int, float)) and not isinstance(p, bool) and p > 0]
    return round(min(listed) * gpu_count, 4) if listed else None


@dataclass(frozen=True)
class SpotPrice:
    listed_per_gpu: float | None  # RunPod's spot price per GPU in that cloud (secureSpotPrice / communitySpotPrice)
    minimum_bid_per_gpu: float | None  # lowestPrice.minimumBidPrice: a lower bid is refused


def spot_price(gpu_type: str, gpu_count: int, cloud_type: str) -> SpotPrice:
    """RunPod's interruptible price for this GPU type (the SDK's get_gpu query asks for the spot fields too)."""
    def look_up() -> dict:
        with _calling(f"looking up the spot price of GPU type {gpu_type!r}"):
            gpu = _sdk().get_gpu(gpu_type, gpu_count)
        if not isinstance(gpu, dict):
            raise MalformedReply(f"RunPod described GPU type {gpu_type!r} without its fields")
        return gpu

    gpu = retried(look_up)
    fields = {"SECURE": ["secureSpotPrice"], "COMMUNITY": ["communitySpotPrice"],
              "ALL": ["secureSpotPrice", "communitySpotPrice"]}[cloud_type]
    listed = [gpu.get(name) for name in fields]
    listed = [p for p in listed if isinstance(p, (int, float)) and not isinstance(p, bool) and p > 0]
    lowest = gpu.get("lowestPrice") if isinstance(gpu.get("lowestPrice"), dict) else {}
    minimum = lowest.get("minimumBidPrice")
    minimum = minimum if isinstance(minimum, (int, float)) and not isinstance(minimum, bool) and minimum > 0 else None
    return SpotPrice(listed_per_gpu=min(listed) if listed else None, minimum_bid_per_gpu=minimum)


def spot_pod_mutation(request: dict, bid_per_gpu: float) -> str:
    """podRentInterruptable with the fields of `request` (runpod.create_pod's keyword arguments, env values already
    escaped as GraphQL string content) and the bid: the mutation SkyPilot's RunPod provisioner sends for spot pods
    (runpod-python's create_pod knows only podFindAndDeployOnDemand)."""
    def text(value) -> str:
        return json.dumps(str(value))

    fields = [f"name: {text(request['name'])}", f"imageName: {text(request['image_name'])}",
              f"gpuTypeId: {text(request['gpu_type_id'])}", f"bidPerGpu: {float(bid_per_gpu):.4f}",
              f"cloudType: {request.get('cloud_type', 'SECURE')}", f"gpuCount: {int(request.get('gpu_count') or 1)}",
              f"volumeInGb: {int(request.get('volume_in_gb') or 0)}",
              f"containerDiskInGb: {int(request.get('container_disk_in_gb') or 0)}",
              f"volumeMountPath: {text(request.get('volume_mount_path', '/workspace'))}", "supportPublicIp: true"]
    if request.get("network_volume_id"):
        fields.append(f"networkVolumeId: {text(request['network_volume_id'])}")
    env = ", ".join(f'{{ key: {text(key)}, value: "{value}" }}' for key, value in (request.get("env") or {}).items())
    fields.append(f"env: [{env}]")
    return ("mutation { podRentInterruptable(input: { " + ", ".join(fields) + " }) "
            "{ id desiredStatus imageName machineId machine { podHostId } } }")


def create_spot_pod(request: dict, bid_per_gpu: float) -> str:
    """Rents an interruptible pod at bid_per_gpu $/h per GPU; returns its id. Never retried (see create_pod)."""
    gpu = request.get("gpu_type_id")
    with _calling(f"renting a spot pod with {request.get('gpu_count')}x {gpu} at ${bid_per_gpu:g}/GPU/h"):
        answer = _sdk().api.graphql.run_graphql_query(spot_pod_mutation(request, bid_per_gpu))
        created = answer["data"]["podRentInterruptable"]
    if not isinstance(created, dict) or not isinstance(created.get("id"), str) or not created["id"]:
        raise MalformedReply(f"RunPod accepted the spot pod request for {gpu} but returned no pod id")
    return created["id"]


def create_pod(request: dict) -> str:
    """Deploys an on-demand pod (podFindAndDeployOnDemand); returns its id. `request`: runpod.create_pod kwargs.
    Never retried here: after an ApiUnavailable the pod may exist (look for it by its name)."""
    gpu = request.get("gpu_type_id")
    with _calling(f"creating a pod with {request.get('gpu_count')}x {gpu}"):
        created = _sdk().create_pod(**request)
    if not isinstance(created, dict) or not isinstance(created.get("id"), str) or not created["id"]:
        raise MalformedReply(f"RunPod accepted the pod request for {gpu} but returned no pod id")
    return created["id"]


def get_pod(pod_id: str) -> Pod | None:
    """The pod's state, or None when RunPod no longer knows it (terminated pods disappear)."""
    def read() -> Pod | None:
        with _calling(f"reading pod {pod_id}"):
            raw = _sdk().get_pod(pod_id)
        return _pod(raw) if raw else None

    return retried(read)


def list_pods() -> list[Pod]:
    def read() -> list[Pod]:
        with _calling("listing your pods"):
            raws = _sdk().get_pods()
        if raws is not None and not isinstance(raws, list):
            raise MalformedReply("RunPod answered the list of your pods with something that is not a list")
        return [_pod(raw) for raw in raws or []]

    return retried(read)


def pods_named(name: str) -> list[Pod]:
    """The pods with this name: t2s-infra names each pod it creates uniquely and records the name first."""
    return [pod for pod in list_pods() if pod.name == name]


def terminate_pod(pod_id: str) -> None:
    """Terminates the pod (stops billing and deletes it); a pod that is already gone is fine."""
    def terminate() -> None:
        with _calling(f"terminating pod {pod_id}"):
            _sdk().terminate_pod(pod_id)

    try:
        retried(terminate)
    except T2SError:
        if get_pod(pod_id) is not None:
            raise


def stream_logs(pod_id: str, api_key: str, last_event_id: str | None, tail: int, read_timeout_s: float,
                source: str = "container", tick_s: float = 1.0) -> Iterator[LogEvent]:
    """The pod's container log (or RunPod's "system" log about it: image pull, container start) as it is
    written. Ends when the server closes the stream; a drop or read_timeout_s of silence raises ApiUnavailable.
    With last_event_id, RunPod resumes from that event (inclusive or not: the caller drops lines already shown).
    The stream is read in a thread of its own, so that a heartbeat, LogEvent(None, None), comes at least every
    tick_s while nothing arrives: the caller looks at its clock whatever the server sends or keeps back."""
    headers = {"Authorization": f"Bearer {api_key}"}
    if last_event_id:
        headers["Last-Event-ID"] = last_event_id
    url = f"{base_url()}/v2/pods/{pod_id}/logs"
    arrived: queue.Queue = queue.Queue()
    done = threading.Event()

    def read() -> None:
        try:
            with httpx.Client(timeout=httpx.Timeout(read_timeout_s, connect=10.0)) as client, connect_sse(
                    client, "GET", url, params={"source": source, "tail": tail}, headers=headers) as events:
                status = events.response.status_code
                if status in (401, 403):
                    raise T2SError(f"RunPod refused the API key for the log stream (HTTP {status}): "
                                   "check RUNPOD_API_KEY")
                if status != 200:  # 404: the pod is gone, or its log is not there yet
                    raise ApiUnavailable(f"the log stream of pod {pod_id} answered HTTP {status}")
                for event in events.iter_sse():
                    if done.is_set():
                        return
                    # No data: a keep-alive (httpx-sse passes one on for a comment once an id has been seen).
                    arrived.put(LogEvent(id=event.id or None, line=_log_line(event.data) if event.data else None))
            arrived.put(None)  # the server ended the stream
        except (httpx.HTTPError, SSEError) as exc:
            arrived.put(ApiUnavailable(f"the log stream of pod {pod_id} dropped ({type(exc).__name__})"))
        except Exception as exc:  # the T2SErrors above, or a bug: raised in the caller's thread
            arrived.put(exc)

    threading.Thread(target=read, name=f"log stream of pod {pod_id}", daemon=True).start()
    try:
        while True:
            try:
                item = arrived.get(timeout=tick_s)
            except queue.Empty:
                yield LogEvent(id=None, line=None)
                continue
            if item is None:
                return
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        done.set()  # the reader stops at its next event, or at its read timeout


def recent_log_lines(pod_id: str, api_key: str, source: str, read_s: float, tail: int = 50) -> list[str]:
    """What the log stream has for the pod within about read_s seconds (its backlog, then what comes); best
    effort: a stream that is not there yet, or fails, gives what was read so far."""
    lines: list[str] = []
    deadline = time.monotonic() + read_s
    try:
        for event in stream_logs(pod_id, api_key, None, tail, read_s, source=source, tick_s=min(read_s, 0.2)):
            if event.line is not None:
                lines.append(event.line)
            if time.monotonic() >= deadline:
                break
    except T2SError:
        pass
    return lines


def _log_line(data: str) -> str:
    try:
        payload = json.loads(data)
    except json.JSONDecodeError:
        return data  # a plain-text payload is shown as it is
    if isinstance(payload, dict) and isinstance(payload.get("line"), str):
        return payload["line"].rstrip("\n")
    return data


def _pod(raw) -> Pod:
    if not isinstance(raw, dict) or not isinstance(raw.get("id"), str) or not raw["id"]:
        raise MalformedReply("RunPod described a pod without its id")
    machine = raw.get("machine") if isinstance(raw.get("machine"), dict) else {}
    cost = raw.get("costPerHr")
    return Pod(
        id=raw["id"],
        name=str(raw.get("name") or ""),
        desired_status=str(raw.get("desiredStatus") or "UNKNOWN"),
        started=raw.get("runtime") is not None,
        cost_per_hr=float(cost) if isinstance(cost, (int, float)) and not isinstance(cost, bool) else None,
        gpu=machine.get("gpuDisplayName"),
        last_status_change=str(raw.get("lastStatusChange") or ""),
    )


@contextmanager
def _calling(what: str):
    """Turns the SDK's exceptions into one-line T2SErrors (never its query text: it holds the secrets)."""
    runpod_error = _sdk().error
    try:
        yield
    except runpod_error.AuthenticationError:
        raise T2SError(f"RunPod refused the API key (HTTP 401) while {what}: "
                       "check RUNPOD_API_KEY in the environment or .env") from None
    except runpod_error.QueryError as exc:
        message = " ".join(str(exc.message or "no message").split())
        if any(phrase in message.lower() for phrase in CAPACITY_MESSAGES):
            raise NoCapacity(f"no capacity while {what}: {message}") from None
        if "internal" in message.lower() or "try again" in message.lower():
            raise ApiUnavailable(f"RunPod failed while {what}: {message}") from None
        raise T2SError(f"RunPod refused {what}: {message}") from None
    except requests.exceptions.JSONDecodeError:
        raise ApiUnavailable(f"RunPod answered with an unreadable response (a server error) while {what}") from None
    except requests.RequestException as exc:
        raise ApiUnavailable(f"cannot reach RunPod at {base_url()} while {what} ({type(exc).__name__})") from None
    except (KeyError, TypeError, IndexError, AttributeError):
        # The SDK indexes reply["data"][...] unchecked: a reply without them (a gateway's 502 JSON) lands here.
        raise MalformedReply(f"RunPod answered without the data it should have (a gateway or server error) "
                             f"while {what}") from None
    except ValueError as exc:  # the SDK's checks of its own arguments (an unknown GPU type, a cloud type)
        raise T2SError(f"RunPod's client refused {what}: {first_line(exc)}") from None
