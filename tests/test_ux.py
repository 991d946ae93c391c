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

from jobs.lib import shipped
from jobs.lib.config import load_config
from jobs.lib.errors import T2SError
from jobs.lib.hub import names_local_model
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
@pytest.mark.skipif(sys.version_info < (3, 11), reason="the wheel is built and installed on the cu12 set (Python 3.11): "
                    "the cu118 set's venv has no wheel builder")
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
    probe = ("import jobs, jobs.lib.accelerate_config as t; p = t.accelerate_config_path('single'); "
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


@pytest.mark.parametrize("argv, says", [
    (["jobs.cli", "serve", "--request-timeout-s", "nan"], "t2s serve: error: Invalid value for '--request-timeout-s'"),
    (["jobs.cli", "train", "--bogus"], "t2s train: error: No such option: --bogus (see t2s train --help)"),
    (["jobs.cli", "nosuch"], "t2s: error: No such command 'nosuch'."),
    (["infra.cli", "launch", "--gpus", "9"], "t2s-infra launch: error: Invalid value for '--gpus'"),
])
def test_a_usage_error_is_one_line_and_exit_code_2(argv, says):
    """typer's own checks (unknown options, out-of-range values) answer like every other error: one line, not a box."""
    name = "t2s-infra" if argv[0] == "infra.cli" else "t2s"
    result = subprocess.run([sys.executable, "-c", f"import sys; sys.argv[0] = {name!r}; "
                             f"from {argv[0]} import main; main()", *argv[1:]],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(says), result.stderr


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


def test_runs_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "runs.txt").write_text("")
    result = t2s("runs", "--runs-dir", str(tmp_path / "runs.txt"))
    assert result.returncode == 2 and result.stderr.strip() == (
        f"t2s runs: error: {tmp_path / 'runs.txt'} is a file, not a folder of runs: pass --runs-dir the folder that "
        "holds them")


def test_headline_skips_what_is_not_a_finite_score():
    # an eval.done written by hand or by another t2s: a string or NaN neither wins nor breaks the comparison
    results = {"a": {"execution_accuracy": "x", "exact_match": 0.9}, "b": {"execution_accuracy": 0.5},
               "c": {"execution_accuracy": float("nan"), "sql_only": float("inf"), "exact_match": True}}
    assert headline(results) == ("b", {"execution_accuracy": 0.5})
    assert headline({"c": results["c"]}) == ("c", {})


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
    from jobs.lib import quiet

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


def test_generate_never_warns_that_max_length_is_set_too():
    """TinyLlama's generation_config.json sets max_length (2048): transformers warned at every generate, so once per
    eval batch and per served request, although t2s always passes max_new_tokens (which takes precedence)."""
    import torch

    from jobs.lib import quiet, tiny

    quiet.quiet_library_output()
    model = tiny.build_model(64, seed=0)
    model.generation_config.max_length = 2048
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers.generation.utils")
    logger.addHandler(handler)
    try:
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False, pad_token_id=0)
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records if "max_new_tokens" in r.getMessage()] == []


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
    for stream in (out, result.stderr):  # the training worker's output comes through stdout, the CLI's warnings stderr
        warned = [line for line in stream.splitlines() if "Warning:" in line]
        assert len(warned) == len(set(warned)), warned  # each warning once per process
    assert "\r" not in out + result.stderr  # no progress bars: the output is not a terminal
    assert not [line for line in out.splitlines() if line.startswith("{'loss'")]  # the Trainer's dicts
    again = t2s("train", "--config", str(config))
    assert again.returncode == 0 and again.stdout.count("train: already finished") == 1


# --- 8, 16, 17. make ------------------------------------------------------------------------------------------------

