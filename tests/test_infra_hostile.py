"""Issue 16, as a hostile user (and a hostile network) would: secrets smuggled into a run, and RunPod replies
that could strand a billing pod. One test per class, one case per way in; each case failed on the code
before these fixes, and each ends with no pod on the fake and no secret in any file, upload or line shown.

RunPod is tests/fake_runpod.py (scripted pods; `faults.no_data` answers like a gateway, HTTP 502 with JSON
that has no `data`); the Hub is tests/fake_hub.py, which `t2s push` and `t2s-infra upload-logs` reach in
subprocesses, as users run them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from infra import records
from infra import timing as timing_module
from infra.cli import app
from jobs.lib.rundir import write_atomic
from tests.fake_hub import FakeHub
from tests.fake_runpod import FAST_TIMING as FAST, JUNK_RECORD_LINES, FakeRunPod
from tests.test_push import make_run

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "rpa_HOSTILEkey0123456789abcdefABCDEF0123"
HF_TOKEN = "hf_HOSTILEwriteToken0123456789abcdefXYZ"  # in .env, as the README says
READ_TOKEN = "hf_SECONDreadToken9876543210zyxwvuABCDE"  # another token the user has: in no variable t2s knows
WANDB_KEY = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b"  # .env's WANDB_API_KEY: hex, no telling shape
OLD_RUNPOD_KEY = "7QK3ZP9X2M8VJ4HT6RWC1YBN5DLF0GSA"  # the old 32-character RunPod key format
SECRETS = (API_KEY, HF_TOKEN, READ_TOKEN, WANDB_KEY, OLD_RUNPOD_KEY)
USER = "alice"

CONFIG = """\
run_id: demo
train: {accelerate_config: single}
infra:
  gpu_types: ["NVIDIA L4", "NVIDIA RTX A5000"]
  provision_timeout_s: 5
  capacity_rounds: 1
  max_runtime_min: 5
  max_cost_usd: 5
"""


class World:
    """The user's folder (a .env with their secrets, run.yaml), the fake RunPod and the fake Hub; everything
    shown to the user is kept in `outputs`."""

    def __init__(self, root: Path):
        self.root = root
        self.runpod = FakeRunPod(api_key=API_KEY).start()
        self.hub = FakeHub({HF_TOKEN: [USER]}).start()
        # The default base model and dataset, which a launch checks the pod can read (issue 24 item 13).
        self.hub.add_repo("TinyLlama/TinyLlama-1.1B-Chat-v1.0", private=False)
        self.hub.add_repo("b-mc2/sql-create-context", "dataset", private=False)
        self.outputs: list[str] = []
        self.planted: set[Path] = set()  # files a test wrote a secret into itself (what a library printed)
        (root / ".env").write_text(f"HF_TOKEN={HF_TOKEN}\nRUNPOD_API_KEY={API_KEY}\nWANDB_API_KEY={WANDB_KEY}\n")

    def config(self, text: str = CONFIG) -> str:
        Path("run.yaml").write_text(text)
        return "run.yaml"

    def infra(self, *args: str, input: str | None = None):
        if args[0] in ("launch", "down"):
            args = (*args, "--yes")
        result = CliRunner().invoke(app, list(args), input=input, catch_exceptions=False)
        self.outputs.append(result.output)
        return result

    def run(self, *command: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """A command in a fresh process, in the user's folder (whose .env it reads), as typed."""
        environment = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "RUNPOD_", "T2S_PUSH"))}
        environment.update(PYTHONPATH=str(ROOT), HF_ENDPOINT=self.hub.url, HF_HUB_DISABLE_XET="1",
                           HF_HOME=str(self.root / "hf_home"), T2S_PUSH_BACKOFF_S="0.01", **(env or {}))
        result = subprocess.run([sys.executable, *command], cwd=self.root, env=environment, capture_output=True,
                                text=True, timeout=120)
        self.outputs.append(result.stdout + result.stderr)
        return result

    def assert_clean(self) -> None:
        """No pod left on the fake; no secret in any output, file (but .env and the planted ones) or upload."""
        assert self.runpod.wait_until_no_pod_is_live(5), [pod.id for pod in self.runpod.live_pods()]
        files = [p for p in self.root.rglob("*") if p.is_file() and p.name != ".env" and p not in self.planted]
        stored = [f.content for repo in self.hub.repos.values() for f in repo.files.values()]
        stored += list(self.hub.lfs_objects.values())
        for secret in SECRETS:
            assert not any(secret in output for output in self.outputs), f"{secret[:6]}... in the output"
            for path in files:
                assert secret.encode() not in path.read_bytes(), f"{secret[:6]}... in {path}"
            assert not any(secret.encode() in content for content in stored), f"{secret[:6]}... uploaded"

    def close(self) -> None:
        self.runpod.stop()
        self.hub.stop()


