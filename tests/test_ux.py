"""What a new user meets first (issue 24): shipped configs, --version and completion, the run list, messages that blame
the right thing, a local --model that never goes to the Hub, and logs a person can read."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import sysconfig
import time
import warnings
from pathlib import Path

import pytest

from jobs import shipped
from jobs.config import load_config
from jobs.errors import T2SError
from jobs.hub import names_local_model
from jobs.runlist import headline, human_size, list_runs
from tests.conftest import ROOT, t2s, tiny_config, write_config


# --- 1. shipped configs ---------------------------------------------------------------------------------------------

def test_every_config_in_the_repository_is_shipped_and_listed():
    names = shipped.shipped_configs()
    on_disk = {p.stem for p in (ROOT / "configs").glob("*.yaml")} | \
        {f"accelerate/{p.stem}" for p in (ROOT / "configs/accelerate").glob("*.yaml")}
    assert set(names) == on_disk and {"demo", "default", "accelerate/single"} <= on_disk
    result = t2s("configs", "list")
    assert result.returncode == 0, result.stderr
    for name in on_disk:
        assert f"  {name} " in result.stdout
    assert "One process: one GPU, or the CPU." in result.stdout  # each with its own first comment line


def test_configs_copy_writes_an_editable_copy_and_refuses_to_overwrite(tmp_path):
    result = t2s("configs", "copy", "configs/demo.yaml", str(tmp_path))
    assert result.returncode == 0, result.stderr
    copy = tmp_path / "demo.yaml"
    assert copy.read_text() == (ROOT / "configs/demo.yaml").read_text()
    assert load_config(copy).run_id == "demo"
    again = t2s("configs", "copy", "demo", str(copy))
    assert again.returncode == 2 and "exists" in again.stderr and "--force" in again.stderr
    assert t2s("configs", "copy", "accelerate/zero3", str(copy), "--force").returncode == 0
    assert "DEEPSPEED" in copy.read_text()
    missing = t2s("configs", "copy", "nope", str(tmp_path / "x.yaml"))
    assert missing.returncode == 2 and "no shipped config 'nope'" in missing.stderr and "accelerate/single" in missing.stderr
    assert not (tmp_path / "x.yaml").exists()


def test_an_installed_package_finds_its_own_copy(tmp_path, monkeypatch):
    """Without a checkout beside the package (a wheel), the configs come from jobs/configs/ inside it."""
    package = tmp_path / "site" / "jobs"
    (package / "configs" / "accelerate").mkdir(parents=True)
    (package / "configs" / "accelerate" / "single.yaml").write_text("# one\nnum_processes: 1\n")
    monkeypatch.setattr(shipped, "_PACKAGE", package)
    assert shipped.configs_dir() == package / "configs"
    assert list(shipped.shipped_configs()) == ["accelerate/single"]


@pytest.mark.slow
def test_a_built_wheel_ships_the_configs_and_trains_with_single(tmp_path):
    """pip wheel → a fresh venv (system site packages from .venv, for the dependencies) → `t2s configs list` and
    train.accelerate_config: single resolve from the installed package, not the checkout."""
    wheels, venv = tmp_path / "wheels", tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(ROOT)], check=True, capture_output=True, timeout=300)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # The dependencies from this interpreter's site-packages (a plain path: its .pth files, among them the editable
    # install of this checkout, are not run), t2s only from the wheel.
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    wheel = next(wheels.glob("t2s-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    listed = subprocess.run([str(venv / "bin" / "t2s"), "configs", "list"], cwd=outside, capture_output=True,
                            text=True, env=env, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert str(venv) in listed.stdout and "accelerate/single" in listed.stdout and str(ROOT) not in listed.stdout
    probe = ("import jobs, jobs.train as t; p = t.accelerate_config_path('single'); "
             "print(jobs.__file__); print(p); print(t.read_accelerate_config('single')[1]['num_processes'])")
    resolved = subprocess.run([str(python), "-c", probe], cwd=outside, capture_output=True, text=True, env=env,
                              timeout=120)
    assert resolved.returncode == 0, resolved.stderr
    package_file, path, processes = resolved.stdout.split()
    assert package_file.startswith(str(venv)) and path.startswith(str(venv)) and processes == "1"
    copied = subprocess.run([str(venv / "bin" / "t2s"), "configs", "copy", "demo", "demo.yaml"], cwd=outside,
                            capture_output=True, text=True, env=env, timeout=120)
    assert copied.returncode == 0 and (outside / "demo.yaml").is_file(), copied.stderr


# --- 2. --version and completion ------------------------------------------------------------------------------------

def test_version_of_both_commands():
    from importlib.metadata import version

    assert t2s("--version").stdout.strip() == f"t2s {version('t2s')}"
    infra = subprocess.run([sys.executable, "-m", "infra.cli", "--version"], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
    assert infra.returncode == 0 and infra.stdout.strip() == f"t2s-infra {version('t2s')}"


def test_shell_completion_completes_commands():
    script = Path(sys.executable).parent / "t2s"  # the installed command: completion goes by the program's name
    if not script.is_file():
        pytest.skip("no t2s script beside this Python")
    env = {**os.environ, "_T2S_COMPLETE": "complete_bash", "COMP_WORDS": "t2s con", "COMP_CWORD": "1"}
    result = subprocess.run([str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and result.stdout.split() == ["configs"], result.stderr


# --- 3. t2s runs ----------------------------------------------------------------------------------------------------

def test_headline_is_the_best_fine_tuned_row():
    results = {"base": {"sql_only": 0.1, "exact_match": 0.0, "execution_accuracy": 0.2},
               "merged": {"sql_only": 0.9, "exact_match": 0.5, "execution_accuracy": 0.6},
               "merged+checked": {"sql_only": 1.0, "exact_match": 0.55, "execution_accuracy": 0.7}}
    assert headline(results) == ("merged+checked", results["merged+checked"])
    assert headline({"base": results["base"]}) == ("base", results["base"])
    assert headline({}) == (None, {})
    assert human_size(512) == "512 B" and human_size(3 * 2**20) == "3.0 MB"


def test_runs_lists_each_run_with_jobs_model_metrics_and_size(copy_run, tmp_path):
    run, config = copy_run("listed")
    (run / "eval.done").write_text(json.dumps({"job": "eval", "finished_at": "2030-01-01T10:00:00Z", "results": {
        "base": {"sql_only": 0.25, "exact_match": 0.0, "execution_accuracy": 0.125},
        "merged": {"sql_only": 0.875, "exact_match": 0.5, "execution_accuracy": 0.625}}}))
    (run.parent / "not-a-run").mkdir()
    assert list_runs(run.parent)[0].method is None  # prepared, not trained: train's settings are not pinned yet
    (run / "train.done").write_text(json.dumps({"job": "train", "finished_at": "2026-12-07T09:00:00Z",
                                                "method": "lora"}))
    [summary] = list_runs(run.parent)
    assert summary.run_id == "t" and summary.jobs_done == ["prep", "train", "eval"] and summary.model == "tiny"
    assert summary.method == "lora" and summary.scored_model == "merged" and summary.metrics["execution_accuracy"] == 0.625
    assert summary.size_bytes > 10_000 and summary.finished_at == "2030-01-01T10:00:00Z"

    as_json = t2s("runs", "--runs-dir", str(run.parent), "--json")
    assert as_json.returncode == 0, as_json.stderr
    [row] = json.loads(as_json.stdout)
    assert row["run_id"] == "t" and row["metrics"]["sql_only"] == 0.875
    table = t2s("runs", "--config", str(config))  # the config's runs_dir
    assert table.returncode == 0, table.stderr
    line = next(line for line in table.stdout.splitlines() if " t " in line or line.startswith("│ t "))
    for shown in ("prep train eval", "tiny", "lora", "merged", "87.5%", "62.5%", "2.6 MB"):
        assert shown in line, (shown, table.stdout)
    empty = t2s("runs", "--runs-dir", str(tmp_path / "none"))
    assert empty.returncode == 0 and "no runs in" in empty.stdout


# --- 6. a local --model is never looked up on the Hub -----------------------------------------------------------------

@pytest.mark.parametrize("name, local", [
    ("runs/nope", True), ("./runs/nope", True), ("/abs/model", True), ("~/m", True), ("a/b/c", True), ("x/", True),
    ("bad id!", True), ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", False), ("gpt2", False), ("someone/model.v2", False),
])
def test_names_local_model(name, local):
    assert names_local_model(name) is local


def test_an_id_whose_first_part_is_a_folder_here_is_local(tmp_path, monkeypatch):
    (tmp_path / "mymodels").mkdir()
    monkeypatch.chdir(tmp_path)
    assert names_local_model("mymodels/v1") and not names_local_model("someone/v1")


def test_ask_with_a_missing_run_is_one_line_at_once(tmp_path):
    started = time.monotonic()
    result = t2s("ask", "--model", "runs/nope", "--schema", "CREATE TABLE t (a INT)", "how many?", cwd=tmp_path,
                 env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "0"})
    assert result.returncode == 2 and time.monotonic() - started < 30
    assert result.stderr.strip() == ("t2s ask: error: model path runs/nope does not exist: pass a run directory, a "
                                     "merged model folder or a Hub id like org/name")


# --- 7. a wrong --set key is blamed on --set ------------------------------------------------------------------------

def test_a_wrong_set_key_is_blamed_on_the_set(tmp_path):
    path = write_config(tmp_path / "c.yaml", {"train": {"epochs": 1}})
    with pytest.raises(T2SError, match=r"unknown config key 'train.epoch' in --set train.epoch:"):
        load_config(path, ["train.epoch=1"])
    with pytest.raises(T2SError, match=r"config key 'train.epochs' in --set train.epochs: .*greater than 0"):
        load_config(path, ["train.epochs=-1"])
    with pytest.raises(T2SError, match=r"unknown config key 'train.lora.x' in --set train.lora:"):
        load_config(path, ["train.lora={x: 1}"])
    path.write_text("train:\n  epoch: 1\n")  # the file's own mistake is still the file's
    with pytest.raises(T2SError, match=rf"unknown config key 'train.epoch' in {path}:"):
        load_config(path, ["train.epochs=1"])
    result = t2s("train", "--config", str(ROOT / "configs/demo.yaml"), "--set", "train.epoch=1")
    assert result.returncode == 2 and "in --set train.epoch" in result.stderr and "demo.yaml" not in result.stderr


# --- 12. logs for people --------------------------------------------------------------------------------------------

def test_quiet_library_output(monkeypatch):
    from jobs import quiet

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.delenv("PYTHONWARNINGS", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        quiet.quiet_library_output(open(os.devnull, "w"))
        for _ in range(3):
            warnings.warn("old API", FutureWarning)
    assert [str(w.message) for w in caught] == ["old API"]
    assert os.environ["TQDM_DISABLE"] == "1" and "once::FutureWarning" in os.environ["PYTHONWARNINGS"]
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "no kernels")
        logger.warning("something else")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["something else"]


@pytest.mark.slow
def test_a_job_prints_its_summary_once_and_a_finished_job_says_so(copy_run):
    run, config = copy_run("once")
    result = t2s("pipeline", "--config", str(config), "--set", "push.enforce_gates=false")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("prep: already finished") == 1
    for job in ("train", "merge", "eval", "push"):
        [done] = [line for line in out.splitlines() if line.startswith(f"== {job} done in ")]
        summary = done.split(": ", 1)[1]
        assert out.count(summary) == 1, summary
    assert "gemm_4bit_forward" not in out + result.stderr
    warned = [line for line in (out + result.stderr).splitlines() if "Warning:" in line]
    assert len(warned) == len(set(warned)), warned  # each warning once (per process)
    assert "\r" not in out + result.stderr  # no progress bars: the output is not a terminal
    assert not [line for line in out.splitlines() if line.startswith("{'loss'")]  # the Trainer's dicts
    again = t2s("train", "--config", str(config))
    assert again.returncode == 0 and again.stdout.count("train: already finished") == 1
