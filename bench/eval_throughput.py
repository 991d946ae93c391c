"""Batched eval vs the seed notebook's one-prompt-at-a-time loop, same model, same prompts, same greedy decoding.

    python bench/eval_throughput.py --model runs/x/merged --rows runs/x/data/validation.jsonl --out $OUT \
        [--batch-sizes 64,256,1024] [--single 48]

Every batch size runs over the same rows through jobs.generate (what `t2s eval` runs); the one-at-a-time loop
runs over the first --single rows only (it is slow) and is compared per query.
"""

import argparse
import json
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jobs.chat import render_prompt  # noqa: E402
from jobs.generate import generate_batched  # noqa: E402
from jobs.models import load_model, load_tokenizer  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--rows", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--max-rows", type=int, default=None)
parser.add_argument("--single", type=int, default=48)
parser.add_argument("--batch-sizes", default="64,256,1024")
parser.add_argument("--max-new-tokens", type=int, default=128)
args = parser.parse_args()

tokenizer = load_tokenizer(args.model)
model = load_model(args.model, dtype=torch.bfloat16).cuda().eval()
rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines()][: args.max_rows]
prompts = [render_prompt(tokenizer, r["context"], r["question"]) for r in rows]
generate_batched(model, tokenizer, prompts[:8], 8, 16)  # warm-up

runs = [(f"batch_{b}", prompts, int(b)) for b in args.batch_sizes.split(",")] + [
    ("one_at_a_time", prompts[: args.single], 1), ("batch_256_cudnn_sdpa", prompts, 256)]
results = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "transformers": version("transformers"),
           "model": args.model, "max_new_tokens": args.max_new_tokens, "runs": {}}
for name, subset, batch in runs:
    # the last run puts back what jobs.models turns off, to show what that is worth
    torch.backends.cuda.enable_cudnn_sdp(name.endswith("cudnn_sdpa"))
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    started = time.perf_counter()
    out = generate_batched(model, tokenizer, subset, batch, args.max_new_tokens)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    results["runs"][name] = {"queries": len(subset), "batch_size": batch, "seconds": round(elapsed, 2),
                             "queries_per_s": round(len(subset) / elapsed, 2),
                             "tokens_per_s": round(sum(g.new_tokens for g in out) / elapsed),
                             "new_tokens_max": max(g.new_tokens for g in out),
                             "peak_gpu_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    print(name, json.dumps(results["runs"][name]), flush=True)
single = results["runs"]["one_at_a_time"]["queries_per_s"]
results["speedup_vs_one_at_a_time"] = {name: round(r["queries_per_s"] / single, 1)
                                       for name, r in results["runs"].items() if name != "one_at_a_time"}
print(json.dumps(results["runs"]))
Path(args.out, "eval_throughput.json").write_text(json.dumps(results, indent=2))
print(json.dumps(results["speedup_vs_one_at_a_time"]))
