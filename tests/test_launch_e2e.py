"""`make launch-train` as a user runs it, end to end, against a pod simulator on this machine.

The user's side is a checkout with a .env (HF_TOKEN, RUNPOD_API_KEY) and a config; `make launch-train` and
`make logs` run through make, as typed. RunPod is tests/fake_runpod.py with real pods: each pod runs the image
under Docker (T2S_POD_IMAGE set and DOCKER_HOST answering, as `make image-smoke` runs this file) or else
entrypoints/run-job as a local process, with the environment RunPod gives a pod. The Hub is tests/fake_hub.py
on 127.0.0.1, which the pod reaches too. The jobs are the real ones, on the built-in tiny model, on the CPU.

Every scenario ends with no pod on the fake and nothing of a container left, and the secrets in no file and
no line of output.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.fake_hub import FakeHub
from tests.fake_runpod import FakeRunPod

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
HF_TOKEN = "hf_E2Esecret0123456789abcdefABCDEF"
RUNPOD_KEY = "rpa_E2Esecret0123456789ABCDEFabcdef"
USER = "alice"
# The flavor of the pods' image (images/smoke.sh runs this file once per flavor; cu12 is the launcher's default).
POD_FLAVOR = os.environ.get("T2S_POD_FLAVOR", "cu12")
IMAGE = f"ghcr.io/t2s/t2s:pipeline-{POD_FLAVOR}"  # as `make push-images` publishes it
POD_TIMEOUT_S = 600

RUN_CONFIG = {  # the tiny model on synthetic rows: the whole pipeline in about 30 s on a laptop CPU
    "run_id": "e2e",
    "model": {"name_or_path": "tiny"},
    "data": {"source": "synthetic", "synthetic_rows": 400, "max_length": 256},
    "train": {"method": "lora", "max_steps": 6, "per_device_batch_size": 8, "packing": "none", "logging_steps": 2,
              "learning_rate": 3e-3, "early_stopping_patience": None,
              "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "modules_to_save": ["embed_tokens", "lm_head"]}},
    "eval": {"models": ["base", "merged"], "max_examples": 12, "batch_size": 6, "max_new_tokens": 24},
    "push": {"enforce_gates": False},  # 6 steps of a tiny model: below push.gates, published here all the same
}


def pod_image() -> str | None:
    """The image to run pods from, when a Docker engine answers; else None (pods are local processes)."""
    image = os.environ.get("T2S_POD_IMAGE")
    if not image:
        return None
    try:
        answered = subprocess.run(["docker", "image", "inspect", image], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if answered.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"T2S_POD_IMAGE={image} is set but Docker does not answer or has no such image")
        return None
    return image


class World:
    """The user's checkout and shell, the fake RunPod with real pods, the fake Hub."""

    def __init__(self, root: Path):
        self.root = root
        self.hub = FakeHub({HF_TOKEN: [USER]}).start()
        self.runpod = FakeRunPod(api_key=RUNPOD_KEY).start()
        network = {"RUNPOD_API_BASE_URL": self.runpod.url, "HF_ENDPOINT": self.hub.url, "HF_HUB_DISABLE_XET": "1"}
        self.runpod.run_pods(root / "pods", network, image=pod_image())
        self.runpod.faults.pullable = {IMAGE}
        # A checkout: what `make` needs of the repo, the user's .env and config beside it.
        self.checkout = root / "checkout"
        self.checkout.mkdir()
        for name in ("Makefile", "pyproject.toml", ".venv", ".venv-cu118", "images", "configs"):
            (self.checkout / name).symlink_to(ROOT / name)
        (self.checkout / ".env").write_text(f"HF_TOKEN={HF_TOKEN}\nRUNPOD_API_KEY={RUNPOD_KEY}\n")
        (self.checkout / "my-run.yaml").write_text(yaml.safe_dump(RUN_CONFIG))
        self.state = root / "state"
        self.env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "RUNPOD_API_KEY", "MAKEFLAGS")}
        self.env.update(network, PYTHONPATH=str(ROOT), T2S_STATE_DIR=str(self.state))
        self.outputs: list[str] = []  # everything the user's commands printed

    def make(self, *args: str, timeout: float = POD_TIMEOUT_S) -> subprocess.CompletedProcess:
        """`make <args>` in the checkout, as typed (the venvs are taken as installed)."""
        result = subprocess.run(self._make_command(*args), cwd=self.checkout, env=self.env, capture_output=True,
                                text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        self.outputs.append(result.stdout + result.stderr)
        return result

    def _make_command(self, *args: str) -> list[str]:
        return ["make", "--no-print-directory", "-o", ".venv/.installed", "-o", ".venv-cu118/.installed", *args]

    def launch(self, *settings: str, config: str = "my-run.yaml", timeout: float = POD_TIMEOUT_S):
        return self.make("launch-train", f"CONFIG={config}", f"SET={' '.join(settings)}", "YES=1", timeout=timeout)

    def start_launch(self, *settings: str) -> "Running":
        command = self._make_command("launch-train", "CONFIG=my-run.yaml", f"SET={' '.join(settings)}", "YES=1")
        return Running(subprocess.Popen(command, cwd=self.checkout, env=self.env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                                        start_new_session=True), self.outputs)

    def records(self) -> dict[str, dict]:
        """The latest launch record of each pod (by its name: a launch is recorded before its pod has an id)."""
        latest = {}
        for line in (self.state / "launches.jsonl").read_text().splitlines():
            row = json.loads(line)
            latest[row.get("pod_name") or row["pod_id"]] = row
        return latest

    def hub_file(self, repo_id: str, path: str, repo_type: str = "model") -> str:
        repo = self.hub.repo(repo_id, repo_type)
        assert repo is not None, f"no {repo_type} repo {repo_id} on the Hub: {sorted(self.hub.repos)}"
        assert path in repo.files, f"{path} not in {repo_id}: {sorted(repo.files)}"
        return repo.files[path].content.decode(errors="replace")

    def assert_nothing_left(self, wait_s: float = 60) -> None:
        """No pod on the fake (waiting wait_s for pods to end themselves), nothing of their containers."""
        assert self.runpod.wait_until_no_pod_is_live(wait_s), [p.id for p in self.runpod.live_pods()]
        deadline = time.monotonic() + 60
        while (left := self.runpod.left_behind()) and time.monotonic() < deadline:
            time.sleep(0.5)  # a terminate kills the container a moment after it answers
        assert left == []

    def assert_no_secret_anywhere(self) -> None:
        """Not in any file written (the checkout's runs/, the state dir, the pods' volumes), not in the Hub's
        storage, not in any line the user saw. The one place the secrets belong is the user's .env."""
        secrets = [HF_TOKEN, RUNPOD_KEY, *(pod.api_key for pod in self.runpod.pods.values())]
        files = [p for p in self.root.rglob("*") if p.is_file() and not p.is_symlink() and p.name != ".env"]
        assert any(p.name == "launches.jsonl" for p in files) == bool(self.runpod.pods)
        stored = [f.content for repo in self.hub.repos.values() for f in repo.files.values()]
        stored += list(self.hub.lfs_objects.values())
        for secret in secrets:
            for path in files:
                assert secret.encode() not in path.read_bytes(), f"a secret in {path}"
            assert not any(secret.encode() in content for content in stored), "a secret in the Hub's storage"
            assert not any(secret in output for output in self.outputs), "a secret in the output"

    def close(self) -> None:
        self.runpod.stop()
        self.hub.stop()


class Running:
    """A command still running: its output as it comes."""

    def __init__(self, process: subprocess.Popen, outputs: list[str]):
        self.process, self.lines, self._outputs = process, [], outputs
        self._reader = threading.Thread(target=lambda: self.lines.extend(iter(process.stdout.readline, "")),
                                        daemon=True)
        self._reader.start()

    def wait_for(self, pattern: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = next((line for line in self.lines if re.search(pattern, line)), None)
            if found:
                return found
            if self.process.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.2)
        raise AssertionError(f"no line matching {pattern!r}:\n{''.join(self.lines)[-4000:]}")

    def finish(self, timeout: float) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        self._outputs.append("".join(self.lines))
        return code


@pytest.fixture
def world(tmp_path):
    created = World(tmp_path)
    yield created
    created.close()


def outcome_line(result: subprocess.CompletedProcess) -> str:
    """The launcher's last line: how the run ended."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("t2s-infra")]
    assert lines, result.stdout[-3000:] + result.stderr[-3000:]
    return lines[-1]


# --- the user's path ---------------------------------------------------------------------------------------


def test_make_launch_train_trains_evaluates_pushes_and_the_pod_ends_itself(world):
    result = world.launch()
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    last = outcome_line(result)
    assert "run e2e: job pipeline succeeded" in last and "t2s-infra logs e2e" in last
    # The plan came first, with what was derived: one GPU for one process, the repos from the token's user.
    assert "1x NVIDIA L4 ($0.43/h)" in result.stderr and f"model     {USER}/t2s-e2e" in result.stderr
    # The pod ran every job and said how it ended, as its last line.
    for job in ("prep", "train", "merge", "eval", "push"):
        assert f"== {job} done in" in result.stdout
    pod_lines = result.stdout.strip().splitlines()
    assert re.fullmatch(r"t2s-infra: job exited with code 0; terminating pod pod\d+fake", pod_lines[-1])
    world.assert_nothing_left()
    [record] = world.records().values()
    assert (record["status"], record["note"], record["gpu_count"]) == ("succeeded", "exit 0", 1)

    # The model, its card (eval table, hardware, cost) and the report are on the Hub.
    model = world.hub.repo(f"{USER}/t2s-e2e")
    assert model is not None and model.private
    assert any(path.endswith(".safetensors") for path in model.files)
    card = world.hub_file(f"{USER}/t2s-e2e", "README.md")
    assert "| model | SQL-only | exact match | execution accuracy |" in card
    assert "| hardware | 1x NVIDIA L4 (RunPod secure cloud) |" in card
    assert re.search(r"\| cost \| ≈ \$\d+\.\d\d at \$0\.43/h for the run time", card), card
    assert "exact match" in world.hub_file(f"{USER}/t2s-e2e", "eval/report.md").lower()
    assert world.hub.repo(f"{USER}/t2s-runs", "dataset").private

    # The logs, after the pod is gone, on this machine.
    fetched = world.make("logs", "RUN=e2e")
    assert fetched.returncode == 0, fetched.stderr
    assert "eval report: runs/e2e/eval/report.md" in fetched.stdout
    run = world.checkout / "runs" / "e2e"
    assert (run / "eval" / "report.md").is_file() and (run / "push.done").is_file()
    entrypoint_log = (run / "logs" / "entrypoint-pipeline.log").read_text()
    assert "t2s pipeline exited with code 0" in entrypoint_log
    assert json.loads((run / "logs" / "pod-end.json").read_text())["exit_code"] == 0
    # The pod ran exactly the config the launcher resolved: this one's, with the derived names (each job keeps the
    # config it ran with in logs/; the run's own record holds the settings the model was made with).
    resolved = yaml.safe_load((run / "logs" / "push.config.yaml").read_text())
    assert resolved["push"]["repo_id"] == f"{USER}/t2s-e2e" and resolved["infra"]["logs_repo"] == f"{USER}/t2s-runs"
    assert resolved["train"]["max_steps"] == 6 and resolved["push"]["cost_per_hour_usd"] == 0.43
    assert yaml.safe_load((run / "config.resolved.yaml").read_text())["train"]["max_steps"] == 6
    world.assert_no_secret_anywhere()


def test_the_cards_two_gpu_zero3_qlora_config_runs_on_two_cpu_processes(world):
    """configs/l4x2-qlora.yaml, as shipped but for the tiny model and CPU processes (zero3-cpu has the same two
    processes as zero3, so the pod is still ordered with two GPUs)."""
    from jobs.lib.training import installed_stack

    stack = installed_stack()
    cpu_shape = ["train.accelerate_config=zero3-cpu", "infra.env.DS_ACCELERATOR=cpu"]
    if POD_FLAVOR == "cu118":
        # The card's stack on the CPU: torch 2.1 runs no ZeRO-3 over CPU processes and bitsandbytes 0.45 no 4-bit
        # without CUDA (both GPU-only there, README), so the pod trains the config's LoRA in one process; the launch,
        # the data, eval and push are the card's config's, on the cu118 image.
        cpu_shape = ["train.method=lora", "train.accelerate_config=single", f"infra.image={IMAGE}"]
    elif not (stack.trains_on_cpu_processes and stack.quantizes_on_cpu):
        pytest.skip("this package set cannot run ZeRO-3 QLoRA on CPU processes (torch < 2.2 or bitsandbytes < 0.46)")
    tiny = ["run_id=e2e-zero3", "model.name_or_path=tiny", "data.source=synthetic", "data.synthetic_rows=400",
            "data.max_length=256", *cpu_shape, "train.max_steps=3",
            "train.per_device_batch_size=8", "train.gradient_checkpointing=false", "eval.max_examples=12",
            "eval.batch_size=6", "eval.max_new_tokens=24",
            "push.enforce_gates=false"]  # 3 steps of a tiny model: below push.gates
    result = world.make("launch-train", "CONFIG=configs/l4x2-qlora.yaml", f"SET={' '.join(tiny)}", "YES=1")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "run e2e-zero3: job pipeline succeeded" in outcome_line(result)
    processes = 1 if POD_FLAVOR == "cu118" else 2
    assert f"{processes}x NVIDIA L4 (${0.43 * processes:.2f}/h)" in result.stderr
    assert f"{processes} process(es)" in result.stdout  # accelerate launched them all
    if POD_FLAVOR == "cu118":
        assert IMAGE in result.stderr  # the plan names the image the pod runs
    world.assert_nothing_left()
    card = world.hub_file(f"{USER}/t2s-e2e-zero3", "README.md")
    method = "lora" if POD_FLAVOR == "cu118" else "qlora"
    assert f"| hardware | {processes}x NVIDIA L4 (RunPod secure cloud) |" in card and method in card
    assert "completion only" in card and "| packing / max length | none; " in card  # this config's loss and packing
    world.assert_no_secret_anywhere()


# --- failures, end to end ----------------------------------------------------------------------------------


def test_a_job_that_fails_mid_train_is_reported_its_pod_ends_and_its_logs_are_kept(world):
    result = world.launch("run_id=e2e-fail", "train.lora.target_modules=[no_such_module]")
    assert result.returncode == 2 and "launch-train] Error 1" in result.stderr  # make's 2, for t2s-infra's 1
    last = outcome_line(result)
    assert re.search(r"run e2e-fail: job pipeline failed with exit code 2 .*pod pod\d+fake is gone", last), last
    assert "== t2s train" in result.stdout and "training failed" in result.stdout
    world.assert_nothing_left()
    assert [r["status"] for r in world.records().values()] == ["failed"]
    assert world.hub.repo(f"{USER}/t2s-e2e-fail") is None  # nothing was pushed
    fetched = world.make("logs", "RUN=e2e-fail")
    assert fetched.returncode == 0, fetched.stderr
    log = (world.checkout / "runs" / "e2e-fail" / "logs" / "entrypoint-pipeline.log").read_text()
    assert "target_modules" in log and "training failed" in log and "exited with code 2" in log
    world.assert_no_secret_anywhere()


def test_the_runtime_cap_fires_inside_the_pod(world):
    # Training that would go on for hours; a cap of 30 s. The laptop's watchdog would wait 5 more minutes.
    result = world.launch("run_id=e2e-cap", "train.max_steps=100000", "infra.max_runtime_min=0.5")
    assert result.returncode == 2 and "launch-train] Error 1" in result.stderr
    last = outcome_line(result)
    assert "job pipeline stopped by the pod's runtime cap (infra.max_runtime_min=0.5)" in last, last
    assert "stopping the job (SIGTERM)" in result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith(
        "t2s-infra: job exited with code 2 — stopped by the pod's runtime cap (infra.max_runtime_min=0.5); "
        "terminating pod")
    world.assert_nothing_left()
    [record] = world.records().values()
    assert record["status"] == "stopped" and "stopped by the pod's runtime cap" in record["note"]
    minutes = (time.mktime(time.strptime(record["ended_at"][:19], "%Y-%m-%dT%H:%M:%S")) -
               time.mktime(time.strptime(record["started_at"][:19], "%Y-%m-%dT%H:%M:%S"))) / 60
    assert minutes < 3  # the pod's own cap, not the laptop's watchdog (which would wait past 5.5 min)
    world.assert_no_secret_anywhere()


def test_after_ctrl_c_the_laptop_is_gone_and_the_pod_still_finishes_and_ends_itself(world):
    running = world.start_launch("run_id=e2e-detach")
    running.wait_for(r"== t2s train", timeout=POD_TIMEOUT_S)
    os.killpg(running.process.pid, signal.SIGINT)  # Ctrl-C in the terminal: make and the launcher get it
    assert running.finish(timeout=60) != 0
    detached = running.wait_for(r"detached from run e2e-detach", timeout=5)
    assert "its job keeps running" in detached
    assert world.runpod.live_pods(), "the pod must go on without the laptop"
    world.assert_nothing_left(wait_s=POD_TIMEOUT_S)  # it finishes, pushes and terminates itself
    assert world.hub.repo(f"{USER}/t2s-e2e-detach") is not None
    # Nobody followed the end: `make logs` fetches the logs and settles the record from what the pod wrote.
    fetched = world.make("logs", "RUN=e2e-detach")
    assert fetched.returncode == 0, fetched.stderr
    assert re.search(r"run e2e-detach: job pipeline ended on pod pod\d+fake: succeeded \(exit 0\)", fetched.stderr)
    assert [r["status"] for r in world.records().values()] == ["succeeded"]
    world.assert_no_secret_anywhere()


def test_an_image_that_cannot_be_pulled_is_caught_and_its_pod_terminated(world):
    started = time.monotonic()
    result = world.launch("run_id=e2e-pull", "infra.image=ghcr.io/nobody/t2s:pipeline-cu12", timeout=120)
    assert result.returncode == 2 and "launch-train] Error 2" in result.stderr
    last = outcome_line(result)
    assert last.startswith("t2s-infra launch: error: pod pod001fake cannot start: RunPod stopped the pod before its "
                           "container started"), last
    assert "ghcr.io/nobody/t2s:pipeline-cu12" in last and "terminated it so it stops billing" in last
    assert "RunPod: create container: still fetching image ghcr.io/nobody/t2s:pipeline-cu12" in result.stderr
    assert time.monotonic() - started < 60  # not the 900 s provisioning timeout
    world.assert_nothing_left()
    assert [r["status"] for r in world.records().values()] == ["stopped"]
    world.assert_no_secret_anywhere()


def test_bad_input_is_refused_in_one_line_before_any_network_call(world):
    result = world.launch("train.epochs=-1")
    assert result.returncode == 2
    [error] = [line for line in result.stderr.splitlines() if "error" in line]
    assert error.startswith("t2s-infra launch: error: config key 'train.epochs' in --set train.epochs") and "(got -1)" in error
    assert world.runpod.calls == [] and world.hub.requests == []
    # Without --yes and without a terminal to ask on, nothing waits and nothing is created.
    unasked = world.make("launch-train", "CONFIG=my-run.yaml")
    assert unasked.returncode == 2 and "pass --yes" in outcome_line(unasked)
    assert "podFindAndDeployOnDemand" not in world.runpod.operations()
    world.assert_no_secret_anywhere()
