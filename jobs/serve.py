"""serve: the fine-tuned model behind an OpenAI-compatible HTTP endpoint, batched, read-only on the user's database.

    t2s serve --model runs/<id> [--db shop.sqlite] [--decoding greedy|checked] [--host 127.0.0.1] [--port 8000]

    POST /v1/chat/completions  OpenAI's chat API: system = the schema (optional with --db), user = the question
    GET  /v1/models
    POST /v1/sql               {question, schema?, run?} -> {sql, checked, why_unchecked, columns, rows, truncated,
                               timings}; run: true executes the SQL on --db read-only in the sandbox
    GET  /health               200 once the model is loaded and warmed up; 503 while loading or draining
    GET  /metrics              Prometheus text

Every input is checked before the model loads: a model path that does not exist, a --db that is not SQLite, a port
in use, a non-loopback --host without T2S_SERVE_API_KEY are one line each, exit code 2. The request side lives in
jobs.serve_api (pure) and jobs.serve_app (FastAPI), batching in jobs.serve_batching.
"""

from __future__ import annotations

import errno
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import typer

from jobs.lib import checked
from jobs.ask import CANDIDATES, checked_schema, resolve_model
from jobs.lib.credentials import redact, secret
from jobs.lib.errors import T2SError, one_line_errors, printable
from jobs.serve_api import Limits, is_loopback

API_KEY_VARIABLE = "T2S_SERVE_API_KEY"
MIN_API_KEY_CHARS = 16


def api_key_for(host: str, key: str | None) -> str | None:
    """The API key requests must carry: required off loopback, optional (but enforced when set) on it."""
    key = (key or "").strip() or None
    if key is None and not is_loopback(host):
        raise T2SError(f"--host {host} serves beyond this machine: set {API_KEY_VARIABLE} (in the environment or "
                       ".env) to a key clients send as 'Authorization: Bearer <key>', or bind 127.0.0.1")
    if key is not None and len(key) < MIN_API_KEY_CHARS:
        raise T2SError(f"{API_KEY_VARIABLE} is shorter than {MIN_API_KEY_CHARS} characters: use a long random key, "
                       "e.g. from `python -c \"import secrets; print(secrets.token_urlsafe(32))\"`")
    return key


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, bound before the model loads, so a port in use is one line at once."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise T2SError(f"--host {host}: cannot be resolved ({error.strerror}); pass an address such as "
                       "127.0.0.1") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise T2SError(f"port {port} on {host} is in use: stop what listens there or pass --port another "
                           "one") from None
        raise T2SError(f"cannot listen on {host}:{port} ({error.strerror or error}): pass another --host or "
                       "--port") from None
    return sock


def database_schema(db: Path) -> str:
    from jobs.lib.sandbox import schema_from_sqlite

    return checked_schema(schema_from_sqlite(db), f"the tables of {db}")


