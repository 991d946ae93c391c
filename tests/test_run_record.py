"""The run directory as the one truth about a run (issues 16, 17 and 18): what it records, what --force does, and
a config that differs from the run. The record's pure core first, then the jobs end to end on the tiny model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from jobs.lib.config import load_config
from jobs.lib.errors import T2SError
from tests.conftest import t2s

# ---------- the record's pure core ----------


def test_settings_differences_compare_what_is_pinned_among_the_keys_a_job_reads():
    from jobs.lib.rundir import READS, describe_differences, select, settings_differences

    pinned = {"model": {"name_or_path": "tiny", "tokenizer": None}, "data": {"source": "synthetic", "seed": 1}}
    mine = load_config(None, ["model.name_or_path=tiny", "data.source=synthetic", "data.seed=2",
                              "train.learning_rate=1e-3"]).model_dump(mode="json")
    assert settings_differences(pinned, mine, READS["train"]) == [("data.seed", 1, 2)]
    assert settings_differences(pinned, mine, READS["eval"]) == []  # eval reads the base model only
    assert settings_differences({}, mine, READS["train"]) == []  # nothing pinned yet: nothing to differ from
    assert select(mine, ("model.name_or_path", "data")) == {"model": {"name_or_path": "tiny"}, "data": mine["data"]}
    long = [(f"train.k{i}", i, "x" * 60) for i in range(5)]
    assert describe_differences(long).endswith('train.k2=2 (yours: "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...) and 2 more')


def test_a_damaged_settings_file_is_one_line(tmp_path):
    from jobs.lib.rundir import RunDir

    run = RunDir(tmp_path)
    run.settings_file.write_text("model: [unclosed\n")
    with pytest.raises(T2SError, match="config.resolved.yaml is not valid YAML: restore it"):
        run.check_settings("eval", load_config(None), force=False)


# ---------- the jobs, end to end ----------


def files(run: Path, *parts: str) -> dict[str, str]:
    """Every file of the run (or of `parts` of it) by content: what must not change."""
    roots = [run / part for part in parts] if parts else [run]
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for root in roots for p in sorted(root.rglob("*")) if p.is_file() and "logs" not in p.parts}


def done(run: Path, job: str) -> dict:
    return json.loads((run / f"{job}.done").read_text())


def ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def last_line(result) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run after prep, train (its checkpoints kept) and merge; copy it before changing it."""
    from tests.conftest import tiny_config, write_config

    base = tmp_path_factory.mktemp("finished")
    config = write_config(base / "config.yaml", tiny_config(base / "runs", push={"artifact": "adapter",
                                                                                "enforce_gates": False}))
    for job in ("prep", "train", "merge"):
        ok(t2s(job, "--config", str(config)))
    return base / "runs" / "t"


@pytest.fixture
def copy_finished(finished_run, tmp_path):
    import shutil

    from tests.conftest import tiny_config, write_config

    def make(**sections) -> tuple[Path, Path]:
        runs = tmp_path / "runs"
        shutil.copytree(finished_run, runs / "t")
        push = {"artifact": "adapter", "enforce_gates": False, **sections.pop("push", {})}
        return runs / "t", write_config(tmp_path / "config.yaml", tiny_config(runs, push=push, **sections))

    return make


