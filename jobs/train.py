"""train: LoRA / QLoRA / full fine-tuning with trl's SFTTrainer, launched through accelerate.

`t2s train` checks the setup (before any model loads), then starts `accelerate launch` with the run's
accelerate config (single GPU, DDP, DeepSpeed ZeRO-3, multi-node) on this same module as the worker
(`python -m jobs.train --worker <config>`). The worker resumes from the latest complete checkpoint (one a kill cut
off is set aside first), checkpoints and stops cleanly on SIGTERM (spot preemption), logs loss / lr / grad norm /
tokens/s / GPU memory to stdout, TensorBoard and metrics.jsonl, and saves the adapter gathered from every rank (a
ZeRO-3 adapter saved without gathering comes out empty). train.done records what ran: the settings, the precision,
the steps.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from jobs.lib.accelerate_config import read_accelerate_config
from jobs.lib.config import Config, TrainConfig, load_config
from jobs.lib.errors import T2SError, one_line_errors
from jobs.lib.resume import own_checkpoint_loads
from jobs.lib.rundir import RunDir, fresh_staging, read_json, run_settings, staging_path
from jobs.lib.training import (_has, adapter_problems, check_precision, check_stack, installed_stack, kahan_adamw,
                               keep_trainable_in_fp32, load_base_for_training, precision_plan, trainable_dtypes)
from jobs.lib.quiet import one_line_per_log, quiet_library_output

PREEMPTED_EXIT = 143  # 128 + SIGTERM: checkpointed and stopped, rerun to resume


# ---------- pure core ----------

def check_setup(train: TrainConfig, accelerate: dict, gpus_present: int, have_bitsandbytes: bool) -> None:
    """Everything that can be known wrong before a model is loaded, as one line each."""
    processes = int(accelerate.get("num_processes", 1))
    machines = int(accelerate.get("num_machines", 1))
    zero3 = accelerate.get("distributed_type") == "DEEPSPEED" and \
        int(accelerate.get("deepspeed_config", {}).get("zero_stage", 0)) == 3
    if zero3 and processes * machines < 2:
        raise T2SError("ZeRO-3 shards the model across processes, but the accelerate config has num_processes: 1: "
                       "use train.accelerate_config: single, or num_processes >= 2")
    if train.method == "qlora" and not have_bitsandbytes:
        raise T2SError("train.method qlora needs bitsandbytes (pip install 'bitsandbytes>=0.46'), "
                       "or use train.method: lora")
    local_processes = processes // machines
    if not accelerate.get("use_cpu") and gpus_present and local_processes > gpus_present:
        raise T2SError(f"the accelerate config asks for {local_processes} processes per machine but "
                       f"{gpus_present} GPU(s) are present: lower num_processes or use a bigger machine")
    if gpus_present == 0 and processes > 1 and not accelerate.get("use_cpu"):
        raise T2SError(f"the accelerate config asks for {processes} GPU processes but no GPU is present: "
                       "use train.accelerate_config: single (CPU), or run on a GPU machine")
    if train.early_stopping_patience and train.save_every_steps and (
            not train.eval_every_steps or train.save_every_steps % train.eval_every_steps):
        raise T2SError("early stopping keeps the best checkpoint, so train.save_every_steps must be a multiple of "
                       "train.eval_every_steps (or unset both to save and evaluate every epoch)")
    if train.liger_kernel and gpus_present == 0:
        raise T2SError("train.liger_kernel needs a GPU (its kernels are Triton): set train.liger_kernel: false")
    if zero3 and train.method == "qlora" and not accelerate.get("deepspeed_config", {}).get("zero3_init_flag"):
        raise T2SError("QLoRA under ZeRO-3 needs zero3_init_flag: true in the accelerate config")


# ---------- launcher (the `t2s train` process) ----------

def check(cfg: Config, run: RunDir) -> None:
    """Everything that can be known wrong before training starts (and before any model loads), as one line each."""
    import torch

    from jobs.lib.models import base_model_path, check_source, gpu_has_bf16, pick_attention

    run.require("prep", "train")
    _, accelerate = read_accelerate_config(cfg.train.accelerate_config)
    gpus = torch.cuda.device_count()
    check_setup(cfg.train, accelerate, gpus, _has("bitsandbytes"))
    on_gpu = gpus > 0 and not accelerate.get("use_cpu")
    check_precision(cfg.train, cfg.model.dtype, accelerate, on_gpu, gpu_has_bf16(), _has("optimi"))
    attention = pick_attention(cfg.model.attn_implementation)  # a forced, missing flash-attn fails here, before loading
    check_stack(cfg.train, accelerate, attention, gpus, installed_stack())
    check_source(base_model_path(cfg, run), "model")
    restore_synced_checkpoint(cfg, run)


def restore_synced_checkpoint(cfg: Config, run: RunDir) -> None:
    """train.checkpoint_sync: hub on a volume without checkpoints (a new pod of the run): the synced one comes back."""
    from jobs import checkpoint_sync

    repo = checkpoint_sync.sync_repo(cfg)
    if repo is not None:
        checkpoint_sync.restore(run, cfg, repo, checkpoint_sync.hub_token(), say=lambda line: print(line, flush=True))


def run(cfg: Config, run: RunDir) -> str:
    import torch

    from jobs.lib.models import pick_attention

    accel_path, accelerate = read_accelerate_config(cfg.train.accelerate_config)
    for folder, moved in run.set_aside_incomplete_checkpoints():
        print(f"set aside {folder.name}, cut off while it was saved (no complete trainer_state.json), as {moved}",
              flush=True)
    check_stack(cfg.train, accelerate, pick_attention(cfg.model.attn_implementation), torch.cuda.device_count(),
                installed_stack())

    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accel_path)]
    if not torch.cuda.is_available() and not accelerate.get("use_cpu"):
        command += ["--cpu"]  # (a use_cpu config launches as it says: --cpu would drop its DeepSpeed and processes)
    command += ["-m", "jobs.train", "--worker", str(run.job_config("train"))]
    print(f"launching: accelerate launch --config_file {accel_path} ({cfg.train.method}, "
          f"{accelerate.get('num_processes', 1)} process(es))", flush=True)
    code = _stream(command)
    if code == PREEMPTED_EXIT:
        raise T2SError(f"training was stopped (SIGTERM) after saving a checkpoint: {what_a_rerun_does(run)}")
    if code != 0:
        raise T2SError(f"training failed (exit code {code}); the log above and {run.job_log('train')} say why; "
                       f"once that is fixed, {what_a_rerun_does(run)}")
    summary = json.loads(run.marker("train").read_text())
    return (f"{summary['global_step']} steps, {summary['examples_seen']} examples in "
            f"{summary['train_runtime_s']:.0f}s ({summary['precision']}: trainable weights "
            f"{summary['weights_dtype']}); {run.trained()} in {run.adapter}")


def what_a_rerun_does(run: RunDir) -> str:
    """The one command that resumes an interrupted training, when a complete checkpoint is there to resume from: train
    with the config it ran with (kept in logs/), and --force when a finished training is there (whose settings may
    differ; --force resumes an interrupted training with its own settings instead of discarding it)."""
    checkpoint = run.last_checkpoint()
    if checkpoint is None:
        return "rerun the same command to start again (no complete checkpoint to resume from)"
    force = " --force" if run.is_done("train") else ""
    return f"rerun `t2s train --config {run.job_config('train')}{force}` to resume from {checkpoint.name}"


def _stream(command: list[str]) -> int:
    """Runs the workers, copying their output through (so it reaches the log). SIGTERM or Ctrl-C is passed to
    every worker (they checkpoint and stop); the output is drained until the last of them has exited."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                             start_new_session=True)
    stopped = []

    def stop(signum, _frame):
        stopped.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while chunk := os.read(child.stdout.fileno(), 65536):  # retried across signals (PEP 475)
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if signal.SIGINT in stopped:
        raise KeyboardInterrupt
    return PREEMPTED_EXIT if stopped else code