def _stub_make(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """`make launch-train ...` with t2s-infra replaced by a stub that prints each argument it gets in brackets."""
    stub = tmp_path / "bin"
    stub.mkdir(exist_ok=True)
    (stub / "t2s-infra").write_text('#!/usr/bin/env bash\nfor a in "$@"; do echo "[$a]"; done\n')
    (stub / "t2s-infra").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "MAKEFLAGS"}
    return subprocess.run(["make", "--no-print-directory", "-o", ".venv/.installed", "-f", str(ROOT / "Makefile"),
                           "launch-train", f"BIN={stub}", *args], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=60)


def test_make_launch_train_carries_values_with_spaces_in_set_file(tmp_path):
    overrides = tmp_path / "overrides.txt"
    overrides.write_text('# GPUs\ninfra.gpu_types=["NVIDIA L40S", "NVIDIA A40"]\n\ntrain.epochs=1')  # no final newline
    result = _stub_make(tmp_path, "SET=infra.max_cost_usd=3 push.private=true", f"SET_FILE={overrides}", "YES=1")
    assert result.returncode == 0, result.stderr
    args = [line[1:-1] for line in result.stdout.splitlines() if line.startswith("[")]
    assert args == ["launch", "--config", "configs/default.yaml", "--set", "infra.max_cost_usd=3", "--set",
                    "push.private=true", "--set", 'infra.gpu_types=["NVIDIA L40S", "NVIDIA A40"]', "--set",
                    "train.epochs=1", "--yes"]
    missing = _stub_make(tmp_path, f"SET_FILE={tmp_path / 'absent.txt'}")
    assert missing.returncode != 0 and "SET_FILE=" in missing.stderr and "not found" in missing.stderr
    assert "[launch]" not in missing.stdout


def _make_n(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "TORCH_INDEX_URL", "TORCH_SPEC")}
    result = subprocess.run(["make", "-n", "-f", str(ROOT / "Makefile"), *args], cwd=ROOT, capture_output=True,
                            text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_make_clean_keeps_runs_and_clean_runs_is_its_own_target():
    assert [line for line in _make_n("clean").splitlines() if "rm " in line] == ["rm -rf .venv .venv-cu118"]
    assert "rm -rf runs" in _make_n("clean-runs")


def test_make_install_takes_torch_from_the_cpu_index_or_the_one_given(tmp_path):
    venv = tmp_path / "venv"  # a venv that is not there, so that make -n shows the install
    default = _make_n("install", f"VENV={venv}")
    assert "--index-url https://download.pytorch.org/whl/cpu" in default and "'torch==2.13.0'" in default
    mine = _make_n("install", f"VENV={venv}", "TORCH_INDEX_URL=https://mirror.example/torch-cpu", "TORCH_SPEC=torch==2.13.0+cpu")
    assert "--index-url https://mirror.example/torch-cpu" in mine and "'torch==2.13.0+cpu'" in mine


# --- 4. training curves -----------------------------------------------------------------------------------------------

def test_training_curves_from_metrics_jsonl(tmp_path):
    from jobs import curves

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join([
        json.dumps({"step": 2, "loss": 2.5, "learning_rate": 1e-3}),
        json.dumps({"step": 4, "loss": 2.0, "learning_rate": 8e-4}),
        json.dumps({"step": 4, "eval_loss": 2.2}),
        json.dumps({"step": 4, "loss": 1.9, "learning_rate": 8e-4}),  # logged again after a resume: the latest holds
        json.dumps({"step": 6, "loss": float("nan")}),  # not finite: left out
        '{"step": 8, "loss": 1.',  # cut short by a kill
    ]) + "\n")
    read = curves.read_curves(metrics)
    assert read == {"loss": [(2, 2.5), (4, 1.9)], "eval_loss": [(4, 2.2)], "learning_rate": [(2, 1e-3), (4, 8e-4)]}
    picture = tmp_path / "curves.png"
    assert curves.plot_training_curves(metrics, picture, "run t") and picture.read_bytes()[:4] == b"\x89PNG"
    assert not curves.plot_training_curves(tmp_path / "absent.jsonl", tmp_path / "none.png", "x")
    assert not (tmp_path / "none.png").exists()


