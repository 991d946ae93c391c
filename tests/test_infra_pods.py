"""t2s-infra against a fake RunPod (tests/fake_runpod.py): launch, follow, faults, clean-up.

Every scenario ends with no pod left on the fake (nothing billing) and exactly one line telling the user
how it ended. The CLI runs in-process; waits are made tiny through infra.launch.TIMING.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

import yaml

from tests.fake_hub import LocalHub
from tests.fake_runpod import FAST_TIMING as FAST, FakeRunPod
from infra import launch as launching
from infra import records
from infra import timing as timing_module
from infra.cli import app

API_KEY = "rpa_SECRETKEY0123456789"
HF_TOKEN = "hf_SECRETTOKEN0123456789"

CONFIG = """\
run_id: demo
# two processes: two GPUs per pod (infra.gpu_count follows train.accelerate_config)
train:
  learning_rate: 1e-4
  accelerate_config: ddp
eval:
  prompt_variants: [plain]
push:
  hardware: 'a "quoted": colon'
infra:
  gpu_types: ["NVIDIA L4", "NVIDIA RTX A5000"]
  logs_repo: someone/t2s-runs
  provision_timeout_s: 2
  capacity_rounds: 2
  max_runtime_min: 5
  max_cost_usd: 5
  network_volume_id: vol1  # a job alone (--job train) keeps its output only there (issue 31)