# ---------- worker (one per process, under accelerate) ----------

def build_sft_config(cfg: Config, run: RunDir, has_eval: bool, on_gpu: bool):
    from trl import SFTConfig

    t = cfg.train
    strategy = "steps" if t.eval_every_steps else "epoch"
    # transformers 5.2x renamed group_by_length to train_sampling_strategy
    grouping = ({"train_sampling_strategy": "group_by_length" if t.group_by_length else "random"}
                if "train_sampling_strategy" in SFTConfig.__dataclass_fields__ else {"group_by_length": t.group_by_length})
    # transformers 4.x takes the ratio as warmup_ratio; 5.x as warmup_steps below 1
    warmup = ({"warmup_ratio": t.warmup_ratio} if "warmup_ratio" in SFTConfig.__dataclass_fields__
              else {"warmup_steps": t.warmup_ratio})
    # transformers 4.x takes TensorBoard's folder as logging_dir; 5.x reads TENSORBOARD_LOGGING_DIR (the worker sets it)
    tensorboard = ({"logging_dir": os.environ.get("TENSORBOARD_LOGGING_DIR")}
                   if "logging_dir" in SFTConfig.__dataclass_fields__ else {})
    early_stop = has_eval and t.early_stopping_patience is not None
    return SFTConfig(
        output_dir=str(run.checkpoints),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": True} if t.gradient_checkpointing else None,
        bf16=precision_plan(cfg.train, cfg.model.dtype, on_gpu).autocast_bf16,
        use_cpu=not on_gpu,
        logging_steps=t.logging_steps,
        eval_strategy=strategy if has_eval else "no",
        eval_steps=t.eval_every_steps,
        save_strategy="steps" if t.save_every_steps else strategy,
        save_steps=t.save_every_steps or t.eval_every_steps,
        save_total_limit=t.save_total_limit,
        load_best_model_at_end=early_stop,
        metric_for_best_model="eval_loss" if early_stop else None,
        greater_is_better=False if early_stop else None,
        report_to=["tensorboard"] if _has("tensorboard") or _has("tensorboardX") else [],
        seed=t.seed,
        data_seed=t.seed,
        dataloader_num_workers=t.dataloader_workers,
        torch_compile=t.torch_compile,
        use_liger_kernel=t.liger_kernel,
        include_num_input_tokens_seen="non_padding",  # (transformers 4.x counts the padding too)
        packing=t.packing != "none",
        packing_strategy="wrapped" if t.packing == "wrapped" else "bfd",
        max_length=t.max_seq_length,
        completion_only_loss=t.completion_only_loss,
        dataset_num_proc=None,
        disable_tqdm=False,
        save_only_model=False,
        **grouping,
        **warmup,
        **tensorboard,
    )