@pytest.mark.slow
def test_a_force_with_a_typo_loses_nothing(copy_finished):
    """Issue 16: `--force` validated nothing before clearing the later jobs' markers, so a typo left a run whose merged
    model `t2s ask` refused. Each refusal here is one line, and the run is byte-identical after it."""
    from jobs import ask

    run, config = copy_finished()
    before = files(run)
    for job, sets, expected in [
        ("train", ["train.accelerate_config=singel"], "train.accelerate_config 'singel' is neither a YAML file"),
        ("train", ["model.name_or_path=./no-such-model"], "run t was made with other settings than yours"),
        ("prep", ["data.source=./no-such-data.jsonl"], "dataset path ./no-such-data.jsonl does not exist"),
        ("merge", ["merge.dtype=float16", "model.gguf_file=x.gguf"], "model.gguf_file"),
        ("push", ["push.dry_run=false", "push.repo_id=not a repo"], "push.repo_id 'not a repo' is not 'owner/name'"),
    ]:
        args = [job, "--config", str(config), "--force"] + [a for s in sets for a in ("--set", s)]
        assert expected in last_line(t2s(*args)), (job, sets)
        assert files(run) == before, (job, sets)
    assert ask.resolve_model(str(run)) == ask.ModelSource(str(run / "merged"))  # still the merged model
    assert ask.load(str(run), device="cpu").answers([("CREATE TABLE t (a INTEGER)", "How many rows?")])


@pytest.mark.slow
def test_the_record_says_what_train_really_used(copy_finished, tmp_path):
    """Issue 16: after `t2s train --set ...` and a plain `t2s push`, the card and the uploaded config stated the
    config file's learning rate and epochs. Now they state train's, as train.done recorded them."""
    run, config = copy_finished()
    ok(t2s("train", "--config", str(config), "--force", "--set", "train.learning_rate=1e-3",
           "--set", "train.max_steps=4"))
    pushed = ok(t2s("push", "--config", str(config)))  # the config file says learning rate 3e-3, max_steps 6
    card = (run / "push" / "README.md").read_text()
    assert "Settings and progress as train recorded them (`run/train.done`)." in card
    assert "| learning rate | 0.001, cosine schedule" in card and "| epochs | max_steps 4 |" in card
    assert "| optimizer steps | 4 |" in card and "| learning rate | 0.003" not in card
    recorded = done(run, "train")["settings"]["train"]
    assert recorded["learning_rate"] == 1e-3 and recorded["max_steps"] == 4
    uploaded = {line.split()[-3]: Path(line.split()[-1]) for line in pushed.stdout.splitlines() if "← " in line}
    pinned = yaml.safe_load(uploaded["run/config.resolved.yaml"].read_text())
    assert pinned["train"]["learning_rate"] == 1e-3 and pinned["train"]["max_steps"] == 4
    train_config = yaml.safe_load(uploaded["logs/train.config.yaml"].read_text())
    assert train_config["train"]["learning_rate"] == 1e-3  # and each job's own config, as it ran, in logs/


