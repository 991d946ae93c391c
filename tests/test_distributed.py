"""The GPU-only paths, run on CPU: DeepSpeed ZeRO-3 over 2 processes (gloo) and QLoRA (bitsandbytes' CPU 4-bit
backend), each `t2s train` then `t2s merge` end to end on the tiny model.

The ZeRO-3 run is the check against the known trap: an adapter saved without gathering the shards comes out
empty or partial (on the tiny model, the modules_to_save embed_tokens / lm_head are the sharded ones; LoRA A/B
are under DeepSpeed's persistence threshold and stay whole on every rank).
The first ZeRO-3 run on a machine JIT-builds DeepSpeed's shared-memory comm op (about 1.5 min on 2 cores, then
cached in ~/.cache/torch_extensions).
"""

import importlib.util
import json
import os
from pathlib import Path

import pytest

from jobs.lib.training import adapter_problems, installed_stack
from tests.conftest import t2s

pytestmark = pytest.mark.slow

DEEPSPEED_ON_CPU = {"DS_ACCELERATOR": "cpu"}


def _require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{module} is not installed: CI installs '.[dev]', which includes it")
        pytest.skip(f"{module} not installed")


def _done(run: Path, job: str) -> dict:
    return json.loads((run / f"{job}.done").read_text())


def _train_then_merge(run: Path, config: Path, env: dict | None = None) -> dict:
    result = t2s("train", "--config", str(config), env=env, timeout=480)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert (run / "train.done").is_file()
    assert adapter_problems(run / "adapter") == []

    result = t2s("merge", "--config", str(config), timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "logits match base + adapter" in result.stdout
    assert _done(run, "merge")["verified"] is True
    return _done(run, "train")


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_zero3_on_two_cpu_processes_saves_a_gathered_adapter_that_merges(copy_run, method):
    _require("deepspeed")
    if method == "qlora":
        _require("bitsandbytes")
    run, config = copy_run(f"zero3-{method}", train={"method": method, "max_steps": 3,
                                                     "accelerate_config": "zero3-cpu"})
    if not installed_stack().trains_on_cpu_processes:
        result = t2s("train", "--config", str(config), env=DEEPSPEED_ON_CPU)
        assert result.returncode == 2 and "trains on 2 CPU processes" in result.stderr.strip().splitlines()[-1]
        pytest.skip("torch < 2.2: accelerate and gloo cannot run ZeRO-3 on CPU processes, so `t2s train` refuses it "
                    "(check_stack)")
    done = _train_then_merge(run, config, env=DEEPSPEED_ON_CPU)
    # 2, not 1: `accelerate launch --cpu` would have silently run one plain process instead of DeepSpeed
    assert done["num_processes"] == 2
    assert done["global_step"] == 3 and done["method"] == method


def test_qlora_on_cpu_trains_4bit_and_merges_into_the_full_precision_base(copy_run):
    _require("bitsandbytes")
    run, config = copy_run("qlora", train={"method": "qlora", "max_steps": 3})
    if not installed_stack().quantizes_on_cpu:
        result = t2s("train", "--config", str(config))
        assert result.returncode == 2 and "qlora without a GPU needs" in result.stderr.strip().splitlines()[-1]
        pytest.skip("bitsandbytes < 0.46 quantizes on CUDA only, so `t2s train` refuses QLoRA on CPU (check_stack)")
    done = _train_then_merge(run, config)
    assert done["global_step"] == 3 and done["method"] == "qlora"
    assert done["num_processes"] == 1

    # the base really was 4-bit on CPU (not a silent full-precision load)
    from bitsandbytes.nn import Linear4bit

    from jobs.lib.config import load_config
    from jobs.lib.rundir import RunDir
    from jobs.lib.training import load_base_for_training

    model, _ = load_base_for_training(load_config(config), RunDir(run), on_gpu=False)
    assert model.is_loaded_in_4bit
    assert isinstance(model.model.layers[0].self_attn.q_proj, Linear4bit)


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
def test_zero3_qlora_on_two_cpu_processes_resumes_to_the_same_step_count(copy_run, stop):
    """Two-process ZeRO-3 QLoRA stopped (SIGTERM) or killed between checkpoints, then rerun: DeepSpeed restores its
    sharded optimizer and the Trainer the schedule (scheduler.pt, through jobs/lib/resume.py on torch < 2.6)."""
    from tests.test_train import stop_then_resume

    _require("deepspeed")
    _require("bitsandbytes")
    stack = installed_stack()
    if not (stack.trains_on_cpu_processes and stack.quantizes_on_cpu):
        pytest.skip("torch < 2.2 / bitsandbytes < 0.46 (the cu118 set): ZeRO-3 over CPU processes and QLoRA without "
                    "CUDA are refused before training (check_stack), so this resume runs on GPUs there; the gate "
                    "lifted for the resume is the single-process tests' (test_train.py)")
    run = stop_then_resume(copy_run, "zero3-qlora", {"method": "qlora", "accelerate_config": "zero3-cpu",
                                                     "max_steps": 8, "save_every_steps": 2}, stop,
                           env=DEEPSPEED_ON_CPU, timeout=480)
    done = _done(run, "train")
    assert done["num_processes"] == 2 and done["method"] == "qlora" and done["global_step"] == 8
    assert adapter_problems(run / "adapter") == []
