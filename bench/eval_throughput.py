"""Eval's generation, old decoder against new in one process: same model, same prompts, same greedy decoding.

    python bench/eval_throughput.py --model runs/x/merged --rows validation.jsonl --out $OUT \
        [--batch-sizes 64,256,all] [--single 32] [--decoders dynamic,cudagraph] [--time-limit 500]

Every batch size runs over the same rows through jobs.generate.generate_batched (what `t2s eval` runs) once per
decoder (jobs.generate.DECODERS): "dynamic" is transformers' generate (the old path), "cudagraph" the static cache
with CUDA graphs. The CUDA graph decoder runs each batch size twice: cold (its captures for new shapes included and
timed apart as compile_s) and warm (every shape already captured). --single runs the first rows one at a time.
Answers are compared row by row: how many are identical, and every difference (in bf16, kernels that add in another
order can flip a near-tie; the dynamic path at two batch sizes is compared too, as the yardstick of that effect).
Results go to $OUT/eval_throughput.json after every run (a call cut short keeps what finished) and a table at the end.
"""

import argparse
import json
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jobs.chat import render_prompt  # noqa: E402
from jobs.generate import decoding_info, generate_batched  # noqa: E402
from jobs.models import load_model, load_tokenizer  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True, help="a model folder (a run's merged/)")
parser.add_argument("--rows", required=True, help="JSONL with context and question, e.g. the validation split")
parser.add_argument("--out", required=True)
parser.add_argument("--max-rows", type=int, default=None)
parser.add_argument("--single", type=int, default=32, help="rows answered one at a time, per decoder")
parser.add_argument("--batch-sizes", default="64,256,all")
parser.add_argument("--decoders", default="dynamic,cudagraph")
parser.add_argument("--max-new-tokens", type=int, default=128)
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on a CPU")
parser.add_argument("--time-limit", type=float, default=500, help="start no run after this many seconds")
args = parser.parse_args()
started = time.perf_counter()
cuda = args.device.startswith("cuda")


def sync() -> None:
    if cuda:
        torch.cuda.synchronize()


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None


def differences(a: list, b: list, rows: list[dict]) -> list[dict]:
    """Rows whose answers differ, with where the two texts part."""
    out = []
    for i, (x, y) in enumerate(zip(a, b)):
        if x.text != y.text:
            same = next((k for k, (p, q) in enumerate(zip(x.text, y.text)) if p != q), min(len(x.text), len(y.text)))
            out.append({"row": i, "question": rows[i]["question"], "first_differing_char": same,
                        "a": x.text, "b": y.text})
    return out


tokenizer = load_tokenizer(args.model)
dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
model = load_model(args.model, dtype=dtype).to(args.device).eval()
rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines() if line.strip()][: args.max_rows]
prompts = [render_prompt(tokenizer, r["context"], r["question"]) for r in rows]
decoders = args.decoders.split(",")
generate_batched(model, tokenizer, prompts[:8], 8, 16, decoder="dynamic")  # CUDA, cuBLAS and generate's first call

results = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
           "transformers": version("transformers"), "model": args.model, "dtype": str(dtype),
           "parameters": sum(p.numel() for p in model.parameters()), "rows": len(rows),
           "max_new_tokens": args.max_new_tokens, "runs": {}, "identical": {}, "differences": {}}
answers: dict[str, list] = {}
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)


def save() -> None:
    (out / "eval_throughput.json").write_text(json.dumps(results, indent=1))


def timed_run(name: str, subset: list[str], batch: int, decoder: str) -> list:
    before = decoding_info(model)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync()
    began = time.perf_counter()
    generations = generate_batched(model, tokenizer, subset, batch, args.max_new_tokens, decoder=decoder)
    sync()
    seconds = time.perf_counter() - began
    after = decoding_info(model)
    compile_s = round(after["compile_s"] - before["compile_s"], 3) if decoder != "dynamic" else 0.0
    results["runs"][name] = {
        "decoder": after["backend"] if decoder != "dynamic" else "dynamic", "queries": len(subset),
        "batch_size": batch, "seconds": round(seconds, 3), "compile_s": compile_s,
        "graphs_captured": after["graphs"] - before["graphs"] if decoder != "dynamic" else 0,
        "queries_per_s": round(len(subset) / seconds, 2),
        "queries_per_s_without_compile": round(len(subset) / max(seconds - compile_s, 1e-9), 2),
        "tokens_per_s": round(sum(g.new_tokens for g in generations) / seconds),
        "new_tokens_mean": round(statistics.fmean(g.new_tokens for g in generations), 1),
        "new_tokens_max": max(g.new_tokens for g in generations),
        "ended_at_eos": round(sum(bool(g.ended_at_eos) for g in generations) / len(generations), 3),
        "peak_gpu_mem_gib": peak_gib(), **({"fallback": after["fallback"]} if after["fallback"] else {})}
    print(name, json.dumps(results["runs"][name]), flush=True)
    save()
    return generations


