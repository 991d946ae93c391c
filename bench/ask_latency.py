"""Latency of `t2s ask`: time to first token and per-query time, one question at a time, greedy, as ask runs it.

    python bench/ask_latency.py --model runs/<id> [--questions 20] [--max-new-tokens 128] [--device cpu] [--cli]

Questions are synthetic rows (jobs.synthetic, the tiny model's training distribution). Time to first token is
generation with max_new_tokens=1 (prompt rendering, tokenizing, prefill, one step, decode); per-query latency is the
full answer. `--cli` also times whole `t2s ask` processes (imports and model load included: what a user waits).
Prints one JSON line.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from jobs import ask  # noqa: E402
from jobs.synthetic import synthetic_rows  # noqa: E402


def summary_ms(seconds: list[float]) -> dict:
    ms = sorted(s * 1000 for s in seconds)
    return {"mean": round(statistics.fmean(ms), 2), "median": round(statistics.median(ms), 2),
            "p90": round(ms[min(len(ms) - 1, int(0.9 * len(ms)))], 2), "min": round(ms[0], 2)}


def timed(generator: ask.SQLGenerator, pair: tuple[str, str], max_new_tokens: int):
    generator.max_new_tokens = max_new_tokens
    started = time.perf_counter()
    [generation] = generator.respond([pair], batch_size=1)
    return time.perf_counter() - started, generation


parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True, help="run directory, merged folder or Hub id")
parser.add_argument("--questions", type=int, default=20)
parser.add_argument("--max-new-tokens", type=int, default=ask.MAX_NEW_TOKENS)
parser.add_argument("--device", default=None)
parser.add_argument("--cli", type=int, default=0, metavar="N", help="also time N whole `t2s ask` processes")
args = parser.parse_args()

started = time.perf_counter()
generator = ask.load(args.model, args.device, args.max_new_tokens)
load_s = time.perf_counter() - started  # includes transformers' lazy imports, as in a fresh `t2s ask`
import torch  # noqa: E402  (already imported by load)

pairs = [(row["context"], row["question"]) for row in synthetic_rows(args.questions, seed=123)]
timed(generator, pairs[0], args.max_new_tokens)  # warm-up: first-call allocations and lazy inits

first_token = [timed(generator, pair, 1)[0] for pair in pairs]
full = [timed(generator, pair, args.max_new_tokens) for pair in pairs]
per_query = [seconds for seconds, _ in full]
new_tokens = [g.new_tokens for _, g in full]
decode_ms_per_token = [(s - t) / (n - 1) * 1000 for (s, g), t, n in zip(full, first_token, new_tokens) if n > 1]

generator.max_new_tokens = args.max_new_tokens
started = time.perf_counter()
generator.answers(pairs, batch_size=len(pairs))
batched_s = time.perf_counter() - started

cli_s = []
for _ in range(args.cli):
    context, question = pairs[0]
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jobs.cli", "ask", "--model", args.model, "--schema", context,
                    "--max-new-tokens", str(args.max_new_tokens), "--json", question],
                   cwd=ROOT, capture_output=True, text=True, check=True)
    cli_s.append(time.perf_counter() - started)

device = next(generator.model.parameters()).device
print(json.dumps({
    "model": args.model,
    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores, "
                                                                              f"{torch.get_num_threads()} threads)",
    "machine": platform.machine(), "torch": torch.__version__,
    "parameters": sum(p.numel() for p in generator.model.parameters()),
    "questions": len(pairs), "max_new_tokens": args.max_new_tokens,
    "load_s": round(load_s, 2),
    "first_token_ms": summary_ms(first_token),
    "per_query_ms": summary_ms(per_query),
    "new_tokens_mean": round(statistics.fmean(new_tokens), 1),
    "decode_ms_per_token_mean": round(statistics.fmean(decode_ms_per_token), 2) if decode_ms_per_token else None,
    "sql_only": sum(ask.sqlcheck.is_sql_only(g.text) for _, g in full) / len(full),
    "batched_queries_per_s": round(len(pairs) / batched_s, 2),
    **({"cli_process_ms": summary_ms(cli_s)} if cli_s else {}),
}))
