"""Quality sweep of the stand-in SmolLM2-135M-Instruct through the project's own jobs, several variants at once.

Prep runs once (every variant trains on the same rows, so variants may not change data.* or the model); then each
variant runs train → merge → eval (merged model, validation split) in its own run, CONCURRENTLY: training the 135M
model is host-bound, so several runs share a GPU (--per-gpu), spread over every visible GPU with
CUDA_VISIBLE_DEVICES. The last lines printed are a table: variant, SQL-only, exact match, execution accuracy, how
answers end, train time, peak memory. Train times of variants that ran side by side are contended, not solo times.

    python bench/quality_sweep.py --shared ../shared --out $OUT --per-gpu 4 --preset precision \\
        --variant lr1e-4=train.learning_rate=1e-4 --variant lora_r64=train.method=lora,train.lora.r=64

Finished jobs are skipped on a rerun with the same --runs (the machine's /tmp lasts while it stays warm), so a
sweep cut by --deadline continues where it stopped. $OUT gets quality_sweep.json (every variant's scores, train.done
and merge.done), quality_sweep.md (the table) and quality_sweep_runs.tgz (each variant's eval report, predictions,
train.done, merge.done and train log). --smoke runs the same thing on the CPU with the tiny model and a slice of the
rows, to try the script before a GPU call.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from queue import Queue

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from jobs.lib.rundir import PINNED_BY, RunDir, read_json  # noqa: E402

CONFIG = ROOT / "configs" / "smollm2.yaml"
# Issue 17's sweep, four variants a preset (one GPU's worth at --per-gpu 4); --variant name=sets adds or replaces one.
PRESETS = {
    "precision": {
        "fp32_master": "",  # the default: fp32 master weights, bf16 autocast (lr 2e-4, 3 epochs, batch 64)
        "bf16": "train.precision=bf16",  # the old default: bf16 weights, plain AdamW
        "bf16_kahan": "train.precision=bf16_kahan",
        "lr4e-4": "train.learning_rate=4e-4",  # seen never to stop (issue 17): how answers end tells
    },
    "lr": {
        "lr1e-4": "train.learning_rate=1e-4",
        "lr3e-4": "train.learning_rate=3e-4",
        "kahan_lr1e-4": "train.precision=bf16_kahan,train.learning_rate=1e-4",
        "kahan_lr4e-4": "train.precision=bf16_kahan,train.learning_rate=4e-4",
    },
    "schedule": {
        "epochs2": "train.epochs=2",
        "epochs4": "train.epochs=4",
        "batch32": "train.per_device_batch_size=32",
        "batch128": "train.per_device_batch_size=128,train.learning_rate=4e-4",
    },
    "lora": {
        "lora_r64": "train.method=lora,train.lora.r=64,train.lora.alpha=128,train.learning_rate=5e-4",
        "lora_r64_lr1e-3": "train.method=lora,train.lora.r=64,train.lora.alpha=128,train.learning_rate=1e-3",
        "lora_r256": "train.method=lora,train.lora.r=256,train.lora.alpha=512,train.learning_rate=2e-4",
        "lora_r256_lr5e-4": "train.method=lora,train.lora.r=256,train.lora.alpha=512,train.learning_rate=5e-4",
    },
}
# A few steps of everything on the CPU: the tiny model, 300 rows per split, short answers.
SMOKE = ["model.name_or_path=tiny", "model.gguf_file=null", "data.max_rows=300", "data.max_length=256",
         "train.max_steps=4", "train.eval_every_steps=2", "train.save_every_steps=2", "train.logging_steps=2",
         "eval.max_examples=16", "eval.batch_size=16", "eval.max_new_tokens=16"]


def parse_sets(text: str) -> list[str]:
    """"a=1,b.c=[x,y]" → ["a=1", "b.c=[x,y]"]: a comma starts a new setting only where a key= follows."""
    return [part for part in re.split(r",(?=[A-Za-z_][\w.]*=)", text) if part]


def shared_by_prep(key: str) -> bool:
    """Whether a setting is the prepped run's (what prep pins, or where the run is), which no variant may change."""
    return key in ("run_id", "runs_dir") or any(key == k or key.startswith(k + ".") for k in PINNED_BY["prep"])


