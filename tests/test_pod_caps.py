"""The pod's own caps (entrypoints/lib.sh with infra/caps.py): past its runtime or cost cap the job is stopped,
then killed if it will not stop, and the reason reaches the log, the uploaded end record and the last line.

Run with the stub `t2s` and `t2s-infra` of tests/test_entrypoints.py, so that seconds stand for hours.
"""

from __future__ import annotations

import os
import time

import psutil

from tests.test_entrypoints import ROOT, _write_exe, box, stubbed  # noqa: F401 (fixtures)

RUNTIME_REASON = "stopped by the pod's runtime cap (infra.max_runtime_min=0.02)"


def run_capped(entry, **env):
    entry.prepped(entry.work / "runs/r1")  # so that train runs alone
    return entry.run("train", T2S_CONFIG_YAML="run_id: r1\n", RUNPOD_POD_ID="pod-123", PYTHONPATH=str(ROOT),
                   timeout=60, **env)


def test_past_the_runtime_cap_the_job_is_stopped_and_the_pod_says_why(stubbed):
    started = time.monotonic()
    result = run_capped(stubbed, T2S_MAX_RUNTIME_MIN="0.02", STUB_T2S_SLEEP="60", STUB_T2S_TERM_RC="143")
    assert result.returncode == 143, result.stdout + result.stderr
    assert time.monotonic() - started < 20
    assert (stubbed.stubs / "t2s.terminated").exists()  # SIGTERM: the job checkpointed and stopped
    assert stubbed.calls("infra") == [f"upload-logs runs/r1 --exit-code 143 --reason {RUNTIME_REASON}",
                                      f"self-terminate --exit-code 143 --reason {RUNTIME_REASON}"]
    log = stubbed.log(stubbed.work / "runs/r1", "train")
    assert "the job is stopped after 1s if still running: the pod's runtime cap" in log
    assert f"{RUNTIME_REASON}: stopping the job (SIGTERM)" in log
    assert "t2s train exited with code 143" in log


def test_past_the_cost_cap_the_job_is_stopped(stubbed):
    # $0.001 at $3.6/h: one second.
    result = run_capped(stubbed, T2S_MAX_RUNTIME_MIN="240", T2S_MAX_COST_USD="0.001", T2S_COST_PER_HOUR_USD="3.6",
                        STUB_T2S_SLEEP="60", STUB_T2S_TERM_RC="143")
    assert result.returncode == 143
    reason = "stopped by the pod's cost cap (infra.max_cost_usd=0.001 at $3.6/h)"
    assert stubbed.calls("infra")[-1] == f"self-terminate --exit-code 143 --reason {reason}"


def test_a_job_that_ignores_sigterm_is_killed_after_the_grace(stubbed):
    _write_exe(stubbed.stubs / "t2s", "#!/usr/bin/env bash\ntrap '' TERM\necho stubborn\nsleep 60 & wait $!\n"
                                      "sleep 60 & wait $!\n")
    started = time.monotonic()
    result = run_capped(stubbed, T2S_MAX_RUNTIME_MIN="0.02", T2S_CAP_GRACE_S="1")
    assert result.returncode == 137  # SIGKILL
    assert time.monotonic() - started < 20
    log = stubbed.log(stubbed.work / "runs/r1", "train")
    assert f"{RUNTIME_REASON}: the job was still running 1s later: killed it" in log
    assert stubbed.calls("infra")[-1] == f"self-terminate --exit-code 137 --reason {RUNTIME_REASON}"
    _kill_stub_sleepers(stubbed)


def test_a_job_that_ends_before_its_cap_ends_as_usual_and_leaves_no_timer(stubbed):
    result = run_capped(stubbed, T2S_MAX_RUNTIME_MIN="10")
    assert result.returncode == 0, result.stderr
    assert stubbed.calls("infra") == ["upload-logs runs/r1 --exit-code 0", "self-terminate --exit-code 0"]
    time.sleep(0.5)
    assert _stub_sleepers(stubbed, "600") == []  # the timer's sleep went with it


def test_a_cap_that_is_not_a_number_is_a_warning_and_the_job_runs(stubbed):
    result = run_capped(stubbed, T2S_MAX_RUNTIME_MIN="ten")
    assert result.returncode == 0
    assert "warning: the pod's caps are not armed: T2S_MAX_RUNTIME_MIN='ten' is not a number" in result.stdout
    assert stubbed.calls("t2s") == ["train --config runs/r1/config.env.yaml"]


def _stub_sleepers(entry, seconds: str | None = None) -> list:
    """`sleep` processes started under this box (its STUB_DIR is in their environment)."""
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        try:
            if process.info["name"] == "sleep" and process.environ().get("STUB_DIR") == str(entry.stubs) and (
                    seconds is None or process.info["cmdline"][-1] == seconds):
                found.append(process)
        except psutil.Error:
            pass
    return found


def _kill_stub_sleepers(entry) -> None:
    for process in _stub_sleepers(entry):
        try:
            os.kill(process.pid, 9)
        except OSError:
            pass

