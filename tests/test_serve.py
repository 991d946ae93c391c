"""t2s serve: the pure core exactly; the app in-process with a fake model (the sandbox path: rows, truncation, SQL
bombs); and the real server as a subprocess on 127.0.0.1 with the tiny model, through the official openai client and
httpx (one server for the module; SIGTERM's drain, which stops it, runs last)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from jobs.serve_api import (Answered, ApiError, ChatRequest, Limits, SqlRequest, authorized, chat_chunks,
                            chat_completion, chat_question, cut_at_stop, is_loopback, parse_body, sql_question, sse)
from jobs.serve_batching import Batcher, Closed, DeadlinePassed, Pending, QueueFull
from tests.conftest import ROOT, SONGS_SCHEMA

API_KEY = "test-key-0123456789-abcdefghij"
QUESTIONS = ["How many songs are there?", "Which songs are jazz?", "What is the latest year?",
             "List the artists of rock songs released after 2000.", "Count the genres."]
LIMITS = Limits(max_body_bytes=4096, max_question_chars=100, max_schema_chars=500, max_tokens=16)


# ---------- the pure core ----------

def chat(messages, **extra) -> ChatRequest:
    return parse_body(json.dumps({"model": "m", "messages": messages, **extra}).encode(), ChatRequest, LIMITS)


def test_chat_question_is_system_schema_and_user_question():
    q = chat_question(chat([{"role": "system", "content": SONGS_SCHEMA}, {"role": "user", "content": " How many? "}],
                           max_tokens=5, stop=[";"]), None, LIMITS)
    assert (q.schema, q.question, q.max_tokens, q.stop) == (SONGS_SCHEMA, "How many?", 5, (";",))
    default = chat_question(chat([{"role": "user", "content": [{"type": "text", "text": "How many?"}]}]),
                            SONGS_SCHEMA, LIMITS)
    assert (default.schema, default.max_tokens) == (SONGS_SCHEMA, LIMITS.max_tokens)


@pytest.mark.parametrize("messages, extra, says", [
    ([{"role": "user", "content": "q"}], {}, "no schema"),
    ([{"role": "system", "content": SONGS_SCHEMA}, {"role": "user", "content": "q"}, {"role": "user", "content": "r"}],
     {}, "roles"),
    ([{"role": "system", "content": SONGS_SCHEMA}, {"role": "user", "content": "q"}], {"n": 2}, "n must be 1"),
    ([{"role": "system", "content": SONGS_SCHEMA}, {"role": "user", "content": "q"}], {"max_tokens": 17}, "between 1 and 16"),
    ([{"role": "system", "content": SONGS_SCHEMA}, {"role": "user", "content": "q"}], {"max_tokens": 0}, "between 1"),
    ([{"role": "system", "content": "DROP TABLE x"}, {"role": "user", "content": "q"}], {}, "CREATE TABLE"),
    ([{"role": "system", "content": SONGS_SCHEMA}, {"role": "user", "content": "q\x1b[2J"}], {}, "U+001B"),
    ([{"role": "system", "content": SONGS_SCHEMA}, {"role": "user", "content": "q\u202e"}], {}, "U+202E"),
    ([{"role": "system", "content": SONGS_SCHEMA}, {"role": "user", "content": "x" * 101}], {}, "at most 100"),
    ([{"role": "system", "content": SONGS_SCHEMA}, {"role": "user", "content": "   "}], {}, "empty"),
    ([{"role": "system", "content": SONGS_SCHEMA}, {"role": "user", "content": "q"}], {"stop": [""]}, "stop"),
])
def test_chat_question_refuses_what_it_cannot_honour(messages, extra, says):
    with pytest.raises(ApiError) as refused:
        chat_question(chat(messages, **extra), None, LIMITS)
    assert refused.value.status == 400 and says in refused.value.message and "\n" not in refused.value.message


@pytest.mark.parametrize("body, status, says", [
    (b"x" * 5000, 413, "over 4096 bytes"),
    (b"{not json", 400, "not JSON"),
    (b"\xff\xfe", 400, "not UTF-8"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"question": 5}', 400, "question: Input should be a valid string"),
    (b'{"question": "q", "run": "yes"}', 400, "run: Input should be a valid boolean"),
    (b'{"question": "q", "sql": "DROP TABLE songs"}', 400, "sql: is not a field"),
    (b"[" * 3000 + b"]" * 3000, 413, "over"),
])
def test_parse_body_is_one_line_per_problem(body, status, says):
    with pytest.raises(ApiError) as refused:
        parse_body(body, SqlRequest, LIMITS)
    assert refused.value.status == status and says in refused.value.message


def test_parse_body_survives_deep_nesting_within_the_size_limit():
    limits = Limits(max_body_bytes=1 << 20)
    with pytest.raises(ApiError) as refused:
        parse_body(b"[" * 200_000 + b"]" * 200_000, SqlRequest, limits)
    assert refused.value.status == 400


def test_sql_question_needs_a_database_to_run_on():
    request = parse_body(b'{"question": "How many?", "run": true}', SqlRequest, LIMITS)
    with pytest.raises(ApiError, match="without --db"):
        sql_question(request, SONGS_SCHEMA, has_db=False, limits=LIMITS)
    assert sql_question(request, SONGS_SCHEMA, has_db=True, limits=LIMITS).schema == SONGS_SCHEMA


def test_stop_sequences_cut_the_answer_as_openai_does():
    answer = Answered("SELECT 1; SELECT 2", "eos", 10, 6)
    assert cut_at_stop(answer.text, (";", "2")) == ("SELECT 1", True)
    body = chat_completion("id", "m", 0, answer, (";",))
    assert body["choices"][0]["message"]["content"] == "SELECT 1"
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 6, "total_tokens": 16}
    cut = chat_completion("id", "m", 0, Answered("SELECT", "limit", 3, 16), ())
    assert cut["choices"][0]["finish_reason"] == "length"
    events = sse(chat_chunks("id", "m", 0, answer, ())).decode()
    assert events.endswith("data: [DONE]\n\n")
    chunks = [json.loads(line[6:]) for line in events.split("\n\n") if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == answer.text
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    with_usage = chat_chunks("id", "m", 0, answer, (), include_usage=True)
    assert with_usage[-1]["choices"] == [] and with_usage[-1]["usage"]["total_tokens"] == 16


def test_loopback_and_api_key():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.2", "example.com"))
    assert authorized(None, None) and authorized("Bearer whatever", None)
    assert authorized(f"Bearer {API_KEY}", API_KEY) and authorized(f"bearer {API_KEY}", API_KEY)
    assert not any(authorized(h, API_KEY) for h in (None, "", API_KEY, f"Bearer {API_KEY}x", f"Basic {API_KEY}",
                                                    "Bearer " + API_KEY[:-1]))


# ---------- the batcher ----------

def collect() -> tuple[list, callable]:
    got = []
    return got, got.append


def test_a_receiver_that_is_gone_does_not_stop_the_batcher():
    def gone(result):  # what a request's delivery raises once the server's event loop is closed
        raise RuntimeError("Event loop is closed")

    batcher = Batcher(lambda batch: ["ok"] * len(batch), max_batch=1, wait_s=0, max_queue=8)
    got, deliver = collect()
    batcher.submit(Pending(1, time.monotonic() + 30, gone))
    batcher.submit(Pending(2, time.monotonic() + 30, deliver))
    batcher.close(timeout_s=5)
    assert got == ["ok"]


def test_batcher_batches_what_waits_together_and_keeps_each_answer_with_its_question():
    batches = []
    gate = threading.Event()

    def answer(batch):
        gate.wait(5)
        batches.append([p.payload for p in batch])
        return [p.payload * 10 for p in batch]

    batcher = Batcher(answer, max_batch=4, wait_s=0.2, max_queue=100)
    results = {}
    for i in range(10):
        batcher.submit(Pending(i, time.monotonic() + 30, lambda r, i=i: results.__setitem__(i, r)))
    gate.set()
    batcher.close(timeout_s=10)
    assert results == {i: i * 10 for i in range(10)}
    assert all(len(b) <= 4 for b in batches) and max(len(b) for b in batches) == 4
    assert sorted(x for b in batches for x in b) == list(range(10))


def test_batcher_refuses_when_full_or_closed_and_drops_what_expired():
    release = threading.Event()
    batcher = Batcher(lambda batch: [release.wait(5) and "ok" for _ in batch], max_batch=1, wait_s=0, max_queue=2)
    got, deliver = collect()
    batcher.submit(Pending("first", time.monotonic() + 30, deliver))  # taken by the worker, which blocks
    time.sleep(0.2)
    batcher.submit(Pending("expires", time.monotonic() + 0.05, deliver))
    batcher.submit(Pending("waits", time.monotonic() + 30, deliver))
    with pytest.raises(QueueFull):
        batcher.submit(Pending("one too many", time.monotonic() + 30, deliver))
    time.sleep(0.1)
    release.set()
    batcher.close(timeout_s=5)
    with pytest.raises(Closed):
        batcher.submit(Pending("late", time.monotonic() + 30, deliver))
    assert got[0] == "ok" and isinstance(got[1], DeadlinePassed) and got[2] == "ok" and len(got) == 3


def test_a_failing_batch_fails_its_requests_not_the_batcher():
    calls = []

    def answer(batch):
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return ["ok"] * len(batch)

    batcher = Batcher(answer, max_batch=8, wait_s=0, max_queue=8)
    got, deliver = collect()
    batcher.submit(Pending(1, time.monotonic() + 30, deliver))
    time.sleep(0.3)
    batcher.submit(Pending(2, time.monotonic() + 30, deliver))
    batcher.close(timeout_s=5)
    assert isinstance(got[0], RuntimeError) and got[1] == "ok"


def test_a_load_failure_that_names_a_secret_reaches_neither_health_nor_the_log(monkeypatch, capsys):
    from jobs.lib.errors import T2SError
    from jobs.serve_app import ServerState, load_in_background

    token = "secret-value-for-the-load-failure-0123"
    monkeypatch.setenv("WANDB_API_KEY", token)

    class Failing:
        def __init__(self, error):
            self.error = error

        def load(self):
            raise self.error

    for error in (T2SError(f"cannot read model with {token}"), RuntimeError(f"library said {token}")):
        state, said = ServerState(), []
        load_in_background(Failing(error), state, said.append).join(10)
        assert said == [state.failed] and state.failed and token not in state.failed
        assert "<WANDB_API_KEY>" in state.failed
    assert token not in capsys.readouterr().err


# ---------- the app in-process, with a fake model: the sandbox path ----------

def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fake_app(db: Path, replies: dict[str, str], request_timeout_s: float = 20, generate_s: float = 0.0, **limits):
    """The real app and engine, the model replaced by `replies` (question -> answer, after `generate_s`)."""
    from jobs.ask import ModelSource
    from jobs.serve_app import Engine, Metrics, ServerState, create_app

    class FakeEngine(Engine):
        def load(self):
            from jobs.lib import sandbox

            for _ in range(self.sql_workers):
                self._sandboxes.put(sandbox.Sandbox(workers=1))
            self.batcher = Batcher(self.answer_batch, max_batch=8, wait_s=0.001, max_queue=8)
            self.ready = True

        def answer_batch(self, batch):
            time.sleep(generate_s)
            return [Answered(replies[p.payload.question], "eos", 5, 5, queue_s=0.001, generate_s=0.002,
                             batch_size=len(batch)) for p in batch]

    engine = FakeEngine(ModelSource("fake"), "fake", limits=Limits(**limits), decoding="greedy", candidates=1,
                        device="cpu", db=db, default_schema=SONGS_SCHEMA, max_batch=8, wait_s=0.001, max_queue=8,
                        request_timeout_s=request_timeout_s, sql_workers=1, metrics=Metrics())
    engine.load()
    return engine, create_app(engine, ServerState(), None)


def test_the_deadline_runs_from_the_requests_arrival_not_from_its_question_being_queued(songs_db):
    # a body that takes 0.6 s to arrive and an answer that takes 0.6 s: 1.2 s from arrival, past a 1 s deadline
    engine, app = fake_app(songs_db, {"q": "SELECT 1"}, request_timeout_s=1.0, generate_s=0.6)

    async def trickle():
        for part in (b'{"question": ', b'"q"}'):
            yield part
            await asyncio.sleep(0.3)

    async def ask(body):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.post("/v1/sql", content=body, headers={"content-type": "application/json"})

    try:
        assert asyncio.run(ask(b'{"question": "q"}')).status_code == 200  # 0.6 s: within it
        late = asyncio.run(ask(trickle()))
        assert late.status_code == 504, late.text
        assert "request deadline of 1 s" in late.json()["error"]["message"]
    finally:
        engine.close(timeout_s=2)


BOMBS = {
    "forever": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c",
    "huge": "SELECT printf('%.*c', 2000000000, 'x')",
    "many": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 5000) SELECT x FROM c",
    "write": "DELETE FROM songs",
    "attach": "SELECT * FROM songs; ATTACH 'x.db' AS x",
    "pragma": "PRAGMA writable_schema = 1",
    "jazz": "SELECT title, year FROM songs WHERE genre = 'jazz' ORDER BY year",
}


def test_sql_endpoint_runs_answers_read_only_within_limits(songs_db):
    before = digest(songs_db)
    engine, app = fake_app(songs_db, BOMBS, row_limit=100, query_timeout_s=0.5)

    async def ask_all():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return {name: (await client.post("/v1/sql", json={"question": name, "run": True})).json()
                    for name in BOMBS}

    try:
        answers = asyncio.run(ask_all())
    finally:
        engine.close(timeout_s=1)
    assert answers["jazz"]["columns"] == ["title", "year"] and answers["jazz"]["rows"] == [["blue", 1999],
                                                                                         ["echo", 2020]]
    assert answers["jazz"]["truncated"] is False and answers["jazz"]["error"] is None
    assert answers["jazz"]["timings"]["run_ms"] is not None
    assert len(answers["many"]["rows"]) == 100 and answers["many"]["truncated"] is True
    assert "ran past 0.5 s" in answers["forever"]["error"]
    assert answers["huge"]["error"] and answers["huge"]["rows"] == []
    for refused in ("write", "attach", "pragma"):
        assert answers[refused]["error"] and answers[refused]["rows"] in (None, [])
    assert digest(songs_db) == before


# ---------- the real server ----------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The tiny model, untrained (its answers are not SQL, which serving does not mind): seconds to build."""
    folder = tmp_path_factory.mktemp("serve-model") / "tiny"
    code = ("import sys; from pathlib import Path; from jobs.lib.synthetic import synthetic_rows; "
            "from jobs.lib.tiny import save_tiny_base; rows = synthetic_rows(300); "
            "save_tiny_base(Path(sys.argv[1]), [r['context'] + '\\n' + r['question'] + '\\n' + r['answer'] "
            "for r in rows])")
    subprocess.run([sys.executable, "-c", code, str(folder)], cwd=ROOT, check=True, capture_output=True,
                   timeout=300)
    return folder


