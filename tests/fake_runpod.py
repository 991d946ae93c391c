"""A fake RunPod API on 127.0.0.1 for infra's tests: the GraphQL operations the runpod SDK and t2s-infra
send, and the v2 SSE log stream, with faults to inject.

    fake = FakeRunPod(api_key="key").start()   # then RUNPOD_API_BASE_URL=fake.url
    fake.faults.capacity["NVIDIA L4"] = 0      # no L4 free
    ...
    fake.live_pods()                           # what would still be billing
    fake.stop()

A pod's life is a timeline computed from the clock: its container starts `start_after_s` after creation
(RunPod reports `runtime: null` until then), then the "job" prints `job_lines` lines `line_every_s` apart,
prints the exit line `t2s-infra self-terminate --exit-code N` prints, and (`self_terminate`) the pod is
terminated as the entrypoint would do. Terminated pods disappear, as on RunPod.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from huggingface_hub.errors import RepositoryNotFoundError
from huggingface_hub.utils import filter_repo_objects

NO_CAPACITY = ("There are no longer any instances available with the requested specifications. "
               "Please refresh and try again.")

GPU_TYPES = {
    "NVIDIA L4": {"displayName": "L4", "memoryInGb": 24, "securePrice": 0.43, "communityPrice": 0.28},
    "NVIDIA RTX A5000": {"displayName": "RTX A5000", "memoryInGb": 24, "securePrice": 0.27, "communityPrice": 0.16},
    "NVIDIA H100 80GB HBM3": {"displayName": "H100 SXM", "memoryInGb": 80, "securePrice": 2.99,
                              "communityPrice": 2.69},
}


@dataclass
class Faults:
    capacity: dict[str, int] = field(default_factory=dict)  # GPU type -> pods it can still create (absent: any)
    http500_on_create: int = 0  # the next N creates answer HTTP 500 with an HTML body
    create_despite_500: bool = False  # ... after creating the pod anyway (a response lost on its way back)
    start_after_s: float = 0.02  # image pull: `runtime` stays null until then
    never_start: bool = False
    drop_stream_after: int | None = None  # a pod's first log connection breaks after this many events
    job_lines: int = 6
    job_says: str | None = None  # one more line the job prints first (e.g. a secret it should not print)
    line_every_s: float = 0.01
    exit_code: int = 0
    self_terminate: bool = True  # the entrypoint's `t2s-infra self-terminate` after the exit line
    terminate_after_exit_s: float = 0.3  # the entrypoint uploads the logs between the exit line and that
    cost_per_hr_per_gpu: float = 0.43


@dataclass
class FakePod:
    id: str
    name: str
    image: str
    gpu: str
    gpu_count: int
    env: dict[str, str]
    created: float  # time.monotonic()
    cost_per_hr: float
    faults: Faults
    ts_base: datetime
    terminated: bool = False
    stopped: bool = False
    stream_connections: int = 0

    @property
    def start_time(self) -> float | None:
        return None if self.faults.never_start else self.created + self.faults.start_after_s

    @functools.cached_property
    def lines(self) -> list[tuple[float, str, str]]:
        """(monotonic time it is printed, ts, text) for every line the job will print."""
        if self.start_time is None:
            return []
        texts = [self.faults.job_says] if self.faults.job_says else []
        texts += [f"{self.env.get('T2S_JOB', 'job')} line {i + 1}/{self.faults.job_lines}"
                  for i in range(self.faults.job_lines)]
        texts.append(f"t2s-infra: job exited with code {self.faults.exit_code}; pod {self.id}")
        out = []
        for i, text in enumerate(texts):
            # Two lines share each timestamp, as fast output does on RunPod: ids alone cannot tell them apart.
            ts = (self.ts_base + timedelta(milliseconds=i // 2)).strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z"
            out.append((self.start_time + (i + 1) * self.faults.line_every_s, ts, text))
        return out

    def end_time(self) -> float | None:
        if self.start_time is None or not self.faults.self_terminate:
            return None
        return self.lines[-1][0] + self.faults.terminate_after_exit_s

    def advance(self, now: float) -> None:
        end = self.end_time()
        if end is not None and now >= end:
            self.terminated = True

    def as_graphql(self, now: float) -> dict:
        started = self.start_time is not None and now >= self.start_time and not self.stopped
        return {
            "id": self.id, "name": self.name, "imageName": self.image, "gpuCount": self.gpu_count,
            "desiredStatus": "EXITED" if self.stopped else "RUNNING", "costPerHr": self.cost_per_hr,
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
        self.lock = threading.Lock()
        self.closing = threading.Event()
        self._count = 0
        self._server: ThreadingHTTPServer | None = None

    # --- the test's view -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeRunPod:
        fake = self

        class Handler(_Handler):
            runpod = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def stop(self) -> None:
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

    def add_pod(self, name: str, gpu: str = "NVIDIA L4") -> str:
        """A pod made outside t2s-infra (by hand, or by another machine); returns its id."""
        with self.lock:
            return self._create({"name": name, "imageName": "x", "gpuTypeId": gpu}, time.monotonic())["id"]

    def operations(self) -> list[str]:
        return [name for name, _ in self.calls]

    # --- GraphQL -----------------------------------------------------------------------------------------

    def graphql(self, query: str) -> tuple[int, str]:
        try:
            fields = parse_root_fields(query)
        except GraphQLSyntaxError as exc:
            return 200, json.dumps({"errors": [{"message": f"Syntax Error: {exc}"}], "data": None})
        data = {}
        for name, args in fields:
            with self.lock:
                self.calls.append((name, args.get("input", {})))
                now = time.monotonic()
                for pod in self.pods.values():
                    pod.advance(now)
                try:
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
            return [{"id": gpu, "maxGpuCount": 8, "secureCloud": True, "communityCloud": True,
                     "lowestPrice": {"minimumBidPrice": 0.1, "uninterruptablePrice": GPU_TYPES[gpu]["securePrice"]},
                     **GPU_TYPES[gpu]} for gpu in wanted if gpu in GPU_TYPES]
        if name == "podFindAndDeployOnDemand":
            return self._create(given, now)
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
                return {"id": pod.id, "desiredStatus": "EXITED"}
            pod.terminated = True
            return None
        raise GraphQLError(f'Cannot query field "{name}" on type "Query".')

    def _create(self, given: dict, now: float) -> dict:
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
        self.pods[pod_id] = FakePod(
            id=pod_id, name=given["name"], image=given["imageName"], gpu=gpu, gpu_count=count, env=env,
            created=now, cost_per_hr=round(self.faults.cost_per_hr_per_gpu * count, 4), faults=self.faults,
            ts_base=datetime.now(timezone.utc).replace(microsecond=0),
        )
        return {"id": pod_id, "imageName": given["imageName"], "env": [], "machineId": "m1",
                "machine": {"podHostId": f"{pod_id}-host"}}


class GraphQLError(Exception):
    pass


class GraphQLSyntaxError(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    runpod: FakeRunPod
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def _authorized(self) -> bool:
        if self.headers.get("Authorization") == f"Bearer {self.runpod.api_key}":
            return True
        self._reply(401, '{"error": "Unauthorized"}')
        return False

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
        if not self._authorized():
            return
        status, text = self.runpod.graphql(json.loads(body)["query"])
        self._reply(status, text, "application/json" if status == 200 else "text/html")

    def do_GET(self):
        url = urlparse(self.path)
        match = re.fullmatch(r"/v2/pods/([^/]+)/logs", url.path)
        if not match:
            return self._reply(404, "{}")
        if not self._authorized():
            return
        with self.runpod.lock:
            pod = self.runpod.pods.get(match.group(1))
            if pod is not None:
                pod.advance(time.monotonic())
            if pod is None or pod.terminated:
                return self._reply(404, '{"error": "pod not found"}')
            pod.stream_connections += 1
            first_connection = pod.stream_connections == 1
        self._stream(pod, url, first_connection)

    def _stream(self, pod: FakePod, url, first_connection: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        lines = pod.lines
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
                if index < len(lines) and lines[index][0] <= now:
                    _, ts, text = lines[index]
                    data = json.dumps({"source": "container", "line": text, "ts": ts})
                    self._chunk(f"id: {ts}\ndata: {data}\n\n")
                    index += 1
                    sent += 1
                    last_write = now
                    drop = pod.faults.drop_stream_after
                    if first_connection and drop is not None and sent >= drop:
                        self.close_connection = True
                        self.wfile.flush()
                        self.connection.shutdown(2)  # mid-stream, without the closing chunk
                        return
                    continue
                with self.runpod.lock:
                    pod.advance(now)
                    gone = pod.terminated
                if gone and index >= len(lines):
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


# --- the part of GraphQL the SDK sends: operations whose root fields take literal arguments -------------

_TOKEN = re.compile(r'\s+|,|#[^\n]*|(?P<string>"(?:[^"\\\n]|\\.)*")|(?P<punct>[{}()\[\]:!$=])|'
                    r"(?P<number>-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)|(?P<name>[_A-Za-z][_0-9A-Za-z]*)")


def _tokens(text: str) -> list[tuple[str, object]]:
    out, pos = [], 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match or match.end() == pos:
            raise GraphQLSyntaxError(f"unexpected character {text[pos]!r} at {pos}")
        pos = match.end()
        if match.group("string") is not None:
            out.append(("value", json.loads(match.group("string"))))  # GraphQL escapes are JSON's
        elif match.group("punct") is not None:
            out.append(("punct", match.group("punct")))
        elif match.group("number") is not None:
            out.append(("value", json.loads(match.group("number"))))
        elif match.group("name") is not None:
            out.append(("name", match.group("name")))
    return out


def parse_root_fields(query: str) -> list[tuple[str, dict]]:
    """[(root field name, its arguments)] of a `query`/`mutation` with literal arguments."""
    tokens = _tokens(query)
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else ("eof", None)

    def take(kind, value=None):
        nonlocal pos
        token = peek()
        if token[0] != kind or (value is not None and token[1] != value):
            raise GraphQLSyntaxError(f"expected {value or kind}, got {token[1]!r}")
        pos += 1
        return token[1]

    def value():
        kind, text = peek()
        if kind == "value":
            return take("value")
        if kind == "name":
            take("name")
            return {"true": True, "false": False, "null": None}.get(text, text)  # else an enum value
        if text == "[":
            take("punct", "[")
            items = []
            while peek() != ("punct", "]"):
                items.append(value())
            take("punct", "]")
            return items
        take("punct", "{")
        obj = {}
        while peek() != ("punct", "}"):
            key = take("name")
            take("punct", ":")
            obj[key] = value()
        take("punct", "}")
        return obj

    def skip_selection():
        take("punct", "{")
        depth = 1
        nonlocal pos
        while depth:
            kind, text = peek()
            if kind == "eof":
                raise GraphQLSyntaxError("unbalanced braces")
            depth += {"{": 1, "}": -1}.get(text, 0) if kind == "punct" else 0
            pos += 1

    if peek()[0] == "name" and peek()[1] in ("query", "mutation"):
        take("name")
        if peek()[0] == "name":
            take("name")
    take("punct", "{")
    fields = []
    while peek() != ("punct", "}"):
        name = take("name")
        args = {}
        if peek() == ("punct", "("):
            take("punct", "(")
            while peek() != ("punct", ")"):
                key = take("name")
                take("punct", ":")
                args[key] = value()
            take("punct", ")")
        if peek() == ("punct", "{"):
            skip_selection()
        fields.append((name, args))
    take("punct", "}")
    return fields


# --- the Hub side: where pods upload their run's logs -----------------------------------------------------


class LocalHub:
    """A folder standing in for Hub datasets: the huggingface_hub calls infra.logs makes, nothing more.

        hub = LocalHub(tmp_path / "hub")
        monkeypatch.setattr(infra.logs, "HfApi", hub.client)
        monkeypatch.setattr(infra.logs, "snapshot_download", hub.snapshot_download)
    """

    def __init__(self, root: Path):
        self.root = root
        self.private: dict[str, bool] = {}  # repo id -> created private
        self.tokens: list[str | None] = []  # every token a call was made with
        self.offline = False  # every call fails as without network

    def client(self, token: str | None = None) -> "LocalHub._Client":
        return LocalHub._Client(self, token)

    def _enter(self, token: str | None) -> None:
        if self.offline:
            raise ConnectionError("the Hub cannot be reached")
        self.tokens.append(token)

    def _missing(self, repo_id: str) -> RepositoryNotFoundError:
        try:
            import httpx2 as http  # huggingface_hub 2.x's HTTP client
        except ImportError:
            import httpx as http
        url = f"https://huggingface.co/api/datasets/{repo_id}"
        return RepositoryNotFoundError(f"404: {repo_id}", response=http.Response(404, request=http.Request("GET", url)))

    def snapshot_download(self, repo_id, *, repo_type=None, allow_patterns=None, local_dir=None, token=None, **_):
        self._enter(token)
        assert repo_type == "dataset"
        repo = self.root / repo_id
        if repo_id not in self.private:
            raise self._missing(repo_id)
        names = [p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()]
        for name in filter_repo_objects(names, allow_patterns=allow_patterns):
            target = Path(local_dir) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(repo / name, target)
        return str(local_dir)

    class _Client:
        def __init__(self, hub: "LocalHub", token: str | None):
            self.hub, self.token = hub, token

        def create_repo(self, repo_id, *, repo_type=None, private=None, exist_ok=False, **_):
            self.hub._enter(self.token)
            assert repo_type == "dataset"
            self.hub.private.setdefault(repo_id, bool(private))

        def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, repo_type=None, allow_patterns=None,
                          **_):
            self.hub._enter(self.token)
            assert repo_type == "dataset" and repo_id in self.hub.private
            folder = Path(folder_path)
            names = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
            for name in filter_repo_objects(names, allow_patterns=allow_patterns):
                target = self.hub.root / repo_id / (path_in_repo or "") / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(folder / name, target)

        def list_repo_files(self, repo_id, *, repo_type=None, **_):
            self.hub._enter(self.token)
            if repo_id not in self.hub.private:
                raise self.hub._missing(repo_id)
            repo = self.hub.root / repo_id
            return sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file())