def test_eval_report_and_card_show_the_training_curves(tmp_path):
    from jobs.lib.card import render_model_card
    from jobs.lib.report import render_markdown
    from tests.test_push import REPORT, TRAIN_DONE, make_run

    report = {**REPORT, "buckets": {"base": {}, "merged": {}}, "build_errors": {},
              "config": {"databases_per_example": 3, "query_timeout_s": 1.0}, "training_curves": "training_curves.png"}
    for r in report["results"].values():
        r.update(fails_to_execute=0.0, gold_error=3, build_error=0)
    markdown = render_markdown(report)
    assert "![training: loss and learning rate per step](training_curves.png)" in markdown
    assert "![scores](metrics.png)" in markdown
    assert "training_curves" not in render_markdown({**report, "training_curves": None})
    config, _ = make_run(tmp_path)
    card = render_model_card(load_config(config), "alice/x", report=REPORT, train_done=TRAIN_DONE, prompt_suffix="",
                             training_curves=True)
    assert "![training and validation loss, learning rate](eval/training_curves.png)" in card
    assert "training_curves" not in render_model_card(load_config(config), "alice/x", report=REPORT,
                                                       train_done=TRAIN_DONE, prompt_suffix="")


# --- 11. the model card -----------------------------------------------------------------------------------------------

def test_card_rows_say_what_they_measured(tmp_path):
    from jobs.lib.card import render_model_card
    from tests.test_push import REPORT, TRAIN_DONE, make_run

    config, _ = make_run(tmp_path)
    cfg = load_config(config, ["data.max_length=384"])
    merged = {**REPORT["results"]["merged"], "latency_ms_mean": 12345.678, "tokens_per_s": 123456.0}
    report = {**REPORT, "n_examples": 300, "split_rows": 3900,
              "results": {"merged": {**merged, "decoding": "greedy"},
                          "merged+checked": {**merged, "decoding": "checked", "candidates": 4}}}
    card = render_model_card(cfg, "alice/x", report=report, train_done=TRAIN_DONE, prompt_suffix="", run_span_s=7200.0)
    assert "| packing / max length | padding_free; examples up to 384 tokens (prep dropped longer ones), sequences " \
           "up to 2048 tokens |" in card
    assert "12,345.7 ms" in card and "123,456" in card and "e+0" not in card  # no scientific notation
    assert card.count("training time") == 1 and "s of training" not in card
    assert "| fine-tuned (merged) — **this repo** |" in card
    assert "| fine-tuned (merged), checked decoding — **this repo** |" in card
    assert card.count("| fine-tuned (merged) — **this repo** |") == 1
    assert "| run time | 2 h 00 min, from the start of the run's first job to this push |" in card
    assert "≈ $10.00 at $5/h for the run time (every job on the pod;" in card and "training alone ≈ $7.50" in card
    assert "(the first 300 of its 3,900 examples, eval.max_examples)" in card


def test_run_span_counts_from_the_first_job_start(tmp_path):
    from jobs.lib.card import run_span_s
    from jobs.lib.rundir import RunDir

    run = RunDir(tmp_path / "r")
    assert run_span_s(run) is None
    run.logs.mkdir(parents=True)
    for job, age in (("prep", 3600), ("train", 1800), ("push", 5)):
        run.job_config(job).write_text("x")
        os.utime(run.job_config(job), (time.time() - age, time.time() - age))
    assert 3590 < run_span_s(run) < 3700


# --- 18. small ones ---------------------------------------------------------------------------------------------------

def test_dropped_rows_say_why():
    from collections import Counter

    from jobs.prep import describe_dropped

    assert describe_dropped(Counter(duplicate_pair=5, too_long=2)) == \
        " (5 duplicate (question, answer) pairs, 2 longer than data.max_length)"
    assert describe_dropped(Counter()) == ""