def make_callbacks(cfg: Config, run: RunDir):
    import torch
    from transformers import TrainerCallback

    class ProgressAndPreemption(TrainerCallback):
        """One line per logging step (what infra streams), metrics.jsonl, and SIGTERM → checkpoint → stop."""

        def __init__(self):
            self.preempted = False
            self.started = time.monotonic()
            self.last = (self.started, 0)
            signal.signal(signal.SIGTERM, self._on_sigterm)

        def _on_sigterm(self, _signum, _frame):
            self.preempted = True

        def on_step_end(self, args, state, control, **kwargs):
            if self.preempted:
                control.should_save = True
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            now = time.monotonic()
            tokens = logs.get("num_input_tokens_seen", state.num_input_tokens_seen) or 0
            record = {"step": state.global_step, "max_steps": state.max_steps, "epoch": state.epoch,
                      **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
            if tokens > self.last[1] and now > self.last[0]:
                record["tokens_per_s"] = (tokens - self.last[1]) / (now - self.last[0])
                self.last = (now, tokens)
            if torch.cuda.is_available():
                record["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            done = state.global_step / max(state.max_steps, 1)
            record["eta_s"] = (now - self.started) * (1 - done) / done if done else None
            with open(run.metrics, "a") as f:
                f.write(json.dumps(record) + "\n")
            shown = [f"{k} {record[k]:.4g}" for k in
                     ("loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_s", "gpu_mem_gb")
                     if isinstance(record.get(k), (int, float))]
            if record["eta_s"] is not None:
                shown.append(f"eta {record['eta_s']:.0f}s")
            print(" · ".join([f"step {state.global_step}/{state.max_steps}", *shown]), flush=True)

    callbacks = [ProgressAndPreemption()]
    from jobs import checkpoint_sync

    repo = checkpoint_sync.sync_repo(cfg)
    if repo is not None:
        syncer = checkpoint_sync.HubCheckpointSync(repo, checkpoint_sync.hub_token(),
                                                   say=lambda line: print(line, flush=True))

        class SyncCheckpoints(TrainerCallback):
            """Each complete checkpoint (on_save comes after trainer_state.json) to the Hub, in the background."""

            def on_save(self, args, state, control, **kwargs):
                if state.is_world_process_zero:
                    syncer.submit(Path(args.output_dir) / f"checkpoint-{state.global_step}", run.checkpoint_settings_file)

            def on_train_end(self, args, state, control, **kwargs):
                if state.is_world_process_zero and not syncer.wait():
                    print(f"checkpoint sync: the last upload to {repo} did not finish in time", flush=True)

        callbacks.append(SyncCheckpoints())
    return callbacks


def checkpoint_is_final(checkpoint: Path, max_steps: int) -> bool:
    """The checkpoint was saved at train.max_steps (when that, not epochs, ends training)."""
    state = read_json(checkpoint / "trainer_state.json") or {}
    return max_steps > 0 and isinstance(state.get("global_step"), int) and state["global_step"] >= max_steps


def load_tokenized(run: RunDir, split: str):
    """prep's tokenized `split`, or None when prep left it empty: datasets saves an empty split as no data files and
    then cannot load it (IndexError), so the row count comes from prep's manifest."""
    from datasets import load_from_disk

    rows = (read_json(run.manifest) or {}).get("rows", {})
    if isinstance(rows, dict) and rows.get(split) == 0:
        return None
    return load_from_disk(str(run.tokenized / split))


def load_datasets(cfg: Config, run: RunDir):
    """(train, validation or None) as prep tokenized them; with completion_only_loss off, the loss is on the prompt
    too (the seed's way)."""
    train_data = load_tokenized(run, "train")
    eval_data = load_tokenized(run, "validation")
    if not cfg.train.completion_only_loss:  # the seed's way: loss on the prompt too
        train_data = train_data.map(lambda row: {"labels": row["input_ids"]})
        eval_data = eval_data.map(lambda row: {"labels": row["input_ids"]}) if eval_data is not None else None
    if eval_data is None or len(eval_data) == 0:
        print("no validation rows (data.validation_fraction 0, or none left): training without evaluation", flush=True)
        return train_data, None
    return train_data, eval_data


def check_trainable(trainer, plan, adapter: bool) -> bool:
    """Trainable weights kept as the precision plan says (LoRA's in fp32); whether DeepSpeed holds them instead."""
    deepspeed = trainer.is_deepspeed_enabled
    if adapter and not deepspeed:
        keep_trainable_in_fp32(trainer.model)
    kept = trainable_dtypes(trainer.model)
    if not deepspeed and kept != {plan.weights}:  # a library changed what the plan promised: say so, do not train
        raise T2SError(f"trainable weights are {', '.join(sorted(kept))}, not {plan.weights} as train.precision "
                       f"{plan.precision} requires: this is a bug in t2s's handling of this package set")
    if deepspeed:
        print("DeepSpeed keeps fp32 master weights of the trainable parameters", flush=True)
    return deepspeed


def train_from_last_checkpoint(trainer, run: RunDir, max_steps: int, deepspeed: bool):
    """trainer.train(), resumed from the run's last checkpoint when there is one; the train result."""
    resume = run.last_checkpoint()
    if resume:
        print(f"resuming from {resume}", flush=True)
    elif trainer.is_world_process_zero():
        run.metrics.unlink(missing_ok=True)  # a fresh start: no lines from an earlier attempt
    if resume and checkpoint_is_final(resume, max_steps) and not deepspeed:
        # A checkpoint of the last step (a pod lost after it, e.g. during eval): resuming would train one step more
        # (transformers skips the step's batches, then steps once before it checks max_steps); its weights are the
        # trained model.
        from transformers.trainer_callback import TrainerState

        print(f"{resume.name} is the last step (train.max_steps): its weights are the trained model", flush=True)
        trainer._load_from_checkpoint(str(resume))
        trainer.state = TrainerState.load_from_json(str(resume / "trainer_state.json"))
        return SimpleNamespace(metrics={})
    with own_checkpoint_loads(resume, run.checkpoints):  # torch < 2.6: transformers' load gate (jobs/lib/resume.py)
        return trainer.train(resume_from_checkpoint=str(resume) if resume else None)


def save_trained(cfg: Config, run: RunDir, trainer, tokenizer, plan, record: dict) -> int:
    """The adapter (or full model) into run.adapter, with train.done: what it was trained with (`record`: the
    counts of this training), written by rank 0 once every rank has handed over its shards. The exit code."""
    import torch

    zero = trainer.is_world_process_zero()
    staging = fresh_staging(run.adapter) if zero else staging_path(run.adapter)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))  # gathers ZeRO-3 shards on every rank, writes on rank 0
    if zero:
        tokenizer.save_pretrained(str(staging))
        if cfg.train.method in ("lora", "qlora"):  # trained through a peft config: an adapter
            problems = adapter_problems(staging)
            if problems:
                print(f"error: the saved adapter is unusable: {'; '.join(problems)}", file=sys.stderr)
                return 1
        on_gpu = torch.cuda.is_available()
        run.finish(
            "train", cfg, [(staging, run.adapter)],
            settings=run_settings(cfg),  # what the card and the uploads say the model was trained with
            method=cfg.train.method,
            precision=plan.precision,
            weights_dtype="float32 (DeepSpeed master weights)" if trainer.is_deepspeed_enabled else plan.weights,
            compute_dtype=plan.compute,
            optimizer=plan.optimizer,
            **record,
            num_gpus=torch.cuda.device_count() if on_gpu else 0,
            num_processes=trainer.accelerator.num_processes,
            gpu_name=torch.cuda.get_device_name(0) if on_gpu else None,
            peak_gpu_mem_gb=torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
        )
    trainer.accelerator.wait_for_everyone()
    return 0


