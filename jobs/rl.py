"""rl: GRPO with execution rewards (trl's GRPOTrainer), from the trained model, between train and merge.

For each prompt of the train split, rl.group_size completions are sampled and rewarded (jobs.rewards: the same rows as
the gold query on eval's generated databases, SQL only, ended by itself; judged in jobs.lib.sandbox workers so a hostile
completion earns 0 within its time limit); GRPO raises the likelihood of those above their group's mean. It starts
from what train left in adapter/ (a LoRA / QLoRA adapter goes on training as that adapter; a full fine-tune as the
whole model) and writes the same kind of folder to rl/, which merge, eval, ask and push then use (RunDir.trained_model).

Like train: settings pinned when it finishes (rl.done, config.resolved.yaml), checkpoints in rl-checkpoints/ with the
settings they are made with, a rerun resumes from the latest complete one (one cut off is set aside), SIGTERM saves a
checkpoint and stops, --force starts over. Checkpoints made from another trained model (train ran again) are
discarded. Reward mean/std per component, KL (rl.beta > 0), completion length, tokens/s and GPU memory go to stdout,
TensorBoard (logs/tensorboard/rl) and logs/metrics.jsonl ("stage": "rl"). One process, one device.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import yaml

from jobs.lib.config import Config
from jobs.lib.errors import T2SError
from jobs.lib.resume import own_checkpoint_loads
from jobs.lib.rundir import PINNED_BY, RunDir, fresh_staging, read_json, select, write_atomic

SETTINGS = "settings.yaml"  # in rl-checkpoints/: what the checkpoints are being made with
SHOWN = (("reward", "reward"), ("rewards/execution/mean", "execution"), ("rewards/sql_only/mean", "sql_only"),
         ("rewards/ended/mean", "ended"), ("kl", "kl"), ("completions/mean_length", "length"),
         ("tokens_per_s", "tokens/s"), ("gpu_mem_gb", "gpu_mem_gb"))


# ---------- pure core ----------

def rl_settings(cfg: Config) -> dict:
    """What rl's model depends on besides the trained model: the rl section but rl.enabled (the pipeline's switch)."""
    return select(cfg.model_dump(mode="json"), PINNED_BY["rl"])


def checkpoint_record(cfg: Config, train_done: dict | None) -> dict:
    """What rl's checkpoints are made with and from: its settings and the trained model (train.done's time)."""
    return {"settings": rl_settings(cfg), "trained_at": (train_done or {}).get("finished_at")}


def active_rewards(cfg: Config) -> dict[str, float]:
    """The rewards trl is given: those of weight > 0, by name (jobs.rewards.REWARDS), with their weights."""
    weights = cfg.rl.reward_weights
    return {name: getattr(weights, name) for name in type(weights).model_fields if getattr(weights, name) > 0}


def describe_reward_weights(cfg: Config) -> str:
    w = cfg.rl.reward_weights
    return ", ".join(f"{name} {getattr(w, name):g}" for name in type(w).model_fields)


def checkpoint_folders(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir()
             if p.is_dir() and p.name.startswith("checkpoint-") and p.name.removeprefix("checkpoint-").isdigit()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("checkpoint-")))


def last_checkpoint(folder: Path) -> Path | None:
    return next((p for p in reversed(checkpoint_folders(folder)) if RunDir.checkpoint_is_complete(p)), None)


def what_a_rerun_does(run: RunDir) -> str:
    checkpoint = last_checkpoint(run.rl_checkpoints)
    if checkpoint is None:
        return "rerun the same command to start rl again (no complete checkpoint to resume from)"
    return f"rerun the same command to resume rl from {checkpoint.name}"


# ---------- the job ----------

def check(cfg: Config, run: RunDir) -> None:
    import torch

    run.require("train", "rl")
    if not run.adapter.is_dir():
        raise T2SError(f"rl starts from the trained model, but {run.adapter} is missing: run `t2s train --force`")
    if torch.cuda.device_count() > 1 and not os.environ.get("CUDA_VISIBLE_DEVICES"):
        raise T2SError(f"rl runs in one process on one GPU, and {torch.cuda.device_count()} are visible: "
                       "set CUDA_VISIBLE_DEVICES=0")
    rows = _read_rows(run, cfg.rl.max_prompts)
    if not rows:
        raise T2SError(f"rl draws its prompts from the train split, and {run.split('train')} is empty: run `t2s prep` "
                       "with more data")


def _read_rows(run: RunDir, limit: int | None) -> list[dict]:
    path = run.split("train")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return rows[:limit] if limit else rows


def prepare_checkpoints(cfg: Config, run: RunDir) -> Path | None:
    """The checkpoint to resume from (None: a fresh start), after setting aside cut-off ones and discarding those made
    from another trained model. Checkpoints made with other rl settings stop the job (--force discards them)."""
    folder = run.rl_checkpoints
    record = checkpoint_record(cfg, read_json(run.marker("train")))
    for checkpoint in checkpoint_folders(folder):
        if not RunDir.checkpoint_is_complete(checkpoint):
            target = run.incomplete / f"rl-{checkpoint.name}"
            while target.exists():
                target = target.with_name(target.name + "+")
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(checkpoint, target)
            print(f"set aside {checkpoint.name}, cut off while it was saved, as {target}", flush=True)
    resume = last_checkpoint(folder)
    if resume is not None:
        try:
            made_with = yaml.safe_load((folder / SETTINGS).read_text()) or {}
        except (OSError, yaml.YAMLError):
            made_with = {}
        if made_with.get("trained_at") != record["trained_at"]:
            print(f"discarding {folder.name}/: its checkpoints continue another trained model (train ran again)",
                  flush=True)
            resume = None
        elif made_with.get("settings") != record["settings"]:
            raise T2SError(f"the checkpoints in {folder} were made with other rl settings than yours: rerun with "
                           "those to resume, or `t2s rl --force` to start over with yours (the checkpoints are "
                           "discarded)")
    if resume is None:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        write_atomic(folder / SETTINGS, yaml.safe_dump(record, sort_keys=False))
    return resume


def load_policy(cfg: Config, run: RunDir, on_gpu: bool):
    """(model, kind): the trained model to go on training. An adapter is loaded trainable on its base (as train
    loaded it); with rl.beta > 0 a frozen copy of it, named "ref", is the reference trl's KL is taken against."""
    import torch

    from jobs.lib.models import load_model, pick_attention
    from jobs.lib.training import load_base_for_training, precision_plan

    plan = precision_plan(cfg.train, cfg.model.dtype, on_gpu)
    if (run.adapter / "adapter_config.json").is_file():
        from peft import PeftModel

        base, _ = load_base_for_training(cfg, run, on_gpu)
        model = PeftModel.from_pretrained(base, str(run.adapter), is_trainable=True)
        if cfg.rl.beta > 0:
            model.load_adapter(str(run.adapter), adapter_name="ref", is_trainable=False)
            model.set_adapter("default")
        return model, "adapter"
    model = load_model(str(run.adapter), dtype=getattr(torch, plan.weights),
                       attn_implementation=pick_attention(cfg.model.attn_implementation))
    model.config.use_cache = False
    return model, "model"