def test_eval_names_its_subset_apart_from_the_split():
    from jobs.lib.report import render_decoding, subset

    assert subset(12, {"rows": {"test": 40}}, "test") == "the first 12 of the 40 test examples (eval.max_examples)"
    assert subset(40, {"rows": {"test": 40}}, "test") == "all 40 test examples"
    cpu = {"results": {"base": {"decoder": "dynamic", "compile_s": 0.0}, "merged": {"decoder": "dynamic"}}}
    assert render_decoding(cpu) == ["", "Decoding (jobs.lib.generate): base: dynamic; merged: dynamic."]  # no CUDA graphs


def test_a_fresh_train_start_drops_old_tensorboard_events(copy_run):
    from jobs.lib.rundir import RunDir

    run_path, config = copy_run("tb")
    run, cfg = RunDir(run_path), load_config(config)
    events = run.logs / "tensorboard" / "events.out.tfevents.1.old"
    events.parent.mkdir(parents=True)
    events.write_text("old")
    run.start("train", cfg, force=True)
    assert not events.exists()
    checkpoint = run.checkpoints / "checkpoint-2"  # a run with a checkpoint resumes: its events stay
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text('{"global_step": 2}')
    events.parent.mkdir(parents=True)
    events.write_text("kept")
    assert run.last_checkpoint() == checkpoint
    run.start("train", cfg, force=False)
    assert events.read_text() == "kept"


# --- 9. .env ----------------------------------------------------------------------------------------------------------

def _section_variables(title_start: str) -> set[str]:
    """The variables .env.example lists in the section whose header starts with `title_start`."""
    import re

    found, inside = set(), False
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.startswith("# ---"):
            inside = line.startswith(title_start)
        elif inside and (m := re.match(r"#?\s?([A-Z][A-Z0-9_]+)=", line)):
            found.add(m.group(1))
    return found


def test_env_example_section_read_from_dotenv_is_what_the_commands_read():
    from jobs.lib.dotenv_settings import DOTENV_SETTINGS

    assert _section_variables("# --- read from .env by t2s and t2s-infra") == set(DOTENV_SETTINGS)
    assert {"T2S_JOB", "T2S_CONFIG", "HF_HOME"} <= _section_variables("# --- inside the job container")


def test_dotenv_settings_fill_in_what_the_environment_leaves_unset(tmp_path, monkeypatch):
    from jobs.lib.dotenv_settings import load_dotenv_settings

    env = tmp_path / ".env"
    env.write_text("T2S_DECODER=dynamic\nT2S_STATE_DIR=/from/dotenv\nT2S_JOB=train\nHF_TOKEN=hf_notputintheenvironment\n")
    for name in ("T2S_DECODER", "T2S_JOB", "T2S_STATE_DIR"):  # set, then unset: monkeypatch undoes what the test sets
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("T2S_STATE_DIR", "/from/environment")
    assert load_dotenv_settings(env) == {"T2S_DECODER": "dynamic"}
    assert os.environ["T2S_DECODER"] == "dynamic" and os.environ["T2S_STATE_DIR"] == "/from/environment"
    assert "T2S_JOB" not in os.environ and "HF_TOKEN" not in os.environ  # container-only, and secrets: not set
    assert load_dotenv_settings(tmp_path / "absent") == {}


