"""What a launch checks and derives before any pod exists: the pure rules exactly, then `t2s-infra launch` on
each bad input (one line, no pod; a bad --set: no network call at all), with a fake RunPod and a fake Hub."""

from __future__ import annotations

import re
from pathlib import Path

import huggingface_hub
import pytest
from typer.testing import CliRunner

from jobs.lib.config import Config, load_config
from jobs.lib.errors import T2SError
from infra import cli as infra_cli
from infra import preflight
from infra import runpod_api as api
from infra import timing as timing_module
from infra.caps import cap_from_env, pod_cap
from infra.cli import app
from infra.launch import pod_env, start_failure
from infra.settings import default_image, image_flavor, load_infra_settings
from tests.fake_hub import FakeHub
from tests.fake_runpod import FakeRunPod

HF_TOKEN = "hf_PREFLIGHTsecret0123456789abcdef"
READ_TOKEN = "hf_READONLYsecret0123456789abcdef"
API_KEY = "rpa_PREFLIGHTsecret0123456789ABCDEF"


def config(**sections) -> Config:
    return Config.model_validate(sections)


def settings_of(cfg: Config):
    return load_infra_settings(cfg, "run.yaml")


# --- the pure rules ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("image, flavor", [
    ("ghcr.io/t2s/t2s:pipeline-cu12", "cu12"), ("docker.io/me/t2s:train-cu118-1a2b3c4", "cu118"),
    ("t2s:pipeline", None), ("localhost:5000/t2s", None), ("ghcr.io/t2s/t2s@sha256:" + "a" * 64, None),
    ("ghcr.io/t2s/t2s:pipeline-cu12@sha256:" + "a" * 64, "cu12"),
])
def test_the_flavor_is_read_from_the_image_tag(image, flavor):
    assert image_flavor(image) == flavor