"""


@pytest.fixture
def fake(tmp_path, monkeypatch):
    server = FakeRunPod(api_key=API_KEY).start()
    monkeypatch.chdir(tmp_path)  # runs/ and .env are looked up here
    monkeypatch.setenv("RUNPOD_API_BASE_URL", server.url)  # the SDK reads it on every call
    monkeypatch.setenv("RUNPOD_API_KEY", API_KEY)
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    monkeypatch.setenv("T2S_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("RUNPOD_POD_ID", raising=False)
    monkeypatch.delenv("T2S_LOGS_REPO", raising=False)
    monkeypatch.setattr(timing_module, "TIMING", FAST)
    hub = LocalHub(tmp_path / "hub").install(monkeypatch)  # never the real Hub
    yield server
    server.stop()


def write_config(text: str = CONFIG, **infra_lines: str) -> Path:
    extra = "".join(f"  {key}: {value}\n" for key, value in infra_lines.items())
    path = Path("run.yaml")
    path.write_text(text + extra)
    return path


def t2s_infra(*args: str):
    if args and args[0] in ("launch", "down"):
        args = (*args, "--yes")  # CliRunner's stdin is no terminal: launch and down ask nothing without --yes
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def outcome_lines(result) -> list[str]:
    """The lines that tell the user how a command ended (errors, success, detach)."""
    pattern = re.compile(r"error:|succeeded|detached from run|is kept")
    return [line for line in result.stderr.splitlines() if pattern.search(line)]


def assert_one_message(result, *fragments: str) -> str:
    lines = outcome_lines(result)
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_launch_follows_the_job_to_its_end_and_leaves_nothing_running(fake):
    config = write_config()
    result = t2s_infra("launch", "--job", "train", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert_one_message(result, "run demo: job train succeeded", "t2s-infra logs demo")
    shown = result.stdout.splitlines()
    assert shown[:6] == [f"train line {i}/6" for i in range(1, 7)]
    assert re.match(r"t2s-infra: job exited with code 0", shown[6])
    assert fake.live_pods() == []
    pod = next(iter(fake.pods.values()))
    assert pod.name.startswith("t2s-demo-train-") and pod.gpu == "NVIDIA L4" and pod.gpu_count == 2
    # The resolved config, multi-line, quotes and all, through GraphQL; the derived names filled in.
    sent = yaml.safe_load(pod.env["T2S_CONFIG_YAML"])
    assert (sent["run_id"], sent["train"]["learning_rate"], sent["runs_dir"]) == ("demo", 1e-4, "runs")
    assert sent["push"]["hardware"] == 'a "quoted": colon' and sent["push"]["cost_per_hour_usd"] == 0.86
    assert sent["push"]["repo_id"] == "someone/t2s-demo" and sent["infra"]["logs_repo"] == "someone/t2s-runs"
    assert sent["infra"]["gpu_count"] == 2 and sent["infra"]["image"] == "ghcr.io/t2s/t2s:pipeline-cu12"
    assert pod.env["T2S_JOB"] == "train" and pod.env["HF_TOKEN"] == HF_TOKEN
    assert "RUNPOD_API_KEY" not in pod.env  # RunPod gives the pod its own, pod-scoped key
    assert pod.env["T2S_LOGS_REPO"] == "someone/t2s-runs" and pod.env["T2S_KEEP_POD"] == "0"
    assert (pod.env["T2S_MAX_RUNTIME_MIN"], pod.env["T2S_MAX_COST_USD"], pod.env["T2S_COST_PER_HOUR_USD"]) == (
        "5", "5", "0.86")
    [launch] = records.load_all()
    assert (launch.status, launch.pod_id, launch.gpu_count, launch.cost_per_hr) == ("succeeded", pod.id, 2, 0.86)
    assert launch.note == "exit 0"  # the pod terminated itself, as the entrypoint does
    assert Path(f"runs/demo/logs/pod-{pod.id}.log").read_text().splitlines() == shown[:7]



def test_no_capacity_falls_back_to_the_next_gpu_type(fake):
    fake.faults.capacity["NVIDIA L4"] = 0
    result = t2s_infra("launch", "--job", "train", "--config", str(write_config()))
    assert result.exit_code == 0, result.output
    assert_one_message(result, "succeeded")
    assert "no 2x NVIDIA L4 free" in result.stderr
    assert [pod.gpu for pod in fake.pods.values()] == ["NVIDIA RTX A5000"]
    assert records.load_all()[0].gpu == "NVIDIA RTX A5000"
    assert fake.live_pods() == []


def test_no_capacity_anywhere_retries_the_list_with_backoff_then_says_what_to_do(fake):
    fake.faults.capacity.update({"NVIDIA L4": 0, "NVIDIA RTX A5000": 0})
    result = t2s_infra("launch", "--job", "train", "--config", str(write_config()))
    assert result.exit_code == 2
    assert_one_message(result, "t2s-infra launch: error: could not get 2x any of NVIDIA L4, NVIDIA RTX A5000",
                       "after 4 tries", "infra.cloud_type: ALL")
    assert fake.operations().count("podFindAndDeployOnDemand") == 4  # 2 types x capacity_rounds 2
    assert "trying NVIDIA L4, NVIDIA RTX A5000 again in" in result.stderr
    assert fake.pods == {} and records.load_all() == []


def test_a_rejected_api_key_is_one_line_and_creates_nothing(fake, monkeypatch):
    monkeypatch.setenv("RUNPOD_API_KEY", "rpa_WRONGKEY0123456789")
    result = t2s_infra("launch", "--job", "train", "--config", str(write_config()))
    assert result.exit_code == 2
    assert_one_message(result, "RunPod refused the API key (HTTP 401)", "check RUNPOD_API_KEY")
    assert "rpa_WRONGKEY" not in result.output
    assert fake.pods == {}


def test_a_server_error_on_create_uses_the_pod_it_made_anyway_or_else_retries(fake):
    fake.faults.http500_on_create = 1
    fake.faults.create_despite_500 = True  # the pod exists, but its id never reached us
    result = t2s_infra("launch", "--job", "train", "--config", str(write_config()))
    assert result.exit_code == 0, result.output
    assert_one_message(result, "succeeded")
    assert "unreadable response" in result.stderr and "but RunPod did make pod pod001fake" in result.stderr
    assert len(fake.pods) == 1 and fake.live_pods() == []  # found by its recorded name, followed, not re-made
    [launch] = records.load_all()
    assert (launch.pod_id, launch.status) == ("pod001fake", "succeeded") and launch.pod_name.startswith("t2s-demo-")

    fake.faults.http500_on_create, fake.faults.create_despite_500 = 1, False  # this time no pod was made
    again = t2s_infra("launch", "--job", "train", "--config", str(write_config()))
    assert again.exit_code == 0, again.output
    assert "RunPod made no pod (t2s-demo-train-" in again.stderr and "will retry" in again.stderr
    assert len(fake.pods) == 2 and fake.live_pods() == []
    assert [launch.status for launch in records.load_all()] == ["succeeded", "succeeded"]  # the miss is not listed


def test_slow_provisioning_is_waited_for(fake):
    fake.faults.start_after_s = 0.4  # runtime stays null while the image pulls
    result = t2s_infra("launch", "--job", "train", "--config", str(write_config()))
    assert result.exit_code == 0, result.output
    assert_one_message(result, "succeeded")
    assert fake.operations().count("pod") > 5 and fake.live_pods() == []


def test_a_pod_that_never_starts_is_terminated_at_the_provisioning_timeout(fake):
    fake.faults.never_start = True
    config = write_config(CONFIG.replace("provision_timeout_s: 2", "provision_timeout_s: 0.3"))
    result = t2s_infra("launch", "--job", "train", "--config", str(config))
    assert result.exit_code == 2
    assert_one_message(result, "did not start within 0.3s", "terminated it so it stops billing",
                       "infra.provision_timeout_s")
    assert fake.live_pods() == [] and "podTerminate" in fake.operations()
    [launch] = records.load_all()
    assert (launch.status, launch.note) == ("stopped", "provisioning timeout")


def test_ctrl_c_while_the_pod_starts_terminates_it(fake, monkeypatch):
    fake.faults.never_start = True

    def interrupt(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(launching, "time", SimpleNamespace(sleep=interrupt, monotonic=time.monotonic))
    result = t2s_infra("launch", "--job", "train", "--config", str(write_config()))
    assert result.exit_code == 2
    assert_one_message(result, "interrupted while pod pod001fake was starting; terminated it so it stops billing")
    assert fake.live_pods() == []


def test_a_dropped_stream_reconnects_without_repeating_a_line(fake):
    fake.faults.job_lines = 12
    fake.faults.drop_stream_after = 5  # mid-way through a pair of lines sharing one timestamp
    result = t2s_infra("launch", "--job", "train", "--config", str(write_config()))
    assert result.exit_code == 0, result.output
    assert_one_message(result, "succeeded")
    job_lines = [line for line in result.stdout.splitlines() if "line" in line]
    assert job_lines == [f"train line {i}/12" for i in range(1, 13)]
    assert next(iter(fake.pods.values())).stream_connections >= 2
    assert "reconnecting" in result.stderr and fake.live_pods() == []


def test_a_failed_job_is_reported_once_and_its_pod_is_gone(fake):
    fake.faults.exit_code = 3
    result = t2s_infra("launch", "--job", "train", "--config", str(write_config()))
    assert result.exit_code == 1
    assert_one_message(result, "error: run demo: job train failed with exit code 3", "t2s-infra logs demo")
    assert fake.live_pods() == []
    assert records.load_all()[0].status == "failed"


def test_a_pod_left_running_after_its_job_is_terminated_by_the_follower(fake):
    fake.faults.self_terminate = False  # a broken entrypoint: the job ended, the pod bills on
    result = t2s_infra("launch", "--job", "train", "--config", str(write_config()))
    assert result.exit_code == 0, result.output
    assert_one_message(result, "succeeded")
    assert fake.live_pods() == []
    assert records.load_all()[0].note == "exit 0; pod terminated by t2s-infra"


def test_the_watchdog_stops_a_run_past_its_cost_limit(fake):
    fake.faults.cost_per_hr_per_gpu = 1800.0  # 2 GPUs: $1 a second
    fake.faults.job_lines, fake.faults.line_every_s = 400, 0.01
    config = write_config(CONFIG.replace("max_cost_usd: 5", "max_cost_usd: 0.3"))
    result = t2s_infra("launch", "--job", "train", "--config", str(config))
    assert result.exit_code == 1
    assert_one_message(result, "error: run demo: stopped pod", "past infra.max_cost_usd=0.3", "pod-")
    assert fake.live_pods() == []
    assert records.load_all()[0].status == "stopped"


def test_the_watchdog_stops_a_run_past_its_runtime_limit(fake):
    fake.faults.job_lines, fake.faults.line_every_s = 400, 0.01
    config = write_config(CONFIG.replace("max_runtime_min: 5", "max_runtime_min: 0.005"))  # 0.3 s
    result = t2s_infra("launch", "--job", "train", "--config", str(config))
    assert result.exit_code == 1
    assert_one_message(result, "past infra.max_runtime_min=0.005")
    assert fake.live_pods() == []


def interrupt_after(monkeypatch, lines: int) -> None:
    """Ctrl-C in the follower after it has shown `lines` lines."""
    from infra import cli

    shown = []
    original = cli._PodLog.__call__

    def call(self, line):
        if len(shown) == lines:
            raise KeyboardInterrupt
        shown.append(line)
        original(self, line)

    monkeypatch.setattr(cli._PodLog, "__call__", call)


def test_ctrl_c_detaches_without_stopping_the_job_and_down_stops_it(fake, monkeypatch):
    fake.faults.job_lines = 300
    interrupt_after(monkeypatch, 3)
    result = t2s_infra("launch", "--job", "train", "--config", str(write_config()))
    assert result.exit_code == 130
    assert_one_message(result, "detached from run demo", "t2s-infra logs --follow demo", "t2s-infra down demo")
    assert len(fake.live_pods()) == 1  # the job goes on
    down = t2s_infra("down", "demo")
    assert down.exit_code == 0, down.output
    assert "terminated pod" in down.stderr
    assert fake.live_pods() == [] and records.load_all()[0].status == "stopped"


def test_after_detaching_logs_follow_reattaches_to_the_end(fake, monkeypatch):
    fake.faults.job_lines, fake.faults.line_every_s = 30, 0.01
    interrupt_after(monkeypatch, 2)
    assert t2s_infra("launch", "--job", "train", "--config", str(write_config())).exit_code == 130
    from infra import cli

    monkeypatch.setattr(cli._PodLog, "__call__", lambda self, line: print(line, flush=True))
    result = t2s_infra("logs", "--follow", "demo")
    assert result.exit_code == 0, result.output
    assert_one_message(result, "run demo: job train succeeded")
    assert result.stdout.splitlines()[-1].startswith("t2s-infra: job exited with code 0")
    assert fake.live_pods() == []


def test_no_follow_then_watch_once_stops_a_run_past_its_limit(fake):
    fake.faults.job_lines = 10_000
    config = write_config(CONFIG.replace("max_runtime_min: 5", "max_runtime_min: 0.003"))  # 0.18 s
    started = t2s_infra("launch", "--job", "train", "--config", str(config), "--no-follow")
    assert started.exit_code == 0, started.output
    assert "t2s-infra logs --follow demo" in started.stderr and len(fake.live_pods()) == 1
    time.sleep(0.25)
    result = t2s_infra("watch", "--once")
    assert result.exit_code == 0, result.output
    assert "stopped run demo" in result.stderr and "past infra.max_runtime_min=0.003" in result.stderr
    assert fake.live_pods() == []


def test_down_all_stops_only_pods_launched_from_here(fake):
    fake.faults.job_lines = 10_000
    assert t2s_infra("launch", "--job", "train", "--config", str(write_config()), "--no-follow").exit_code == 0
    foreign, by_hand = fake.add_pod("t2s-someone-else"), fake.add_pod("my-notebook")
    result = t2s_infra("down", "--all")
    assert result.exit_code == 0, result.output
    assert f"left pod {foreign} (t2s-someone-else) alone" in result.stderr
    assert {pod.id for pod in fake.live_pods()} == {foreign, by_hand}
    for pod in fake.live_pods():
        pod.terminated = True
    assert fake.live_pods() == []


def test_ls_shows_every_launch_and_notices_pods_that_are_gone(fake):
    fake.faults.job_lines = 10_000
    assert t2s_infra("launch", "--job", "train", "--config", str(write_config()), "--no-follow").exit_code == 0
    for pod in fake.live_pods():
        pod.terminated = True  # ended while nobody followed it
    result = t2s_infra("ls")
    assert result.exit_code == 0, result.output
    header, row = result.stdout.splitlines()
    assert header.split()[:4] == ["RUN", "JOB", "POD", "GPU"]
    assert "demo" in row and "2x NVIDIA L4" in row and "0.86" in row and "gone" in row
    assert fake.live_pods() == []


def test_self_terminate_does_nothing_off_runpod_or_when_the_pod_is_kept(fake, monkeypatch):
    fake.faults.job_lines = 10_000
    result = t2s_infra("self-terminate", "--exit-code", "0")
    assert result.exit_code == 0 and "nothing to terminate" in result.stderr
    pod_id, other = fake.add_pod("t2s-x-train-0000"), fake.add_pod("t2s-y-train-0000")
    monkeypatch.setenv("RUNPOD_POD_ID", pod_id)
    monkeypatch.setenv("RUNPOD_API_KEY", fake.pods[pod_id].api_key)  # the pod's own, as RunPod gives it
    monkeypatch.setenv("T2S_KEEP_POD", "1")
    kept = t2s_infra("self-terminate", "--exit-code", "1")
    assert kept.exit_code == 0
    assert kept.stdout == f"t2s-infra: job exited with code 1; leaving pod {pod_id} running (T2S_KEEP_POD=1)\n"
    assert len(fake.live_pods()) == 2
    monkeypatch.setenv("T2S_KEEP_POD", "0")
    # The pod-scoped key terminates its own pod and nothing else.
    monkeypatch.setenv("RUNPOD_POD_ID", other)
    refused = t2s_infra("self-terminate")
    assert refused.exit_code == 2 and "RunPod refused the API key" in refused.stderr
    assert len(fake.live_pods()) == 2 and fake.refused[0] == "podTerminate"
    monkeypatch.setenv("RUNPOD_POD_ID", pod_id)
    capped = t2s_infra("self-terminate", "--exit-code", "143", "--reason", "stopped by the pod's runtime cap (x)")
    assert capped.exit_code == 0, capped.output
    assert capped.stdout.splitlines()[-1] == (
        f"t2s-infra: job exited with code 143 — stopped by the pod's runtime cap (x); terminating pod {pod_id}")
    assert [pod.id for pod in fake.live_pods()] == [other] and fake.operations()[-1] == "podTerminate"
    fake.pods[other].terminated = True


def test_config_problems_are_one_line_and_reach_no_api(fake, monkeypatch):
    bad = t2s_infra("launch", "--job", "train", "--config", str(write_config(gpu_typo="2")))
    assert bad.exit_code == 2
    assert_one_message(bad, "unknown config key 'infra.gpu_typo' in run.yaml", "allowed here: image, gpu_types")
    secret_in_env = write_config(CONFIG.replace("infra:\n", "infra:\n  env: {HF_TOKEN: x}\n"))
    assert_one_message(t2s_infra("launch", "--job", "train", "--config", str(secret_in_env)),
                       "'infra.env' in run.yaml: HF_TOKEN is a secret")
    assert_one_message(t2s_infra("launch", "--job", "trian", "--config", str(write_config())),
                       "--job 'trian' is not a job")
    assert_one_message(t2s_infra("launch", "--job", "train", "--config", str(write_config()), "--gpu", "NVIDIA L5"),
                       "RunPod has no GPU type 'NVIDIA L5'")
    assert fake.operations() == ["gpuTypes"]
    fake.calls.clear()
    monkeypatch.delenv("RUNPOD_API_KEY")
    assert_one_message(t2s_infra("launch", "--job", "train", "--config", str(write_config())),
                       "RUNPOD_API_KEY is not set")
    assert fake.calls == []


def test_secrets_never_reach_any_output_or_file(fake, monkeypatch, tmp_path):
    fake.faults.job_says = f"oops, the job printed HF_TOKEN={HF_TOKEN}"
    outputs = [t2s_infra("launch", "--job", "train", "--config", str(write_config()))]
    fake.faults.exit_code = 1
    outputs.append(t2s_infra("launch", "--job", "train", "--config", str(write_config())))
    outputs += [t2s_infra("ls"), t2s_infra("down", "demo"), t2s_infra("logs", "--follow", "demo", "--repo", "x/y")]
    fake.faults.never_start = True
    outputs.append(t2s_infra("launch", "--job", "prep", "--config",
                             str(write_config(CONFIG.replace("provision_timeout_s: 2", "provision_timeout_s: 0.1")))))
    monkeypatch.setenv("RUNPOD_API_KEY", "rpa_OTHERSECRET999")
    outputs.append(t2s_infra("launch", "--job", "train", "--config", str(write_config())))
    text = "".join(result.output for result in outputs)
    assert "<HF_TOKEN>" in text  # the job's line was shown, redacted
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert any(path.name == "launches.jsonl" for path in files) and any(path.suffix == ".log" for path in files)
    for secret in (API_KEY, HF_TOKEN, "rpa_OTHERSECRET999"):
        assert secret not in text
        for path in files:
            assert secret not in path.read_text(errors="replace"), path
    assert fake.live_pods() == []


def test_an_image_runpod_cannot_pull_is_caught_when_runpod_stops_the_pod(fake):
    fake.faults.pullable = set()  # RunPod fetches, gives up and stops the pod, naming no reason
    config = write_config(CONFIG.replace("provision_timeout_s: 2", "provision_timeout_s: 60"))
    started = time.monotonic()
    result = t2s_infra("launch", "--job", "train", "--config", str(config))
    assert result.exit_code == 2
    message = assert_one_message(result, "pod pod001fake cannot start: RunPod stopped the pod before its container "
                                         'started ("Exited by Runpod:', "ghcr.io/t2s/t2s:pipeline-cu12",
                                 "terminated it so it stops billing: check infra.image")
    assert "Traceback" not in message and time.monotonic() - started < 10  # not the provisioning timeout
    assert "RunPod: create container: still fetching image ghcr.io/t2s/t2s:pipeline-cu12" in result.stderr
    assert fake.live_pods() == [] and "podTerminate" in fake.operations()
    assert records.load_all()[0].status == "stopped"
    assert len(fake.pods) == 1  # no retry on another GPU type: the image, not the GPU, is the problem


def test_a_pull_error_in_runpods_system_log_ends_the_wait_at_once(fake):
    fake.faults.pullable = set()
    fake.faults.stop_unpullable_after_s = 3600  # RunPod would keep trying; its log already says why
    fake.faults.pull_error_line = ("create container: error pulling image: Error response from daemon: manifest for "
                                   "ghcr.io/t2s/t2s:pipeline-cu12 not found: manifest unknown")
    result = t2s_infra("launch", "--job", "train", "--config", str(write_config()))
    assert result.exit_code == 2
    assert_one_message(result, "cannot start: RunPod cannot pull image ghcr.io/t2s/t2s:pipeline-cu12 (its log: "
                               "create container: error pulling image", "manifest unknown")
    assert fake.live_pods() == []
