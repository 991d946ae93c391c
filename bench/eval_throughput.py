"""Eval's generation, old decoder against new in one process: same model, same prompts, same greedy decoding.

    python bench/eval_throughput.py --model runs/x/merged --rows validation.jsonl --out $OUT \
        [--batch-sizes 64,256,all] [--decoders dynamic,cudagraph] [--dynamic-batches 2] [--single 0] [--time-limit 150]

Every batch size runs through jobs.lib.generate.generate_batched (what `t2s eval` runs) once per decoder
(jobs.lib.generate.DECODERS): "dynamic" is transformers' generate (the old path), "cudagraph" the static cache with CUDA
graphs. The new decoders answer every row at every batch size, twice: cold (captures for new shapes included, timed
apart as compile_s) and warm (every shape already captured). The old path costs ~35 ms a step whatever the batch
(bench/RESULTS.md §4), so below "all" it answers only its first --dynamic-batches batches (the first rows of the file),
which measure its queries/s at that size; at "all" it answers every row: the reference. Every other run's answers are
compared with the reference row by row: how many are identical, and every difference (in bf16, kernels that add in
another order can flip a near-tie; the old path at a smaller batch against the reference is the yardstick of that
effect). --single N answers the first N rows one at a time per decoder (bench/ask_latency.py measures that too).
Results go to $OUT/eval_throughput.json after every run (a call cut short keeps what finished) and a table at the end.

On one H200, the 1,090 validation rows, 128 new tokens at most: ~60 s for SmolLM2-135M (imports and load ~15 s, old
path ~20 s, new path ~20 s); with --max-rows 512 --single 2, ~45 s for TinyLlama's architecture with random weights.
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
from jobs.lib.chat import render_prompt  # noqa: E402
from jobs.lib.generate import decoding_info, generate_batched  # noqa: E402
from jobs.lib.models import load_model, load_tokenizer  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True, help="a model folder (a run's merged/)")
parser.add_argument("--rows", required=True, help="JSONL with context and question, e.g. the validation split")
parser.add_argument("--out", required=True)
parser.add_argument("--max-rows", type=int, default=None)
parser.add_argument("--single", type=int, default=0, help="rows answered one at a time, per decoder")
parser.add_argument("--dynamic-batches", type=int, default=2,
                    help="batches the old path answers at each batch size below all rows (0: every row)")
parser.add_argument("--batch-sizes", default="64,256,all")
parser.add_argument("--decoders", default="dynamic,cudagraph")
parser.add_argument("--max-new-tokens", type=int, default=128)
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on a CPU")
parser.add_argument("--time-limit", type=float, default=150, help="start no run after this many seconds")
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
        subset = prompts
        if decoder == "dynamic" and args.dynamic_batches and batch < len(rows):
            subset = prompts[: batch * args.dynamic_batches]  # its queries/s at this size needs only a few batches
        runs = ["cold", "warm"] if decoder != "dynamic" else [""]
        for run in runs:
            name = f"batch_{batch}_{decoder}" + (f"_{run}" if run else "")
            answers[name] = timed_run(name, subset, batch, decoder)

# every run against the reference: the first decoder's (the old path's, by default) run over every row
complete = [n for n in answers if len(answers[n]) == len(rows)]
reference = next((n for n in complete if n.endswith(f"_{decoders[0]}")), complete[0] if complete else None)
for name in answers:
    if reference and name != reference:
        compared = len(answers[name])  # a run over the first rows only is compared on those
        diff = differences(answers[reference][:compared], answers[name], rows)
        key = f"{reference} vs {name}"
        results["identical"][key], results["differences"][key] = f"{compared - len(diff)} of {compared}", diff
        print(f"{key}: {compared - len(diff)} of {compared} identical", flush=True)
save()

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

print("\n| run | decoder | batch | queries | queries/s | (without compile) | compile s | tokens/s | peak GiB |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
for name, r in results["runs"].items():
    if "batch_size" in r:
        print(f"| {name} | {r['decoder']} | {r['batch_size']} | {r['queries']} | {r['queries_per_s']} | "
              f"{r['queries_per_s_without_compile']} | {r['compile_s']} | {r['tokens_per_s']} | {r['peak_gpu_mem_gib']} |")
for decoder, r in single.items():
    print(f"| one at a time | {decoder} | 1 | {r['queries']} | {r['queries_per_s']} | | | {r['ms_per_token']} ms/token, "
          f"median {r['per_query_ms_median']} ms, p90 {r['per_query_ms_p90']} ms | |")
for key, value in results["identical"].items():
    print(f"identical answers, {key}: {value}")
print(f"total {time.perf_counter() - started:.0f} s")
