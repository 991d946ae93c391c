"""infra's pure core: settings, fallback plan, pod request, SSE parsing, the log cursor, limits, records."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from jobs.lib.config import Config
from jobs.lib.errors import T2SError
from infra import records
from infra.launch import capacity_plan, graphql_string_content, pod_env, pod_request
from infra.logs import LogCursor, exit_code_of, exit_line, exit_reason_of
from infra.records import Launch
from infra.runpod_api import ApiUnavailable, stream_logs
from infra.settings import InfraSettings, load_infra_settings, redact
from infra.timing import Timing
from infra.watchdog import limit_exceeded
from tests.fake_runpod import parse_root_fields


def settings(**infra) -> InfraSettings:
    return load_infra_settings(Config(infra=infra), "run.yaml")


def test_settings_defaults_and_one_line_errors_naming_the_key():
    default = settings()
    assert (default.gpu_types, default.gpu_count, default.cloud_type) == (["NVIDIA L4"], None, "SECURE")
    assert default.image is None and default.logs_repo is None  # derived at launch (infra.preflight)
    with pytest.raises(T2SError, match=r"^unknown config key 'infra.gpu' in run.yaml: .*allowed here: image, "):
        settings(gpu="NVIDIA L4")
    with pytest.raises(T2SError, match=r"^config key 'infra.cloud_type' in run.yaml: .*'SECURE'.*\(got 'cheap'\)$"):
        settings(cloud_type="cheap")
    with pytest.raises(T2SError, match=r"'infra.gpu_count' .*greater than 0"):
        settings(gpu_count=0)
    with pytest.raises(T2SError, match=r"'infra.gpu_types' .*at least 1"):
        settings(gpu_types=[])
    with pytest.raises(T2SError, match=r"'infra.env' .*RUNPOD_API_KEY is a secret"):
        settings(env={"RUNPOD_API_KEY": "rpa_x"})
    with pytest.raises(T2SError, match=r"'infra.env' .*T2S_JOB is set by t2s-infra"):
        settings(env={"T2S_JOB": "x"})
    with pytest.raises(T2SError, match=r"'infra.logs_repo'"):
        settings(logs_repo="no-namespace")


def test_a_secret_in_the_config_is_not_echoed_in_the_error():
    with pytest.raises(T2SError) as error:
        settings(env={"HF_TOKEN": "hf_LEAKME"})
    assert "hf_LEAKME" not in str(error.value)


def test_capacity_plan_walks_the_fallback_list_with_exponential_backoff_between_passes():
    timing = Timing(backoff_s=10, backoff_max_s=25)
    assert capacity_plan(["L4", "A5000"], 4, timing) == [
        ("L4", 0), ("A5000", 0), ("L4", 10), ("A5000", 0), ("L4", 20), ("A5000", 0), ("L4", 25), ("A5000", 0)]


def test_pod_request_carries_the_env_contract_escaped_for_the_sdk_graphql():
    config_text = 'run_id: demo\n# "quoted" \\ backslash, tab\there, ünïcode\n'
    infra = settings(logs_repo="me/runs", env={"EXTRA": "1"}, network_volume_id="vol1")
    infra = infra.model_copy(update={"gpu_count": 2, "image": "ghcr.io/t2s/t2s:pipeline-cu12"})
    env = pod_env(infra, job="train", config_text=config_text, price_per_hr=0.86, hf_token="hf_t")
    assert env["T2S_CONFIG_YAML"] == config_text and env["EXTRA"] == "1"
    assert (env["T2S_COST_PER_HOUR_USD"], env["T2S_MAX_RUNTIME_MIN"], env["T2S_MAX_COST_USD"]) == ("0.86", "240", "10")
    # Every T2S_* variable is read on the pod (entrypoints/, infra/caps.py, upload-logs); your RunPod key stays home.
    assert sorted(k for k in env if k.startswith("T2S_")) == [
        "T2S_CONFIG_YAML", "T2S_COST_PER_HOUR_USD", "T2S_JOB", "T2S_KEEP_POD", "T2S_LOGS_REPO", "T2S_MAX_COST_USD",
        "T2S_MAX_RUNTIME_MIN", "T2S_WORKDIR"]
    assert "RUNPOD_API_KEY" not in env
    request = pod_request(infra, name="t2s-demo-train-abcd", gpu="NVIDIA L4", env=env)
    assert request["volume_in_gb"] == 0 and request["network_volume_id"] == "vol1"
    # What the SDK builds from it must parse as GraphQL and give back the exact text.
    from runpod.api.mutations.pods import generate_pod_deployment_mutation

    mutation = generate_pod_deployment_mutation(
        request["name"], request["image_name"], request["gpu_type_id"], request["cloud_type"],
        gpu_count=request["gpu_count"], env=request["env"], network_volume_id="vol1")
    [(name, args)] = parse_root_fields(mutation)
    sent = {item["key"]: item["value"] for item in args["input"]["env"]}
    assert name == "podFindAndDeployOnDemand" and sent == env
    assert graphql_string_content('a"b\nc') == 'a\\"b\\nc'


class ScriptedStream:
    """A log stream on 127.0.0.1 that writes a script piece by piece (chunked, as RunPod's is): bytes are sent
    as they are, a float is a pause, an Event is waited for (at most 5 s); `cut` ends without the closing chunk."""

    def __init__(self, script: list, cut: bool = False, content_type: str = "text/event-stream"):
        stream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                stream.requests.append((self.path, dict(self.headers)))
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    for piece in script:
                        if isinstance(piece, float):
                            time.sleep(piece)
                        elif isinstance(piece, threading.Event):
                            piece.wait(timeout=5)
                        else:
                            self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                            self.wfile.flush()
                    if cut:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    else:
                        self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    pass
                self.close_connection = True

        self.requests: list = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def serve(monkeypatch):
    servers = []

    def start(script: list, **options) -> ScriptedStream:
        server = ScriptedStream(script, **options)
        servers.append(server)
        monkeypatch.setenv("RUNPOD_API_BASE_URL", server.url)
        return server

    yield start
    for server in servers:
        server.close()


def read_stream(last_id: str | None = None, tick_s: float = 5.0) -> list[tuple[str | None, str | None]]:
    return [(e.id, e.line) for e in stream_logs("p1", "key", last_id, 100, 5.0, tick_s=tick_s)]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_the_log_stream_survives_any_chunking_and_every_line_ending(serve, size):
    text = b": hello\r\nid: 1\r\ndata: {\"line\": \"a\"}\r\n\r\nid: 2\rdata: first\rdata: second\r\rdata: no id\n\n"
    server = serve([text[i:i + size] for i in range(0, len(text), size)])
    lines = [(event_id, line) for event_id, line in read_stream(last_id="0") if line is not None]
    assert lines == [("1", "a"), ("2", "first\nsecond"), ("2", "no id")]
    [(path, headers)] = server.requests
    assert path == "/v2/pods/p1/logs?source=container&tail=100"
    assert headers["Authorization"] == "Bearer key" and headers["Last-Event-ID"] == "0"


def test_the_log_stream_drops_an_event_cut_off_before_its_blank_line(serve):
    serve([b"data: whole\n\n", b"data: cut"])
    assert [line for _, line in read_stream() if line] == ["whole"]


def test_each_line_shows_as_soon_as_it_is_sent(serve):
    shown_first = threading.Event()  # the server sends the second line only once the first has been shown
    serve([b'id: 1\ndata: {"line": "first"}\n\n', shown_first, b'id: 2\ndata: {"line": "second"}\n\n'])
    lines = []
    for event in stream_logs("p1", "key", None, 100, 10.0):
        if event.line:
            lines.append((event.line, shown_first.is_set()))
            shown_first.set()
    assert lines == [("first", False), ("second", True)]


def test_heartbeats_come_on_time_whatever_the_server_sends(serve):
    # Nothing for 0.4 s, then keep-alive comments only (they reset any read timeout) for 0.4 s, then a line.
    serve([0.4, *[b": ping\n\n", 0.05] * 8, b'id: 1\ndata: {"line": "late"}\n\n'])
    events = read_stream(tick_s=0.05)
    assert events[-1] == ("1", "late")
    assert sum(1 for event in events if event == (None, None)) >= 8


def test_a_dropped_or_wrong_stream_is_apiunavailable_after_the_lines_it_gave(serve):
    serve([b'id: 1\ndata: {"line": "a"}\n\n', b"data: b"], cut=True)
    lines = []
    with pytest.raises(ApiUnavailable, match="log stream of pod p1 dropped"):
        for event in stream_logs("p1", "key", None, 100, 5.0):
            lines.append(event.line)
    assert lines == ["a"]
    serve([b"<html>502 Bad gateway</html>"], content_type="text/html")
    with pytest.raises(ApiUnavailable, match="log stream of pod p1 dropped"):
        read_stream()


def test_log_cursor_shows_each_line_once_across_an_inclusive_resume():
    cursor = LogCursor()
    first = [("2025-01-01T00:00:00.001Z", "a"), ("2025-01-01T00:00:00.001Z", "b"), ("2025-01-01T00:00:00.002Z", "c")]
    shown = [line for ts, line in first if cursor.is_new(ts)]
    assert shown == ["a", "b", "c"] and cursor.last_id == "2025-01-01T00:00:00.002Z"
    cursor.reconnected()
    # The server resumes from the last id inclusive, and one more line at that same timestamp is new.
    replay = [("2025-01-01T00:00:00.002Z", "c"), ("2025-01-01T00:00:00.002Z", "d"), ("2025-01-01T00:00:01Z", "e")]
    assert [line for ts, line in replay if cursor.is_new(ts)] == ["d", "e"]
    cursor.reconnected()
    # A server that ignores the cursor and replays its backfill shows nothing twice either.
    assert [line for ts, line in first + replay if cursor.is_new(ts)] == []


def test_log_cursor_orders_timestamps_by_time_not_by_text():
    cursor = LogCursor()
    assert cursor.is_new("2025-01-01T00:00:01Z")
    assert cursor.is_new("2025-01-01T00:00:01.5Z")  # later, though "." sorts before "Z"
    assert cursor.is_new("2025-01-01T01:00:01.6+01:00") is True  # same instant zone-shifted, 0.1 s later
    assert not cursor.is_new("2025-01-01T00:00:01.000000001Z")


def test_exit_lines_of_t2s_infra_and_of_the_entrypoint_are_recognised():
    assert exit_code_of(exit_line(3) + "; terminating pod abc") == 3
    assert exit_reason_of(exit_line(3) + "; terminating pod abc") is None
    capped = exit_line(143, "stopped by the pod's runtime cap (infra.max_runtime_min=2)") + "; terminating pod abc"
    assert (exit_code_of(capped), exit_reason_of(capped)) == (143, "stopped by the pod's runtime cap "
                                                                   "(infra.max_runtime_min=2)")
    assert exit_code_of("== entrypoint train: t2s train exited with code 0 after 12s") == 0
    assert exit_code_of("step 3 exited with code 1") is None


def launch(**changes) -> Launch:
    base = dict(run_id="r", pod_id="p1", job="train", gpu="NVIDIA L4", gpu_count=2, cost_per_hr=0.86,
                started_at="2025-01-01T10:00:00+00:00", status="running", max_runtime_min=120, max_cost_usd=1.0)
    return Launch(**{**base, **changes})


def test_limits_stop_runtime_first_then_cost():
    assert limit_exceeded(launch(), "2025-01-01T11:00:00+00:00") is None
    assert limit_exceeded(launch(), "2025-01-01T12:00:00+00:00") == "ran 120.0 min, past infra.max_runtime_min=120"
    assert limit_exceeded(launch(cost_per_hr=3.0), "2025-01-01T10:20:00+00:00") == (
        "cost $1.00, past infra.max_cost_usd=1")
    assert limit_exceeded(launch(cost_per_hr=None), "2025-01-01T11:59:00+00:00") is None


def test_the_watchdog_leaves_the_pod_its_grace_to_stop_itself_first():
    # The pod stops itself at the limit; the watchdog, the second line, only after the grace.
    assert limit_exceeded(launch(max_cost_usd=100), "2025-01-01T12:04:00+00:00", grace_s=300) is None
    assert limit_exceeded(launch(max_cost_usd=100), "2025-01-01T12:05:00+00:00", grace_s=300).startswith(
        "ran 125.0 min")
    assert limit_exceeded(launch(cost_per_hr=3.0), "2025-01-01T10:24:00+00:00", grace_s=300) is None
    assert limit_exceeded(launch(cost_per_hr=3.0), "2025-01-01T10:25:00+00:00", grace_s=300) == (
        "cost $1.25, past infra.max_cost_usd=1")


def test_records_keep_the_latest_state_of_each_pod_and_print_a_table(tmp_path, monkeypatch):
    monkeypatch.setenv("T2S_STATE_DIR", str(tmp_path))
    first = records.save(launch())
    records.save(launch(pod_id="p2", run_id="s", started_at="2025-01-01T11:00:00+00:00", status="provisioning"))
    records.end(first, "succeeded", "exit 0")
    (tmp_path / "launches.jsonl").open("a").write("not json\n")
    runs = records.load_all()
    assert [(r.pod_id, r.status) for r in runs] == [("p1", "succeeded"), ("p2", "provisioning")]
    assert runs[0].cost_usd is not None and records.latest_of("s").pod_id == "p2"
    table = records.format_table(runs, "2025-01-01T12:00:00+00:00").splitlines()
    assert table[0].split() == ["RUN", "JOB", "POD", "GPU", "$/H", "STARTED", "(UTC)", "ENDED", "(UTC)", "STATUS",
                                "COST", "$"]
    assert "provisioning" in table[2] and table[2].endswith("0.86")  # an hour at $0.86, so far
    assert [json.loads(line)["pod_id"] for line in (tmp_path / "launches.jsonl").read_text().splitlines()[:3]] == [
        "p1", "p2", "p1"]


def test_redact_replaces_known_secret_values(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefgh")
    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    (tmp_path / ".env").write_text("RUNPOD_API_KEY=rpa_fromdotenv\n")
    assert redact("a hf_abcdefgh b rpa_fromdotenv") == "a <HF_TOKEN> b <RUNPOD_API_KEY>"


def test_records_skip_every_line_that_is_not_a_record_and_say_which(tmp_path, monkeypatch):
    from tests.fake_runpod import JUNK_RECORD_LINES

    monkeypatch.setenv("T2S_STATE_DIR", str(tmp_path))
    records.save(launch(pod_id="", pod_name="t2s-r-train-abcd", status="creating"))
    (tmp_path / "launches.jsonl").open("a").write("\n".join(JUNK_RECORD_LINES) + "\n")
    records.save(launch(pod_id="p1", pod_name="t2s-r-train-abcd", status="running"))  # the same pod, now known
    warnings: list[str] = []
    [current] = records.load_all(warnings.append)
    assert (current.pod_id, current.status) == ("p1", "running")
    assert len(warnings) == len(JUNK_RECORD_LINES) and all("warning: skipped line" in w for w in warnings)
    assert "JSON null, not a record" in warnings[0] and "a JSON array, not a record" in warnings[1] and "'yesterday' is not an ISO 8601 time" in warnings[5]
    records.not_created(current, "no capacity")
    assert records.load_all() == []  # a request that made no pod is no longer listed