def prompt_dataset(cfg: Config, run: RunDir, tokenizer):
    """The train split's questions as GRPO prompts (the prompt exactly as train rendered it), with what the rewards
    need: the schema, the gold query and a seed for the generated databases."""
    from datasets import Dataset

    from jobs.lib.chat import render_prompt

    rows = _read_rows(run, cfg.rl.max_prompts)
    return Dataset.from_list([{"prompt": render_prompt(tokenizer, r["context"], r["question"]),
                               "context": r["context"], "gold": r["answer"], "seed": i} for i, r in enumerate(rows)])


def build_grpo_config(cfg: Config, run: RunDir, on_gpu: bool):
    from trl import GRPOConfig

    from jobs.lib.training import _has, precision_plan

    r = cfg.rl
    fields = GRPOConfig.__dataclass_fields__
    tensorboard = {"logging_dir": os.environ.get("TENSORBOARD_LOGGING_DIR")} if "logging_dir" in fields else {}
    # trl < 1 (the cu118 set's 0.22) cuts prompts to max_prompt_length (512 by default) from the left; later trl never
    prompt_cap = {"max_prompt_length": cfg.data.max_length} if "max_prompt_length" in fields else {}
    return GRPOConfig(
        output_dir=str(run.rl_checkpoints),
        max_steps=r.max_steps,
        per_device_train_batch_size=r.prompts_per_step * r.group_size,  # completions per step
        gradient_accumulation_steps=1,
        num_generations=r.group_size,
        max_completion_length=r.max_completion_length,
        temperature=r.temperature,
        learning_rate=r.learning_rate,
        lr_scheduler_type="constant",
        gradient_checkpointing=cfg.train.gradient_checkpointing,  # (GRPOConfig's default is on: slower, for memory)
        generation_kwargs={"use_cache": True},  # train turned the model's cache off; sampling needs it
        beta=r.beta,
        reward_weights=list(active_rewards(cfg).values()),
        bf16=precision_plan(cfg.train, cfg.model.dtype, on_gpu).autocast_bf16,
        use_cpu=not on_gpu,
        logging_steps=r.logging_steps,
        save_strategy="steps",
        save_steps=r.save_every_steps,
        save_total_limit=r.save_total_limit,
        save_only_model=False,
        report_to=["tensorboard"] if _has("tensorboard") or _has("tensorboardX") else [],
        seed=r.seed,
        data_seed=r.seed,
        disable_tqdm=True,
        log_completions=False,
        **tensorboard,
        **prompt_cap,
    )


