"""RunPod behind a small interface: create a pod, read its state, list, terminate, stream its logs.

Pods go through the runpod SDK (GraphQL at $RUNPOD_API_BASE_URL/graphql, read by the SDK on every call);
the log stream is the v2 REST endpoint GET {base}/v2/pods/{id}/logs, Server-Sent Events whose data is
{"source": ..., "line": ..., "ts": ...} and whose event id is the ts (docs.runpod.io, api-reference-v2).
Every SDK failure becomes a T2SError; capacity and transient failures get their own types because the
launcher retries them. No message here carries the API key, the env sent to the pod, or the SDK's query
text (which holds both).
"""

from __future__ import annotations

import codecs
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import requests
import urllib3

from jobs.errors import T2SError

DEFAULT_BASE_URL = "https://api.runpod.io"
POD_NAME_PREFIX = "t2s-"

# What RunPod answers when no machine fits the request (observed wording; matched case-insensitively).
CAPACITY_MESSAGES = (
    "no longer any instances available",
    "no instances available",
    "not enough free gpus",
    "does not have the resources",
)


class NoCapacity(T2SError):
    """No machine with this GPU type and count is free right now: try another type, or later."""


class ApiUnavailable(T2SError):
    """RunPod could not be reached or answered with a server error: worth retrying."""


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


def gpu_price_per_hr(gpu_type: str, gpu_count: int, cloud_type: str) -> float | None:
    """RunPod's listed on-demand price for gpu_count GPUs of this type, or None when it lists none."""
    with _calling(f"looking up GPU type {gpu_type!r}"):
        try:
            gpu = _sdk().get_gpu(gpu_type, gpu_count)
        except ValueError as exc:  # the SDK's way of saying "no such GPU type"...
            if isinstance(exc, requests.exceptions.JSONDecodeError):
                raise  # ...unless it is an unreadable server error, which _calling reports
            raise T2SError(
                f"RunPod has no GPU type {gpu_type!r}: use a GPU id as RunPod spells it, e.g. 'NVIDIA L4'"
            ) from None
    prices = {"SECURE": [gpu.get("securePrice")], "COMMUNITY": [gpu.get("communityPrice")],
              "ALL": [gpu.get("securePrice"), gpu.get("communityPrice")]}[cloud_type]
    listed = [p for p in prices if isinstance(p, (int, float)) and p > 0]
    return round(min(listed) * gpu_count, 4) if listed else None


def create_pod(request: dict) -> str:
    """Deploys an on-demand pod (podFindAndDeployOnDemand); returns its id. `request`: runpod.create_pod kwargs."""
    gpu = request.get("gpu_type_id")
    with _calling(f"creating a pod with {request.get('gpu_count')}x {gpu}"):
        created = _sdk().create_pod(**request)
    if not created or not created.get("id"):
        raise ApiUnavailable(f"RunPod accepted the pod request for {gpu} but returned no pod id")
    return created["id"]


def get_pod(pod_id: str) -> Pod | None:
    """The pod's state, or None when RunPod no longer knows it (terminated pods disappear)."""
    with _calling(f"reading pod {pod_id}"):
        raw = _sdk().get_pod(pod_id)
    return _pod(raw) if raw else None


def list_pods() -> list[Pod]:
    with _calling("listing your pods"):
        return [_pod(raw) for raw in _sdk().get_pods() or []]


def terminate_pod(pod_id: str) -> None:
    """Terminates the pod (stops billing and deletes it); a pod that is already gone is fine."""
    try:
        with _calling(f"terminating pod {pod_id}"):
            _sdk().terminate_pod(pod_id)
    except T2SError:
        if get_pod(pod_id) is not None:
            raise


