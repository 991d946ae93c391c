"""Latency of `t2s ask`, old decoder against new in one process: time to first token, per query, per token.

    python bench/ask_latency.py --model runs/<id> [--rows validation.jsonl] [--questions 8] [--max-new-tokens 128]
        [--device cuda] [--decoders dynamic,auto] [--cli 0] [--out $OUT]

For each decoder (a T2S_DECODER value; "auto" is the CUDA graph decoder on a GPU) the same questions are asked one
at a time, greedily, as ask runs them, after one warm-up question (which pays the decoder's CUDA graph capture:
reported as warmup_ms and compile_s). Time to first token is generation with max_new_tokens=1 (prompt rendering,
tokenizing, prefill, decode); ms per token is (query - first token) / (new tokens - 1). Questions are the first rows
of --rows (context, question), or synthetic rows (jobs.lib.synthetic) without it. `--cli N` also runs N whole
`t2s ask --verbose` processes per decoder: what a user waits, from process start to the first answer, with ask's own
breakdown (start-up, model load, answering; bench/ask_startup.py splits it finer). Prints one JSON line per decoder
and a table; --out keeps the JSON.

On one H200 with SmolLM2-135M, 8 questions: ~50 s (imports and load ~12 s; the old path ~3.3 s a question that runs
to 128 tokens, ~35 s at most; the new one a few seconds).
"""

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from jobs import ask  # noqa: E402
from jobs.lib.generate import decoding_info  # noqa: E402
from jobs.lib.synthetic import synthetic_rows  # noqa: E402


def summary_ms(seconds: list[float]) -> dict:
    ms = sorted(s * 1000 for s in seconds)
    return {"mean": round(statistics.fmean(ms), 2), "median": round(statistics.median(ms), 2),
            "p90": round(ms[min(len(ms) - 1, int(0.9 * len(ms)))], 2), "min": round(ms[0], 2)}


def timed(generator: ask.SQLGenerator, pair: tuple[str, str], max_new_tokens: int, decoder: str):
    generator.max_new_tokens = max_new_tokens
    os.environ["T2S_DECODER"] = decoder  # read by jobs.lib.generate on every call
    started = time.perf_counter()
    [generation] = generator.respond([pair], batch_size=1)
    return time.perf_counter() - started, generation


VERBOSE = re.compile(r"ready to load after ([\d.]+) s; model loaded in ([\d.]+) s .*answered in ([\d.]+) s .*"
                     r"first answer ([\d.]+) s after")


def cli_runs(count: int, model: str, pair: tuple[str, str], max_new_tokens: int, decoder: str, device) -> dict:
    """Whole `t2s ask --verbose` processes: wall time and ask's own breakdown, medians."""
    walls, stages = [], []
    for _ in range(count):
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "jobs.cli", "ask", "--verbose", "--model", model, "--schema",
                                 pair[0], "--max-new-tokens", str(max_new_tokens), "--json",
                                 *(["--device", device] if device else []), pair[1]],
                                cwd=ROOT, capture_output=True, text=True, env={**os.environ, "T2S_DECODER": decoder})
        walls.append(time.perf_counter() - started)
        if result.returncode != 0:
            sys.exit(f"t2s ask failed:\n{result.stderr[-3000:]}")
        found = VERBOSE.search(result.stderr)
        if found:
            stages.append([float(x) for x in found.groups()])
    out = {"process_ms": summary_ms(walls)}
    if stages:
        names = ("ready_to_load_s", "model_load_s", "answering_s", "first_answer_after_start_s")
        out.update({name: round(statistics.median(s[i] for s in stages), 2) for i, name in enumerate(names)})
    return out


parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True, help="run directory, merged folder or Hub id")
parser.add_argument("--rows", default=None, help="JSONL of context and question (default: synthetic questions)")
parser.add_argument("--questions", type=int, default=8)
parser.add_argument("--max-new-tokens", type=int, default=ask.MAX_NEW_TOKENS)
parser.add_argument("--device", default=None)
parser.add_argument("--decoders", default="dynamic,auto", help="T2S_DECODER values, compared in this process")
parser.add_argument("--cli", type=int, default=0, metavar="N", help="also time N whole `t2s ask` processes each")
parser.add_argument("--out", default=None)
args = parser.parse_args()