@pytest.fixture
def world(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("HF_TOKEN", "RUNPOD_API_KEY", "HUGGING_FACE_HUB_TOKEN", "RUNPOD_POD_ID", "T2S_LOGS_REPO"):
        monkeypatch.delenv(name, raising=False)  # the secrets come from .env, as the README says
    monkeypatch.setenv("T2S_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(timing_module, "TIMING", FAST)
    created = World(tmp_path)
    monkeypatch.setenv("RUNPOD_API_BASE_URL", created.runpod.url)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", created.hub.url)  # whoami at launch
    yield created
    created.close()


def one_error(result) -> str:
    errors = [line for line in result.output.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


# --- Secrets can be smuggled ----------------------------------------------------------------------------------


def smuggle_a_second_token_as_the_hub_token(world: World) -> None:
    """infra.env HUGGING_FACE_HUB_TOKEN, which huggingface_hub reads as a token, would land in the pod's env."""
    config = world.config(CONFIG + f"  env: {{HUGGING_FACE_HUB_TOKEN: {READ_TOKEN}}}\n")
    assert "holds a Hugging Face token" in one_error(world.infra("launch", "--config", config))
    by_name = world.config(CONFIG + "  env: {HUGGING_FACE_HUB_TOKEN: see-dotenv}\n")
    assert "HUGGING_FACE_HUB_TOKEN is a secret's name" in one_error(world.infra("launch", "--config", by_name))


def smuggle_a_known_secret_under_an_innocent_name(world: World) -> None:
    """.env's WANDB_API_KEY (hex: no shape gives it away) under an innocent infra.env name, through --set."""
    result = world.infra("launch", "--config", world.config(), "--set", f"infra.env.TRACKING={WANDB_KEY}")
    assert "config key 'infra.env.TRACKING' in a --set holds the value of WANDB_API_KEY" in (
        one_error(result))


def smuggle_an_old_style_runpod_key_into_the_model_card(world: World) -> None:
    """push.hardware goes onto the public model card; an old RunPod key has no prefix, only its randomness."""
    result = world.infra("launch", "--config", world.config(), "--set", f"push.hardware={OLD_RUNPOD_KEY}")
    assert "config key 'push.hardware' in a --set holds a random-looking key" in one_error(result)


def make_a_job_echo_the_token_in_its_config_error(world: World) -> None:
    """`t2s push --set push.retries=$HF_TOKEN`: the job's own config error used to print the value."""
    result = world.run("-m", "jobs.cli", "push", "--config", world.config(), "--set", f"push.retries={HF_TOKEN}")
    assert result.returncode == 2
    assert "config key 'push.retries'" in result.stderr and "holds the value of HF_TOKEN" in result.stderr


def make_the_uploads_carry_what_a_library_printed(world: World) -> None:
    """A log holding HF_TOKEN and another token (a library printed them): the model repo and the logs dataset
    get the log redacted, and push and upload-logs say nothing of either."""
    config, run = make_run(world.root, push={"repo_id": f"{USER}/t2s-sql", "hardware": "1x L4"})
    log = run / "logs" / "train.log"
    log.write_text(f"step 1\nhuggingface_hub: token={HF_TOKEN}\nlogin with {READ_TOKEN}\nstep 2\n")
    world.planted.add(log)
    pushed = world.run("-m", "jobs.cli", "push", "--config", str(config), "--force")
    assert pushed.returncode == 0, pushed.stderr
    uploaded = world.run("-m", "infra.cli", "upload-logs", str(run), env={"T2S_LOGS_REPO": f"{USER}/t2s-runs"})
    assert uploaded.returncode == 0, uploaded.stderr
    model_log = world.hub.repo(f"{USER}/t2s-sql").files["logs/train.log"].content.decode()
    dataset_log = world.hub.repo(f"{USER}/t2s-runs", "dataset").files["r1/logs/train.log"].content.decode()
    for shown in (model_log, dataset_log):
        assert shown == "step 1\nhuggingface_hub: token=<HF_TOKEN>\nlogin with <secret>\nstep 2\n"
    assert world.hub.repo(f"{USER}/t2s-sql").files["model.safetensors"].content == (
        run / "merged" / "model.safetensors").read_bytes()  # weights go up untouched


def make_a_pod_print_tokens_while_followed(world: World) -> None:
    """The job prints HF_TOKEN and a token t2s has never seen: the follower shows and keeps both redacted."""
    world.runpod.faults.job_says = f"env: HF_TOKEN={HF_TOKEN} HUGGING_FACE_HUB_TOKEN={READ_TOKEN}"
    result = world.infra("launch", "--config", world.config())
    assert result.exit_code == 0, result.output
    assert "env: HF_TOKEN=<HF_TOKEN> HUGGING_FACE_HUB_TOKEN=<secret>" in result.stdout
    pod = next(iter(world.runpod.pods.values()))
    assert set(pod.env) & {"HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY"} == set()


SMUGGLERS = [smuggle_a_second_token_as_the_hub_token, smuggle_a_known_secret_under_an_innocent_name,
             smuggle_an_old_style_runpod_key_into_the_model_card, make_a_job_echo_the_token_in_its_config_error,
             make_the_uploads_carry_what_a_library_printed, make_a_pod_print_tokens_while_followed]


@pytest.mark.parametrize("attempt", SMUGGLERS, ids=lambda attempt: attempt.__name__)
def test_secrets_cannot_be_smuggled_into_a_pod_a_file_an_upload_or_an_error(world, attempt):
    attempt(world)
    if "smuggle" in attempt.__name__:  # refused before any pod or record: nothing asked of RunPod but prices
        assert "podFindAndDeployOnDemand" not in world.runpod.operations()
        assert not (world.root / "state" / "launches.jsonl").exists()
    world.assert_clean()


# --- The RunPod client can strand a billing pod ---------------------------------------------------------------


def create_answered_by_a_gateway_after_making_the_pod(world: World) -> None:
    """RunPod makes the pod, then a gateway answers 502 {"message": "Bad gateway"}: the pod is found by the
    name recorded before asking, followed to its end, and is the one pod made."""
    world.runpod.faults.no_data["podFindAndDeployOnDemand"] = 1
    result = world.infra("launch", "--config", world.config())
    assert result.exit_code == 0, result.output
    assert "but RunPod did make pod pod001fake" in result.stderr and "job pipeline succeeded" in result.stderr
    assert len(world.runpod.pods) == 1
    [launch] = records.load_all()
    assert (launch.pod_id, launch.status) == ("pod001fake", "succeeded")


def create_and_list_answered_by_a_gateway(world: World) -> None:
    """The gateway answers the create and every look for the pod: the launch stops with one line, its record
    keeps the name, and `ls` and `down` (once RunPod answers again) find the pod by it and stop it."""
    world.runpod.faults.job_lines = 10_000
    world.runpod.faults.no_data.update({"podFindAndDeployOnDemand": 1, "myself": FAST.api_attempts})
    result = world.infra("launch", "--config", world.config())
    assert result.exit_code == 2
    assert re.search(r"RunPod did not answer whether it created pod t2s-demo-pipeline-[0-9a-f]{4} .*"
                     r"`t2s-infra down demo` finds it by name", one_error(result))
    assert len(world.runpod.live_pods()) == 1  # billing, and in no id we were told
    [creating] = records.load_all()
    assert creating.status == "creating" and creating.pod_id == ""
    listed = world.infra("ls")
    assert listed.exit_code == 0 and re.search(r"demo +pipeline +pod001fake .* (provisioning|running) ", listed.stdout)
    down = world.infra("down", "demo")
    assert down.exit_code == 0 and "terminated pod pod001fake" in down.stderr
    assert records.load_all()[0].status == "stopped"


def reads_answered_by_a_gateway_while_following(world: World) -> None:
    """Pod reads and lists answer 502 without data while the follower runs its watchdog: it keeps going."""
    world.runpod.faults.job_lines = 60
    from infra import cli

    shown, original = [], cli._PodLog.__call__

    def show(self, line):
        if len(shown) == 3:
            world.runpod.faults.no_data.update({"pod": 6, "myself": 6})
        shown.append(line)
        original(self, line)

    cli._PodLog.__call__ = show
    try:
        result = world.infra("launch", "--config", world.config())
    finally:
        cli._PodLog.__call__ = original
    assert result.exit_code == 0, result.output
    assert "job pipeline succeeded" in result.stderr and world.runpod.faults.no_data["pod"] < 6
    assert [line for line in result.stdout.splitlines() if "line" in line][-1] == "pipeline line 60/60"


def junk_lines_in_the_launch_record(world: World) -> None:
    """Lines that are JSON but no record (null, [], a bad started_at, ...): ls, down and watch skip each with a
    warning, and still see and stop the real pod."""
    world.runpod.faults.job_lines = 10_000
    assert world.infra("launch", "--config", world.config(), "--no-follow").exit_code == 0
    with open(records.records_path(), "a") as out:
        out.write("\n".join(JUNK_RECORD_LINES) + "\n")
    for command in (["ls"], ["watch", "--once"], ["down", "demo"]):
        result = world.infra(*command)
        assert result.exit_code == 0, result.output
        assert result.stderr.count("warning: skipped line") == len(JUNK_RECORD_LINES), result.stderr
    assert "terminated pod pod001fake" in result.stderr


def a_gpu_type_without_a_listed_price(world: World) -> None:
    """The fallback type has no listed price, so a cost cap could not be counted there: refused, no pod. Given
    up on purpose (infra.max_cost_usd: null), the plan and the last line say there is no cost cap."""
    world.runpod.faults.unlisted_prices = {"NVIDIA RTX A5000"}
    refused = world.infra("launch", "--config", world.config())
    assert "RunPod lists no secure-cloud price for 1x NVIDIA RTX A5000, so infra.max_cost_usd=5 could not be " \
           "enforced there" in one_error(refused)
    assert "podFindAndDeployOnDemand" not in world.runpod.operations()
    uncapped = world.infra("launch", "--config", world.config(), "--set", "infra.max_cost_usd=null")
    assert uncapped.exit_code == 0, uncapped.output
    assert "caps      5 min; no cost cap (infra.max_cost_usd: null)" in uncapped.stderr
    assert "stops at 5 min or no cost cap" in uncapped.stderr
    assert next(iter(world.runpod.pods.values())).env["T2S_MAX_COST_USD"] == ""


def two_writers_of_one_run_file(world: World) -> None:
    """Two processes finishing the same job write its marker at once: each replaces the file whole."""
    target = world.root / "runs" / "demo" / "train.done"
    target.parent.mkdir(parents=True)
    texts = [json.dumps({"writer": n, "pad": "x" * 200_000}) for n in range(4)]
    failures: list[BaseException] = []

    def write(text: str) -> None:
        try:
            for _ in range(40):
                write_atomic(target, text)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            failures.append(exc)

    writers = [threading.Thread(target=write, args=(text,)) for text in texts]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    assert failures == [] and target.read_text() in texts
    assert sorted(p.name for p in target.parent.iterdir()) == ["train.done"]  # no temporary file left


STRANDERS = [create_answered_by_a_gateway_after_making_the_pod, create_and_list_answered_by_a_gateway,
             reads_answered_by_a_gateway_while_following, junk_lines_in_the_launch_record,
             a_gpu_type_without_a_listed_price, two_writers_of_one_run_file]


@pytest.mark.parametrize("fault", STRANDERS, ids=lambda fault: fault.__name__)
def test_the_runpod_client_never_strands_a_billing_pod(world, fault):
    fault(world)
    world.assert_clean()