MAX_TOKENS = 8  # every answer is cut here: the untrained model never ends one, and the tests stay fast


class Server:
    def __init__(self, process: subprocess.Popen, url: str, log: Path):
        self.process, self.url, self.log = process, url, log

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120,
                            **kwargs)


def start_server(model: Path, db: Path, log: Path, *extra: str) -> Server:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "serve", "--model", str(model), "--db", str(db), "--port", str(port),
         "--max-tokens", str(MAX_TOKENS), "--max-batch", "32", "--max-queue", "32", *extra],
        cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, "T2S_SERVE_API_KEY": API_KEY})
    server = Server(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise AssertionError("the server was not ready in 300 s:\n" + log.read_text()[-3000:])


@pytest.fixture(scope="module")
def server(model_dir, songs_db, tmp_path_factory):
    """Bound to every interface (which needs the API key), reached through 127.0.0.1."""
    server = start_server(model_dir, songs_db, tmp_path_factory.mktemp("serve-log") / "server.log",
                          "--host", "0.0.0.0")
    yield server
    if server.process.poll() is None:
        server.process.kill()
        server.process.wait()


def sql(server: Server, client: httpx.Client, question: str, **extra) -> httpx.Response:
    return client.post("/v1/sql", json={"question": question, **extra})


def test_openai_client_chat_streaming_and_models(server, model_dir):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == [str(model_dir)]
    messages = [{"role": "system", "content": SONGS_SCHEMA}, {"role": "user", "content": QUESTIONS[0]}]
    completion = client.chat.completions.create(model=str(model_dir), messages=messages)
    text = completion.choices[0].message.content
    assert text and completion.choices[0].finish_reason in ("length", "stop")
    assert 0 < completion.usage.completion_tokens <= MAX_TOKENS and completion.usage.prompt_tokens > 10
    stream = client.chat.completions.create(model=str(model_dir), messages=messages, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == text
    assert chunks[-1].usage.completion_tokens == completion.usage.completion_tokens
    with server.client() as http:  # the chat endpoint's answer is /v1/sql's (and so t2s ask's, tested below)
        assert sql(server, http, QUESTIONS[0], schema=SONGS_SCHEMA).json()["sql"] == text
    shorter = client.chat.completions.create(model="any", messages=messages, max_tokens=2)
    assert shorter.usage.completion_tokens <= 2 < completion.usage.completion_tokens
    from openai import BadRequestError

    with pytest.raises(BadRequestError, match="n must be 1"):
        client.chat.completions.create(model="any", messages=messages, n=3)
    with pytest.raises(BadRequestError, match="between 1 and 8"):
        client.chat.completions.create(model="any", messages=messages, max_tokens=9)


@pytest.mark.slow
def test_answers_are_t2s_asks_and_do_not_depend_on_their_batch(server, model_dir, songs_db):
    ask = subprocess.run([sys.executable, "-m", "jobs.cli", "ask", "--model", str(model_dir), "--db", str(songs_db),
                          "--json", "--max-new-tokens", str(MAX_TOKENS), "--batch-size", "1", "-"],
                         cwd=ROOT, input="\n".join(QUESTIONS), capture_output=True, text=True, timeout=300)
    assert ask.returncode in (0, 2), ask.stderr
    expected = [json.loads(line)["sql"] for line in ask.stdout.splitlines()]
    assert len(expected) == len(QUESTIONS)
    with server.client() as client:
        alone = [sql(server, client, q).json()["sql"] for q in QUESTIONS]
        with ThreadPoolExecutor(16) as pool:  # each question among the others, several times, in batches
            together = list(pool.map(lambda q: sql(server, client, q).json(), QUESTIONS * 6))
    assert alone == expected
    assert [a["sql"] for a in together] == expected * 6
    assert max(a["timings"]["batch_size"] for a in together) > 1


def test_sql_endpoint_with_and_without_run(server, songs_db):
    before = digest(songs_db)
    with server.client() as client:
        plain = sql(server, client, QUESTIONS[0]).json()
        run = sql(server, client, QUESTIONS[0], run=True).json()
        own = sql(server, client, "How many heads?", schema="CREATE TABLE head (age INTEGER)").json()
    assert plain["sql"] and plain["rows"] is None and plain["checked"] is None and plain["timings"]["generate_ms"] > 0
    assert run["sql"] == plain["sql"]  # the untrained model's answer is no SQL: it is said, not run
    if not run["sql_only"]:
        assert "not one SQL query" in run["error"] and run["rows"] is None
    else:
        assert run["error"] or run["columns"]
    assert own["sql"] and own["timings"]["batch_size"] >= 1
    assert digest(songs_db) == before


@pytest.mark.slow
def test_load_every_request_answered(server):
    def client_session(_):
        with server.client() as client:
            return [sql(server, client, QUESTIONS[i % len(QUESTIONS)], max_tokens=2).status_code for i in range(10)]

    with ThreadPoolExecutor(32) as pool:
        codes = [code for codes in pool.map(client_session, range(32)) for code in codes]
    assert codes == [200] * 320
    metrics = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    batch_count = next(float(line.split()[-1]) for line in metrics.splitlines()
                       if line.startswith("t2s_batch_size_count"))
    assert batch_count < 320  # requests were batched together


def test_overload_is_refused_and_the_server_stays_up(server):
    # more clients than a batch (32) and the queue (32) hold together: with 64, all of them fit whenever the server
    # takes full batches, and under load the test saw no 429 at all
    with ThreadPoolExecutor(128) as pool, server.client() as client:
        codes = list(pool.map(lambda i: sql(server, client, QUESTIONS[i % 5]).status_code, range(200)))
    assert set(codes) <= {200, 429, 503} and 429 in codes and 200 in codes
    with server.client() as client:
        assert client.get("/health").json()["status"] == "ready"
        assert sql(server, client, QUESTIONS[0]).status_code == 200
        metrics = client.get("/metrics").text
    assert 't2s_rejections_total{reason="queue_full"}' in metrics


HOSTILE = [
    (b"x" * (300 * 1024), 413), (b"{not json", 400), (b'{"question": ["a"]}', 400),
    (b'{"question": "q\\u0000\\u001b[2J"}', 400), (b'{"question": "\\ud800"}', 400),
    (b'{"question": "q", "schema": "CREATE TABLE t (a INT); DROP TABLE t"}', 400),
    (b'{"question": "' + b"x" * 3000 + b'"}', 400), (b'{"question": "q", "max_tokens": 100000}', 400),
    (b'{"question": "q", "schema": "' + b"CREATE TABLE t (a INT); " * 1000 + b'"}', 400),
    (b"[" * 100_000, 400),
]


def test_hostile_bodies_get_one_json_line_and_the_server_stays_up(server):
    with server.client() as client:
        for body, status in HOSTILE:
            response = client.post("/v1/sql", content=body, headers={"Content-Type": "application/json"})
            assert response.status_code == status, (body[:80], response.text)
            assert response.text.count("\n") == 1 and "Traceback" not in response.text
            assert response.json()["error"]["message"]
        assert client.post("/v1/chat/completions", content=b"{}").status_code == 400
        assert client.get("/v1/sql").status_code == 405
        assert sql(server, client, QUESTIONS[0]).status_code == 200
    assert server.process.poll() is None
    assert API_KEY not in server.log.read_text()


def test_a_missing_or_wrong_api_key_is_401_on_a_non_loopback_bind(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        response = httpx.post(f"{server.url}/v1/sql", json={"question": "q"}, headers=headers)
        assert response.status_code == 401 and API_KEY not in response.text
        assert httpx.get(f"{server.url}/v1/models", headers=headers).status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200  # probes need no key


def in_flight(server: Server) -> float:
    metrics = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    return next(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("t2s_in_flight ")) - 1


def test_sigterm_drains_in_flight_requests_then_exits_0(server):
    """Last in the module: it stops the server. Four requests send half their body and wait, so they are surely in
    flight when SIGTERM comes, while 24 clients keep asking: the four are answered, then the server exits 0."""
    port = int(server.url.rsplit(":", 1)[1])
    body = json.dumps({"question": QUESTIONS[0]}).encode()
    head = (b"POST /v1/sql HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode())
    slow = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(4)]
    for sock in slow:
        sock.sendall(head + body[:10])
    results = []

    def ask(i):
        with server.client() as client:
            for _ in range(3):
                try:
                    response = sql(server, client, QUESTIONS[i % 5])
                except httpx.TransportError:  # the server stopped listening once drained
                    results.append("closed: shutting down")
                    continue
                results.append(response.status_code if response.status_code == 200 else response.text)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(24)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while in_flight(server) < len(slow) + 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    late = httpx.post(f"{server.url}/v1/sql", json={"question": "q"},
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    health = httpx.get(f"{server.url}/health", timeout=30)
    answers = []
    for sock in slow:
        sock.sendall(body[10:])
        answers.append(sock.recv(65536).decode())
        sock.close()
    for thread in threads:
        thread.join(120)
    assert late.status_code == 503 and "shutting down" in late.json()["error"]["message"]
    assert health.status_code == 503 and health.json()["status"] == "draining"
    assert all(answer.startswith("HTTP/1.1 200") for answer in answers), answers
    assert len(results) == 72 and 200 in results
    assert all(r == 200 or "shutting down" in r for r in results)  # answered, or refused once draining
    assert server.process.wait(60) == 0, server.log.read_text()[-2000:]
    log = server.log.read_text()
    assert "Traceback" not in log and "draining" in log


@pytest.mark.slow
def test_checked_decoding_answers_are_t2s_asks(model_dir):
    """The engine in-process with checked decoding: each answer, its verdict and why, as `t2s ask`'s Python API."""
    from jobs import ask
    from jobs.serve_api import Question
    from jobs.serve_app import Engine, Metrics

    engine = Engine(ask.resolve_model(str(model_dir)), "m", limits=Limits(max_tokens=MAX_TOKENS), decoding="checked",
                    candidates=2, device="cpu", db=None, default_schema=None, max_batch=8, wait_s=0.001, max_queue=8,
                    request_timeout_s=60, sql_workers=1, metrics=Metrics())
    engine.load()
    try:
        got = engine.answer_batch([Pending(Question(SONGS_SCHEMA, q, MAX_TOKENS), float("inf"), lambda _: None)
                                   for q in QUESTIONS[:3]])
    finally:
        engine.close(timeout_s=1)
    expected = ask.load(str(model_dir), "cpu", MAX_TOKENS, decoding="checked", candidates=2).answers(
        [(SONGS_SCHEMA, q) for q in QUESTIONS[:3]])
    assert [(a.text, a.checked, a.why_unchecked) for a in got] == [(e.text, e.checked, e.why_unchecked)
                                                                   for e in expected]
    assert all(a.checked is False and a.why_unchecked for a in got)  # the untrained model's answers fail the checks


# ---------- bad input at start ----------

def test_bad_input_at_start_is_one_line_and_exit_2(model_dir, songs_db, tmp_path):
    not_sqlite = tmp_path / "notes.sqlite"
    not_sqlite.write_text("hello")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k != "T2S_SERVE_API_KEY"}
        cases = {
            "does not exist": ["--model", str(tmp_path / "no-such-model")],
            "not a readable SQLite": ["--model", str(model_dir), "--db", str(not_sqlite)],
            f"port {port} on 127.0.0.1 is in use": ["--model", str(model_dir), "--port", str(port)],
            "set T2S_SERVE_API_KEY": ["--model", str(model_dir), "--host", "0.0.0.0", "--port", str(port)],
        }
        runs = {says: subprocess.Popen([sys.executable, "-m", "jobs.cli", "serve", *args], cwd=ROOT, env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for says, args in cases.items()}
        broken = tmp_path / "broken"
        broken.mkdir()
        (broken / "config.json").write_text("{}")  # a model folder that cannot be loaded: found out after start
        loading = subprocess.Popen([sys.executable, "-m", "jobs.cli", "serve", "--model", str(broken), "--port",
                                    str(free_port())], cwd=ROOT, env={**env, "HF_HUB_OFFLINE": "1"},
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for says, process in runs.items():
            out, err = process.communicate(timeout=120)
            assert process.returncode == 2, (says, err)
            assert says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        out, err = loading.communicate(timeout=300)
        assert loading.returncode == 2 and "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith("t2s serve: error: could not load"), err