def serve_command(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="A run directory (its merged model; before t2s "
                                        "merge, base + adapter), a model folder or a Hub id."),
    db: Optional[Path] = typer.Option(None, "--db", help="A SQLite file, never written: its tables are the default "
                                      "schema, and /v1/sql with run: true runs the answer on it, read-only."),
    decoding: str = typer.Option("greedy", "--decoding", help="greedy, or checked (jobs.lib.checked: the first of up to "
                                 "--candidates answers that checks out)."),
    candidates: int = typer.Option(CANDIDATES, "--candidates", help="Checked decoding: most candidates a question "
                                   "gets."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. Anything but loopback needs "
                             f"{API_KEY_VARIABLE}."),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: GPU if any)."),
    model_name: Optional[str] = typer.Option(None, "--served-model-name", help="The model's id in /v1/models and "
                                             "answers (default: --model as given)."),
    max_batch: int = typer.Option(64, "--max-batch", min=1, max=1024, help="Most questions generated together."),
    batch_wait_ms: float = typer.Option(5.0, "--batch-wait-ms", min=0.0, max=1000.0, help="How long the first "
                                        "question of a batch waits for others to join it."),
    max_queue: int = typer.Option(256, "--max-queue", min=1, max=100_000, help="Questions that may wait; past it "
                                  "requests get 429."),
    request_timeout_s: float = typer.Option(30.0, "--request-timeout-s", min=0.1, max=3600.0, help="A request's "
                                            "deadline, from its arrival to its answer (504 past it)."),
    max_tokens: int = typer.Option(128, "--max-tokens", min=1, max=4096, help="Cap (and default) of a request's "
                                   "max_tokens."),
    max_question_chars: int = typer.Option(2_000, "--max-question-chars", min=1, max=1_000_000),
    max_schema_chars: int = typer.Option(20_000, "--max-schema-chars", min=1, max=1_000_000),
    max_prompt_tokens: int = typer.Option(2_048, "--max-prompt-tokens", min=1, max=1_000_000, help="Schema and "
                                          "question together, in the model's template."),
    max_body_bytes: int = typer.Option(256 * 1024, "--max-body-bytes", min=1024, max=64 * 1024 * 1024),
    row_limit: int = typer.Option(1000, "--row-limit", min=1, max=1_000_000, help="Rows /v1/sql returns with run: "
                                  "true; more are cut (truncated: true)."),
    timeout_s: float = typer.Option(5.0, "--timeout-s", min=0.01, max=600.0, help="Time limit of one query on "
                                    "--db."),
    sql_workers: int = typer.Option(2, "--sql-workers", min=1, max=64, help="Sandbox workers running queries on "
                                    "--db at once."),
    drain_timeout_s: Optional[float] = typer.Option(None, "--drain-timeout-s", min=0.0, max=3600.0, help="On "
                                                    "SIGTERM, how long in-flight requests may take to finish "
                                                    "(default: --request-timeout-s)."),
):
    """Serve the model: an OpenAI-compatible chat endpoint and a SQL endpoint (/v1/sql), batched, checked, and
    read-only on --db. SIGTERM drains: requests in flight finish, new ones get 503, then exit 0."""
    with one_line_errors("t2s serve"):
        if not model:
            raise T2SError("no model given: pass --model a run directory, a merged model folder or a Hub id")
        checked.check_decoding(decoding)
        checked.check_candidates_count(candidates)
        source = resolve_model(model)
        default_schema = database_schema(db) if db is not None else None
        api_key = api_key_for(host, secret(API_KEY_VARIABLE))
        sock = bind(host, port)
        limits = Limits(max_body_bytes=max_body_bytes, max_question_chars=max_question_chars,
                        max_schema_chars=max_schema_chars, max_tokens=max_tokens, max_prompt_tokens=max_prompt_tokens,
                        row_limit=row_limit, query_timeout_s=timeout_s)
        code = run_server(sock, source, model_name or model, api_key, limits=limits, decoding=decoding,
                          candidates=candidates, device=device, db=db, default_schema=default_schema,
                          max_batch=max_batch, wait_s=batch_wait_ms / 1000, max_queue=max_queue,
                          request_timeout_s=request_timeout_s,
                          drain_timeout_s=request_timeout_s if drain_timeout_s is None else drain_timeout_s,
                          sql_workers=sql_workers, where=f"http://{host}:{port}")
    raise typer.Exit(code)


def run_server(sock: socket.socket, source, model_name: str, api_key: str | None, *, drain_timeout_s: float,
               where: str, **engine_settings) -> int:
    """Runs uvicorn on the bound socket until SIGTERM / Ctrl-C (drained: exit code 0) or a model that cannot be
    loaded (one line: exit code 2)."""
    import uvicorn

    from jobs.serve_app import Engine, Metrics, ServerState, create_app, load_in_background, log

    state = ServerState()
    engine = Engine(source, model_name, metrics=Metrics(), **engine_settings)
    app = create_app(engine, state, api_key)
    outcome = {"code": 0}

    class DrainingServer(uvicorn.Server):
        """uvicorn whose first SIGTERM / SIGINT drains instead of stopping at once; a second one stops now."""

        def handle_exit(self, sig, frame) -> None:
            if state.draining:
                self.should_exit = self.force_exit = True
                return
            state.draining = True
            threading.Thread(target=self.drain, name="t2s-drain", daemon=True).start()

        def drain(self) -> None:
            log(f"draining: {state.in_flight} request(s) in flight; new ones get 503")
            until = time.monotonic() + drain_timeout_s
            while (state.in_flight or (engine.batcher and engine.batcher.busy)) and time.monotonic() < until:
                time.sleep(0.02)
            if state.in_flight:
                log(f"drain timeout: {state.in_flight} request(s) still in flight are cut off")
            self.should_exit = True

    def failed(message: str) -> None:  # said after uvicorn's shutdown lines, so that it is the last line
        outcome.update(code=2, error=message)
        server.should_exit = True

    # uvicorn's own 503 past limit_concurrency is the last guard against a flood of connections; the queue's 429
    # comes well before it
    connections = max(256, 2 * (engine_settings["max_queue"] + engine_settings["max_batch"]))
    config = uvicorn.Config(app, log_level="info", access_log=False, timeout_keep_alive=5,
                            timeout_graceful_shutdown=5, limit_concurrency=connections,
                            h11_max_incomplete_event_size=64 * 1024, server_header=False)
    server = DrainingServer(config)
    log(f"listening on {where}; loading the model ({engine_settings['decoding']} decoding)")
    load_in_background(engine, state, failed)
    try:
        server.run(sockets=[sock])
    finally:
        engine.close(timeout_s=1.0)
        sock.close()
    if outcome["code"] == 0:
        log("stopped")
    else:
        print(f"t2s serve: error: {printable(redact(outcome['error']))}", file=sys.stderr, flush=True)
    return outcome["code"]

