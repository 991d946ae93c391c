"""Input that got a traceback instead of a line (issue 16), tried as a hostile user would, each through the real
command in a fresh process: one line on stderr, a non-zero exit, and nothing finished lost."""

from __future__ import annotations

import hashlib
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.lib.runlock import LOCK_FILE
from tests.conftest import t2s, tiny_config, write_config

# ~600 bytes that expand to 9^6 strings when anything walks them (a "billion laughs"); the loop is a list in itself.
ALIAS_BOMB = "infra:\n  a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 7))
ALIAS_LOOP = "infra:\n  a: &a [*a]\n"


def one_error_line(result: subprocess.CompletedProcess, command: str) -> str:
    """The last line on stderr, which must be the command's one-line error; no traceback anywhere."""
    assert result.returncode == 2, (result.returncode, result.stdout[-1500:], result.stderr[-1500:])
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"{command}: error: "), result.stderr[-1500:]
    return line


def finished_state(run: Path) -> dict[str, str]:
    """What a finished run holds: every marker and every output file, by content (not the logs, nor the lock a job
    holds while it runs)."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*"))
            if p.is_file() and not p.is_relative_to(run / "logs") and p.name != LOCK_FILE}


def with_memory_cap(gigabytes: int):
    """A child process that cannot grow past `gigabytes` (an alias bomb must not be able to take the machine)."""
    def cap():
        limit = gigabytes << 30
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return cap


@pytest.mark.parametrize("command", ["t2s", "t2s-infra"])
@pytest.mark.parametrize("name, content, expected", [
    ("latin1", "run_id: caf\xe9\n".encode("latin-1"), "is not UTF-8 text (byte 11): save it as UTF-8"),
    ("loop", ALIAS_LOOP.encode(), "uses a YAML alias (*a) at line 2"),
    ("bomb", ALIAS_BOMB.encode(), "uses a YAML alias (*a0) at line 3"),
    ("deep", ("infra: " + "[" * 5000 + "]" * 5000 + "\n").encode(), "nests too deeply to read"),
])
def test_a_config_file_that_is_not_a_config_is_one_line(tmp_path, command, name, content, expected):
    config = tmp_path / f"{name}.yaml"
    config.write_bytes(content)
    assert len(ALIAS_BOMB) < 700
    args = ["launch", "--config", str(config), "--yes"] if command == "t2s-infra" else ["prep", "--config", str(config)]
    run = [sys.executable, "-m", "infra.cli" if command == "t2s-infra" else "jobs.cli", *args]
    result = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "RUNPOD_API_KEY": "", "HF_TOKEN": ""}, preexec_fn=with_memory_cap(3))
    line = one_error_line(result, f"{command} {args[0]}")
    assert f"config file {config} {expected}" in line
    assert not (tmp_path / "runs").exists()


def test_where_the_run_would_go_is_one_line_and_makes_nothing(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder\n")
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "runs"))
    cases = {
        f"run_id={'x' * 300}": "config key 'run_id' in --set run_id: String should have at most 100 characters",
        f"runs_dir={a_file}": f"cannot make the run folder {a_file}/t (Not a directory): set runs_dir to a folder",
        "runs_dir=/sys/t2s-runs": "cannot make the run folder /sys/t2s-runs/t (",  # not writable, even for root
    }
    for override, expected in cases.items():
        line = one_error_line(t2s("prep", "--config", str(config), "--set", override, cwd=tmp_path), "t2s prep")
        assert expected in line and len(line) < 400, line
    assert a_file.read_text() == "not a folder\n" and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("accelerate, expected", [
    ("- a\n- b\n", "must be a mapping of keys to values, not list"),
    ("num_processes: two\n", "num_processes must be a whole number >= 1 (got 'two')"),
    ("num_processes: [1\n", "is not valid YAML at line 2, column 1"),
    ("deepspeed_config: [zero3]\n", "deepspeed_config must be a mapping"),
    (b"num_processes: \xff\n", "is not UTF-8 text"),
])
def test_an_accelerate_config_that_is_not_one_is_a_line_and_the_finished_run_is_kept(copy_run, tmp_path, accelerate,
                                                                                       expected):
    run, config = copy_run()
    (run / "train.done").write_text('{"job": "train"}\n')  # a finished train that a failed --force must not lose
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    before = finished_state(run)
    path = tmp_path / "accelerate.yaml"
    path.write_bytes(accelerate if isinstance(accelerate, bytes) else accelerate.encode())
    result = t2s("train", "--config", str(config), "--force", "--set", f"train.accelerate_config={path}")
    assert f"accelerate config {path}" in one_error_line(result, "t2s train")
    assert expected in result.stderr.strip().splitlines()[-1]
    assert finished_state(run) == before


@pytest.mark.parametrize("value", ["soon", "-5", "nan", "inf"])
def test_a_push_timeout_that_is_not_seconds_is_one_line_before_any_request(tmp_path, value):
    from tests.test_push import make_run

    config, root = make_run(tmp_path)
    result = t2s("push", "--config", str(config), "--force", cwd=tmp_path,
                 env={"HF_TOKEN": "hf_" + "x" * 34, "T2S_PUSH_TIMEOUT_S": value, "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert "T2S_PUSH_TIMEOUT_S=" in one_error_line(result, "t2s push") and "is not a number of seconds" in result.stderr
    assert not (root / "push.done").exists() and not (root / "push").exists()


def test_ask_reading_stdin_or_arguments_that_are_not_utf8_is_one_line(tmp_path):
    command = [sys.executable, "-m", "jobs.cli", "ask", "--model", "org/never-loaded", "--schema",
               "CREATE TABLE t (a INTEGER)"]
    piped = subprocess.run([*command, "-"], input=b"How many?\n\xff\xfe rows?\n", capture_output=True, cwd=tmp_path,
                           timeout=120)
    result = subprocess.CompletedProcess(piped.args, piped.returncode, piped.stdout.decode(),
                                         piped.stderr.decode(errors="replace"))
    assert "stdin is not UTF-8 text (byte 10)" in one_error_line(result, "t2s ask")
    argument = subprocess.run([*command, os.fsdecode(b"How many \xff?")], capture_output=True, text=True, cwd=tmp_path,
                              timeout=120, errors="replace")
    assert "the question is not UTF-8 text" in one_error_line(argument, "t2s ask")


@pytest.mark.parametrize("command", ["t2s", "t2s-infra"])
def test_an_error_line_cannot_drive_the_terminal(tmp_path, command):
    """A name the user (or a file) supplied comes back in the error line: its escape sequences are written as text."""
    hostile = tmp_path / "x\x1b]52;c;cHduZWQ=\x07\x1b[2J\u202ey.yaml"  # clipboard write, clear screen, RTL override
    args = ["launch", "--config", str(hostile), "--yes"] if command == "t2s-infra" else ["prep", "--config", str(hostile)]
    result = subprocess.run([sys.executable, "-m", "infra.cli" if command == "t2s-infra" else "jobs.cli", *args],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "RUNPOD_API_KEY": "", "HF_TOKEN": ""})
    line = one_error_line(result, f"{command} {args[0]}")
    assert not any(ord(ch) < 0x20 or ch in "\x7f\u202e" for ch in line), repr(line)
    assert "x\\x1b]52;c;cHduZWQ=\\x07\\x1b[2J\\u202ey.yaml" in line, line