def stream_logs(pod_id: str, api_key: str, last_event_id: str | None, tail: int,
                read_timeout_s: float, source: str = "container") -> Iterator[LogEvent]:
    """The pod's container log (or RunPod's "system" log about it: image pull, container start) as it is
    written. Ends when the server closes the stream; a drop or a read timeout raises ApiUnavailable. With
    last_event_id, RunPod resumes from that event (inclusive or not: the caller drops lines already shown)."""
    headers = {"Authorization": f"Bearer {api_key}", "Accept": "text/event-stream"}
    params = {"source": source, "tail": tail}
    if last_event_id:
        headers["Last-Event-ID"] = last_event_id
    url = f"{base_url()}/v2/pods/{pod_id}/logs"
    try:
        with requests.get(url, headers=headers, params=params, stream=True,
                          timeout=(10, read_timeout_s)) as response:
            if response.status_code in (401, 403):
                raise T2SError(f"RunPod refused the API key for the log stream (HTTP {response.status_code}): "
                               "check RUNPOD_API_KEY")
            if response.status_code != 200:  # 404: the pod is gone, or its log is not there yet
                raise ApiUnavailable(f"the log stream of pod {pod_id} answered HTTP {response.status_code}")
            for event in sse_events(_text_chunks(response)):
                yield LogEvent(id=event.id, line=None if event.data is None else _log_line(event.data))
    except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:  # read1 raises urllib3's own
        raise ApiUnavailable(f"the log stream of pod {pod_id} dropped ({type(exc).__name__})") from None


def recent_log_lines(pod_id: str, api_key: str, source: str, read_s: float, tail: int = 50) -> list[str]:
    """What the log stream has for the pod within about read_s seconds (its backlog, then what comes); best
    effort: a stream that is not there yet, or fails, gives what was read so far."""
    lines: list[str] = []
    deadline = time.monotonic() + read_s
    try:
        for event in stream_logs(pod_id, api_key, None, tail, read_s, source=source):
            if event.line is not None:
                lines.append(event.line)
            if time.monotonic() >= deadline:
                break
    except T2SError:
        pass
    return lines


def _text_chunks(response: requests.Response) -> Iterator[str]:
    # read1 returns whatever has arrived, so lines show up live (read(n) would wait for n bytes).
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # SSE is always UTF-8
    while True:
        chunk = response.raw.read1(65536)
        if not chunk:
            break
        yield utf8.decode(chunk)
    yield utf8.decode(b"", final=True)


@dataclass(frozen=True)
class SseEvent:
    id: str | None  # the last id seen on the stream so far (SSE carries it over to later events)
    data: str | None  # None for a comment line (servers send them as heartbeats)


def sse_events(chunks: Iterator[str]) -> Iterator[SseEvent]:
    """Server-Sent Events from text chunks split anywhere (html.spec.whatwg.org, "event stream")."""
    last_id: str | None = None
    data: list[str] = []
    pending = ""
    for chunk in chunks:
        pending += chunk
        # A trailing \r may be half of \r\n: keep it until the next chunk says.
        complete, pending = (pending[:-1], "\r") if pending.endswith("\r") else (pending, "")
        *lines, rest = complete.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        pending = rest + pending
        for line in lines:
            if line == "":
                if data:
                    yield SseEvent(id=last_id, data="\n".join(data))
                data = []
                continue
            if line.startswith(":"):
                yield SseEvent(id=last_id, data=None)  # a comment, e.g. a heartbeat
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "data":
                data.append(value)
            elif field == "id" and "\0" not in value:
                last_id = value
    # An event not ended by a blank line is incomplete and dropped, as the spec says.


def _log_line(data: str) -> str:
    try:
        payload = json.loads(data)
    except json.JSONDecodeError:
        return data  # a plain-text payload is shown as it is
    if isinstance(payload, dict) and isinstance(payload.get("line"), str):
        return payload["line"].rstrip("\n")
    return data


def _pod(raw: dict) -> Pod:
    machine = raw.get("machine") or {}
    cost = raw.get("costPerHr")
    return Pod(
        id=raw["id"],
        name=raw.get("name") or "",
        desired_status=raw.get("desiredStatus") or "UNKNOWN",
        started=raw.get("runtime") is not None,
        cost_per_hr=float(cost) if isinstance(cost, (int, float)) else None,
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