def make_callback(run: RunDir):
    import torch
    from transformers import TrainerCallback

    class ProgressAndPreemption(TrainerCallback):
        """One line per logging step, metrics.jsonl ("stage": "rl"), and SIGTERM → checkpoint → stop."""

        def __init__(self):
            self.preempted = False
            self.last = (time.monotonic(), 0)
            self.rewards: list[float] = []  # the mean reward at each logging step
            self.previous = signal.signal(signal.SIGTERM, self._on_sigterm)

        def _on_sigterm(self, _signum, _frame):
            self.preempted = True

        def restore(self):
            signal.signal(signal.SIGTERM, self.previous)

        def on_step_end(self, args, state, control, **kwargs):
            if self.preempted:
                control.should_save = True
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "reward" not in logs:
                return
            now = time.monotonic()
            record = {"stage": "rl", "step": state.global_step, "max_steps": state.max_steps,
                      **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
            tokens = logs.get("num_tokens", state.num_input_tokens_seen) or 0
            if tokens > self.last[1] and now > self.last[0]:
                record["tokens_per_s"] = (tokens - self.last[1]) / (now - self.last[0])
            self.last = (now, tokens)
            if torch.cuda.is_available():
                record["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            self.rewards.append(float(record["reward"]))
            with open(run.metrics, "a") as f:
                f.write(json.dumps(record) + "\n")
            shown = [f"{label} {record[key]:.4g}" for key, label in SHOWN if isinstance(record.get(key), (int, float))]
            print(" · ".join([f"rl step {state.global_step}/{state.max_steps}", *shown]), flush=True)

    return ProgressAndPreemption()


def drop_rl_metrics(path: Path) -> None:
    """metrics.jsonl without the lines of an earlier rl attempt (a fresh start), train's lines kept."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines(keepends=True) if '"stage": "rl"' not in line]
    write_atomic(path, "".join(kept))


def run(cfg: Config, run: RunDir) -> str:
    import torch
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOTrainer

    from jobs.lib.chat import stop_token_ids
    from jobs.eval import scoring_workers
    from jobs.lib.models import load_tokenizer
    from jobs.rewards import RewardSettings, Rewards
    from jobs.lib.sandbox import Sandbox
    from jobs.lib.training import adapter_problems, keep_trainable_in_fp32, precision_plan

    on_gpu = torch.cuda.is_available()
    resume = prepare_checkpoints(cfg, run)
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run.logs / "tensorboard" / "rl")
    tokenizer = load_tokenizer(str(run.adapter))
    tokenizer.padding_side = "left"
    # A causal LM takes no token_type_ids; trl 0.22 passes whatever the tokenizer returns on to generate, which refuses them.
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    dataset = prompt_dataset(cfg, run, tokenizer)
    # TrainingArguments keeps an ACCELERATE_MIXED_PRECISION it finds when bf16 is off, so one left in the environment
    # (by the shell, or an earlier Trainer in this process) would autocast a run the plan keeps in fp32
    plan = precision_plan(cfg.train, cfg.model.dtype, on_gpu)
    os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16" if plan.autocast_bf16 else "no"
    args = build_grpo_config(cfg, run, on_gpu)
    model, kind = load_policy(cfg, run, on_gpu)
    stops = stop_token_ids(tokenizer)
    model.generation_config.eos_token_id = stops  # trl stops sampling at these (the end of turn)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    r = cfg.rl
    print(f"rl: GRPO from the trained {kind} · {len(dataset)} prompts · {r.max_steps} steps of {r.prompts_per_step} "
          f"prompts x {r.group_size} completions · lr {r.learning_rate:g} · beta {r.beta:g} · rewards "
          f"{describe_reward_weights(cfg)}", flush=True)
    callback = make_callback(run)
    settings = RewardSettings(r.databases_per_example, r.rows_per_table, r.query_timeout_s, cfg.eval.row_limit)
    try:
        with Sandbox(workers=min(r.reward_workers, scoring_workers())) as sandbox:
            rewards = Rewards(sandbox, stops, settings)
            trainer = GRPOTrainer(model=model, reward_funcs=rewards.functions(list(active_rewards(cfg))), args=args,
                                  train_dataset=dataset, processing_class=tokenizer, callbacks=[callback])
            trainer.remove_callback(PrinterCallback)  # the callback prints one line per logging step instead
            if kind == "adapter" and not trainer.is_deepspeed_enabled:
                keep_trainable_in_fp32(trainer.model)
            if resume:
                print(f"resuming from {resume}", flush=True)
            else:
                drop_rl_metrics(run.metrics)
            started = time.monotonic()
            with own_checkpoint_loads(resume, run.rl_checkpoints):  # torch < 2.6: transformers' load gate
                result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
            runtime_s = result.metrics.get("train_runtime", time.monotonic() - started)
    finally:
        callback.restore()
    if callback.preempted:
        raise T2SError(f"rl was stopped (SIGTERM) after saving a checkpoint: {what_a_rerun_does(run)}")

    staging = fresh_staging(run.rl)
    trainer.save_model(str(staging))
    shutil.rmtree(staging / "ref", ignore_errors=True)  # the frozen reference adapter: not part of the model
    tokenizer.save_pretrained(str(staging))
    if kind == "adapter":
        problems = adapter_problems(staging)
        if problems:
            raise T2SError(f"the adapter rl saved is unusable: {'; '.join(problems)}")
    state = trainer.state
    rewards_logged = [h["reward"] for h in state.log_history if "reward" in h]  # a resumed run's too
    run.finish("rl", cfg, [(staging, run.rl)],
               settings=rl_settings(cfg),
               started_from=kind,
               global_step=state.global_step,
               prompts=len(dataset),
               completions_seen=state.global_step * r.prompts_per_step * r.group_size,
               rl_runtime_s=runtime_s,
               first_reward=rewards_logged[0] if rewards_logged else None,
               last_reward=rewards_logged[-1] if rewards_logged else None,
               sandbox_kills=sandbox.kills,
               gpu_name=torch.cuda.get_device_name(0) if on_gpu else None,
               peak_gpu_mem_gb=torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None)
    first = f"{rewards_logged[0]:.3f}" if rewards_logged else "n/a"
    last = f"{rewards_logged[-1]:.3f}" if rewards_logged else "n/a"
    return (f"{state.global_step} GRPO steps in {runtime_s:.0f}s; mean reward {first} → {last} (first and last "
            f"logging step); {kind} in {run.rl}, used by merge, eval, ask and push from now on")