def test_t2s_infra_reads_its_state_dir_from_dotenv(tmp_path):
    state = tmp_path / "state"
    (tmp_path / ".env").write_text(f"T2S_STATE_DIR={state}\n")
    env = {k: v for k, v in os.environ.items() if k != "T2S_STATE_DIR"}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run([sys.executable, "-m", "infra.cli", "ls"], cwd=tmp_path, capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert str(state / "launches.jsonl") in result.stdout + result.stderr


# --- 10, 18. what the files say is what is there ---------------------------------------------------------------------

def test_headline_numbers_are_the_ones_results_measures():
    results = (ROOT / "bench/RESULTS.md").read_text()
    assert "| fp32_master (default) | 355.5 | 35,719 | 17.5 |" in results  # call T
    assert "| **full, batch 64, gradient checkpointing (now `configs/default.yaml`)** | 1 | **419.2** |" in results
    for path in ("README.md", "configs/default.yaml"):
        text = (ROOT / path).read_text()
        assert "355 examples/s" in text and "17.5 GiB" in text and "call T" in text, path
        assert "at 9 GB" not in text, path


def test_requirement_files_name_the_dockerfiles_bases_and_nothing_cites_a_missing_design_md():
    import re

    dockerfile = (ROOT / "images/Dockerfile").read_text()
    for flavor in ("cu118", "cu12"):
        base = re.search(rf"^ARG BASE_IMAGE_{flavor.upper()}=(\S+)", dockerfile, re.M).group(1)
        assert f"base {base} " in (ROOT / f"images/requirements-{flavor}.txt").read_text().splitlines()[0]
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if "DESIGN.md" not in listed:
        citing = [p for p in listed if Path(ROOT, p).is_file() and p != "tests/test_ux.py"
                  and "DESIGN.md" in Path(ROOT, p).read_text(errors="replace")]
        assert citing == []


def test_runs_survives_a_run_folder_with_odd_files(tmp_path):
    run = tmp_path / "runs" / "odd"
    run.mkdir(parents=True)
    (run / "config.resolved.yaml").write_text("model: [not, a, mapping]\ntrain: 3\n")
    (run / "prep.done").write_text("[1, 2]")
    (run / "eval.done").write_text("{not json")
    [summary] = list_runs(tmp_path / "runs")
    assert summary.model is None and summary.method is None and summary.metrics == {}


def test_a_wrong_infra_set_key_is_blamed_on_the_set():
    from infra.settings import load_infra_settings

    cfg = load_config(None, ["infra.gpu_typo=2"])
    with pytest.raises(T2SError, match=r"^unknown config key 'infra.gpu_typo' in --set infra.gpu_typo: "):
        load_infra_settings(cfg, "run.yaml", ["infra.gpu_typo=2"])
    with pytest.raises(T2SError, match=r"^unknown config key 'infra.gpu_typo' in run.yaml: "):
        load_infra_settings(cfg, "run.yaml", ["infra.max_cost_usd=3"])  # the file's key, another --set


@pytest.mark.skipif(sys.version_info < (3, 11), reason="make install makes the cu12 set's venv, which needs Python 3.11: "
                    "its stub Python is this one")
def test_make_install_uses_the_index_when_it_answers_and_pip_s_own_when_not(tmp_path):
    """The install recipe run for real, with a Python whose `-m venv` does nothing and a pip that prints its
    arguments: torch from TORCH_INDEX_URL when it answers, else from pip's own indexes, with one line saying so."""
    import http.server
    import threading

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    (venv / "bin" / "pip").write_text('#!/usr/bin/env bash\necho "pip $*"\n')
    (venv / "bin" / "pip").chmod(0o755)
    python = tmp_path / "python"
    python.write_text(f'#!/usr/bin/env bash\n[ "$1 $2" = "-m venv" ] && exit 0\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "TORCH_INDEX_URL", "TORCH_SPEC")}

    def install(index: str) -> str:
        (venv / ".installed").unlink(missing_ok=True)
        result = subprocess.run(["make", "--no-print-directory", "-f", str(ROOT / "Makefile"), "install", f"VENV={venv}",
                                 f"PYTHON={python}", f"TORCH_INDEX_URL={index}"], cwd=ROOT, capture_output=True,
                                text=True, env=env, timeout=120)
        assert result.returncode == 0, result.stderr
        return result.stdout

    try:
        answering = install(f"http://127.0.0.1:{server.server_address[1]}/")
    finally:
        server.shutdown()
        server.server_close()  # refused from now on
    assert f"pip install -q torch==2.13.0 --index-url http://127.0.0.1:{server.server_address[1]}/" in answering
    silent = install(f"http://127.0.0.1:{server.server_address[1]}/")  # the server is gone
    assert "does not answer: torch==2.13.0 from pip's own indexes" in silent
    assert "pip install -q torch==2.13.0\n" in silent and "--index-url" not in silent.split("own indexes")[1]
