"""train and merge: setup checks, packing isolation, adapter integrity, resume after SIGTERM, merge equivalence."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from jobs.lib.config import TrainConfig
from jobs.lib.errors import T2SError
from jobs.lib.training import Stack, adapter_problems, check_stack, installed_stack
from jobs.train import check_setup
from tests.conftest import ROOT, t2s

ZERO3 = {"distributed_type": "DEEPSPEED", "num_processes": 2,
         "deepspeed_config": {"zero_stage": 3, "zero3_init_flag": True}}


@pytest.mark.parametrize("method, accelerate, gpus, bnb, expected", [
    ("lora", {**ZERO3, "num_processes": 1}, 2, True, "ZeRO-3 shards the model across processes"),
    ("qlora", {"num_processes": 1}, 1, False, "needs bitsandbytes"),
    ("lora", {"num_processes": 4}, 2, True, "asks for 4 processes per machine but 2 GPU"),
    ("lora", {"num_processes": 2}, 0, True, "no GPU is present"),
    ("qlora", {**ZERO3, "deepspeed_config": {"zero_stage": 3}}, 2, True, "zero3_init_flag"),
    ("lora", {"num_processes": 1, "save_every_steps": 5}, 1, True, "multiple of train.eval_every_steps"),
])
def test_bad_setups_fail_before_loading(method, accelerate, gpus, bnb, expected):
    steps = {"save_every_steps": accelerate.pop("save_every_steps")} if "save_every_steps" in accelerate else {}
    with pytest.raises(T2SError, match=expected):
        check_setup(TrainConfig(method=method, **steps), accelerate, gpus, bnb)


def test_forced_attention_that_cannot_run_fails_in_one_line(monkeypatch):
    from jobs.lib import models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.pick_attention("auto") == "sdpa"
    with pytest.raises(T2SError, match="flash_attention_2 but flash-attn is not installed"):
        models.pick_attention("flash_attention_2")
    with pytest.raises(T2SError, match="flex_attention needs a GPU"):
        models.pick_attention("flex_attention")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("transformers.utils.is_torch_flex_attn_available", lambda: False)
    with pytest.raises(T2SError, match="flex_attention needs torch >= 2.5"):
        models.pick_attention("flex_attention")
    monkeypatch.setattr("transformers.utils.is_torch_flex_attn_available", lambda: True)
    assert models.pick_attention("flex_attention") == "flex_attention"


def test_good_setups_pass():
    check_setup(TrainConfig(method="qlora"), ZERO3, 2, True)
    check_setup(TrainConfig(), {"num_processes": 1}, 0, False)


OLD_STACK = Stack(masks_packed_examples=False, trains_on_cpu_processes=False, quantizes_on_cpu=False)


@pytest.mark.parametrize("train, accelerate, expected", [
    ({"packing": "padding_free"}, {}, "packed examples attend to each other with sdpa on torch < 2.6"),
    ({}, {"use_cpu": True, "num_processes": 2}, "trains on 2 CPU processes, which needs torch >= 2.2"),
    ({"method": "qlora"}, {}, "qlora without a GPU needs bitsandbytes >= 0.46"),
])
def test_what_an_old_stack_cannot_do_fails_before_loading(train, accelerate, expected):
    train = TrainConfig(**{"packing": "none", **train})
    with pytest.raises(T2SError, match=expected):
        check_stack(train, accelerate, "sdpa", 0, OLD_STACK)
    check_stack(train, accelerate, "sdpa", 0, Stack(True, True, True))


def test_an_old_stack_runs_what_it_can_on_gpus():
    check_stack(TrainConfig(packing="padding_free"), {}, "flash_attention_2", 1, OLD_STACK)  # varlen
    check_stack(TrainConfig(method="qlora", packing="none"), {"num_processes": 2}, "sdpa", 2, OLD_STACK)


@pytest.mark.skipif(not installed_stack().masks_packed_examples,
                    reason="torch < 2.6: transformers builds no per-example mask for SDPA, so `t2s train` refuses "
                           "padding-free packing without flash-attn (check_stack)")
def test_packed_examples_do_not_attend_to_each_other():
    """trl's padding-free collator + SDPA: each packed example's logits equal its logits alone."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from jobs.lib.tiny import build_model

    model = build_model(vocab_size=64, seed=1).eval()
    model.config.use_cache = False  # as in training: transformers builds the per-example mask only without a cache
    examples = [list(range(3, 13)), list(range(20, 27)), list(range(30, 45))]
    collator = DataCollatorForLanguageModeling(pad_token_id=2, padding_free=True)
    batch = collator([{"input_ids": ids, "labels": ids} for ids in examples])
    assert batch["input_ids"].shape == (1, sum(map(len, examples)))
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([ids])).logits[0] for ids in examples])
    assert torch.allclose(packed, alone, atol=1e-5)
    # and the check can fail: the same tokens without position_ids do attend across examples
    with torch.no_grad():
        mixed = model(input_ids=batch["input_ids"]).logits[0]
    assert not torch.allclose(mixed, alone, atol=1e-3)


def _lora_folder(tmp_path: Path, zero_b: bool = False, drop: str | None = None) -> Path:
    from safetensors.torch import save_file

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    tensors = {"q.lora_A.weight": torch.randn(4, 8), "q.lora_B.weight": torch.zeros(8, 4) if zero_b else torch.randn(8, 4)}
    if drop:
        tensors.pop(drop)
    save_file(tensors, folder / "adapter_model.safetensors")
    return folder


