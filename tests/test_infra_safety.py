"""Issue 31 (nothing paid for is lost) and issue 24 (checks before money is spent, hints that run), on the
launcher: against the fake RunPod (tests/fake_runpod.py) and the fake Hub (tests/fake_hub.py: FakeHub, or its LocalHub).
Each test failed on the code before these fixes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from infra import cli as infra_cli
from infra import records
from infra import timing as timing_module
from infra import watchdog
from infra.cli import app
from tests.fake_hub import LocalHub
from tests.fake_runpod import FAST_TIMING, FakeRunPod
from tests.test_infra_pods import API_KEY, CONFIG, HF_TOKEN
from tests.test_entrypoints import box, stubbed  # noqa: F401 (fixtures)
from tests.test_infra_preflight import HF_TOKEN as PREFLIGHT_TOKEN, launch, one_error, world  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def pods(tmp_path, monkeypatch):
    """The fake RunPod with scripted pods and a LocalHub, as tests/test_infra_pods.py's `fake`, both returned."""
    server = FakeRunPod(api_key=API_KEY).start()
    monkeypatch.chdir(tmp_path)
    for name, value in {"RUNPOD_API_BASE_URL": server.url, "RUNPOD_API_KEY": API_KEY, "HF_TOKEN": HF_TOKEN,
                        "T2S_STATE_DIR": str(tmp_path / "state")}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("RUNPOD_POD_ID", raising=False)
    monkeypatch.delenv("T2S_LOGS_REPO", raising=False)
    monkeypatch.setattr(timing_module, "TIMING", FAST_TIMING)
    hub = LocalHub(tmp_path / "hub").install(monkeypatch)
    Path("run.yaml").write_text(CONFIG)
    yield server, hub
    for pod in server.live_pods():
        pod.terminated = True
    server.stop()


def infra(*args: str, input: str | None = None):
    return CliRunner().invoke(app, list(args), input=input, catch_exceptions=False)


def errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if "error:" in line]


# --- issue 24 item 13: the model and the dataset are readable before any pod exists -------------------------


def test_a_gated_or_missing_base_model_or_dataset_is_refused_before_any_pod(world):
    runpod, hub = world
    hub.add_repo("meta/llama", private=False)
    hub.gated[("model", "meta/llama")] = set()  # gated, and alice was not granted access
    hub.add_repo("bob/secret-sql", "dataset", private=True)  # private to bob
    hub.add_repo("alice/sql", "dataset", private=True)  # alice's own private dataset
    gated = launch("--set", "model.name_or_path=meta/llama", "--yes")
    assert gated.exit_code == 2
    assert one_error(gated).endswith("model.name_or_path meta/llama is a gated model that HF_TOKEN's user alice has "
                                     "not been granted: ask for access at https://huggingface.co/meta/llama (the "
                                     "pod downloads it with this token), then launch again")
    assert "podFindAndDeployOnDemand" not in runpod.operations()
    assert "no such model on the Hub" in one_error(launch("--set", "model.name_or_path=nobody/nothing", "--yes"))
    assert "model.tokenizer nobody/tok: no such model" in one_error(
        launch("--set", "model.tokenizer=nobody/tok", "--yes"))
    private = one_error(launch("--set", "data.source=bob/secret-sql", "--yes"))
    assert "data.source bob/secret-sql: no such dataset on the Hub, or a private one HF_TOKEN (alice) cannot read" \
        in private
    assert runpod.calls == []  # every refusal before RunPod was asked anything
    hub.gated[("model", "meta/llama")].add(PREFLIGHT_TOKEN)  # access granted
    checked = launch("--set", "model.name_or_path=meta/llama", "--set", "data.source=alice/sql", "--dry-run")
    assert checked.exit_code == 0, checked.output
    assert "✓ model.name_or_path meta/llama: on the Hub, readable with HF_TOKEN" in checked.stderr
    assert "✓ data.source alice/sql: on the Hub, readable with HF_TOKEN" in checked.stderr
    assert hub.count("GET", r"/api/models/meta/llama/auth-check") == 2  # refused, then readable


# --- issue 24 item 14: --dry-run ---------------------------------------------------------------------------


