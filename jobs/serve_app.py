"""`t2s serve`'s shell: the model behind FastAPI, batched (jobs.serve_batching), its SQL run in the sandbox.

    Engine     loads the model (jobs.ask.load) in a background thread, warms it up, then answers batches of
               questions in the batcher's thread: one generate_batched call per batch (per max_tokens in it), and
               with checked decoding jobs.lib.checked's checks; runs answers on the --db file in a pool of sandboxes
    create_app the routes: /v1/chat/completions, /v1/models, /v1/sql, /health, /metrics; every error one JSON line
    serve      uvicorn on a socket bound beforehand; SIGTERM drains: in-flight requests finish, new ones get 503,
               then exit 0
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from jobs.lib import checked, sandbox, sqlcheck
from jobs.ask import ModelSource, load
from jobs.lib.credentials import redact
from jobs.lib.errors import T2SError, first_line, printable
from jobs.serve_api import (Answered, ApiError, ChatRequest, Limits, Question, SqlRequest, authorized, chat_chunks,
                            chat_completion, chat_question, dumps, error_body, parse_body, sql_question, sql_response,
                            sse)
from jobs.serve_batching import Batcher, Closed, DeadlinePassed, Pending, QueueFull

WARMUP_SCHEMA = "CREATE TABLE t (a INTEGER)"
WARMUP_QUESTION = "How many rows are there?"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def log(message: str) -> None:
    """One line to the server's log; a secret in it (a token in a library's failure, a traceback) is hidden."""
    print(f"t2s serve: {printable(redact(message))}", file=sys.stderr, flush=True)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("t2s_requests", "HTTP requests answered", ["endpoint", "status"],
                                registry=self.registry)
        self.latency = Histogram("t2s_request_latency_seconds", "Time to answer a request", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("t2s_batch_size", "Questions generated together",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.tokens = Counter("t2s_generated_tokens", "Tokens the model generated", registry=self.registry)
        self.prompt_tokens = Counter("t2s_prompt_tokens", "Prompt tokens the model read", registry=self.registry)
        self.rejections = Counter("t2s_rejections", "Requests refused before the model", ["reason"],
                                  registry=self.registry)
        self.queue_depth = Gauge("t2s_queue_depth", "Questions waiting for a batch", registry=self.registry)
        self.in_flight = Gauge("t2s_in_flight", "Requests being answered", registry=self.registry)


class Engine:
    """The model, its batcher and the sandboxes; `ready` once loaded and warmed up."""

    def __init__(self, source: ModelSource, model_name: str, *, limits: Limits, decoding: str, candidates: int,
                 device: str | None, db: Path | None, default_schema: str | None, max_batch: int, wait_s: float,
                 max_queue: int, request_timeout_s: float, sql_workers: int, metrics: Metrics):
        self.source, self.model_name, self.limits = source, model_name, limits
        self.decoding, self.candidates, self.device = decoding, candidates, device
        self.db, self.default_schema = db, default_schema
        self.max_batch, self.wait_s, self.max_queue = max_batch, wait_s, max_queue
        self.request_timeout_s, self.sql_workers, self.metrics = request_timeout_s, sql_workers, metrics
        self.generator = None
        self.batcher: Batcher | None = None
        self.ready = False
        self.created = int(time.time())
        self.max_positions: int | None = None
        self._sandboxes: queue.Queue = queue.Queue()
        self._check_sandbox: sandbox.Sandbox | None = None

    # ---- start and stop ----

    def load(self) -> None:
        """Loads the model, starts the sandboxes, warms up (on a GPU: captures the CUDA graphs of the batch sizes a
        full batch goes through), then starts the batcher. A T2SError says what is wrong with the model."""
        started = time.perf_counter()
        self.generator = load(self.source, self.device, self.limits.max_tokens, decoding=self.decoding,
                              candidates=self.candidates)
        config = getattr(self.generator.model, "config", None)
        self.max_positions = getattr(config, "max_position_embeddings", None)
        if self.decoding == "checked":
            self._check_sandbox = sandbox.Sandbox(workers=2)
        if self.db is not None:
            for _ in range(self.sql_workers):
                self._sandboxes.put(sandbox.Sandbox(workers=1))
        sizes = [1]
        if self.generator.model.device.type == "cuda":
            sizes += [size for size in (2, 4, 8, 16, 32, 64, 128, 256) if size <= self.max_batch]
        warm = Question(WARMUP_SCHEMA, WARMUP_QUESTION, self.limits.max_tokens)
        for size in sizes:
            self.answer_batch([Pending(warm, float("inf"), lambda _: None) for _ in range(size)])
        self.batcher = Batcher(self.answer_batch, max_batch=self.max_batch, wait_s=self.wait_s,
                               max_queue=self.max_queue, on_batch=self.metrics.batch_size.observe)
        self.ready = True
        from jobs.lib.generate import decoding_info

        info = decoding_info(self.generator.model)
        log(f"ready: {self.model_name} on {self.generator.model.device} ({self.decoding} decoding, "
            f"{info['backend']} decoder) in {time.perf_counter() - started:.1f} s")

    def close(self, timeout_s: float = 0.0) -> None:
        if self.batcher is not None:
            self.batcher.close(timeout_s)
        while not self._sandboxes.empty():
            self._sandboxes.get_nowait().close()
        if self._check_sandbox is not None:
            self._check_sandbox.close()

    # ---- the batcher's thread ----

    def answer_batch(self, batch: list[Pending]) -> list[Answered | ApiError]:
        """An answer (or a 400 for a prompt too long) for each pending question: one generation call per max_tokens
        among them. Runs in the batcher's thread only: nothing else touches the model or its tokenizer."""
        from jobs.lib.chat import render_prompt

        tokenizer = self.generator.tokenizer
        results: list[Any] = [None] * len(batch)
        groups: dict[int, list[tuple[int, int]]] = {}
        for index, pending in enumerate(batch):
            q: Question = pending.payload
            prompt_tokens = len(tokenizer(render_prompt(tokenizer, q.schema, q.question))["input_ids"])
            room = (self.max_positions or prompt_tokens + q.max_tokens) - q.max_tokens
            if prompt_tokens > min(self.limits.max_prompt_tokens, room):
                results[index] = ApiError(400, f"the schema and question come to {prompt_tokens} tokens in the "
                                               f"model's template; at most {min(self.limits.max_prompt_tokens, room)}"
                                               f" fit with max_tokens {q.max_tokens}", param="messages")
                continue
            groups.setdefault(q.max_tokens, []).append((index, prompt_tokens))
        for max_tokens, members in groups.items():
            started = time.monotonic()  # the clock of Pending.enqueued
            answers = self._generate([batch[i].payload for i, _ in members], max_tokens)
            elapsed = time.monotonic() - started
            for (index, prompt_tokens), (text, ended, new_tokens, passed, why) in zip(members, answers):
                self.metrics.tokens.inc(new_tokens)
                self.metrics.prompt_tokens.inc(prompt_tokens)
                # waiting ends where its own group's generation starts (an earlier group's is waiting too)
                results[index] = Answered(text, ended, prompt_tokens, new_tokens, passed, why,
                                          queue_s=max(0.0, started - batch[index].enqueued),
                                          generate_s=elapsed, batch_size=len(members))
        return results

    def _generate(self, questions: list[Question], max_tokens: int) -> list[tuple]:
        """(text, ended, new tokens, checked, why unchecked) per question, as `t2s ask` answers it."""
        generator = self.generator
        generator.max_new_tokens = max_tokens
        pairs = [(q.schema, q.question) for q in questions]
        generations = generator.respond(pairs, batch_size=len(pairs))
        if self.decoding == "greedy":
            return [(g.text, "eos" if g.ended_at_eos else "limit", g.new_tokens, None, "") for g in generations]
        choices = checked.choose_answers(
            [q.schema for q in questions], generations,
            lambda indices: generator.search([pairs[i] for i in indices], [generations[i] for i in indices],
                                             len(pairs)),
            self._check_sandbox, candidates=generator.candidates)
        return [(c.text, c.candidate.ended, c.candidate.new_tokens, c.checked, c.why_unchecked) for c in choices]

    # ---- the event loop's side ----

    async def answer(self, question: Question, deadline: float) -> Answered:
        """The model's answer, from the next batch, by `deadline` (time.monotonic(): the request's arrival plus
        --request-timeout-s); ApiError 429 (queue full), 503 (closing), 504 (deadline)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def resolve(result) -> None:
            if not future.done():
                future.set_result(result)

        pending = Pending(question, deadline, lambda result: loop.call_soon_threadsafe(resolve, result))
        try:
            self.batcher.submit(pending)
        except QueueFull:
            self.metrics.rejections.labels("queue_full").inc()
            raise ApiError(429, f"the server is busy ({self.max_queue} questions waiting): retry shortly",
                           "rate_limit_error") from None
        except Closed:
            raise ApiError(503, "the server is shutting down", "server_error") from None
        self.metrics.queue_depth.set(self.batcher.depth())
        try:
            result = await asyncio.wait_for(asyncio.shield(future), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            pending.abandoned = True
            self.metrics.rejections.labels("deadline").inc()
            raise ApiError(504, f"no answer within the request deadline of {self.request_timeout_s:g} s",
                           "server_error") from None
        except asyncio.CancelledError:  # the client went away: its question is skipped if not yet generated
            pending.abandoned = True
            raise
        if isinstance(result, DeadlinePassed):
            self.metrics.rejections.labels("deadline").inc()
            raise ApiError(504, f"no answer within the request deadline of {self.request_timeout_s:g} s",
                           "server_error")
        if isinstance(result, ApiError):
            raise result
        if isinstance(result, BaseException):
            log("a batch failed: " + "".join(traceback.format_exception(result)).strip())
            raise ApiError(500, f"the model failed on this batch ({type(result).__name__}); see the server's log",
                           "server_error")
        return result

    def run_sql(self, sql: str, deadline: float) -> tuple[list | None, list, bool, str | None]:
        """(columns, rows, truncated, error) of the SQL on the --db file, read-only in a sandbox (a thread's call)."""
        try:
            box = self._sandboxes.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise ApiError(503, "every sandbox stayed busy until the request deadline: retry shortly",
                           "server_error") from None
        try:
            result = box.query_file(self.db, sql, self.limits.query_timeout_s, self.limits.row_limit + 1,
                                    stop_at_limit=True)
        except sandbox.QueryRefused as error:
            return None, [], False, f"the sandbox refused the query ({error}): only reading is allowed"
        except sandbox.QueryTimeout as error:
            return None, [], False, f"the query {error}"
        except sandbox.QueryFailed as error:
            return None, [], False, f"the query failed: {error}"
        except OSError as error:
            return None, [], False, f"the database cannot be read ({error.strerror or error})"
        finally:
            self._sandboxes.put(box)
        rows = [list(row) for row in result.rows[:self.limits.row_limit]]
        columns = result.columns
        return columns, [[v.hex() if isinstance(v, bytes) else v for v in row] for row in rows], \
            len(result.rows) > self.limits.row_limit, None


class ServerState:
    """What the middleware and the shutdown share."""

    def __init__(self):
        self.draining = False
        self.in_flight = 0
        self.failed: str | None = None  # the model could not be loaded


def json_response(body: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(dumps(body) + b"\n", status_code=status, media_type="application/json", headers=headers)


def error_response(error: ApiError) -> Response:
    headers = {"Retry-After": "1"} if error.status in (429, 503) else None
    if error.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return json_response(error_body(error), error.status, headers)


async def read_body(request: Request, limits: Limits, timeout_s: float) -> bytes:
    """The body, read with a size limit and a deadline (a client that trickles its body cannot hold a request)."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limits.max_body_bytes):
        raise ApiError(413, f"the request body is over {limits.max_body_bytes} bytes")

    async def gather() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise ApiError(413, f"the request body is over {limits.max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(gather(), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s") from None


ENDPOINTS = {"/v1/chat/completions", "/v1/models", "/v1/sql", "/health", "/metrics"}


def create_app(engine: Engine, state: ServerState, api_key: str | None) -> FastAPI:
    app = FastAPI(title="t2s serve", docs_url=None, redoc_url=None, openapi_url=None)
    limits, metrics = engine.limits, engine.metrics

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        endpoint = path if path in ENDPOINTS else "other"
        started = time.perf_counter()
        counted = path != "/health"
        if counted and not authorized(request.headers.get("authorization"), api_key):
            metrics.rejections.labels("unauthorized").inc()
            response = error_response(ApiError(401, "missing or wrong API key: send the header "
                                                    "'Authorization: Bearer <T2S_SERVE_API_KEY>'",
                                               "authentication_error"))
        elif counted and state.draining and path != "/metrics":
            metrics.rejections.labels("draining").inc()
            response = error_response(ApiError(503, "the server is shutting down", "server_error"))
        else:
            state.in_flight += counted
            metrics.in_flight.inc(counted)
            try:
                response = await call_next(request)
            except Exception:  # a bug: its traceback goes to the log, never to the client
                log("a request failed: " + traceback.format_exc().strip())
                response = error_response(ApiError(500, "the server failed on this request; see its log",
                                                   "server_error"))
            finally:
                state.in_flight -= counted
                metrics.in_flight.dec(counted)
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        message = {404: f"no endpoint {request.url.path}: see /v1/chat/completions, /v1/models, /v1/sql, /health, "
                        "/metrics", 405: f"{request.method} is not allowed on {request.url.path}"}
        return error_response(ApiError(error.status_code, message.get(error.status_code, str(error.detail))))

    @app.exception_handler(Exception)
    async def bug(request: Request, error: Exception):
        log("a request failed: " + "".join(traceback.format_exception(error)).strip())
        return error_response(ApiError(500, "the server failed on this request; see its log", "server_error"))

    def require_ready() -> None:
        if not engine.ready:
            raise ApiError(503, "the model is still loading: retry when GET /health says ready", "server_error")

    @app.get("/health")
    async def health():
        if state.failed:
            return json_response({"status": "failed", "error": state.failed}, 503)
        if state.draining:
            return json_response({"status": "draining"}, 503)
        if not engine.ready:
            return json_response({"status": "loading"}, 503)
        return json_response({"status": "ready", "model": engine.model_name, "decoding": engine.decoding,
                              "queue": engine.batcher.depth()})

    @app.get("/metrics")
    async def prometheus():
        if engine.batcher is not None:
            metrics.queue_depth.set(engine.batcher.depth())
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return json_response({"object": "list", "data": [
            {"id": engine.model_name, "object": "model", "created": engine.created, "owned_by": "t2s"}]})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        require_ready()
        deadline = time.monotonic() + engine.request_timeout_s  # one deadline from arrival to answer
        body = parse_body(await read_body(request, limits, engine.request_timeout_s), ChatRequest, limits)
        question = await run_in_threadpool(chat_question, body, engine.default_schema, limits)
        answer = await engine.answer(question, deadline)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return Response(sse(chat_chunks(completion_id, engine.model_name, created, answer, question.stop, usage)),
                            media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return json_response(chat_completion(completion_id, engine.model_name, created, answer, question.stop))

    @app.post("/v1/sql")
    async def sql(request: Request):
        require_ready()
        deadline = time.monotonic() + engine.request_timeout_s
        body = parse_body(await read_body(request, limits, engine.request_timeout_s), SqlRequest, limits)
        question = await run_in_threadpool(sql_question, body, engine.default_schema, engine.db is not None,
                                           limits)
        answer = await engine.answer(question, deadline)
        if not body.run:
            return json_response(sql_response(answer))
        if not sqlcheck.is_sql_only(answer.text):
            return json_response(sql_response(answer, run_error="the answer is not one SQL query: not run"))
        started = time.perf_counter()
        columns, rows, truncated, error = await run_in_threadpool(engine.run_sql, answer.text, deadline)
        return json_response(sql_response(answer, columns, rows, truncated, error, time.perf_counter() - started))

    return app


def load_in_background(engine: Engine, state: ServerState, on_failure) -> threading.Thread:
    """Loads the model beside the server, so /health answers "loading" meanwhile; a failure is one line."""

    def run() -> None:
        try:
            engine.load()
        except T2SError as error:
            state.failed = redact(str(error))  # /health shows it to any client, without the API key
            on_failure(state.failed)
        except Exception as error:  # noqa: BLE001 - a bug, or a library's failure to load: one line, and the log
            log("loading failed: " + traceback.format_exc().strip())
            state.failed = redact(f"{type(error).__name__}: {first_line(error)}")
            on_failure(state.failed)

    thread = threading.Thread(target=run, name="t2s-load", daemon=True)
    thread.start()
    return thread