started = time.perf_counter()
generator = ask.load(args.model, args.device, args.max_new_tokens)
load_s = time.perf_counter() - started  # includes transformers' lazy imports, as in a fresh `t2s ask`
import torch  # noqa: E402  (already imported by load)

if args.rows:
    source = [json.loads(line) for line in Path(args.rows).read_text().splitlines() if line.strip()]
else:
    source = synthetic_rows(args.questions, seed=123)
pairs = [(row["context"], row["question"]) for row in source[: args.questions]]
device = next(generator.model.parameters()).device
cuda = device.type == "cuda"
report = {
    "model": args.model,
    "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({os.cpu_count()} cores, "
                                                               f"{torch.get_num_threads()} threads)",
    "machine": platform.machine(), "torch": torch.__version__,
    "parameters": sum(p.numel() for p in generator.model.parameters()),
    "questions": len(pairs), "max_new_tokens": args.max_new_tokens, "load_s": round(load_s, 2), "decoders": {},
}
for decoder in args.decoders.split(","):
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    warmup_s, _ = timed(generator, pairs[0], args.max_new_tokens, decoder)  # first call: the 1-row capture
    first_token = [timed(generator, pair, 1, decoder)[0] for pair in pairs]
    full = [timed(generator, pair, args.max_new_tokens, decoder) for pair in pairs]
    per_query = [seconds for seconds, _ in full]
    new_tokens = [g.new_tokens for _, g in full]
    per_token = [(s - t) / (n - 1) * 1000 for (s, g), t, n in zip(full, first_token, new_tokens) if n > 1]
    generator.max_new_tokens = args.max_new_tokens
    began = time.perf_counter()
    generator.answers(pairs, batch_size=len(pairs))
    batched_s = time.perf_counter() - began
    info = decoding_info(generator.model) if decoder != "dynamic" else {"backend": "dynamic", "compile_s": 0.0}
    result = {
        "backend": info["backend"], "warmup_ms": round(warmup_s * 1000, 1), "compile_s": info["compile_s"],
        **({"fallback": info["fallback"]} if info.get("fallback") else {}),
        "first_token_ms": summary_ms(first_token),
        "per_query_ms": summary_ms(per_query),
        "new_tokens_mean": round(statistics.fmean(new_tokens), 1),
        "ms_per_token": {"median": round(statistics.median(per_token), 2),
                         "p90": round(sorted(per_token)[min(len(per_token) - 1, int(0.9 * len(per_token)))], 2)}
        if per_token else None,
        "sql_only": sum(ask.sqlcheck.is_sql_only(g.text) for _, g in full) / len(full),
        "batched_queries_per_s": round(len(pairs) / batched_s, 2),
        "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "answers": [g.text for _, g in full],
    }
    if args.cli:
        result["cli"] = cli_runs(args.cli, args.model, pairs[0], args.max_new_tokens, decoder, args.device)
    report["decoders"][decoder] = result
    print(decoder, json.dumps({k: v for k, v in result.items() if k != "answers"}), flush=True)

names = list(report["decoders"])
if len(names) > 1:
    a, b = (report["decoders"][n]["answers"] for n in (names[0], names[-1]))
    report["identical_answers"] = f"{sum(x == y for x, y in zip(a, b))} of {len(a)} ({names[0]} vs {names[-1]})"
print("\n| decoder | first token ms (median, p90) | ms/token (median, p90) | per query ms (median, p90) | "
      "warm-up ms (capture s) | process start to first answer s | peak GiB |")
print("|---|---|---|---|---|---|---:|")
for name, r in report["decoders"].items():
    per_token = r["ms_per_token"] or {"median": "-", "p90": "-"}
    cli = r.get("cli", {})
    print(f"| {name} ({r['backend']}) | {r['first_token_ms']['median']}, {r['first_token_ms']['p90']} | "
          f"{per_token['median']}, {per_token['p90']} | {r['per_query_ms']['median']}, {r['per_query_ms']['p90']} | "
          f"{r['warmup_ms']} ({r['compile_s']}) | {cli.get('first_answer_after_start_s', '-')} | "
          f"{r['peak_gpu_mem_gib']} |")
if "identical_answers" in report:
    print(f"identical answers: {report['identical_answers']}")
if args.out:
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "ask_latency.json").write_text(json.dumps(report, indent=1))
