"""Shared fixtures: the real rows and tokenizer in ../shared, and a prepared tiny run to copy from."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def shared_path(*parts: str) -> Path:
    """A path under ../shared; skips the test when it is absent, except in CI, where it must be there."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is missing: CI must run with ../shared beside the checkout")
        pytest.skip(f"{path} not present")
    return path


def tiny_config(runs_dir: Path, run_id: str = "t", **sections) -> dict:
    """A config for the built-in tiny model on synthetic data, small enough for a few seconds per job."""
    config = {
        "run_id": run_id,
        "runs_dir": str(runs_dir),
        "model": {"name_or_path": "tiny"},
        "data": {"source": "synthetic", "synthetic_rows": 400, "max_length": 256},
        "train": {"method": "lora", "max_steps": 6, "per_device_batch_size": 8, "packing": "none",
                  "logging_steps": 2, "learning_rate": 3e-3, "early_stopping_patience": None,
                  "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "modules_to_save": ["embed_tokens", "lm_head"]}},
        "eval": {"models": ["base", "merged"], "max_examples": 12, "batch_size": 6, "max_new_tokens": 24},
        "push": {"repo_id": "someone/t2s-test", "dry_run": True},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values) if isinstance(values, dict) else config.__setitem__(name, values)
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def t2s(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """The CLI as a user runs it: a fresh process, output captured."""
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


@pytest.fixture(autouse=True)
def _restore_environment():
    """Libraries write os.environ (TrainingArguments sets ACCELERATE_MIXED_PRECISION): no test leaks it to the next."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def prepared_run(tmp_path_factory) -> Path:
    """A tiny run after prep (built once); copy it with `copy_run` before changing anything in it."""
    base = tmp_path_factory.mktemp("prepared")
    config = write_config(base / "config.yaml", tiny_config(base / "runs"))
    result = t2s("prep", "--config", str(config))
    assert result.returncode == 0, result.stderr
    return base / "runs" / "t"


@pytest.fixture
def copy_run(prepared_run, tmp_path):
    """A private copy of the prepared run, and a config file pointing at it (extra sections merged in)."""

    def make(name: str = "copy", **sections) -> tuple[Path, Path]:
        runs = tmp_path / name / "runs"
        shutil.copytree(prepared_run, runs / "t")
        config = write_config(tmp_path / name / "config.yaml", tiny_config(runs, **sections))
        return runs / "t", config

    return make


# A small SQLite database for the jobs that run SQL on a user's file (ask --db, serve --db).
SONGS_SCHEMA = "CREATE TABLE songs (title VARCHAR, artist VARCHAR, genre VARCHAR, year INTEGER)"
SONGS = [("blue", "nova", "jazz", 1999), ("river", "kite", "rock", 2005), ("echo", None, "jazz", 2020)]


@pytest.fixture(scope="module")
def songs_db(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("db") / "songs.sqlite"
    conn = sqlite3.connect(path)
    conn.execute(SONGS_SCHEMA)
    conn.executemany("INSERT INTO songs VALUES (?, ?, ?, ?)", SONGS)
    conn.commit()
    conn.close()
    return path