def test_dry_run_shows_the_plan_and_the_checks_and_neither_asks_nor_creates(world, monkeypatch):
    runpod, _ = world
    monkeypatch.setattr(infra_cli, "_interactive", lambda: True)  # at a terminal: it would ask, and must not
    result = launch("--dry-run")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert lines[0] == "t2s-infra: plan for run r1: prep → train → merge → eval → push on one pod"
    assert "t2s-infra: checks passed:" in lines
    for check in ("config and --set valid; --job pipeline leaves the model on the Hub",
                  "HF_TOKEN: a write token of alice that may write to alice/t2s-r1 and alice/t2s-runs",
                  "model.name_or_path tiny: built in, made on the pod (not looked up)",
                  "data.source synthetic: built in, made on the pod (not looked up)",
                  "RUNPOD_API_KEY accepted; RunPod knows NVIDIA L4"):
        assert f"t2s-infra:   ✓ {check}" in lines, result.stderr
    assert lines[-1].startswith("t2s-infra: dry run: every check passed; nothing was asked and no pod was created")
    assert "launch it?" not in result.output
    assert "podFindAndDeployOnDemand" not in runpod.operations() and not records.records_path().exists()
    # ... and a dry run that fails a check fails as a launch does.
    assert "--job train leaves its output" in one_error(launch("--dry-run", "--job", "train"))


