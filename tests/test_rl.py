"""`t2s rl`: its config checks, its place in the run (rl/ becomes the trained model), and (slow) GRPO on the tiny model:
the mean reward rises, SIGTERM checkpoints and stops, a rerun resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from jobs.lib.config import load_config
from jobs.lib.errors import T2SError
from jobs.lib.rundir import RunDir
from tests.conftest import ROOT, t2s, tiny_config, write_config


@pytest.mark.parametrize("override, says", [
    ("rl.group_sizes=4", "unknown config key 'rl.group_sizes'"),
    ("rl.group_size=1", "rl.group_size"),
    ("rl.reward_weights.execution=-1", "rl.reward_weights.execution"),
    ("rl.reward_weights.sql_only=.nan", "rl.reward_weights.sql_only"),
    ("rl.reward_weights.ended=1e400", "rl.reward_weights.ended"),
    ("rl.reward_weights.execution=high", "rl.reward_weights.execution"),
])
def test_a_bad_rl_section_is_one_line(override, says):
    with pytest.raises(T2SError) as error:
        load_config(None, [override])
    assert says in str(error.value) and "\n" not in str(error.value)


def test_reward_weights_that_are_all_zero_are_refused():
    zeros = ["rl.reward_weights.execution=0", "rl.reward_weights.sql_only=0", "rl.reward_weights.ended=0"]
    with pytest.raises(T2SError, match="every reward weight is 0"):
        load_config(None, zeros)
    assert load_config(None, zeros[:2]).rl.reward_weights.ended == 0.1


def test_rl_on_a_run_without_a_finished_train_is_one_line(copy_run):
    run, config = copy_run()
    result = t2s("rl", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"t2s rl: error: rl needs a finished train in {run} (no train.done): run `t2s train` first"]
    assert not (run / "rl.done").exists()


def test_the_trained_model_is_rl_once_rl_has_finished(tmp_path):
    run = RunDir(tmp_path)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "rl").mkdir()
    (tmp_path / "rl" / "adapter_config.json").write_text("{}")
    assert run.trained_model() == run.adapter and run.trained() == "model"
    run.mark_done("rl")
    assert run.trained_model() == run.rl and run.trained() == "adapter"


RL = {"max_steps": 8, "group_size": 4, "prompts_per_step": 4, "logging_steps": 1, "save_every_steps": 2,
      "max_completion_length": 16, "learning_rate": 1e-3, "reward_workers": 2, "temperature": 1.0,
      "reward_weights": {"execution": 1.0, "sql_only": 1.0, "ended": 1.0}}


@pytest.mark.slow
def test_rl_raises_the_mean_reward_stops_on_sigterm_and_resumes(copy_run, tmp_path):
    run, config = copy_run()
    write_config(config, tiny_config(run.parent, train={"max_steps": 30, "logging_steps": 10}, rl=RL))
    assert t2s("train", "--config", str(config)).returncode == 0
    metrics = run / "logs" / "metrics.jsonl"

    def rl_records() -> list[dict]:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        return [r for r in map(json.loads, lines) if r.get("stage") == "rl"]

    # An ACCELERATE_MIXED_PRECISION left in the environment (as an earlier Trainer in a pytest worker leaves it)
    # must not autocast the CPU run: torch 2.1 then fails in attention
    env = {**os.environ, "ACCELERATE_MIXED_PRECISION": "bf16"}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "rl", "--config", str(config)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not any(r["step"] >= 3 for r in rl_records()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, out + err
    assert "rl was stopped (SIGTERM) after saving a checkpoint: rerun the same command to resume rl from " \
           "checkpoint-" in err
    stopped_at = max(r["step"] for r in rl_records())
    assert stopped_at < RL["max_steps"] and not (run / "rl.done").exists()
    assert (run / "rl-checkpoints" / f"checkpoint-{stopped_at}" / "trainer_state.json").is_file()

    resumed = t2s("rl", "--config", str(config))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {run / 'rl-checkpoints' / f'checkpoint-{stopped_at}'}" in resumed.stdout
    done = json.loads((run / "rl.done").read_text())
    assert done["global_step"] == RL["max_steps"] and done["settings"]["rl"]["group_size"] == 4
    steps = [r["step"] for r in rl_records()]
    assert steps == sorted(set(steps)) and steps[-1] == RL["max_steps"]  # each step logged once across the two runs
    record = rl_records()[-1]
    for key in ("reward", "reward_std", "rewards/execution/mean", "rewards/sql_only/std", "rewards/ended/mean",
                "completions/mean_length", "tokens_per_s"):
        assert key in record
    rewards = [r["reward"] for r in rl_records()]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3, rewards
    assert any((run / "logs" / "tensorboard" / "rl").rglob("events.out.tfevents*"))
    assert (run / "rl" / "adapter_model.safetensors").is_file()

    merged = t2s("merge", "--config", str(config))  # merge now folds rl's adapter in
    assert merged.returncode == 0, merged.stderr
    assert "merge: already" not in merged.stdout


def test_the_model_card_says_what_rl_did_only_when_it_ran(tmp_path):
    from jobs.lib.card import render_model_card

    cfg = load_config(None, [f"runs_dir={tmp_path}"])
    done = {"settings": {"rl": {"reward_weights": {"execution": 1.0, "sql_only": 0.2}, "prompts_per_step": 8,
                                "group_size": 4, "learning_rate": 1e-5, "beta": 0.0}},
            "global_step": 30, "first_reward": 0.41, "last_reward": 0.63, "rl_runtime_s": 95.0}
    card = render_model_card(cfg, "a/b", report=None, train_done=None, prompt_suffix=None, rl_done=done)
    section = card.split("## Reinforcement learning")[1].split("##")[0]
    assert "| reward weights | execution 1, sql_only 0.2 |" in section
    assert "| steps | 30 × 8 prompts × 4 completions |" in section and "0.41 → 0.63" in section
    assert "Reinforcement" not in render_model_card(cfg, "a/b", report=None, train_done=None, prompt_suffix=None)


def test_only_rewards_of_weight_above_zero_go_to_trl():
    from jobs.rl import active_rewards, build_grpo_config

    cfg = load_config(None, ["rl.reward_weights.sql_only=0", "rl.reward_weights.execution=2"])
    assert active_rewards(cfg) == {"execution": 2.0, "ended": 0.1}
    args = build_grpo_config(cfg, RunDir(ROOT / "runs" / "unused"), on_gpu=False)
    assert args.reward_weights == [2.0, 0.1] and args.num_generations == cfg.rl.group_size
    assert args.per_device_train_batch_size == cfg.rl.prompts_per_step * cfg.rl.group_size