sizes = [len(rows) if b == "all" else int(b) for b in args.batch_sizes.split(",")]
for batch in sizes:
    for decoder in decoders:
        if time.perf_counter() - started > args.time_limit:
            print(f"time limit: batch {batch} {decoder} not run", flush=True)
            continue
        runs = ["cold", "warm"] if decoder == "cudagraph" else [""]
        for run in runs:
            name = f"batch_{batch}_{decoder}" + (f"_{run}" if run else "")
            answers[name] = timed_run(name, prompts, batch, decoder)
    names = [n for n in answers if n.startswith(f"batch_{batch}_")]
    for other in names[1:]:  # every run against the first decoder's (the old path's, by default)
        diff = differences(answers[names[0]], answers[other], rows)
        results["identical"][f"{names[0]} vs {other}"] = f"{len(rows) - len(diff)} of {len(rows)}"
        results["differences"][f"{names[0]} vs {other}"] = diff
        print(f"{names[0]} vs {other}: {len(rows) - len(diff)} of {len(rows)} identical", flush=True)
dynamic_runs = [n for n in answers if n.endswith("_dynamic")]
if len(dynamic_runs) > 1:  # the yardstick: the old path against itself at another batch size
    diff = differences(answers[dynamic_runs[0]], answers[dynamic_runs[-1]], rows)
    key = f"{dynamic_runs[0]} vs {dynamic_runs[-1]}"
    results["identical"][key], results["differences"][key] = f"{len(rows) - len(diff)} of {len(rows)}", diff
    print(f"{key}: {len(rows) - len(diff)} of {len(rows)} identical", flush=True)

single = {}
for decoder in decoders:
    if args.single and time.perf_counter() - started <= args.time_limit:
        generate_batched(model, tokenizer, prompts[:1], 1, args.max_new_tokens, decoder=decoder)  # its 1-row shape
        latencies, tokens = [], []
        for prompt in prompts[: args.single]:
            sync()
            began = time.perf_counter()
            [g] = generate_batched(model, tokenizer, [prompt], 1, args.max_new_tokens, decoder=decoder)
            sync()
            latencies.append((time.perf_counter() - began) * 1000)
            tokens.append(g.new_tokens)
        ordered = sorted(latencies)
        single[decoder] = {"queries": len(latencies), "queries_per_s": round(1000 * len(latencies) / sum(latencies), 2),
                           "per_query_ms_median": round(statistics.median(latencies), 1),
                           "per_query_ms_p90": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 1),
                           "ms_per_token": round(sum(latencies) / sum(tokens), 2)}
        results["runs"][f"one_at_a_time_{decoder}"] = single[decoder]
        print(f"one_at_a_time_{decoder}", json.dumps(single[decoder]), flush=True)
        save()

print("\n| run | decoder | batch | queries/s | (without compile) | compile s | tokens/s | peak GiB |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
for name, r in results["runs"].items():
    if "batch_size" in r:
        print(f"| {name} | {r['decoder']} | {r['batch_size']} | {r['queries_per_s']} | "
              f"{r['queries_per_s_without_compile']} | {r['compile_s']} | {r['tokens_per_s']} | {r['peak_gpu_mem_gib']} |")
for decoder, r in single.items():
    print(f"| one at a time | {decoder} | 1 | {r['queries_per_s']} | | | {r['ms_per_token']} ms/token, "
          f"median {r['per_query_ms_median']} ms, p90 {r['per_query_ms_p90']} ms | |")
for key, value in results["identical"].items():
    print(f"identical answers, {key}: {value}")
print(f"total {time.perf_counter() - started:.0f} s")
