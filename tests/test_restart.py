"""Training that could wedge itself (issue 16): a kill while a checkpoint or the tiny base model is written, values
that validate but cannot train, and a "rerun to resume" that no rerun could keep. Each rerun here must go through."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from jobs.lib.config import load_config
from jobs.lib.errors import T2SError
from jobs.lib.rundir import RunDir
from tests.conftest import ROOT, t2s


def ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_a_checkpoint_cut_off_while_it_was_saved_is_set_aside_and_training_goes_on(copy_run):
    run, config = copy_run(train={"save_every_steps": 2, "save_total_limit": 3})
    ok(t2s("train", "--config", str(config)))
    # A kill after the weights were saved but before trainer_state.json (the Trainer writes it last).
    (run / "train.done").unlink()
    (run / "checkpoints" / "checkpoint-6" / "trainer_state.json").unlink()
    result = ok(t2s("train", "--config", str(config)))  # on every stack (torch < 2.6 too: jobs/lib/resume.py)
    assert f"set aside checkpoint-6, cut off while it was saved (no complete trainer_state.json), as " \
           f"{run / 'incomplete' / 'checkpoint-6'}" in result.stdout
    assert f"resuming from {run / 'checkpoints' / 'checkpoint-4'}" in result.stdout
    assert json.loads((run / "train.done").read_text())["global_step"] == 6
    assert (run / "incomplete" / "checkpoint-6" / "adapter_model.safetensors").is_file()  # kept, out of the way

    # Every checkpoint cut off (a half-written trainer_state.json too): training starts again, and says so.
    (run / "train.done").unlink()
    for folder in (run / "checkpoints").glob("checkpoint-*"):
        (folder / "trainer_state.json").write_text('{"global_step": ')
    result = ok(t2s("train", "--config", str(config)))
    assert result.stdout.count("set aside checkpoint-") == 3 and "resuming" not in result.stdout


def test_a_tiny_base_cut_off_while_it_was_saved_does_not_wedge_prep(copy_run):
    run, config = copy_run()
    (run / "prep.done").unlink()
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (run / "base" / name).unlink()  # a kill after config.json was written
    ok(t2s("prep", "--config", str(config)))
    assert (run / "base" / "model.safetensors").is_file() and (run / "base" / "tokenizer.json").is_file()
    assert not (run / "base.partial").exists()


@pytest.mark.parametrize("override, expected", [
    ("train.epochs=1e400", "config key 'train.epochs' in --set train.epochs: Input should be a finite number (got inf)"),
    ("eval.query_timeout_s=.inf", "config key 'eval.query_timeout_s' in --set eval.query_timeout_s: Input should be a finite number"),
    ("train.learning_rate=.nan", "config key 'train.learning_rate' in --set train.learning_rate: Input should be a finite number"),
    ("train.max_seq_length=9", "train.max_seq_length 9 is shorter than data.max_length 512, the longest example prep "
                               "keeps: training would cut examples before their answer"),
])
def test_values_that_validate_but_cannot_train_are_refused_when_the_config_is_read(override, expected):
    with pytest.raises(T2SError) as refused:
        load_config(None, [override])
    assert expected in str(refused.value)


@pytest.mark.slow
def test_rerun_to_resume_is_said_only_when_a_rerun_can_resume(copy_run, tmp_path):
    from jobs.train import what_a_rerun_does

    assert what_a_rerun_does(RunDir(tmp_path)) == \
        "rerun the same command to start again (no complete checkpoint to resume from)"
    run, config = copy_run()
    shutil.rmtree(run / "data" / "tokenized" / "train")  # the worker fails before its first checkpoint
    result = t2s("train", "--config", str(config))
    assert result.returncode == 2 and "Traceback" not in result.stderr.strip().splitlines()[-1]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("t2s train: error: training failed (exit code 1)")
    assert line.endswith("once that is fixed, rerun the same command to start again (no complete checkpoint to "
                         "resume from)")
    checkpoint = tmp_path / "runs" / "t" / "checkpoints" / "checkpoint-3"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text('{"global_step": 3}')
    config = tmp_path / "runs" / "t" / "logs" / "train.config.yaml"  # the config train last ran with
    assert what_a_rerun_does(RunDir(tmp_path / "runs" / "t")) == \
        f"rerun `t2s train --config {config}` to resume from checkpoint-3"


@pytest.mark.slow
def test_no_validation_split_trains_without_evaluation(tmp_path):
    # data.validation_fraction=0 leaves prep's validation split empty; datasets cannot load an empty saved split, so
    # the worker crashed with an IndexError traceback. It trains, without evaluation, and says so.
    from tests.conftest import tiny_config, write_config

    config = write_config(tmp_path / "config.yaml", tiny_config(
        tmp_path / "runs", data={"validation_fraction": 0}, train={"max_steps": 2, "early_stopping_patience": 2,
                                                                  "save_every_steps": 1, "eval_every_steps": 1}))
    ok(t2s("prep", "--config", str(config)))
    run = RunDir(tmp_path / "runs" / "t")
    assert json.loads(run.manifest.read_text())["rows"]["validation"] == 0
    result = ok(t2s("train", "--config", str(config)))
    assert "training without evaluation" in result.stdout and "Traceback" not in result.stdout + result.stderr
    assert json.loads(run.marker("train").read_text())["global_step"] == 2


def test_one_job_at_a_time_in_a_run_and_the_lock_is_released(tmp_path):
    from jobs.lib.runlock import LOCK_FILE, hold_run

    with hold_run(tmp_path, "train"):
        with pytest.raises(T2SError, match=r"^t2s train \(pid \d+\) is running in .*: one job at a time in a run"):
            with hold_run(tmp_path, "export"):
                pass
    with hold_run(tmp_path, "export"):  # released when the job ended
        pass
    with hold_run(tmp_path, "train"):  # whatever the lock file holds, the next job's error stays one short line
        (tmp_path / LOCK_FILE).write_text("x\ny " * 50_000)
        with pytest.raises(T2SError) as caught:
            with hold_run(tmp_path, "export"):
                pass
        assert "\n" not in str(caught.value) and len(str(caught.value)) < 400
    (tmp_path / LOCK_FILE).unlink()
    (tmp_path / LOCK_FILE).mkdir()
    with pytest.raises(T2SError, match=r"^cannot open the run's lock file .*\.t2s\.lock \(Is a directory\): remove"):
        with hold_run(tmp_path, "train"):
            pass


def test_a_file_system_without_locks_runs_the_job_unlocked(tmp_path, monkeypatch):
    import errno

    from jobs.lib import runlock

    def no_locks(*_):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(runlock.fcntl, "flock", no_locks)
    with pytest.raises(T2SError, match="the job's own error") as caught:
        with runlock.hold_run(tmp_path, "train"):
            raise T2SError("the job's own error")
    assert caught.value.__context__ is None  # the job's error, not one "during handling" of flock's


@pytest.mark.slow
def test_a_second_job_in_a_busy_run_is_one_line_and_a_killed_job_leaves_no_lock(copy_run):
    run, config = copy_run()
    holder = subprocess.Popen(  # a job that holds the run, as `t2s train` does, until it is killed
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from jobs.lib.runlock import hold_run\n"
         "with hold_run(Path(sys.argv[1]), 'train'):\n    print('held', flush=True); time.sleep(120)", str(run)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        result = t2s("merge", "--config", str(config))
        assert result.returncode == 2 and result.stderr.strip().splitlines() == [
            f"t2s merge: error: t2s train (pid {holder.pid}) is running in {run}: one job at a time in a run; wait "
            "for it to end (or stop it), then run this again"]
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, and the kernel drops the lock with the process
        holder.wait()
    result = t2s("train", "--config", str(config))
    assert result.returncode == 0 and "already finished" not in result.stdout, result.stderr[-2000:]