def parse_variants(presets: list[str], variants: list[str]) -> dict[str, list[str]]:
    chosen: dict[str, list[str]] = {}
    for preset in presets:
        chosen.update({name: parse_sets(sets) for name, sets in PRESETS[preset].items()})
    for spec in variants:
        name, sep, sets = spec.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise SystemExit(f"quality_sweep: --variant {spec!r} is not name=key=value,... "
                             "(name: letters, digits, ._-)")
        chosen[name] = parse_sets(sets)
    for name, sets in chosen.items():
        shared = [s for s in sets if shared_by_prep(s.partition("=")[0])]
        if shared:
            raise SystemExit(f"quality_sweep: variant {name} sets {', '.join(shared)}, but prep is shared by every "
                             "variant: give data and model settings with --set, for all of them")
    if not chosen:
        raise SystemExit("quality_sweep: no variants: give --preset and/or --variant name=key=value,...")
    return chosen


def visible_gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    return [g for g in listed.split(",") if g] if listed else [str(i) for i in range(torch.cuda.device_count())]


class Sweep:
    def __init__(self, args, common: list[str]):
        self.args, self.common = args, common
        self.runs = Path(args.runs)
        self.deadline = time.monotonic() + args.deadline
        self.stopping = threading.Event()
        self.lock = threading.Lock()

    def t2s(self, job: str, sets: list[str], env: dict, log) -> bool:
        """One job of one variant; False when it failed or the deadline came (its process group is killed)."""
        if self.stopping.is_set():
            return False
        command = [sys.executable, "-m", "jobs.cli", job, "--config", str(CONFIG)]
        command += [a for s in self.common + sets for a in ("--set", s)]
        log.write(f"$ t2s {job} {' '.join(sets)}\n")
        log.flush()
        process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        while process.poll() is None:
            if time.monotonic() > self.deadline:
                self.stopping.set()
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return False
            time.sleep(1)
        return process.returncode == 0

    def variant(self, name: str, sets: list[str], gpus: Queue) -> dict:
        run = RunDir(self.runs / name)
        if not run.root.exists():
            shutil.copytree(self.runs / "prep", run.root, ignore=shutil.ignore_patterns("logs"))
        gpu = gpus.get()
        started = time.monotonic()
        env = {"OMP_NUM_THREADS": str(self.args.threads), "TOKENIZERS_PARALLELISM": "false"}
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        status = "ok"
        try:
            with open(self.runs / f"{name}.log", "a") as log:
                for job in ("train", "merge", "eval"):
                    if not self.t2s(job, [f"run_id={name}", "eval.models=[merged]", *sets], env, log):
                        status = "deadline" if self.stopping.is_set() else f"{job} failed"
                        break
        finally:
            gpus.put(gpu)
        result = collect(run, name, sets, status, gpu, time.monotonic() - started)
        with self.lock:
            print(f"{name}: {status} in {result['wall_s']:.0f}s on {'GPU ' + gpu if gpu else 'CPU'} · "
                  f"{summary_cells(result)}", flush=True)
        return result


def collect(run: RunDir, name: str, sets: list[str], status: str, gpu: str | None, wall: float) -> dict:
    report = read_json(run.report) if run.is_done("eval") else None
    return {"variant": name, "sets": sets, "status": status, "gpu": gpu, "wall_s": wall,
            "train": read_json(run.marker("train")), "merge": read_json(run.marker("merge")),
            "merged": (report or {}).get("results", {}).get("merged"),
            "buckets": (report or {}).get("buckets", {}).get("merged", {}),
            "n_examples": (report or {}).get("n_examples"), "split": (report or {}).get("split")}


def _pct(value) -> str:
    return f"{value:.1%}" if isinstance(value, (int, float)) else "-"


def summary_cells(r: dict) -> str:
    m, t = r["merged"] or {}, r["train"] or {}
    return (f"SQL-only {_pct(m.get('sql_only'))} · exact {_pct(m.get('exact_match'))} · execution "
            f"{_pct(m.get('execution_accuracy'))} · ended at EOS {_pct(m.get('ended_at_eos'))} · train "
            f"{t.get('train_runtime_s', 0):.0f}s")


