"""A fake RunPod on 127.0.0.1 for infra's tests: the GraphQL operations the runpod SDK and t2s-infra send,
the v2 SSE log stream (container and system sources), faults to inject, and (`run_pods`) real pods.

    fake = FakeRunPod(api_key="key").start()   # then RUNPOD_API_BASE_URL=fake.url
    fake.faults.capacity["NVIDIA L4"] = 0      # no L4 free
    fake.faults.no_data["pod"] = 2             # the next two pod reads get a gateway's 502 without `data`
    ...
    fake.live_pods()                           # what would still be billing
    fake.stop()

Scripted pods (the default): a pod's life is a timeline computed from the clock. Its container starts
`start_after_s` after creation (RunPod reports `runtime: null` until then), then the "job" prints `job_lines`
lines `line_every_s` apart, prints the exit line `t2s-infra self-terminate --exit-code N` prints, and
(`self_terminate`) the pod is terminated as the entrypoint would do. Terminated pods disappear, as on RunPod.

Real pods (`fake.run_pods(root, network_env, image=...)`): creating a pod starts its container for real, with
the environment RunPod gives a pod: what the launcher sent, RUNPOD_POD_ID and a RUNPOD_API_KEY scoped to that
pod (this fake accepts it for that pod's own reads, log and terminate only). The container is `image` under
Docker (`docker run --network host`, so the pod reaches this fake and a fake Hub on 127.0.0.1), or without an
image entrypoints/run-job as a local process (this checkout's code, the pod's volume a folder under `root`).
Its output is the pod's log stream; terminating the pod (from the test, the launcher or the pod itself) kills
the container and every process it started. A container that exits by itself leaves its pod up, billing, as
RunPod would (it restarts it): only a terminate ends a pod.

An image outside `faults.pullable` cannot be pulled: the system log says "still fetching image", `runtime`
stays null, and after `stop_unpullable_after_s` RunPod stops the pod (desiredStatus EXITED, lastStatusChange
"Exited by Runpod: <date>"), which is what runpodctl's sources say RunPod does and shows (no reason kept).
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import graphql

from infra.timing import Timing

ROOT = Path(__file__).resolve().parents[1]
# The launcher's clocks for tests against this fake (infra.timing.TIMING patched): polls and retries in milliseconds.
FAST_TIMING = Timing(poll_s=0.01, backoff_s=0.01, backoff_max_s=0.02, reconnect_s=0.01, reconnect_max_s=0.02,
                     stream_read_timeout_s=2.0, watch_every_s=0.05, exit_grace_s=1.0, watchdog_grace_s=0.0,
                     system_log_s=0.05, stream_tick_s=0.05, api_retry_s=0.01, keep_log_s=0.3)
NO_CAPACITY = ("There are no longer any instances available with the requested specifications. "
               "Please refresh and try again.")

GPU_TYPES = {
    "NVIDIA L4": {"displayName": "L4", "memoryInGb": 24, "securePrice": 0.43, "communityPrice": 0.28,
                  "secureSpotPrice": 0.22, "communitySpotPrice": 0.14},
    "NVIDIA RTX A5000": {"displayName": "RTX A5000", "memoryInGb": 24, "securePrice": 0.27, "communityPrice": 0.16,
                         "secureSpotPrice": 0.14, "communitySpotPrice": 0.08},
    "NVIDIA H100 80GB HBM3": {"displayName": "H100 SXM", "memoryInGb": 80, "securePrice": 2.99,
                              "communityPrice": 2.69, "secureSpotPrice": 1.75, "communitySpotPrice": 1.49},
}


@dataclass
class Faults:
    capacity: dict[str, int] = field(default_factory=dict)  # GPU type -> pods it can still create (absent: any)
    http500_on_create: int = 0  # the next N creates answer HTTP 500 with an HTML body
    create_despite_500: bool = False  # ... after creating the pod anyway (a response lost on its way back)
    # A gateway's answer, HTTP 502 with JSON that has no `data`, for the next N calls of an operation:
    # "podFindAndDeployOnDemand" (after creating the pod), "pod" (get), "myself" (list), "podTerminate".
    no_data: dict[str, int] = field(default_factory=dict)
    unlisted_prices: set[str] = field(default_factory=set)  # GPU types RunPod lists no price for
    start_after_s: float = 0.02  # image pull: `runtime` stays null until then
    never_start: bool = False
    pullable: set[str] | None = None  # images that can be pulled (None: any); the others never start...
    stop_unpullable_after_s: float = 0.3  # ... and RunPod stops their pod this long after creation
    pull_error_line: str | None = None  # a line the system log shows for an image that cannot be pulled
    drop_stream_after: int | None = None  # a pod's first log connection breaks after this many events
    job_lines: int = 6
    job_says: str | None = None  # one more line the job prints first (e.g. a secret it should not print)
    line_every_s: float = 0.01
    exit_code: int = 0
    self_terminate: bool = True  # the entrypoint's `t2s-infra self-terminate` after the exit line
    terminate_after_exit_s: float = 0.3  # the entrypoint uploads the logs between the exit line and that
    cost_per_hr_per_gpu: float = 0.43
    # Spot pods (podRentInterruptable): GPU type -> spot pods it can still rent (absent: any); a bid below the minimum
    # is refused. A spot pod bills its bid.
    spot_capacity: dict[str, int] = field(default_factory=dict)
    minimum_bid_per_gpu: float = 0.1


# Lines a launches.jsonl may hold that are JSON but no launch record (a hand edit, another tool, a bad clock).
JUNK_RECORD_LINES = (
    "null",
    "[]",
    '"a string"',
    "{}",
    '{"run_id": "demo", "pod_id": "p9", "job": "train", "gpu": "NVIDIA L4", "gpu_count": "two", "cost_per_hr": null,'
    ' "started_at": "2025-01-01T10:00:00+00:00", "status": "running"}',
    '{"run_id": "demo", "pod_id": "p9", "job": "train", "gpu": "NVIDIA L4", "gpu_count": 2, "cost_per_hr": 0.86,'
    ' "started_at": "yesterday", "status": "running"}',
    '{"run_id": "demo", "pod_id": "p9", "job": "train", "gpu": "NVIDIA L4", "gpu_count": 2, "cost_per_hr": 0.86,'
    ' "started_at": "2025-01-01T10:00:00", "status": "running"}',  # no zone: cannot be compared with now
    "not json at all",
)


def _ts(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z"


class Container:
    """A real pod's container: the image under Docker, or entrypoints/run-job as a local process. Its output,
    stdout and stderr together as a container log is, lands in `lines` as (monotonic time, ts, text)."""

    def __init__(self, pod_id: str, command: list[str], env: dict[str, str], cwd: Path, docker_name: str | None):
        self.pod_id, self.docker_name, self.marker = pod_id, docker_name, env.get("RUNPOD_API_KEY")
        self.lines: list[tuple[float, str, str]] = []
        self.drained = threading.Event()
        self.process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for raw in iter(self.process.stdout.readline, b""):
            text = raw.decode(errors="replace").rstrip("\n")
            self.lines.append((time.monotonic(), _ts(datetime.now(timezone.utc)), text))
        self.process.stdout.close()
        self.drained.set()

    def stop(self) -> None:
        """As a terminate does: the container and everything in it are killed at once."""
        if self.docker_name:
            subprocess.run(["docker", "rm", "-f", self.docker_name], capture_output=True, timeout=120)
        for process in self.processes():
            try:
                process.kill()
            except Exception:  # already gone
                pass
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.drained.wait(timeout=10)

    def processes(self) -> list:
        """Every process still running in this container (local mode: found by the pod-scoped key in its
        environment, so that those which started their own session, like accelerate's workers, count too)."""
        import psutil

        found = [p for p in psutil.process_iter(["pid"]) if self._mine(p)]
        if self.process.poll() is None and self.process.pid not in {p.pid for p in found}:
            found.append(psutil.Process(self.process.pid))
        return found

    def _mine(self, process) -> bool:
        try:
            return bool(self.marker) and process.environ().get("RUNPOD_API_KEY") == self.marker
        except Exception:  # gone, or not ours to read
            return False

    def left_behind(self) -> list[str]:
        """What of this container still exists: processes, or the Docker container."""
        left = [f"pid {p.pid}" for p in self.processes()]
        if self.docker_name:
            found = subprocess.run(["docker", "ps", "-aq", "--filter", f"name=^{self.docker_name}$"],
                                   capture_output=True, text=True, timeout=60).stdout.strip()
            left += [f"container {self.docker_name}"] if found else []
        return left


@dataclass
class FakePod:
    id: str
    name: str
    image: str
    gpu: str
    gpu_count: int
    env: dict[str, str]  # as the launcher sent it
    created: float  # time.monotonic()
    cost_per_hr: float
    faults: Faults
    ts_base: datetime
    api_key: str = ""  # the pod-scoped RUNPOD_API_KEY RunPod gives the pod
    terminated: bool = False
    stopped: bool = False
    last_status_change: str = ""
    stream_connections: int = 0
    container: Container | None = None  # a real pod's
    interruptible: bool = False
    bid_per_gpu: float | None = None
    preempted_at: float | None = None  # time.monotonic() of `preempt`: a scripted job prints nothing after it

    @property
    def pullable(self) -> bool:
        return self.faults.pullable is None or self.image in self.faults.pullable

    @property
    def start_time(self) -> float | None:
        if self.faults.never_start or not self.pullable:
            return None
        return self.created if self.container else self.created + self.faults.start_after_s

    @functools.cached_property
    def scripted_lines(self) -> list[tuple[float, str, str]]:
        """(monotonic time it is printed, ts, text) for every line the scripted job will print."""
        if self.start_time is None:
            return []
        texts = [self.faults.job_says] if self.faults.job_says else []
        texts += [f"{self.env.get('T2S_JOB', 'job')} line {i + 1}/{self.faults.job_lines}"
                  for i in range(self.faults.job_lines)]
        texts.append(f"t2s-infra: job exited with code {self.faults.exit_code}; terminating pod {self.id}")
        out = []
        for i, text in enumerate(texts):
            # Two lines share each timestamp, as fast output does on RunPod: ids alone cannot tell them apart.
            ts = _ts(self.ts_base + timedelta(milliseconds=i // 2))
            out.append((self.start_time + (i + 1) * self.faults.line_every_s, ts, text))
        return out

    @property
    def lines(self) -> list[tuple[float, str, str]]:
        if self.container:
            return self.container.lines
        if self.preempted_at is not None:
            return [line for line in self.scripted_lines if line[0] <= self.preempted_at]
        return self.scripted_lines

    @functools.cached_property
    def system_lines(self) -> list[tuple[float, str, str]]:
        """RunPod's own log about the pod (source=system)."""
        lines = [(self.created, _ts(self.ts_base), f"create container: still fetching image {self.image}")]
        if not self.pullable and self.faults.pull_error_line:
            lines.append((self.created, _ts(self.ts_base + timedelta(milliseconds=1)), self.faults.pull_error_line))
        return lines

    def log(self, source: str | None) -> list[tuple[float, str, str]]:
        if source == "system":
            return self.system_lines
        if source == "container":
            return self.lines
        return sorted([*self.system_lines, *self.lines], key=lambda line: line[1])

    def end_time(self) -> float | None:
        if self.container or self.start_time is None or not self.faults.self_terminate or self.preempted_at:
            return None
        return self.scripted_lines[-1][0] + self.faults.terminate_after_exit_s

    def advance(self, now: float) -> None:
        end = self.end_time()
        if end is not None and now >= end:
            self.terminated = True
        if not self.pullable and not self.stopped and now >= self.created + self.faults.stop_unpullable_after_s:
            self.stopped = True  # RunPod gives up on the pull and stops the pod, naming no reason
            self.last_status_change = f"Exited by Runpod: {datetime.now(timezone.utc):%a %b %d %Y %H:%M:%S} GMT"

    @property
    def finished_logging(self) -> bool:
        return self.container is None or self.container.drained.is_set()

    def as_graphql(self, now: float) -> dict:
        started = self.start_time is not None and now >= self.start_time and not self.stopped
        return {
            "id": self.id, "name": self.name, "imageName": self.image, "gpuCount": self.gpu_count,
            "desiredStatus": "EXITED" if self.stopped else "RUNNING", "costPerHr": self.cost_per_hr,
            "lastStatusChange": self.last_status_change or None,
            "env": [f"{k}={v}" for k, v in self.env.items()], "machineId": "m1", "containerDiskInGb": 50,
            "runtime": {"uptimeInSeconds": int(now - self.start_time), "ports": []} if started else None,
            "machine": {"gpuDisplayName": GPU_TYPES[self.gpu]["displayName"], "podHostId": f"{self.id}-host"},
        }


class FakeRunPod:
    def __init__(self, api_key: str = "rpa_TESTKEY"):
        self.api_key = api_key
        self.faults = Faults()
        self.pods: dict[str, FakePod] = {}
        self.calls: list[tuple[str, dict]] = []  # (GraphQL operation, its input) in order
        self.refused: list[str] = []  # what a pod-scoped key was refused for
        self.lock = threading.Lock()
        self.closing = threading.Event()
        self._count = 0
        self._server: ThreadingHTTPServer | None = None
        self._real: dict | None = None  # run_pods' settings

    # --- the test's view -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeRunPod:
        fake = self

        class Handler(_Handler):
            runpod = fake

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def run_pods(self, root: Path, network_env: dict[str, str], image: str | None = None) -> FakeRunPod:
        """From now on a created pod runs for real: `image` under Docker, or (None) entrypoints/run-job as a
        local process with its volume under root. network_env: what the simulated pod's network needs
        (RUNPOD_API_BASE_URL of this fake, HF_ENDPOINT of a fake Hub), added to the pod's environment."""
        self._real = {"root": Path(root), "network_env": dict(network_env), "image": image}
        return self

    def stop(self) -> None:
        for pod in list(self.pods.values()):
            if pod.container:
                pod.container.stop()
        self.closing.set()
        self._server.shutdown()
        self._server.server_close()

    def live_pods(self) -> list[FakePod]:
        """Pods that still exist (and would bill)."""
        with self.lock:
            now = time.monotonic()
            for pod in self.pods.values():
                pod.advance(now)
            return [pod for pod in self.pods.values() if not pod.terminated]

    def left_behind(self) -> list[str]:
        """Processes or containers of real pods that still exist."""
        return [f"{pod.id}: {what}" for pod in self.pods.values() if pod.container
                for what in pod.container.left_behind()]

    def wait_until_no_pod_is_live(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.live_pods():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True

    def add_pod(self, name: str, gpu: str = "NVIDIA L4") -> str:
        """A pod made outside t2s-infra (by hand, or by another machine); returns its id."""
        with self.lock:
            return self._create({"name": name, "imageName": "x", "gpuTypeId": gpu}, time.monotonic(),
                                real=False)["id"]

    def operations(self) -> list[str]:
        return [name for name, _ in self.calls]

    def preempt(self, pod_id: str) -> None:
        """What RunPod does to a spot pod it takes back: no notice, the container is killed at once (no exit line, no
        log upload, no self-terminate), and the pod stays, EXITED, until someone terminates it."""
        with self.lock:
            pod = self.pods[pod_id]
            pod.stopped, pod.preempted_at = True, time.monotonic()
            pod.last_status_change = f"Exited by Runpod: {datetime.now(timezone.utc):%a %b %d %Y %H:%M:%S} GMT"
            container = pod.container
        if container:
            container.stop()

    # --- GraphQL -----------------------------------------------------------------------------------------

    def pod_of_key(self, key: str) -> FakePod | None:
        return next((pod for pod in self.pods.values() if pod.api_key and pod.api_key == key), None)

    def graphql(self, query: str, caller: FakePod | None = None) -> tuple[int, str]:
        """caller: the pod whose scoped key made the request (None: the account's key)."""
        try:
            fields = parse_root_fields(query)
        except GraphQLSyntaxError as exc:
            return 200, json.dumps({"errors": [{"message": f"Syntax Error: {exc}"}], "data": None})
        if caller is not None:
            allowed = all(name in ("pod", "podTerminate", "podStop") and
                          args.get("input", {}).get("podId") == caller.id for name, args in fields)
            if not allowed:
                self.refused.append(", ".join(name for name, _ in fields))
                return 401, json.dumps({"error": "this pod's key may only read and stop its own pod"})
        data = {}
        for name, args in fields:
            with self.lock:
                self.calls.append((name, args.get("input", {})))
                now = time.monotonic()
                for pod in self.pods.values():
                    pod.advance(now)
                try:
                    if self.faults.no_data.get(name, 0) > 0:
                        self.faults.no_data[name] -= 1
                        if name == "podFindAndDeployOnDemand":
                            self._create(args["input"], now)  # made, but the answer is a gateway's
                        return 502, json.dumps({"message": "Bad gateway"})
                    if name == "podFindAndDeployOnDemand" and self.faults.http500_on_create > 0:
                        self.faults.http500_on_create -= 1
                        if self.faults.create_despite_500:
                            self._create(args["input"], now)
                        return 500, "<html><body>500 Internal Server Error</body></html>"
                    data[name] = self._resolve(name, args, now)
                except GraphQLError as exc:
                    return 200, json.dumps({"errors": [{"message": str(exc)}], "data": None})
        return 200, json.dumps({"data": data})

    def _resolve(self, name: str, args: dict, now: float):
        given = args.get("input", {})
        if name == "gpuTypes":
            wanted = [given["id"]] if "id" in given else list(GPU_TYPES)
            unlisted = {"securePrice": None, "communityPrice": None, "secureSpotPrice": None, "communitySpotPrice": None}
            return [{"id": gpu, "maxGpuCount": 8, "secureCloud": True, "communityCloud": True,
                     "lowestPrice": {"minimumBidPrice": self.faults.minimum_bid_per_gpu,
                                     "uninterruptablePrice": GPU_TYPES[gpu]["securePrice"]},
                     **GPU_TYPES[gpu], **(unlisted if gpu in self.faults.unlisted_prices else {})}
                    for gpu in wanted if gpu in GPU_TYPES]
        if name == "podFindAndDeployOnDemand":
            return self._create(given, now)
        if name == "podRentInterruptable":
            bid = given.get("bidPerGpu")
            if not isinstance(bid, (int, float)) or bid < self.faults.minimum_bid_per_gpu:
                raise GraphQLError(f"Your bid is below the minimum bid price of ${self.faults.minimum_bid_per_gpu}/hr")
            free = self.faults.spot_capacity.get(given.get("gpuTypeId"))
            if free is not None:
                if free <= 0:
                    raise GraphQLError(NO_CAPACITY)
                self.faults.spot_capacity[given["gpuTypeId"]] = free - 1
            created = self._create(given, now)
            pod = self.pods[created["id"]]
            pod.interruptible, pod.bid_per_gpu = True, float(bid)
            pod.cost_per_hr = round(float(bid) * pod.gpu_count, 4)
            return created
        if name == "pod":
            pod = self.pods.get(given.get("podId"))
            return pod.as_graphql(now) if pod and not pod.terminated else None
        if name == "myself":
            return {"id": "user-1", "pubKey": "", "networkVolumes": [{"id": "vol1", "name": "v", "size": 100,
                                                                       "dataCenterId": "EU-RO-1"}],
                    "pods": [p.as_graphql(now) for p in self.pods.values() if not p.terminated]}
        if name in ("podStop", "podTerminate"):
            pod = self.pods.get(given.get("podId"))
            if pod is None or pod.terminated:
                raise GraphQLError("pod not found")
            if name == "podStop":
                pod.stopped = True
                pod.last_status_change = f"Exited by User: {datetime.now(timezone.utc):%a %b %d %Y %H:%M:%S} GMT"
                return {"id": pod.id, "desiredStatus": "EXITED"}
            pod.terminated = True
            if pod.container:
                # After the answer is on its way: a pod terminating itself is the one asking.
                threading.Timer(0.2, pod.container.stop).start()
            return None
        raise GraphQLError(f'Cannot query field "{name}" on type "Query".')

    def _create(self, given: dict, now: float, real: bool = True) -> dict:
        gpu = given.get("gpuTypeId")
        if gpu not in GPU_TYPES:
            raise GraphQLError("Invalid GPU type")
        free = self.faults.capacity.get(gpu)
        if free is not None:
            if free <= 0:
                raise GraphQLError(NO_CAPACITY)
            self.faults.capacity[gpu] = free - 1
        self._count += 1
        pod_id = f"pod{self._count:03d}fake"
        env = {item["key"]: item["value"] for item in given.get("env", [])}
        count = given.get("gpuCount", 1)
        pod = FakePod(
            id=pod_id, name=given["name"], image=given["imageName"], gpu=gpu, gpu_count=count, env=env,
            created=now, cost_per_hr=round(self.faults.cost_per_hr_per_gpu * count, 4), faults=self.faults,
            ts_base=datetime.now(timezone.utc).replace(microsecond=0), api_key=f"rpa_POD{secrets.token_hex(12)}",
        )
        self.pods[pod_id] = pod
        if real and self._real and pod.pullable and not self.faults.never_start:
            pod.container = self._start_container(pod)
        return {"id": pod_id, "imageName": given["imageName"], "env": [], "machineId": "m1",
                "machine": {"podHostId": f"{pod_id}-host"}}

    def _start_container(self, pod: FakePod) -> Container:
        """The pod's container, with the environment RunPod gives a pod (plus the simulated network's)."""
        real = self._real
        real["root"].mkdir(parents=True, exist_ok=True)
        runpod_env = {**pod.env, "RUNPOD_POD_ID": pod.id, "RUNPOD_API_KEY": pod.api_key, **real["network_env"]}
        if real["image"]:
            name = f"t2s-fake-{pod.id}-{secrets.token_hex(3)}"
            # `-e NAME` without a value: docker reads it from its own environment, so no value is on a command line.
            command = ["docker", "run", "--rm", "--name", name, "--network", "host",
                       *[arg for key in runpod_env for arg in ("-e", key)], real["image"]]
            return Container(pod.id, command, {**os.environ, **runpod_env}, real["root"], name)
        volume = real["root"] / pod.id / "workspace"
        (real["root"] / pod.id / "tmp").mkdir(parents=True)
        volume.mkdir(parents=True)
        image_env = {  # what the image itself sets: its PATH, code, home, caches
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"]),
            "PYTHONPATH": str(ROOT), "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8",
            "TMPDIR": str(real["root"] / pod.id / "tmp"), "HF_HOME": str(volume / ".cache" / "huggingface"),
        }
        # The pod's volume is mounted at T2S_WORKDIR (infra.volume_mount_path): here, a folder of its own.
        env = {**image_env, **runpod_env, "T2S_WORKDIR": str(volume)}
        return Container(pod.id, [str(ROOT / "entrypoints" / "run-job")], env, volume, None)


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # a client that hung up is no news
            super().handle_error(request, client_address)


class GraphQLError(Exception):
    pass


class GraphQLSyntaxError(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    runpod: FakeRunPod
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def _caller(self) -> tuple[bool, FakePod | None]:
        """(authorized, the pod whose scoped key it is, if one is)."""
        auth = self.headers.get("Authorization") or ""
        key = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
        if key is None:  # the SDK's GraphQL calls put the key in the query string
            key = (parse_qs(urlparse(self.path).query).get("api_key") or [None])[0]
        if key == self.runpod.api_key:
            return True, None
        pod = self.runpod.pod_of_key(key) if key else None
        if pod is not None and not pod.terminated:
            return True, pod
        self._reply(401, '{"error": "Unauthorized"}')
        return False, None

    def _reply(self, status: int, body: str, content_type: str = "application/json") -> None:
        payload = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if urlparse(self.path).path != "/graphql":
            return self._reply(404, "{}")
        authorized, pod = self._caller()
        if not authorized:
            return
        status, text = self.runpod.graphql(json.loads(body)["query"], caller=pod)
        self._reply(status, text, "application/json" if text.startswith("{") else "text/html")

    def do_GET(self):
        url = urlparse(self.path)
        match = re.fullmatch(r"/v2/pods/([^/]+)/logs", url.path)
        if not match:
            return self._reply(404, "{}")
        authorized, caller = self._caller()
        if not authorized:
            return
        with self.runpod.lock:
            pod = self.runpod.pods.get(match.group(1))
            if pod is not None:
                pod.advance(time.monotonic())
            if caller is not None and caller is not pod:
                return self._reply(403, '{"error": "not this pod\'s key"}')
            if pod is None or pod.terminated:
                return self._reply(404, '{"error": "pod not found"}')
            source = (parse_qs(url.query).get("source") or [None])[0]
            if source == "container" or source is None:
                pod.stream_connections += 1
            first_connection = pod.stream_connections == 1
        self._stream(pod, url, source, first_connection)

    def _stream(self, pod: FakePod, url, source: str | None, first_connection: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        lines = pod.log(source)
        resume = self.headers.get("Last-Event-ID")
        now = time.monotonic()
        if resume:
            # Inclusive resume: lines sharing the cursor's timestamp are sent again (the client must cope).
            index = next((i for i, (_, ts, _) in enumerate(lines) if ts >= resume), len(lines))
        else:
            tail = int(parse_qs(url.query).get("tail", ["100"])[0])
            printed = sum(1 for at, _, _ in lines if at <= now)
            index = max(0, printed - tail)
        sent = 0
        last_write = time.monotonic()
        try:
            while not self.runpod.closing.is_set():
                now = time.monotonic()
                lines = pod.log(source)  # a real pod's log grows
                if index < len(lines) and lines[index][0] <= now:
                    _, ts, text = lines[index]
                    data = json.dumps({"source": source or "container", "line": text, "ts": ts})
                    self._chunk(f"id: {ts}\ndata: {data}\n\n")
                    index += 1
                    sent += 1
                    last_write = now
                    drop = pod.faults.drop_stream_after
                    if first_connection and source != "system" and drop is not None and sent >= drop:
                        self.close_connection = True
                        self.wfile.flush()
                        self.connection.shutdown(2)  # mid-stream, without the closing chunk
                        return
                    continue
                with self.runpod.lock:
                    pod.advance(now)
                    gone = pod.terminated and pod.finished_logging
                if gone and index >= len(pod.log(source)):
                    break
                if now - last_write > 0.05:
                    self._chunk(": ping\n\n")
                    last_write = now
                time.sleep(0.003)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
        self.close_connection = True

    def _chunk(self, text: str) -> None:
        payload = text.encode()
        self.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
        self.wfile.flush()


# --- the GraphQL the SDK sends, parsed by graphql-core: operations whose root fields take literal arguments ----


def parse_root_fields(query: str) -> list[tuple[str, dict]]:
    """[(root field name, its arguments)] of the first `query`/`mutation` in `query` (arguments as Python values;
    an enum value as its name). A variable in an argument has no value here: the SDK sends literals."""
    try:
        document = graphql.parse(query)
    except graphql.GraphQLError as exc:
        raise GraphQLSyntaxError(exc.message) from None
    operation = next((d for d in document.definitions if isinstance(d, graphql.OperationDefinitionNode)), None)
    if operation is None:
        raise GraphQLSyntaxError("the document has no query or mutation")
    fields = []
    for selection in operation.selection_set.selections:
        if not isinstance(selection, graphql.FieldNode):
            raise GraphQLSyntaxError("only fields may stand at the root here")
        arguments = selection.arguments or ()  # None for a field without any (graphql-core 3.3)
        fields.append((selection.name.value, {arg.name.value: graphql.value_from_ast_untyped(arg.value)
                                              for arg in arguments}))
    return fields
