"""`t2s serve` under load against one-request-at-a-time transformers `generate`, in one run.

    python bench/serve_latency.py --model runs/x/merged [--rows validation.jsonl] [--device cuda] [--single 50]
        [--clients 64] [--per-client 8] [--baseline 16] [--max-new-tokens 128] [--out $OUT]
    python bench/serve_latency.py --smoke        # CPU, the tiny model built here, small numbers: checks the bench runs

1. `t2s serve` starts as a real subprocess on 127.0.0.1 (a free port) and is timed once /health says ready (its
   load, warm-up and CUDA graph captures are reported apart, as ready_s).
2. warm single request: --single questions sent one after another to POST /v1/chat/completions (system = schema,
   user = question; --endpoint sql: POST /v1/sql without run, which also parses each answer with sqlglot):
   p50 / p99 latency, as a client sees it (HTTP, JSON, the batcher's wait, generation).
3. load: --clients concurrent clients, each sending --per-client questions one after another: answers/s over the
   whole wall time, p50 / p99 latency under that load, the batch sizes the server formed (from /metrics).
4. baseline, after the server has stopped, in this process on the same device: the same model loaded as `t2s ask`
   does (jobs.ask.load), answering --baseline questions one at a time with transformers' generate
   (T2S_DECODER=dynamic): answers/s. The server's answers to those questions are compared with the baseline's
   (identical in fp32; in bf16 a near-tie can flip).
Questions are the rows of --rows (context, question), or synthetic ones (jobs.lib.synthetic). One JSON object
($OUT/serve_latency.json when --out is given) and a short table at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from jobs.lib.synthetic import synthetic_rows  # noqa: E402


def percentiles_ms(seconds: list[float]) -> dict:
    ms = sorted(s * 1000 for s in seconds)
    pick = lambda q: round(ms[min(len(ms) - 1, int(q * len(ms)))], 2)  # noqa: E731
    return {"n": len(ms), "p50": round(statistics.median(ms), 2), "p90": pick(0.9), "p99": pick(0.99),
            "max": round(ms[-1], 2)}


def questions_from(rows_file: str | None, count: int) -> list[tuple[str, str]]:
    if rows_file:
        rows = [json.loads(line) for line in Path(rows_file).read_text().splitlines() if line.strip()]
    else:
        rows = synthetic_rows(max(count, 50), seed=7)
    return [(row["context"], row["question"]) for row in rows[:count]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args, port: int, log_path: Path) -> tuple[subprocess.Popen, float]:
    command = [sys.executable, "-m", "jobs.cli", "serve", "--model", args.model, "--port", str(port),
               "--max-tokens", str(args.max_new_tokens), "--max-batch", str(args.max_batch),
               "--batch-wait-ms", str(args.batch_wait_ms), "--max-queue", str(max(256, args.clients * 4)),
               "--request-timeout-s", "300"] + (["--device", args.device] if args.device else [])
    started = time.perf_counter()
    with log_path.open("w") as log:  # the server writes to its own copy of the handle
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    while time.perf_counter() - started < 900:
        if process.poll() is not None:
            raise SystemExit(f"the server ended (exit code {process.returncode}):\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process, time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    process.kill()
    raise SystemExit("the server was not ready in 900 s")


ENDPOINT = "chat"  # set from --endpoint


async def ask(client: httpx.AsyncClient, pair: tuple[str, str]) -> tuple[float, str]:
    """(seconds, the answer's text) of one request: OpenAI's chat completion, or /v1/sql (which also parses the
    answer with sqlglot to say whether it is SQL only)."""
    started = time.perf_counter()
    if ENDPOINT == "chat":
        response = await client.post("/v1/chat/completions", json={"model": "t2s", "messages": [
            {"role": "system", "content": pair[0]}, {"role": "user", "content": pair[1]}]})
    else:
        response = await client.post("/v1/sql", json={"schema": pair[0], "question": pair[1]})
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"{response.status_code}: {response.text[:300]}")
    body = response.json()
    return elapsed, body["choices"][0]["message"]["content"] if ENDPOINT == "chat" else body["sql"]


async def single(url: str, pairs: list[tuple[str, str]]) -> tuple[list[float], list[dict]]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        await ask(client, pairs[0])  # one more warm-up: the connection, the first real prompt's shapes
        results = [await ask(client, pair) for pair in pairs]
    return [r[0] for r in results], [r[1] for r in results]


async def load(url: str, pairs: list[tuple[str, str]], clients: int, per_client: int) -> tuple[float, list, list]:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:

        async def one_client(k: int):
            return [await ask(client, pairs[(k * per_client + i) % len(pairs)]) for i in range(per_client)]

        started = time.perf_counter()
        done = await asyncio.gather(*(one_client(k) for k in range(clients)))
        wall = time.perf_counter() - started
    results = [r for per in done for r in per]
    return wall, [r[0] for r in results], [r[1] for r in results]


def batch_sizes(url: str) -> dict:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    values = {line.split()[0]: float(line.split()[-1]) for line in text.splitlines()
              if line.startswith("t2s_batch_size_") and not line.startswith("t2s_batch_size_created")}
    return {"batches": int(values.get("t2s_batch_size_count", 0))}


def baseline(args, pairs: list[tuple[str, str]]) -> dict:
    """One question at a time through transformers' generate, the model loaded as t2s ask loads it."""
    os.environ["T2S_DECODER"] = "dynamic"
    from jobs import ask as ask_module

    generator = ask_module.load(args.model, args.device, args.max_new_tokens)
    generator.respond([pairs[0]], batch_size=1)  # warm-up
    texts, seconds = [], []
    for pair in pairs:
        started = time.perf_counter()
        [generation] = generator.respond([pair], batch_size=1)
        seconds.append(time.perf_counter() - started)
        texts.append(generation.text)
    return {"answers_per_s": round(len(pairs) / sum(seconds), 2), "latency_ms": percentiles_ms(seconds),
            "texts": texts, "device": str(generator.model.device), "dtype": str(generator.model.dtype)}


def smoke_model(folder: Path) -> str:
    from jobs.lib.tiny import save_tiny_base

    rows = synthetic_rows(300)
    save_tiny_base(folder, [r["context"] + "\n" + r["question"] + "\n" + r["answer"] for r in rows])
    return str(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a model folder (a run's merged/) or a run directory")
    parser.add_argument("--rows", help="JSONL with context and question, e.g. the validation split")
    parser.add_argument("--device", default=None, help="default: the GPU when there is one")
    parser.add_argument("--single", type=int, default=50)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--per-client", type=int, default=8)
    parser.add_argument("--baseline", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--endpoint", choices=("chat", "sql"), default="chat",
                        help="chat: POST /v1/chat/completions (the OpenAI client's); sql: POST /v1/sql")
    parser.add_argument("--out", default=None)
    parser.add_argument("--smoke", action="store_true", help="CPU, the tiny model built here, small numbers")
    args = parser.parse_args()
    global ENDPOINT
    ENDPOINT = args.endpoint
    work = Path(tempfile.mkdtemp(prefix="t2s-serve-bench-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # the smoke's model, and the server log without --out
    if args.smoke:
        args.model = args.model or smoke_model(work / "tiny")
        args.device, args.single, args.clients, args.per_client, args.baseline = "cpu", 5, 16, 2, 4
        args.max_new_tokens = min(args.max_new_tokens, 16)
    if not args.model:
        parser.error("--model is required (or --smoke)")
    pairs = questions_from(args.rows, max(args.single, args.clients * args.per_client, args.baseline))
    port, log_path = free_port(), Path(args.out or work) / "serve_latency.server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    server, ready_s = start_server(args, port, log_path)
    try:
        single_s, single_answers = asyncio.run(single(url, pairs[:args.single]))
        before = batch_sizes(url)
        wall, load_s, load_answers = asyncio.run(load(url, pairs, args.clients, args.per_client))
        after = batch_sizes(url)
        count = after["batches"] - before["batches"]  # the load's own batches
        batches = {"batches": count, "mean": round(len(load_s) / count, 2) if count else None}
        served = asyncio.run(single(url, pairs[:args.baseline]))[1]
    finally:
        server.terminate()
        try:
            code = server.wait(120)
        except subprocess.TimeoutExpired:  # it did not drain: not left running behind the bench
            server.kill()
            code = server.wait()
    base = baseline(args, pairs[:args.baseline])
    answers = len(load_s)
    result = {
        "model": args.model, "device": base["device"], "dtype": base["dtype"], "server_exit_code": code,
        "ready_s": round(ready_s, 2), "max_new_tokens": args.max_new_tokens,
        "single": percentiles_ms(single_s),
        "endpoint": args.endpoint,
        "load": {"clients": args.clients, "answers": answers, "wall_s": round(wall, 2),
                 "answers_per_s": round(answers / wall, 2), "latency_ms": percentiles_ms(load_s), **batches},
        "baseline_generate_one_at_a_time": {k: v for k, v in base.items() if k != "texts"},
        "speedup_vs_baseline": round(answers / wall / base["answers_per_s"], 2),
        "identical_to_baseline": sum(a == t for a, t in zip(served, base["texts"])),
        "compared": len(base["texts"]),
        "versions": {name: version(name) for name in ("torch", "transformers", "fastapi", "uvicorn")},
        "python": platform.python_version(), "host": platform.node(),
    }
    if args.out:
        Path(args.out, "serve_latency.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    load_ms = result["load"]["latency_ms"]
    print(f"\n{'':34}{'p50 ms':>10}{'p99 ms':>10}{'answers/s':>12}")
    print(f"{'serve, one request at a time':34}{result['single']['p50']:>10}{result['single']['p99']:>10}"
          f"{round(1000 / result['single']['p50'], 1):>12}")
    print(f"{f'serve, {args.clients} concurrent clients':34}{load_ms['p50']:>10}{load_ms['p99']:>10}"
          f"{result['load']['answers_per_s']:>12}")
    bl = result["baseline_generate_one_at_a_time"]
    print(f"{'generate, one at a time':34}{bl['latency_ms']['p50']:>10}{bl['latency_ms']['p99']:>10}"
          f"{bl['answers_per_s']:>12}")
    print(f"load vs generate one at a time: {result['speedup_vs_baseline']}x; mean batch {batches['mean']}; "
          f"answers identical to generate's: {result['identical_to_baseline']} of {result['compared']}; "
          f"server exit code {code}")


if __name__ == "__main__":
    main()