def table(results: list[dict]) -> str:
    # The buckets where a weak model shows first (issue 29): joins, and gold queries that read two tables.
    lines = ["| variant | settings | SQL-only | exact match | execution accuracy | joins | two tables | ended at EOS | "
             "train time | steps | peak GiB | status |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        m, t, b = r["merged"] or {}, r["train"] or {}, r.get("buckets") or {}
        peak = t.get("peak_gpu_mem_gb")
        cells = [r["variant"], ", ".join(r["sets"]) or "(config as is)", _pct(m.get("sql_only")),
                 _pct(m.get("exact_match")), _pct(m.get("execution_accuracy")),
                 _pct(b.get("join", {}).get("execution_accuracy")), _pct(b.get("tables=2", {}).get("execution_accuracy")),
                 _pct(m.get("ended_at_eos")),
                 f"{t['train_runtime_s']:.0f} s" if t else "-", str(t.get("global_step", "-")),
                 f"{peak:.1f}" if isinstance(peak, (int, float)) else "-", r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "transformers", "trl", "peft", "accelerate", "torch-optimi", "liger-kernel"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", required=True, help="the shared folder (its data/sql-create-context)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", default="/tmp/t2s-sweep", help="run folders; reuse to continue a sweep")
    parser.add_argument("--preset", action="append", default=[], choices=sorted(PRESETS))
    parser.add_argument("--variant", action="append", default=[], help="name=key=value,key=value (may be empty)")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="for prep and every variant")
    parser.add_argument("--per-gpu", type=int, default=4, help="variants running at once on each GPU")
    parser.add_argument("--threads", type=int, default=0, help="OMP threads per variant (0: cores / variants at once)")
    parser.add_argument("--deadline", type=float, default=540, help="seconds; then running jobs are killed")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, 300 rows a split, a few steps")
    args = parser.parse_args()
    variants = parse_variants(args.preset, args.variant)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    gpus = [] if args.smoke else visible_gpus()
    slots = [g for g in gpus for _ in range(args.per_gpu)] or [None] * args.per_gpu
    args.threads = args.threads or max(1, (os.cpu_count() or 2) // min(len(slots), len(variants)))
    common = [f"runs_dir={runs}", f"data.source={Path(args.shared).resolve() / 'data' / 'sql-create-context'}",
              *(SMOKE if args.smoke else []), *args.sets]
    sweep = Sweep(args, common)
    print(f"{len(variants)} variants, {len(slots)} at once ({len(gpus)} GPU(s) × {args.per_gpu}"
          f"{'' if gpus else ', CPU'}), {args.threads} threads each; runs in {runs}", flush=True)

    started = time.monotonic()
    with open(runs / "prep.log", "a") as log:
        if not sweep.t2s("prep", ["run_id=prep"], {}, log):
            raise SystemExit(f"quality_sweep: prep failed: see {runs / 'prep.log'}")
    manifest = read_json(RunDir(runs / "prep").manifest) or {}
    print(f"prep: {manifest.get('rows')} rows in {time.monotonic() - started:.0f}s", flush=True)

    free: Queue = Queue()
    for slot in slots:
        free.put(slot)
    with ThreadPoolExecutor(len(slots)) as pool:
        futures = [pool.submit(sweep.variant, name, sets, free) for name, sets in variants.items()]
        results = [f.result() for f in futures]

    import torch

    summary = {"gpu": torch.cuda.get_device_name(0) if gpus else "cpu", "gpus": len(gpus), "per_gpu": args.per_gpu,
               "versions": versions(), "commit": _commit(), "config": str(CONFIG.relative_to(ROOT)),
               "common_sets": common, "prep_rows": manifest.get("rows"), "wall_s": time.monotonic() - started,
               "results": results}
    (out / "quality_sweep.json").write_text(json.dumps(summary, indent=2))
    rendered = table(results)
    (out / "quality_sweep.md").write_text(f"# Quality sweep · {summary['gpu']} × {len(gpus)}, {args.per_gpu} per GPU · "
                                          f"commit {summary['commit']}\n\n{rendered}\n")
    with tarfile.open(out / "quality_sweep_runs.tgz", "w:gz") as tar:
        for name in variants:
            run = RunDir(runs / name)
            for path in (run.report, run.report_md, run.eval / "predictions.jsonl", run.marker("train"),
                         run.marker("merge"), run.job_log("train")):
                if path.is_file():
                    tar.add(path, arcname=f"{name}/{path.relative_to(run.root)}")
            if (runs / f"{name}.log").is_file():
                tar.add(runs / f"{name}.log", arcname=f"{name}/jobs.log")
    print(f"\n{len(results)} variants in {summary['wall_s']:.0f}s; train times of variants run side by side are "
          f"contended\n{rendered}", flush=True)


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


if __name__ == "__main__":
    main()