def test_adapter_integrity_checks(tmp_path):
    for name in ("ok", "zero", "partial"):
        (tmp_path / name).mkdir()
    assert adapter_problems(_lora_folder(tmp_path / "ok")) == []
    assert "does not change the model" in adapter_problems(_lora_folder(tmp_path / "zero", zero_b=True))[0]
    assert "lack their A or B" in adapter_problems(_lora_folder(tmp_path / "partial", drop="q.lora_B.weight"))[-1]
    assert "lacks adapter_model.safetensors" in adapter_problems(tmp_path / "missing")[0]


def _done(run: Path, job: str) -> dict:
    return json.loads((run / f"{job}.done").read_text())


@pytest.mark.slow
def test_train_then_merge_gives_a_working_adapter_and_equal_logits(copy_run):
    run, config = copy_run()
    result = t2s("train", "--config", str(config))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert adapter_problems(run / "adapter") == []
    assert _done(run, "train")["global_step"] == 6
    metrics = [json.loads(l) for l in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in m and "grad_norm" in m and "learning_rate" in m for m in metrics)
    assert any(m.get("tokens_per_s", 0) > 0 for m in metrics)
    assert list((run / "logs" / "tensorboard").rglob("events.out.tfevents*"))

    result = t2s("merge", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "logits match base + adapter" in result.stdout
    assert _done(run, "merge")["verified"] is True
    generation = json.loads((run / "merged" / "generation_config.json").read_text())
    assert generation.get("do_sample") in (False, None)
    assert (run / "merged" / "model.safetensors").is_file() and (run / "merged" / "chat_template.jinja").is_file()

    # the adapter changes the model's output
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(run / "base")
    ids = torch.tensor([[1, 5, 9, 12, 40]])
    with torch.no_grad():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, run / "adapter")(ids).logits
    assert not torch.allclose(before, after, atol=1e-4)


def _kill_tree(pid: int, sig: int) -> None:
    """Sends sig to a process and every process under it (a pod that dies takes the accelerate workers with it)."""
    import psutil

    parent = psutil.Process(pid)
    for process in [*parent.children(recursive=True), parent]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(sig)


def stop_then_resume(copy_run, name: str, train: dict, stop: str, env: dict | None = None, timeout: int = 240):
    """`t2s train` stopped once its first checkpoint is complete — SIGTERM (spot preemption: a checkpoint is saved on
    the way out) or SIGKILL to every process (a pod that dies, between two checkpoints: the steps after the last one
    are redone) — then rerun; then the same config uninterrupted. Checks that the rerun resumed from the last
    complete checkpoint and ends at the uninterrupted run's step count and learning rate (the schedule came back:
    transformers loads scheduler.pt with optimizer.pt, on torch < 2.6 only through jobs/lib/resume.py)."""
    run, config = copy_run(f"{name}-{stop}", train=train)
    env = {**os.environ, **(env or {})}
    process = subprocess.Popen([sys.executable, "-m", "jobs.cli", "train", "--config", str(config)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + timeout
    while not any((p / "trainer_state.json").is_file() for p in (run / "checkpoints").glob("checkpoint-*")) \
            and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    if stop == "sigterm":
        process.send_signal(signal.SIGTERM)
    else:
        _kill_tree(process.pid, signal.SIGKILL)
    out, err = process.communicate(timeout=timeout)
    if stop == "sigterm":
        assert process.returncode == 2, out[-2000:] + err[-2000:]
        assert "stopped (SIGTERM) after saving a checkpoint" in err
    else:
        assert process.returncode == -signal.SIGKILL, out[-2000:] + err[-2000:]
    assert not (run / "train.done").exists()
    interrupted_at = max(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("checkpoint-*")
                         if (p / "trainer_state.json").is_file())

    result = t2s("train", "--config", str(config), env=env, timeout=2 * timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"resuming from {run / 'checkpoints'}/checkpoint-{interrupted_at}" in result.stdout
    resumed = _done(run, "train")["global_step"]
    assert resumed > interrupted_at

    fresh, fresh_config = copy_run(f"{name}-uninterrupted-{stop}", train=train)
    assert t2s("train", "--config", str(fresh_config), env=env, timeout=2 * timeout).returncode == 0
    assert resumed == _done(fresh, "train")["global_step"]
    # (a resumed run's later lines in metrics.jsonl replace the earlier ones)
    logged = [{m["step"]: m for m in map(json.loads, (r / "logs" / "metrics.jsonl").read_text().splitlines())
               if "loss" in m} for r in (run, fresh)]
    last = max(logged[1])
    assert last > interrupted_at and last in logged[0]
    assert logged[0][last]["learning_rate"] == pytest.approx(logged[1][last]["learning_rate"], rel=1e-6)
    return run


@pytest.mark.slow  # two real trainings each (~2 min on 2 cores): the fast lane keeps train's checks and test_resume.py
@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
def test_a_stopped_or_killed_training_resumes_to_the_same_step_count(copy_run, stop):
    # On every stack, torch 2.1 (the cu118 set) too.
    stop_then_resume(copy_run, "interrupted", {"max_steps": -1, "epochs": 1, "save_every_steps": 3,
                                               "per_device_batch_size": 4}, stop)