def test_make_passes_dry_run_and_yes_and_has_follow_and_ls():
    def planned(*args: str) -> str:
        return subprocess.run(["make", "-n", "--no-print-directory", "-o", ".venv/.installed", *args], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout

    assert ".venv/bin/t2s-infra launch --config c.yaml" in planned("launch-train", "CONFIG=c.yaml", "DRY_RUN=1")
    # the recipe builds the command as a bash array (SET_FILE's lines join it): --dry-run is its last word
    command = re.search(r"command=\((.*?)\);", planned("launch-train", "CONFIG=c.yaml", "DRY_RUN=1"), re.S)
    assert command and command.group(1).split()[-1] == "--dry-run"
    assert ".venv/bin/t2s-infra logs --follow r1" in planned("follow", "RUN=r1")
    assert ".venv/bin/t2s-infra ls" in planned("ls")
    assert planned("down", "RUN=r1", "YES=1").rstrip().endswith(".venv/bin/t2s-infra down r1 --yes")


# --- issue 24 item 15 and issue 31 item 3: down asks, and the logs survive it ---------------------------------


def test_down_asks_first_keeps_the_pods_log_and_logs_tells_what_exists(pods, monkeypatch):
    server, hub = pods
    server.faults.job_lines = 10_000
    hub.client(HF_TOKEN).create_repo("someone/t2s-runs", repo_type="dataset", private=True)
    assert infra("launch", "--config", "run.yaml", "--job", "train", "--no-follow", "--yes").exit_code == 0
    [pod] = server.live_pods()
    running = infra("logs", "demo")  # nothing uploaded yet, and the pod still runs: says so
    assert errors(running)[0].startswith("t2s-infra logs: error: Hub dataset someone/t2s-runs has no logs of run "
                                         "demo yet: its job uploads them when it ends, and it is still running; now: "
                                         "`t2s-infra logs --follow demo` (make follow RUN=demo)")

    scripted = infra("down", "demo")  # CliRunner's stdin is no terminal: never waits, never terminates
    assert scripted.exit_code == 2 and errors(scripted) == [
        "t2s-infra down: error: stdin is not a terminal, so nothing can be asked: pass --yes to terminate 1 pod(s) "
        "(make down RUN=demo YES=1)"]
    monkeypatch.setattr(infra_cli, "_interactive", lambda: True)
    declined = infra("down", "demo", input="n\n")
    assert declined.exit_code == 1 and "nothing was terminated" in declined.stderr
    assert f"pod {pod.id}: run demo, job train, running" in declined.stderr
    assert server.live_pods() == [pod] and "podTerminate" not in server.operations()

    accepted = infra("down", "demo", input="y\n")
    assert accepted.exit_code == 0, accepted.output
    kept = Path(f"runs/demo/logs/pod-{pod.id}-down.log")
    assert f"terminated pod {pod.id}" in accepted.stderr and f"its log as RunPod kept it" in accepted.stderr
    assert str(kept) in accepted.stderr and server.live_pods() == []
    assert kept.read_text().splitlines()[:3] == ["train line 1/10000", "train line 2/10000", "train line 3/10000"]

    ended = infra("logs", "demo")  # the pod never uploaded: said, with what this machine kept
    assert errors(ended) == [f"t2s-infra logs: error: Hub dataset someone/t2s-runs has no logs of run demo: its pod "
                             f"{pod.id} ended (stopped: t2s-infra down) without uploading them; kept on this "
                             f"machine: {kept}"]


def test_down_terminates_even_where_the_pods_log_cannot_be_kept(pods):
    server, _ = pods
    server.faults.job_lines = 100
    assert infra("launch", "--config", "run.yaml", "--job", "train", "--no-follow", "--yes").exit_code == 0
    [pod] = server.live_pods()
    Path("not-a-folder").write_text("")
    result = infra("down", "demo", "--yes", "--runs-dir", "not-a-folder")
    assert result.exit_code == 0, result.output
    assert f"could not keep pod {pod.id}'s log in not-a-folder/demo/logs/pod-{pod.id}-down.log" in result.stderr
    assert f"terminated pod {pod.id}" in result.stderr and server.live_pods() == []


def test_ctrl_c_on_watch_is_not_an_error(pods, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(watchdog, "watch", interrupted)
    result = infra("watch")
    assert result.exit_code == 0 and errors(result) == [] and "Traceback" not in result.output
    assert result.stderr.splitlines()[-1] == ("t2s-infra: stopped watching; the pods keep running and stop themselves "
                                              "at their caps (t2s-infra ls shows them)")


# --- issue 24 item 5: the next steps printed are commands that run ---------------------------------------------


def test_next_steps_name_the_command_as_it_was_run_and_the_report_where_it_will_be(pods, monkeypatch):
    """Through make, t2s-infra is .venv/bin/t2s-infra and not on PATH: a bare `t2s-infra ...` would not run."""
    server, _ = pods
    script = Path(".venv/bin/t2s-infra")
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    monkeypatch.setattr(sys, "argv", [str(script)])
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    detached = infra("launch", "--config", "run.yaml", "--job", "train", "--no-follow", "--yes")
    assert detached.exit_code == 0, detached.output
    assert ("follow: .venv/bin/t2s-infra logs --follow demo (make follow RUN=demo) · stop: .venv/bin/t2s-infra down "
            "demo") in detached.stderr
    for pod in server.live_pods():
        pod.terminated = True
    # A pod that outlives its exit line a while, so that a follower slowed by a loaded machine still sees the line.
    server.faults.terminate_after_exit_s = 3
    Path("run.yaml").write_text(CONFIG.replace("run_id: demo", "run_id: demo\nruns_dir: elsewhere"))
    followed = infra("launch", "--config", "run.yaml", "--yes")  # the pipeline: its pod prints `report: runs/...`
    assert followed.exit_code == 0, followed.output
    assert followed.stderr.splitlines()[-1].endswith(
        " is gone. Logs, metrics, report: .venv/bin/t2s-infra logs demo (make logs RUN=demo); report: "
        "runs/demo/eval/report.md once fetched")  # where `make logs` puts it, whatever runs_dir is on the pod


# --- issue 31 item 4: Ctrl-C just after RunPod made the pod ------------------------------------------------------


def interrupt_when_the_pod_id_is_recorded(monkeypatch) -> None:
    """Ctrl-C as RunPod's answer (the pod's id) came back, before the launch record holds it."""
    original, fired = records.update, []

    def update(launch, **changes):
        if changes.get("status") == "provisioning" and not fired:
            fired.append(True)
            raise KeyboardInterrupt
        return original(launch, **changes)

    monkeypatch.setattr(records, "update", update)


def test_ctrl_c_right_after_the_pod_was_made_ends_it_by_its_recorded_name(pods, monkeypatch):
    server, _ = pods
    server.faults.job_lines = 10_000
    interrupt_when_the_pod_id_is_recorded(monkeypatch)
    result = infra("launch", "--config", "run.yaml", "--job", "train", "--yes")
    assert result.exit_code == 2
    assert errors(result) == ["t2s-infra launch: error: interrupted while RunPod was creating the pod; any pod it "
                              "made is terminated"]
    [pod] = server.pods.values()
    assert f"terminated pod {pod.id}, created as Ctrl-C came" in result.stderr
    assert server.live_pods() == []
    [launch] = records.load_all()
    assert (launch.pod_id, launch.status) == (pod.id, "stopped")


def test_a_second_ctrl_c_while_squaring_the_first_says_the_pod_may_run_and_how_to_stop_it(pods, monkeypatch):
    from infra import runpod_api as api

    server, _ = pods
    server.faults.job_lines = 10_000
    update, pods_named = records.update, api.pods_named
    interrupt_when_the_pod_id_is_recorded(monkeypatch)

    def impatient(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "pods_named", impatient)
    result = infra("launch", "--config", "run.yaml", "--job", "train", "--yes")
    assert result.exit_code == 2
    [error] = errors(result)
    assert "no pod was created" not in error and "before any pod" not in error
    assert error == ("t2s-infra launch: error: interrupted while launching run demo: if RunPod made its pod, it runs "
                     "on; `t2s-infra down demo` finds it by its recorded name and stops it (`t2s-infra ls` shows it)")
    assert len(server.live_pods()) == 1  # as said: it runs on ...
    monkeypatch.setattr(records, "update", update)
    monkeypatch.setattr(api, "pods_named", pods_named)
    down = infra("down", "demo", "--yes")  # ... and down finds it by the name recorded before asking
    assert down.exit_code == 0, down.output
    assert server.live_pods() == [] and "terminated pod pod001fake" in down.stderr


# --- issue 31 item 5: what infra.env may set ----------------------------------------------------------------------


@pytest.mark.parametrize("name, value, why", [
    ("HF_ENDPOINT", "https://elsewhere.example", "redirects the pod's traffic (and HF_TOKEN with it)"),
    ("HTTPS_PROXY", "http://proxy.example:3128", "redirects the pod's traffic"),
    ("http_proxy", "http://proxy.example:3128", "redirects the pod's traffic"),
    ("ALL_PROXY", "socks5://proxy.example", "redirects the pod's traffic"),
    ("REQUESTS_CA_BUNDLE", "/tmp/mine.pem", "redirects the pod's traffic"),
    ("PYTHONPATH", "/tmp/mine", "loads code into the job or the entrypoint"),
    ("PYTHONSTARTUP", "/tmp/mine.py", "loads code into the job or the entrypoint"),
    ("LD_PRELOAD", "/tmp/mine.so", "loads code into the job or the entrypoint"),
    ("BASH_ENV", "/tmp/mine.sh", "loads code into the job or the entrypoint"),
    ("PATH", "/nonexistent", "is what the entrypoint, the pod's caps and its self-terminate run on"),
    ("HOME", "/nonexistent", "is what the entrypoint, the pod's caps and its self-terminate run on"),
    ("HF_HUB_OFFLINE", "offline", "is what the entrypoint, the pod's caps and its self-terminate run on"),
])
def test_infra_env_may_not_redirect_traffic_load_code_or_break_the_runner(world, name, value, why):
    runpod, hub = world
    result = launch("--set", f"infra.env.{name}={value}", "--yes")
    assert result.exit_code == 2
    error = one_error(result)
    assert f"config key 'infra.env' in --set infra.env.{name}: {name} {why}" in error
    assert "a pod's environment may not set it" in error
    assert runpod.calls == [] and hub.requests == []  # refused before any network call


def test_the_jobs_own_settings_reach_the_pod(pods):
    server, _ = pods
    config = Path("run.yaml")
    config.write_text(CONFIG + "  env: {DS_ACCELERATOR: cpu, NCCL_DEBUG: INFO, PYTORCH_CUDA_ALLOC_CONF: "
                               "'expandable_segments:True', TOKENIZERS_PARALLELISM: 'false'}\n")
    result = infra("launch", "--config", str(config), "--job", "train", "--no-follow", "--yes")
    assert result.exit_code == 0, result.output
    [pod] = server.pods.values()
    assert (pod.env["DS_ACCELERATOR"], pod.env["NCCL_DEBUG"], pod.env["TOKENIZERS_PARALLELISM"]) == (
        "cpu", "INFO", "false")


# --- issue 31 item 3, on the pod: a stop from outside uploads the logs before a kill can come ---------------------


SLOW_TO_STOP = """#!/usr/bin/env bash
# A job that takes 2 s to checkpoint after SIGTERM (a kill may come first).
printf '%s\\n' "$*" >> "$STUB_DIR/t2s.calls"
trap 'echo "checkpointing"; sleep 2; echo "checkpointed"; exit 143' TERM
touch "$STUB_DIR/t2s.started"
sleep 60 & wait $!
"""


def test_a_stop_from_outside_uploads_the_logs_while_the_job_still_checkpoints(stubbed):
    import signal
    import time

    from tests.test_entrypoints import ENTRYPOINTS, _write_exe

    _write_exe(stubbed.stubs / "t2s", SLOW_TO_STOP)
    stubbed.prepped(stubbed.work / "runs/r1")
    process = subprocess.Popen([str(ENTRYPOINTS / "run-job"), "train"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**stubbed.env, "T2S_CONFIG_YAML": "run_id: r1\n",
                                               "RUNPOD_POD_ID": "pod-123", "T2S_TERM_UPLOAD_S": "0.3"})
    try:
        deadline = time.monotonic() + 30
        while not (stubbed.stubs / "t2s.started").exists():
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)  # docker stop, RunPod ending the pod
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, out + err
    # The logs went up while the job was still checkpointing, then again, complete, at the exit.
    assert stubbed.calls("infra") == ["upload-logs runs/r1", "upload-logs runs/r1 --exit-code 143",
                                      "self-terminate --exit-code 143"]
    assert "still stopping 0.3s after SIGTERM: uploading its logs so far" in out