@pytest.mark.slow
def test_force_starts_over_and_a_plain_rerun_resumes_only_what_it_would_make_again(copy_finished):
    """Issue 17: `--force` resumed from the finished run's last checkpoint and trained nothing, in the old precision;
    a plain rerun with other settings resumed checkpoints made with different ones. Now --force trains from step 0
    with the new settings, and a plain rerun that differs is one line that overwrites nothing."""
    run, config = copy_finished()
    before = files(run)
    line = last_line(t2s("train", "--config", str(config), "--set", "train.learning_rate=1e-2"))
    assert line == ("t2s train: error: run t was made with other settings than yours: train.learning_rate=0.003 "
                    f"(yours: 0.01) ({run / 'config.resolved.yaml'}). Use the run's, or `t2s train --force` to redo "
                    "train with yours (and what follows it)")
    line = last_line(t2s("eval", "--config", str(config), "--set", "model.tokenizer=/elsewhere"))
    assert "model.tokenizer=null (yours: \"/elsewhere\")" in line and "`t2s prep --force` to redo prep" in line
    assert files(run) == before

    result = ok(t2s("train", "--config", str(config), "--force", "--set", "model.dtype=float32"))
    assert "resuming" not in result.stdout
    record = done(run, "train")
    assert record["global_step"] == 6 and record["settings"]["model"]["dtype"] == "float32"
    steps = [json.loads(line)["step"] for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert steps[0] == 2 and steps == sorted(steps)  # logged from the start (logging_steps 2), not resumed at 6
    assert not (run / "merge.done").exists() and (run / "prep.done").exists()  # merge was of the old adapter

    # `make demo` twice (its pipeline --force starts with prep --force): new data voids the checkpoints made from the
    # old, so a plain train after it trains again instead of resuming the finished run's last checkpoint
    ok(t2s("prep", "--config", str(config), "--force"))
    assert not (run / "checkpoints").exists() and not (run / "train.done").exists()
    result = ok(t2s("train", "--config", str(config)))
    assert "resuming" not in result.stdout and done(run, "train")["global_step"] == 6


@pytest.mark.slow
def test_eval_of_an_adapter_that_a_full_fine_tune_never_made_is_one_line(copy_run):
    run, config = copy_run(train={"method": "full", "max_steps": 2, "lora": {"modules_to_save": None}},
                           eval={"models": ["base", "adapter"]})
    ok(t2s("train", "--config", str(config)))
    line = last_line(t2s("eval", "--config", str(config)))
    assert line == (f"t2s eval: error: eval.models has adapter, but {run / 'adapter'} holds a full fine-tune (no LoRA "
                    "adapter): evaluate it as merged (`t2s merge`, then eval.models: [base, merged])")
    assert not (run / "eval").exists()


@pytest.mark.slow
def test_an_interrupted_force_resumes_with_the_command_it_prints_and_loses_nothing_finished(copy_finished):
    """Issue 31: an interrupted `t2s train --force --set ...` said "rerun the same command to resume", but that command
    discarded the checkpoint and every other one was refused; and --force removed train.done as it started, so merge
    and eval refused the finished model that nothing had replaced. Now the message prints the one command that
    resumes, and the finished model stays usable until a new one has finished."""
    import signal
    import subprocess
    import sys
    import time

    from jobs.lib.training import installed_stack
    from tests.conftest import ROOT

    run, config = copy_finished()
    finished = files(run, "adapter", "merged")
    forced = ["train", "--config", str(config), "--force", "--set", "train.max_steps=16",
              "--set", "train.save_every_steps=2"]
    process = subprocess.Popen([sys.executable, "-m", "jobs.cli", *forced], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)

    def new_checkpoint() -> bool:  # one of the forced training's, not one the finished training left
        settings = run / "checkpoints" / "settings.yaml"
        return settings.is_file() and "max_steps: 16" in settings.read_text() and any(
            (p / "trainer_state.json").is_file() for p in (run / "checkpoints").glob("checkpoint-*"))

    deadline = time.monotonic() + 240
    while not new_checkpoint() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=240)
    line = err.strip().splitlines()[-1]
    assert process.returncode == 2 and "Traceback" not in err, out[-2000:] + err[-2000:]
    interrupted_at = max(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("checkpoint-*"))
    command = f"t2s train --config {run / 'logs' / 'train.config.yaml'} --force"
    assert line.endswith(f"rerun `{command}` to resume from checkpoint-{interrupted_at}"), line

    # Nothing finished is lost: train's record, the adapter and merged model, and the later jobs' markers stay usable.
    assert done(run, "train")["global_step"] == 6 and (run / "merge.done").exists()
    assert files(run, "adapter", "merged") == finished
    ok(t2s("train", "--config", str(config)))  # the finished training: skipped, neither refused nor resumed
    ok(t2s("merge", "--config", str(config), "--force"))  # merge still has a finished train to merge
    assert done(run, "merge")["verified"] is True

    result = t2s(*command.split()[1:])
    ok(result)
    assert f"resuming from {run / 'checkpoints' / f'checkpoint-{interrupted_at}'}" in result.stdout
    assert done(run, "train")["global_step"] == 16 and done(run, "train")["settings"]["train"]["max_steps"] == 16
    assert not (run / "merge.done").exists()  # the new model replaced the one merge had merged
    # Once finished, its checkpoints are the finished model's: the same --force trains again from step 0.
    result = ok(t2s(*forced))
    assert "resuming" not in result.stdout and done(run, "train")["global_step"] == 16