def worker(config_path: str) -> int:
    import torch
    from transformers import EarlyStoppingCallback
    from trl import SFTTrainer

    from jobs.lib.models import load_run_tokenizer

    cfg = load_config(config_path)
    run = RunDir(Path(cfg.run_dir))
    on_gpu = torch.cuda.is_available()
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(run.logs / "tensorboard"))
    train_data, eval_data = load_datasets(cfg, run)
    args = build_sft_config(cfg, run, eval_data is not None, on_gpu)  # before the model: ZeRO-3 init hooks in
    model, peft_config = load_base_for_training(cfg, run, on_gpu)
    tokenizer = load_run_tokenizer(cfg, run)
    callbacks = make_callbacks(cfg, run)
    if eval_data is not None and cfg.train.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.train.early_stopping_patience))
    plan = precision_plan(cfg.train, cfg.model.dtype, on_gpu)
    optimizer = kahan_adamw(args) if plan.kahan else None
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_data, eval_dataset=eval_data,
                         processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks,
                         optimizer_cls_and_kwargs=optimizer)
    one_line_per_log(trainer)
    deepspeed = check_trainable(trainer, plan, adapter=peft_config is not None)
    started = time.monotonic()
    result = train_from_last_checkpoint(trainer, run, args.max_steps, deepspeed)
    if callbacks[0].preempted:
        print("SIGTERM: checkpoint saved, stopping; rerun to resume", flush=True)
        return PREEMPTED_EXIT
    state = trainer.state
    record = {"global_step": state.global_step,
              "examples_seen": int(len(train_data) * min(state.epoch or 0, cfg.train.epochs)),
              "tokens_seen": int(state.num_input_tokens_seen or 0),
              "train_runtime_s": result.metrics.get("train_runtime", time.monotonic() - started),
              "train_loss": result.metrics.get("train_loss"),
              "best_eval_loss": state.best_metric}
    return save_trained(cfg, run, trainer, tokenizer, plan, record)


if __name__ == "__main__":  # the worker, one per process, as `t2s train` launches it through accelerate
    if len(sys.argv) != 3 or sys.argv[1] != "--worker":
        sys.exit("usage: python -m jobs.train --worker CONFIG (what `t2s train` launches; run `t2s train` instead)")
    quiet_library_output()
    with one_line_errors("t2s train"):
        sys.exit(worker(sys.argv[2]))
