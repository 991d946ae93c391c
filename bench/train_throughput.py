"""Training throughput and memory: configs/seed.yaml vs candidate defaults, through the project's own jobs.

TinyLlama's architecture with random weights (bench/random_tinyllama.py), TinyLlama's real tokenizer, the real
rows in ../shared. Every variant trains on about the same number of examples; then each one's completion-only
validation loss is measured the same way, so the seed (loss on the prompt too) and ours compare fairly.

    python bench/train_throughput.py --model /tmp/tinyllama --shared ../shared --out $OUT \
        --variant seed=configs/seed.yaml --variant default=configs/default.yaml \
        --variant full=configs/default.yaml:train.method=full,train.learning_rate=2e-5

Precision variants (train.precision) compare the same way: speed and peak memory on TinyLlama's architecture,
and each one's precision as train.done recorded it. --smoke runs it all on the CPU with the tiny model and a slice
of the rows (to try the script before a GPU call); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobs.lib.config import load_config  # noqa: E402
from jobs.lib.rundir import RunDir  # noqa: E402
from jobs.lib.accelerate_config import read_accelerate_config  # noqa: E402

HOPPER_BF16_DENSE = 989e12  # FLOP/s, the datasheet's dense bf16 peak for H100 and H200 SXM (same chip)
PARAMS = 1.1e9


def t2s(*args: str, env: dict | None = None, timeout: float | None = None) -> bool:
    """Runs one job; a failure or a timeout is reported and returns False, so the other variants still run."""
    started = time.monotonic()
    # own process group: on a timeout the accelerate workers go too, not just the launcher
    job = subprocess.Popen([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, env={**os.environ, **(env or {})},
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        job.communicate()
        print(f"  t2s {args[0]} timed out after {timeout:.0f}s", flush=True)
        return False
    if job.returncode:
        print(f"  t2s {args[0]} failed:\n{output[-3000:]}", flush=True)
        return False
    print(f"  t2s {args[0]} ok in {time.monotonic() - started:.0f}s", flush=True)
    return True


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "transformers", "trl", "peft", "accelerate", "deepspeed", "bitsandbytes", "liger-kernel",
                    "flash-attn", "torch-optimi"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def examples_per_step(cfg, mean_tokens: float, processes: int) -> float:
    t = cfg.train
    rows = t.per_device_batch_size * t.gradient_accumulation_steps * processes
    return rows * t.max_seq_length / mean_tokens if t.packing != "none" else rows


@torch.no_grad()
def completion_loss(base: str, run: RunDir, n: int = 512) -> float:
    """Mean loss over answer tokens only, on the first n validation rows (the same rows for every variant), in bf16
    whatever the weights trained in (what a deployed model runs in)."""
    from datasets import load_from_disk
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from jobs.lib.models import default_device

    device = default_device()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).to(device)
    if run.trained() == "adapter":
        model = PeftModel.from_pretrained(model, str(run.adapter))
    else:
        model = AutoModelForCausalLM.from_pretrained(run.adapter, dtype=torch.bfloat16).to(device)
    model.eval()
    data = load_from_disk(str(run.tokenized / "validation"))
    data = data.select(range(min(n, len(data))))
    total, count = 0.0, 0
    for row in data:
        ids = torch.tensor([row["input_ids"]], device=device)
        labels = torch.tensor([row["labels"]], device=device)
        out = model(input_ids=ids, labels=labels)
        k = int((labels[:, 1:] != -100).sum())
        total, count = total + float(out.loss) * k, count + k
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--shared", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", default="/tmp/bench-runs")
    parser.add_argument("--examples", type=int, default=6000)
    parser.add_argument("--timeout", type=float, default=240, help="seconds per variant's train job")
    parser.add_argument("--variant", action="append", required=True, help="name=config.yaml[:k=v,k=v]")
    parser.add_argument("--smoke", action="store_true", help="CPU, 300 rows, a few steps (with --model tiny)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = Path(args.runs)
    data = str(Path(args.shared) / "data" / "sql-create-context")
    common = [f"runs_dir={runs}", f"model.name_or_path={args.model}", f"data.source={data}",
              "data.max_length=512", "train.early_stopping_patience=null", "train.logging_steps=5",
              "eval.models=[merged]"]
    if args.smoke:  # GPU-only kernels off; the tiny model's base is built by prep into each run
        common += ["data.max_rows=300", "train.liger_kernel=false", "train.logging_steps=1"]

    # prep once (same rows, same tokenizer for every variant), then copy into each variant's run
    prep_cfg_path = out / "prep.yaml"
    prep_cfg_path.write_text(yaml.safe_dump({"run_id": "prep"}))
    if not t2s("prep", "--config", str(prep_cfg_path), *sum((["--set", s] for s in common), [])):
        raise SystemExit(1)
    prepped = RunDir(runs / "prep")
    manifest = json.loads(prepped.manifest.read_text())
    mean_tokens = manifest["tokens"]["train_total"] / manifest["rows"]["train"]
    print(f"prep: {manifest['rows']} rows, mean {mean_tokens:.0f} tokens/example", flush=True)

    results = {}
    for spec in args.variant:
        name, _, rest = spec.partition("=")
        config_file, _, sets = rest.partition(":")
        overrides = common + [f"run_id={name}"] + [s for s in sets.split(",") if s]
        cfg = load_config(ROOT / config_file, overrides)
        processes = read_accelerate_config(cfg.train.accelerate_config)[1].get("num_processes", 1)
        steps = math.ceil(args.examples / examples_per_step(cfg, mean_tokens, processes))
        overrides += [f"train.max_steps={steps}", f"train.save_every_steps={steps}", "train.eval_every_steps=null"]
        run = RunDir(runs / name)
        if run.root.exists():
            shutil.rmtree(run.root)
        shutil.copytree(prepped.root, run.root)
        print(f"{name}: {config_file} {sets} · {processes} process(es) · {steps} steps", flush=True)
        started = time.monotonic()
        if not t2s("train", "--config", str(ROOT / config_file), *sum((["--set", s] for s in overrides), []),
                   env={"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(processes))}, timeout=args.timeout):
            continue
        base = str(prepped.base) if args.model == "tiny" else args.model
        wall = time.monotonic() - started
        done = json.loads(run.marker("train").read_text())
        metrics = [json.loads(l) for l in run.metrics.read_text().splitlines()]
        rates = [m["tokens_per_s"] for m in metrics if m.get("tokens_per_s")][1:] or \
                [m["tokens_per_s"] for m in metrics if m.get("tokens_per_s")]
        tokens_per_s = statistics.median(rates) if rates else done["tokens_seen"] / done["train_runtime_s"]
        multiplier = 6 if cfg.train.method == "full" else 4
        results[name] = {
            "config": config_file, "overrides": sets, "processes": processes, "steps": done["global_step"],
            "examples": round(steps * examples_per_step(cfg, mean_tokens, processes)),
            "tokens_per_s": tokens_per_s, "tokens_per_s_per_gpu": tokens_per_s / processes,
            "examples_per_s_per_gpu": tokens_per_s / processes / mean_tokens,
            "peak_gpu_mem_gb_rank0": done.get("peak_gpu_mem_gb"),
            "mfu": multiplier * PARAMS * tokens_per_s / (processes * HOPPER_BF16_DENSE),
            "train_runtime_s": done["train_runtime_s"], "wall_s": wall,
            "epoch_full_dataset_s_78577_rows": 78577 * mean_tokens / tokens_per_s,
            "precision": done.get("precision"), "weights_dtype": done.get("weights_dtype"),
            "optimizer": done.get("optimizer"),
        }
        results[name]["val_completion_loss"] = completion_loss(base, run)
        print(json.dumps({name: results[name]}), flush=True)
        (out / "train_throughput.json").write_text(json.dumps(
            {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
             "gpus": torch.cuda.device_count(), "versions": versions(),
             "mean_tokens_per_example": mean_tokens, "results": results}, indent=2))

    print(f"\n{'variant':<12} {'precision':<12} {'procs':>5} {'ex/s/GPU':>9} {'tok/s/GPU':>10} {'peak GiB':>8} "
          f"{'MFU':>6} {'val loss':>9} {'epoch@78.6K s':>13}")
    for name, r in results.items():
        print(f"{name:<12} {r['precision'] or '-':<12} {r['processes']:>5} {r['examples_per_s_per_gpu']:>9.1f} "
              f"{r['tokens_per_s_per_gpu']:>10.0f} {r['peak_gpu_mem_gb_rank0'] or 0:>8.1f} {r['mfu']:>6.1%} "
              f"{r['val_completion_loss']:>9.3f} {r['epoch_full_dataset_s_78577_rows']:>13.0f}")


if __name__ == "__main__":
    main()