def test_the_default_image_is_what_push_images_publishes_under_REGISTRY(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("REGISTRY", raising=False)
    assert default_image() == "ghcr.io/t2s/t2s:pipeline-cu12"
    (tmp_path / ".env").write_text("REGISTRY=docker.io/me/\n")
    assert default_image() == "docker.io/me/t2s:pipeline-cu12"
    monkeypatch.setenv("REGISTRY", "registry.example:5000/team")
    assert default_image() == "registry.example:5000/team/t2s:pipeline-cu12"


def test_gpu_count_follows_the_accelerate_config_and_a_forced_mismatch_is_refused():
    single, ddp = preflight.read_accelerate(config()), preflight.read_accelerate(config(train={"accelerate_config": "ddp"}))
    assert (single.processes, ddp.processes, ddp.deepspeed) == (1, 2, False)
    assert preflight.read_accelerate(config(train={"accelerate_config": "zero3"})).deepspeed
    assert preflight.gpu_count_for(settings_of(config()), single) == 1
    assert preflight.gpu_count_for(settings_of(config(infra={"gpu_count": 2})), ddp) == 2
    with pytest.raises(T2SError, match=r"^infra.gpu_count is 2 but train.accelerate_config single starts 1 process"):
        preflight.gpu_count_for(settings_of(config(infra={"gpu_count": 2})), single)
    multinode = preflight.read_accelerate(config(train={"accelerate_config": "multinode"}))
    with pytest.raises(T2SError, match="spans 2 machines, but a pod is one machine"):
        preflight.gpu_count_for(settings_of(config()), multinode)


def test_an_accelerate_config_file_of_this_machine_is_refused(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("num_processes: 2\n")
    with pytest.raises(T2SError, match="is a file on this machine, which the pod does not have"):
        preflight.read_accelerate(config(train={"accelerate_config": str(mine)}))


@pytest.fixture
def requirements(tmp_path, monkeypatch):
    """An images/ folder whose cu12 set lacks liger-kernel and whose cu118 set lacks deepspeed."""
    (tmp_path / "requirements-cu12.txt").write_text("# comment\nbitsandbytes==0.50.2\ndeepspeed==0.19.8\ngguf==1\n")
    (tmp_path / "requirements-cu118.txt").write_text("bitsandbytes==0.45.5  # why\nLiger_Kernel==0.6\n")
    monkeypatch.setattr(preflight, "REQUIREMENTS", tmp_path)


def test_every_package_the_config_needs_must_be_in_the_images_requirement_set(requirements):
    def problem(image, **sections):
        cfg = config(**sections)
        return preflight.package_problem(cfg, preflight.read_accelerate(cfg), image)

    cu12, cu118 = "ghcr.io/t2s/t2s:pipeline-cu12", "ghcr.io/t2s/t2s:pipeline-cu118"
    assert problem(cu12, train={"method": "qlora", "accelerate_config": "zero3"}) is None
    assert problem(cu12, model={"attn_implementation": "flash_attention_2", "gguf_file": "m.gguf"}) is None
    liger = problem(cu12, train={"liger_kernel": True})
    assert liger.startswith(f"the image {cu12} does not install liger-kernel (for train.liger_kernel): "
                            "images/requirements-cu12.txt lacks it")
    assert problem(cu118, train={"liger_kernel": True}) is None  # PEP 503 names: Liger_Kernel is liger-kernel
    assert "deepspeed (for train.accelerate_config: zero3)" in problem(cu118, train={"accelerate_config": "zero3"})
    assert "gguf (for model.gguf_file)" in problem(cu118, model={"gguf_file": "m.gguf"})
    assert problem("t2s:pipeline", train={"liger_kernel": True}) is None  # an image of your own: not checked
    assert "names flavor cu99, which images/ does not build (flavors: cu118, cu12)" in problem(
        "ghcr.io/t2s/t2s:pipeline-cu99")


def test_local_paths_the_pod_cannot_see_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert preflight.local_path_problem(config(model={"name_or_path": "tiny"}, data={"source": "synthetic"})) is None
    assert preflight.local_path_problem(config()) is None  # Hub ids
    (tmp_path / "rows.jsonl").write_text("{}\n")
    assert preflight.local_path_problem(config(data={"source": "rows.jsonl"})).startswith(
        "data.source is rows.jsonl, a path on this machine, which the pod cannot see")
    assert "model.name_or_path is ./my-model" in preflight.local_path_problem(config(model={"name_or_path": "./my-model"}))


def whoami(role="write", name="alice", orgs=(), scoped=None) -> dict:
    token = {"displayName": "t", "role": role}
    if scoped is not None:
        token["fineGrained"] = {"scoped": [{"entity": {"type": "user", "name": entity}, "permissions": permissions}
                                           for entity, permissions in scoped]}
    return {"type": "user", "name": name, "orgs": [{"name": o, "roleInOrg": r} for o, r in orgs],
            "auth": {"type": "access_token", "accessToken": token}}


def test_the_repos_are_derived_from_the_tokens_user_and_must_be_writable():
    cfg = config(run_id="r1")
    alice = preflight.hub_identity(whoami(orgs=[("team", "write"), ("readers", "read")]))
    assert preflight.resolve_repos(cfg, settings_of(cfg), alice) == ("alice/t2s-r1", "alice/t2s-runs")
    set_by_user = config(run_id="r1", push={"repo_id": "team/sql"}, infra={"logs_repo": "team/logs"})
    assert preflight.resolve_repos(set_by_user, settings_of(set_by_user), alice) == ("team/sql", "team/logs")
    foreign = config(push={"repo_id": "readers/sql"})
    with pytest.raises(T2SError, match=r"^HF_TOKEN \(alice, write token\) may not write to readers/sql \(push.repo_id\)"):
        preflight.resolve_repos(foreign, settings_of(foreign), alice)
    with pytest.raises(T2SError, match=r"^HF_TOKEN is a read token of alice: .* needs write access"):
        preflight.resolve_repos(cfg, settings_of(cfg), preflight.hub_identity(whoami(role="read")))
    scoped = preflight.hub_identity(whoami(role="fineGrained", scoped=[("alice", ["repo.content.read", "repo.write"]),
                                                                      ("team", ["repo.content.read"])]))
    assert preflight.resolve_repos(cfg, settings_of(cfg), scoped) == ("alice/t2s-r1", "alice/t2s-runs")
    with pytest.raises(T2SError, match="may not write to team/sql"):
        preflight.resolve_repos(set_by_user, settings_of(set_by_user), scoped)
    long_id = config(run_id="r" * 100)
    with pytest.raises(T2SError, match="is not 'owner/name'"):
        preflight.resolve_repos(long_id, settings_of(long_id), alice)


def test_the_pod_gets_the_resolved_config_with_the_cards_hardware_and_price():
    cfg = load_config(None, ["run_id=r1", "runs_dir=/home/me/runs", "train.epochs=1"])
    settings = settings_of(cfg).model_copy(update={"image": "i:pipeline-cu12", "gpu_count": 1})
    pod = preflight.pod_config(cfg, settings, model_repo="alice/t2s-r1", logs_repo="alice/t2s-runs")
    text = preflight.config_for_gpu(pod, "NVIDIA L4", 1, "SECURE", 0.43)
    sent = load_config_text(text)
    assert (sent.runs_dir, sent.train.epochs, sent.push.repo_id) == ("runs", 1, "alice/t2s-r1")
    assert (sent.push.hardware, sent.push.cost_per_hour_usd) == ("1x NVIDIA L4 (RunPod secure cloud)", 0.43)
    assert load_infra_settings(sent).logs_repo == "alice/t2s-runs"  # what upload-logs on the pod reads
    own = pod.model_copy(update={"push": pod.push.model_copy(update={"hardware": "my box", "cost_per_hour_usd": 1.0})})
    mine = load_config_text(preflight.config_for_gpu(own, "NVIDIA L4", 1, "SECURE", 0.43))
    assert (mine.push.hardware, mine.push.cost_per_hour_usd) == ("my box", 1.0)


def load_config_text(text: str) -> Config:
    import yaml

    return Config.model_validate(yaml.safe_load(text))


def test_the_plan_shows_gpus_image_repos_expected_cost_and_caps():
    cfg = config(run_id="r1", infra={"expected_min": 90, "max_runtime_min": 120, "max_cost_usd": 5,
                                     "gpu_types": ["NVIDIA L4", "NVIDIA RTX A5000"]})
    settings = settings_of(cfg).model_copy(update={"image": "ghcr.io/t2s/t2s:pipeline-cu12", "gpu_count": 2})
    prices = {"NVIDIA L4": 0.86, "NVIDIA RTX A5000": 2.0}
    lines = preflight.plan_lines(run_id="r1", job="pipeline", settings=settings, prices=prices,
                                 model_repo="alice/t2s-r1", logs_repo="alice/t2s-runs", private=True)
    assert lines[0] == "plan for run r1: prep → train → merge → eval → push on one pod"
    assert lines[1] == "  GPUs      2x NVIDIA L4 ($0.86/h), then 2x NVIDIA RTX A5000 ($2.00/h); SECURE cloud"
    assert "  expected  ≈ 90 min, ≈ $1.29 (infra.expected_min)" in lines
    # The worst case is the dearest type the fallback may land on: 120 min at $2/h = $4, under the $5 cap.
    assert any(line.startswith("  caps      120 min or $5, whichever comes first (at most ≈ $4.00)") for line in lines)
    assert preflight.price_problem(settings, prices) is None
    unknown = preflight.plan_lines(run_id="r1", job="train", settings=settings.model_copy(
        update={"expected_min": None, "image": "t2s:mine", "gpu_types": ["NVIDIA RTX A5000"]}),
        prices={"NVIDIA RTX A5000": None}, model_repo="a/b", logs_repo="a/c", private=False)
    assert "cannot be enforced" in unknown[-2] and "packages were not checked" in unknown[-1]
    assert any(line.startswith("  expected  no estimate") for line in unknown)


def test_a_cost_cap_that_cannot_hold_is_refused_unless_given_up_and_the_plan_says_which(tmp_path):
    """No listed price for a fallback type: the cost cap could not be counted there (the pod's cap and the
    watchdog both need $/h). The launch is refused, or, with max_cost_usd: null, the plan says there is none."""
    settings = settings_of(config(infra={"gpu_types": ["NVIDIA L4", "NVIDIA RTX A5000"], "max_runtime_min": 60}))
    settings = settings.model_copy(update={"image": "ghcr.io/t2s/t2s:pipeline-cu12", "gpu_count": 1})
    prices = {"NVIDIA L4": 0.43, "NVIDIA RTX A5000": None}
    problem = preflight.price_problem(settings, prices)
    assert problem.startswith("RunPod lists no secure-cloud price for 1x NVIDIA RTX A5000, so infra.max_cost_usd=10 "
                              "could not be enforced there") and "infra.max_cost_usd: null" in problem
    uncapped = settings.model_copy(update={"max_cost_usd": None})
    assert preflight.price_problem(uncapped, prices) is None
    plan = preflight.plan_lines(run_id="r", job="pipeline", settings=uncapped, prices=prices, model_repo="a/b",
                                logs_repo="a/c", private=True)
    assert any(line.startswith("  caps      60 min; no cost cap (infra.max_cost_usd: null); at most ≈ $0.43 at the "
                               "listed price") for line in plan)
    assert settings_of(config(infra={"max_cost_usd": None})).max_cost_usd is None
    env = pod_env(uncapped, job="train", config_text="", price_per_hr=None, hf_token="t")
    assert env["T2S_MAX_COST_USD"] == "" and cap_from_env(env) == (3600, "stopped by the pod's runtime cap "
                                                                       "(infra.max_runtime_min=60)")


def test_the_pods_caps_take_the_first_limit_reached():
    assert pod_cap(None, None, None) is None
    assert pod_cap(2, None, 0.86) == (120, "stopped by the pod's runtime cap (infra.max_runtime_min=2)")
    assert pod_cap(240, 1.0, 0.5) == (7200, "stopped by the pod's cost cap (infra.max_cost_usd=1 at $0.5/h)")
    assert pod_cap(60, 10.0, 0.5)[0] == 3600
    assert pod_cap(60, 10.0, None)[0] == 3600  # no price: only the runtime cap
    assert cap_from_env({"T2S_MAX_RUNTIME_MIN": "0.5", "T2S_COST_PER_HOUR_USD": ""}) == (
        30, "stopped by the pod's runtime cap (infra.max_runtime_min=0.5)")
    with pytest.raises(ValueError, match="T2S_MAX_COST_USD='ten' is not a number"):
        cap_from_env({"T2S_MAX_COST_USD": "ten"})
    # Whatever reaches the pod, a timer is armed and finite (an infinite cap crashed the caps, leaving none armed).
    week = (7 * 24 * 3600, "stopped by the pod's runtime cap (10080 min, the most allowed)")
    assert cap_from_env({"T2S_MAX_RUNTIME_MIN": "inf"}) == week
    assert cap_from_env({"T2S_MAX_RUNTIME_MIN": "nan", "T2S_MAX_COST_USD": "inf", "T2S_COST_PER_HOUR_USD": "inf"}) == week
    assert cap_from_env({"T2S_MAX_COST_USD": "1e300", "T2S_COST_PER_HOUR_USD": "0.5"}) == week
    assert cap_from_env({"T2S_MAX_RUNTIME_MIN": "10", "T2S_MAX_COST_USD": "nan", "T2S_COST_PER_HOUR_USD": "1"})[0] == 600


def pod(status="RUNNING", started=False, change=""):
    return api.Pod(id="p1", name="t2s-x", desired_status=status, started=started, cost_per_hr=0.43, gpu="L4",
                   last_status_change=change)


def test_a_pod_that_cannot_start_is_told_apart_from_one_still_pulling():
    image = "ghcr.io/nobody/t2s:pipeline-cu12"
    assert start_failure(pod(), ["create container: still fetching image " + image], image) is None
    assert start_failure(None, [], image) is None  # RunPod could not be read this time
    stopped = start_failure(pod("EXITED", change="Exited by Runpod: Mon Jan 05 2026"), [], image)
    assert stopped.startswith('RunPod stopped the pod before its container started ("Exited by Runpod: Mon Jan 05')
    assert image in stopped
    assert start_failure(pod("EXITED", change="Exited by User: x"), [], image) == (
        'the pod stopped before its container started ("Exited by User: x")')
    told = start_failure(pod(), ["Error response from daemon: manifest unknown: manifest unknown"], image)
    assert told.startswith(f"RunPod cannot pull image {image} (its log: Error response from daemon: manifest unknown")


# --- `t2s-infra launch` on bad input: one line, no pod ----------------------------------------------------------


GOOD = "run_id: r1\nmodel: {name_or_path: tiny}\ndata: {source: synthetic}\n"


@pytest.fixture
def world(tmp_path, monkeypatch):
    runpod = FakeRunPod(api_key=API_KEY).start()
    hub = FakeHub({HF_TOKEN: ["alice", "team"], READ_TOKEN: ["alice"]}, roles={READ_TOKEN: "read"}).start()
    monkeypatch.chdir(tmp_path)
    for name, value in {"RUNPOD_API_BASE_URL": runpod.url, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1",
                        "RUNPOD_API_KEY": API_KEY, "HF_TOKEN": HF_TOKEN, "T2S_STATE_DIR": str(tmp_path / "state")}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("REGISTRY", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)  # read at import, before this test
    monkeypatch.setattr(timing_module, "TIMING", timing_module.Timing(poll_s=0.01, system_log_s=0.05,
                                                                      stream_read_timeout_s=2.0, exit_grace_s=1.0))
    Path("run.yaml").write_text(GOOD)
    yield runpod, hub
    runpod.stop()
    hub.stop()


def launch(*args: str, input: str | None = None):
    return CliRunner().invoke(app, ["launch", "--config", "run.yaml", *args], input=input, catch_exceptions=False)


def one_error(result) -> str:
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


@pytest.mark.parametrize("sets, message", [
    (["train.epochs=-1"], "config key 'train.epochs' in --set train.epochs: Input should be greater than 0"),
    (["train.epoch=1"], "unknown config key 'train.epoch' in --set train.epoch"),  # not the file's (issue 24)
    (["infra.gpu_typo=2"], "unknown config key 'infra.gpu_typo' in --set infra.gpu_typo"),
    (["infra.image=UPPER/Case:tag"], "infra.image 'UPPER/Case:tag' is not an image reference"),
    (["infra.gpu_count=2"], "infra.gpu_count is 2 but train.accelerate_config single starts 1 process"),
    (["train.accelerate_config=multinode"], "spans 2 machines, but a pod is one machine"),
    (["infra.image=ghcr.io/t2s/t2s:pipeline-cu99"], "names flavor cu99, which images/ does not build"),
    (["data.source=./rows.jsonl"], "data.source is ./rows.jsonl, a path on this machine"),
    (["nonsense"], "--set 'nonsense' is not key=value"),
    (["--job", "eval"], "--job eval needs the output of the jobs before it, but a pod's own volume starts empty"),
    # Issue 31: a job whose output stays on the pod's own volume dies with the pod; refused like merge/eval/push.
    (["--job", "train"], "--job train leaves its output (the trained adapter or model) on the pod's own volume, which "
                         "goes with the pod: launch the pipeline"),
    (["--job", "prep"], "--job prep leaves its output (the prepared data) on the pod's own volume"),
    # Issue 31: caps that never fire (infinite, absurd) are refused, one line each, before any pod exists.
    (["infra.max_runtime_min=.inf"], "'infra.max_runtime_min' in --set infra.max_runtime_min: Input should be a finite number"),
    (["infra.max_runtime_min=1e300"], "'infra.max_runtime_min' in --set infra.max_runtime_min: Input should be less than or equal to"),
    (["infra.max_cost_usd=1e300"], "'infra.max_cost_usd' in --set infra.max_cost_usd: Input should be less than or equal to 10000"),
    (["infra.max_cost_usd=.nan"], "'infra.max_cost_usd' in --set infra.max_cost_usd: Input should be a finite number"),
    (["infra.provision_timeout_s=1e300"], "'infra.provision_timeout_s' in --set infra.provision_timeout_s: Input should be less than or equal"),
    (["infra.capacity_rounds=1000000000"], "'infra.capacity_rounds' in --set infra.capacity_rounds: Input should be less than or equal to 20"),
    (["infra.capacity_rounds=1e9"], "'infra.capacity_rounds' in --set infra.capacity_rounds: Input should be a valid integer"),
    (["infra.expected_min=.inf"], "'infra.expected_min' in --set infra.expected_min: Input should be a finite number"),
    (["infra.volume_gb=1000000"], "'infra.volume_gb' in --set infra.volume_gb: Input should be less than or equal to"),
    (["infra.gpu_count=64"], "'infra.gpu_count' in --set infra.gpu_count: Input should be less than or equal to 8"),
])
def test_a_bad_config_or_set_is_one_line_before_any_network_call(world, sets, message):
    runpod, hub = world
    args = sets if sets[0].startswith("--") else [arg for item in sets for arg in ("--set", item)]
    result = launch(*args, "--yes")
    assert result.exit_code == 2
    assert message in one_error(result)
    assert runpod.calls == [] and hub.requests == []


def test_missing_packages_are_refused_before_any_network_call(world, requirements):
    runpod, hub = world
    assert "does not install liger-kernel" in one_error(launch("--set", "train.liger_kernel=true", "--yes"))
    assert runpod.calls == [] and hub.requests == []


@pytest.mark.parametrize("change, message", [
    ({"HF_TOKEN": None}, "HF_TOKEN is not set"),
    ({"HF_TOKEN": "hf_UNKNOWNtoken0123456789abcdef"}, "the Hub does not accept HF_TOKEN (HTTP 401"),
    ({"HF_TOKEN": READ_TOKEN}, "HF_TOKEN is a read token of alice"),
    ({"RUNPOD_API_KEY": None}, "RUNPOD_API_KEY is not set"),
    ({"RUNPOD_API_KEY": "rpa_WRONGkey0123456789"}, "RunPod refused the API key (HTTP 401)"),
])
def test_secrets_that_are_missing_or_cannot_do_the_job_are_one_line_and_create_no_pod(world, monkeypatch, change,
                                                                                       message):
    runpod, _ = world
    for name, value in change.items():
        monkeypatch.delenv(name) if value is None else monkeypatch.setenv(name, value)
    result = launch("--yes")
    assert result.exit_code == 2 and message in one_error(result)
    assert "podFindAndDeployOnDemand" not in runpod.operations()
    for secret in (HF_TOKEN, READ_TOKEN, API_KEY, "hf_UNKNOWNtoken0123456789abcdef", "rpa_WRONGkey0123456789"):
        assert secret not in result.output


def test_repos_the_token_may_not_write_to_are_refused(world):
    runpod, _ = world
    foreign = launch("--set", "push.repo_id=bob/sql", "--yes")
    assert "may not write to bob/sql (push.repo_id)" in one_error(foreign)
    logs = launch("--set", "infra.logs_repo=bob/logs", "--yes")
    assert "may not write to bob/logs (infra.logs_repo)" in one_error(logs)
    assert "podFindAndDeployOnDemand" not in runpod.operations()


def test_a_secret_in_the_config_is_refused_without_being_echoed(world):
    runpod, _ = world
    result = launch("--set", f"push.license={HF_TOKEN}", "--yes")
    assert "config key 'push.license' in a --set holds the value of HF_TOKEN" in one_error(result)
    assert HF_TOKEN not in result.output and "podFindAndDeployOnDemand" not in runpod.operations()


def test_without_a_terminal_nothing_is_asked_and_no_pod_is_made(world):
    runpod, _ = world
    result = launch()  # CliRunner's stdin is no terminal, as in a script or CI
    assert result.exit_code == 2
    assert one_error(result).endswith("pass --yes to launch this plan (make launch-train ... YES=1)")
    assert "plan for run r1" in result.stderr and "podFindAndDeployOnDemand" not in runpod.operations()


def test_at_a_terminal_the_plan_is_confirmed_or_declined(world, monkeypatch):
    runpod, hub = world
    monkeypatch.setattr(infra_cli, "_interactive", lambda: True)
    declined = launch(input="n\n")
    assert declined.exit_code == 1 and "not launched: no pod was created" in declined.stderr
    assert "podFindAndDeployOnDemand" not in runpod.operations()
    accepted = launch("--no-follow", input="y\n")
    assert accepted.exit_code == 0, accepted.output
    assert runpod.operations().count("podFindAndDeployOnDemand") == 1
    assert re.search(r"plan for run r1: prep → train → merge → eval → push on one pod", accepted.stderr)
    assert "model     alice/t2s-r1 (private)" in accepted.stderr
    for pod in runpod.live_pods():
        pod.terminated = True
