"""Where a training step's time goes: torch.profiler over a few steps of the project's own train worker, one GPU.

    python bench/profile_train.py --prepped /tmp/bench-runs/prep --config configs/default.yaml \
        --set model.name_or_path=/tmp/tinyllama [--set ...] [--out $OUT]

Runs the worker in this process (what `accelerate launch` runs on one GPU) on a copy of a prepped run, skips
5 steps (the last one warms the profiler up), profiles 5, then prints the busiest GPU kernels and how much of
the steps' wall time the GPU was busy: near 100% means the kernels are the cost, far below it means the host
(Python, launches, syncs) is.
"""

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, schedule

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from jobs import train  # noqa: E402
from jobs.lib.config import dump_config, load_config  # noqa: E402
from jobs.lib.rundir import open_run, write_atomic  # noqa: E402

SKIP, WARMUP, ACTIVE = 4, 1, 5

parser = argparse.ArgumentParser()
parser.add_argument("--prepped", required=True, type=Path, help="a run directory whose prep job has run")
parser.add_argument("--config", required=True)
parser.add_argument("--set", action="append", default=[], dest="sets")
parser.add_argument("--out", type=Path, default=None)
args = parser.parse_args()

run_dir = args.prepped.with_name("profile")
shutil.rmtree(run_dir, ignore_errors=True)
shutil.copytree(args.prepped, run_dir)
steps = SKIP + WARMUP + ACTIVE + 1
cfg = load_config(args.config, args.sets + [f"runs_dir={run_dir.parent}", "run_id=profile", f"train.max_steps={steps}",
                                             f"train.save_every_steps={steps}", "train.eval_every_steps=null",
                                             "train.early_stopping_patience=null", "train.logging_steps=100"])
run = open_run(cfg)
write_atomic(run.job_config("train"), dump_config(cfg))  # what `t2s train` hands its worker


def callbacks_with_profiler(cfg, run):
    from transformers import TrainerCallback

    class Profiler(TrainerCallback):
        def on_train_begin(self, *a, **k):
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=activities, schedule=schedule(wait=SKIP, warmup=WARMUP, active=ACTIVE))
            self.prof.__enter__()
            self.marks = []

        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks.append(time.perf_counter())
            self.prof.step()

        def on_train_end(self, *a, **k):
            self.prof.__exit__(None, None, None)
            wall_ms = (self.marks[SKIP + WARMUP + ACTIVE - 1] - self.marks[SKIP + WARMUP - 1]) * 1000
            events = self.prof.key_averages()
            # kernels only (as the table's own "Self CUDA time total"): op rows and annotations repeat their time
            gpu_ms = sum(e.self_device_time_total for e in events
                         if e.device_type == DeviceType.CUDA and not e.is_user_annotation) / 1000
            table = events.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70)
            summary = (f"{ACTIVE} steps: wall {wall_ms:.0f} ms ({wall_ms / ACTIVE:.0f} ms/step), GPU kernels "
                       f"{gpu_ms:.0f} ms ({gpu_ms / wall_ms:.0%} busy)")
            print(table + "\n" + summary, flush=True)
            if args.out:
                (args.out / "profile_train.txt").write_text(table + "\n" + summary + "\n")

    return train_callbacks(cfg, run) + [Profiler()]


train_callbacks = train.make_callbacks
train.make_callbacks = callbacks_with_profiler
sys.exit(train.worker(str(run.job_config("train"))))
