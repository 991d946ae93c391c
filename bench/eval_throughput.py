"""Batched eval vs the seed notebook's one-prompt-at-a-time loop, same model, same prompts, same greedy decoding.

    python bench/eval_throughput.py --model runs/x/merged --rows runs/x/data/validation.jsonl --out $OUT
"""

import argparse
import json
import sys
import time
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
parser.add_argument("--batched", type=int, default=512)
parser.add_argument("--single", type=int, default=48)
parser.add_argument("--batch-size", type=int, default=256)
args = parser.parse_args()

tokenizer = load_tokenizer(args.model)
model = load_model(args.model, dtype=torch.bfloat16).cuda().eval()
rows = [json.loads(l) for l in Path(args.rows).read_text().splitlines()][: args.batched]
prompts = [render_prompt(tokenizer, r["context"], r["question"]) for r in rows]
generate_batched(model, tokenizer, prompts[:8], 8, 16)  # warm-up

results = {}
for name, subset, batch in (("batched", prompts, args.batch_size), ("one_at_a_time", prompts[: args.single], 1)):
    torch.cuda.synchronize()
    started = time.perf_counter()
    out = generate_batched(model, tokenizer, subset, batch, 128)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    results[name] = {"queries": len(subset), "batch_size": batch, "seconds": elapsed,
                     "queries_per_s": len(subset) / elapsed,
                     "tokens_per_s": sum(g.new_tokens for g in out) / elapsed,
                     "latency_ms_per_query_mean": elapsed / len(subset) * 1000 if batch == 1 else None}
results["speedup"] = results["batched"]["queries_per_s"] / results["one_at_a_time"]["queries_per_s"]
results["gpu"] = torch.cuda.get_device_name(0)
Path(args.out, "eval_throughput.json").write_text(json.dumps(results, indent=2))
print(json.dumps(results, indent=2))
