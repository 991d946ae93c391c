"""Spot pods that recover by themselves (infra/recovery.py), against the RunPod fake's scripted pods: the spot
mutation and prices, the plan, preemption and relaunch, fallback to on-demand, caps over attempts, a real failure
not retried, `watch` relaunching for a detached launcher, and bad input refused before any pod exists."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from infra import cli, records, recovery
from infra import runpod_api as api
from infra.launch import graphql_string_content
from infra.records import Launch
from infra.settings import InfraSettings
from tests.fake_runpod import GraphQLSyntaxError, parse_root_fields  # noqa: F401
from tests.test_infra_pods import CONFIG, fake, outcome_lines, t2s_infra, write_config  # noqa: F401 (fixture)

SPOT = {"interruptible": "true", "max_recoveries": "2"}


@pytest.fixture(autouse=True)
def jobs_that_outlast_the_followers_connection(fake):
    # A scripted job over before the launcher connects to its log (a loaded machine) would look like a lost pod.
    fake.faults.line_every_s = 0.1


def preempt_at(monkeypatch, fake, line: str, pods: int) -> None:
    """The fake takes back each of the first `pods` pods as soon as the launcher shows `line` from it."""
    taken: list[str] = []
    shown = cli._PodLog.__call__
    fake.faults.line_every_s = 0.25  # slow enough that the pod is taken back before its job's end is printed

    def call(self, text):
        shown(self, text)
        pod_id = self.path.name.removeprefix("pod-").removesuffix(".log")
        if text == line and len(taken) < pods and pod_id not in taken:
            taken.append(pod_id)
            fake.preempt(pod_id)

    monkeypatch.setattr(cli._PodLog, "__call__", call)


def test_a_preempted_spot_pod_is_relaunched_and_the_run_finishes(fake, monkeypatch):
    preempt_at(monkeypatch, fake, "train line 2/6", pods=1)
    result = t2s_infra("launch", "--job", "train", "--config", str(write_config(**SPOT)))
    assert result.exit_code == 0, result.output
    # The plan: spot and on-demand side by side, the saving (L4: $0.22 spot vs $0.43 a GPU, two GPUs).
    assert "2x NVIDIA L4: $0.44/h spot vs $0.86/h on-demand, saves 49%" in result.stderr
    assert "set train.checkpoint_sync: hub" not in result.stderr  # its network volume keeps the checkpoints
    assert fake.operations().count("podRentInterruptable") == 2 and "podFindAndDeployOnDemand" not in fake.operations()
    bids = [given["bidPerGpu"] for name, given in fake.calls if name == "podRentInterruptable"]
    assert bids == [0.22, 0.22]  # RunPod's listed spot price, per GPU
    assert "ended without the job's end" in result.stderr and "launching pod 2 of at most 3 (spot" in result.stderr
    assert fake.live_pods() == []  # the EXITED pod was terminated too
    first, second = records.load_all()
    assert (first.status, first.attempt, first.interruptible, first.cost_per_hr) == ("gone", 1, True, 0.44)
    assert "spot pod taken back by RunPod" in first.note
    assert (second.status, second.attempt, second.series) == ("succeeded", 2, first.pod_name)
    # The second pod got what was left of the caps, and its card says how many pods the run took.
    pod2 = fake.pods[second.pod_id]
    assert float(pod2.env["T2S_MAX_RUNTIME_MIN"]) < 5 and float(pod2.env["T2S_MAX_COST_USD"]) < 5
    sent = yaml.safe_load(pod2.env["T2S_CONFIG_YAML"])
    assert sent["push"]["attempts"] == 2 and sent["push"]["earlier_attempts_min"] is not None
    assert sent["push"]["cost_per_hour_usd"] == 0.44
    # The log of each attempt is kept on this machine.
    for launch in (first, second):
        assert Path(f"runs/demo/logs/pod-{launch.pod_id}.log").read_text().startswith("train line 1/6")
    assert "2 pod(s)" in result.stderr


def test_preempted_twice_then_on_demand(fake, monkeypatch):
    preempt_at(monkeypatch, fake, "train line 2/6", pods=2)
    config = write_config(**SPOT, on_demand_after_preemptions="2")
    result = t2s_infra("launch", "--job", "train", "--config", str(config))
    assert result.exit_code == 0, result.output
    creates = [name for name in fake.operations() if name in ("podRentInterruptable", "podFindAndDeployOnDemand")]
    assert creates == ["podRentInterruptable", "podRentInterruptable", "podFindAndDeployOnDemand"]
    launches = records.load_all()
    assert [(launch.attempt, launch.interruptible, launch.status) for launch in launches] == [
        (1, True, "gone"), (2, True, "gone"), (3, False, "succeeded")]
    assert launches[2].cost_per_hr == 0.86


def test_no_spot_capacity_falls_back_to_on_demand(fake):
    fake.faults.spot_capacity.update({"NVIDIA L4": 0, "NVIDIA RTX A5000": 0})
    result = t2s_infra("launch", "--job", "train", "--config", str(write_config(**SPOT, on_demand_after_preemptions="1")))
    assert result.exit_code == 0, result.output
    assert "falling back to on-demand" in result.stderr
    launches = records.load_all()
    assert len(launches) == 1, (result.stderr, launches)
    [launch] = launches
    assert (launch.interruptible, launch.status) == (False, "succeeded")


def test_recoveries_run_out_and_the_run_is_reported(fake, monkeypatch):
    preempt_at(monkeypatch, fake, "train line 2/6", pods=5)
    result = t2s_infra("launch", "--job", "train", "--config", str(write_config(interruptible="true",
                                                                                max_recoveries="1")))
    assert result.exit_code == 1
    assert "gave up after 2 pod(s) ended without the job's end (infra.max_recoveries=1)" in result.stderr
    assert [launch.status for launch in records.load_all()] == ["gone", "gone"]
    assert fake.live_pods() == []


def test_a_real_job_failure_is_not_retried(fake):
    fake.faults.exit_code = 2
    result = t2s_infra("launch", "--job", "train", "--config", str(write_config(**SPOT)))
    assert result.exit_code == 1 and "failed with exit code 2" in result.stderr
    assert fake.operations().count("podRentInterruptable") == 1
    assert [launch.status for launch in records.load_all()] == ["failed"]


def test_watch_relaunches_for_a_detached_launcher(fake):
    result = t2s_infra("launch", "--job", "train", "--no-follow", "--config", str(write_config(**SPOT)))
    assert result.exit_code == 0, result.output
    [first] = records.load_all()
    fake.faults.job_lines = 2000  # the relaunched pod: still running when watch --once looks
    fake.preempt(first.pod_id)
    watched = t2s_infra("watch", "--once")
    assert watched.exit_code == 0, watched.output
    assert "relaunched on pod" in watched.stderr and "(attempt 2)" in watched.stderr
    launches = records.load_all()
    assert [(launch.attempt, launch.status) for launch in launches] == [(1, "gone"), (2, "running")]
    # A second watch does not relaunch again while attempt 2 runs; down stops it.
    t2s_infra("watch", "--once")
    assert len(records.load_all()) == 2
    assert "2x NVIDIA L4 spot" in t2s_infra("ls", "--offline").stdout
    assert t2s_infra("down", "demo").exit_code == 0
    assert fake.live_pods() == []


@pytest.mark.parametrize("setting, fragment", [
    ({"interruptible": "true", "bid_per_gpu_usd": "0"}, "infra.bid_per_gpu_usd"),
    ({"interruptible": "true", "bid_per_gpu_usd": "-1"}, "infra.bid_per_gpu_usd"),
    ({"interruptible": "true", "bid_per_gpu_usd": ".nan"}, "infra.bid_per_gpu_usd"),
    ({"max_recoveries": "-1"}, "infra.max_recoveries"),
    ({"max_recoveries": "1e9"}, "infra.max_recoveries"),
    ({"interruptible": "true", "bid_per_gpu_usd": ".inf"}, "infra.bid_per_gpu_usd"),
    ({"interruptible": "true", "bid_per_gpu_usd": "1e300"}, "infra.bid_per_gpu_usd"),
    ({"interruptible": "true", "bid_per_gpu_usd": "0.01"}, "below RunPod's minimum bid"),
])
def test_bad_spot_settings_are_one_line_before_any_pod(fake, setting, fragment):
    result = t2s_infra("launch", "--config", str(write_config(**setting)))
    assert result.exit_code == 2
    [line] = outcome_lines(result)
    assert fragment in line and "Traceback" not in result.output
    assert not any(name in fake.operations() for name in ("podRentInterruptable", "podFindAndDeployOnDemand"))


def test_checkpoint_sync_needs_a_token_that_may_write_its_repo(fake):
    text = CONFIG.replace("train:\n", "train:\n  checkpoint_sync: hub\n  checkpoint_repo: elsewhere/ckpts\n")
    text = text.replace("  network_volume_id: vol1", "  # no network volume: the checkpoints go to the Hub")
    result = t2s_infra("launch", "--config", str(write_config(text, **SPOT)))
    assert result.exit_code == 2
    [line] = outcome_lines(result)
    assert "may not write to elsewhere/ckpts" in line
    assert fake.calls == [] or "podRentInterruptable" not in fake.operations()


# ---------------------------------------------------------------- the pure parts


def launch(attempt: int, minutes: float, cost: float, status: str = "gone", spot: bool = True) -> Launch:
    start = f"2026-01-01T10:{attempt * 10:02d}:00+00:00"
    end = f"2026-01-01T10:{attempt * 10 + int(minutes):02d}:00+00:00"
    return Launch(run_id="r", pod_id=f"p{attempt}", job="pipeline", gpu="NVIDIA L4", gpu_count=1, cost_per_hr=0.2,
                  started_at=start, status=status, ended_at=end, cost_usd=cost, interruptible=spot, attempt=attempt,
                  pod_name=f"n{attempt}", series="" if attempt == 1 else "n1")


def test_the_caps_count_the_sum_over_attempts():
    settings = InfraSettings(interruptible=True, max_runtime_min=20, max_cost_usd=1.0, gpu_count=1)
    after_one = recovery.decide(settings, [launch(1, 8, 0.3)], "2026-01-01T11:00:00+00:00")
    assert after_one.relaunch and after_one.runtime_min == 12 and after_one.cost_usd == 0.7
    spent = [launch(1, 8, 0.3), launch(2, 9, 0.3), launch(3, 4, 0.1)]
    no = recovery.decide(settings.model_copy(update={"max_recoveries": 5}), spent, "2026-01-01T11:00:00+00:00")
    assert not no.relaunch and "caps are reached across the 3 pod(s)" in no.reason
    costly = recovery.decide(settings.model_copy(update={"max_recoveries": 5}), [launch(1, 2, 0.6), launch(2, 2, 0.4)],
                             "2026-01-01T11:00:00+00:00")
    assert not costly.relaunch
    fallback = recovery.decide(settings.model_copy(update={"on_demand_after_preemptions": 1}), [launch(1, 1, 0.01)],
                               "2026-01-01T11:00:00+00:00")
    assert fallback.relaunch and fallback.on_demand


def test_the_spot_mutation_escapes_every_string():
    request = {"name": 't2s-x"y', "image_name": "img:1", "gpu_type_id": "NVIDIA L4", "gpu_count": 2,
               "cloud_type": "SECURE", "volume_in_gb": 50, "container_disk_in_gb": 50, "volume_mount_path": "/workspace",
               "env": {"T2S_CONFIG_YAML": graphql_string_content('a: "b"\nc: 1')}}  # as pod_request escapes it
    [(name, args)] = parse_root_fields(api.spot_pod_mutation(request, 0.2))
    given = args["input"]
    assert name == "podRentInterruptable" and given["bidPerGpu"] == 0.2 and given["name"] == 't2s-x"y'
    assert given["gpuCount"] == 2 and given["cloudType"] == "SECURE"
    assert given["env"] == [{"key": "T2S_CONFIG_YAML", "value": 'a: "b"\nc: 1'}]
    assert not math.isnan(given["bidPerGpu"])


def test_the_card_says_how_many_pods_the_run_took():
    from jobs.lib.card import _cost_section
    from jobs.lib.config import Config

    done = {"train_runtime_s": 600, "gpu_name": "L4", "num_gpus": 1}
    one = Config.model_validate({"push": {"cost_per_hour_usd": 0.22}})
    assert "attempts" not in _cost_section(one, done)
    three = Config.model_validate({"push": {"cost_per_hour_usd": 0.22, "attempts": 3, "earlier_attempts_min": 12.5,
                                            "earlier_attempts_usd": 0.05}})
    assert ("| attempts | 3 pods: 2 preempted or lost before the one that finished (≈ 12.5 min, ≈ $0.05, not in the "
            "figures above) |") in _cost_section(three, done)


def test_a_pod_whose_job_reported_its_end_in_the_uploaded_logs_is_not_relaunched(fake, monkeypatch):
    """A pod gone before its log was read to the end may have finished: the pod-end.json its entrypoint uploaded
    says so, and the run is not launched again."""
    from infra import logs

    preempt_at(monkeypatch, fake, "train line 2/6", pods=1)

    def uploaded(repo_id, *, local_dir, allow_patterns, **_):
        [pattern] = allow_patterns
        target = Path(local_dir) / pattern
        target.parent.mkdir(parents=True, exist_ok=True)
        [pod_id] = list(fake.pods)
        target.write_text(json.dumps({"pod_id": pod_id, "exit_code": 0}))

    monkeypatch.setattr(logs, "snapshot_download", uploaded)
    result = t2s_infra("launch", "--job", "train", "--config", str(write_config(**SPOT)))
    assert "reported its end (exit 0) in the run's uploaded logs: not relaunched" in result.stderr
    assert fake.operations().count("podRentInterruptable") == 1


def test_a_cap_reached_across_attempts_stops_the_relaunching(fake, monkeypatch):
    preempt_at(monkeypatch, fake, "train line 2/6", pods=5)
    # Nothing worth a second pod is left of $0.01 once the first has run (less than a cent is left).
    result = t2s_infra("launch", "--job", "train", "--config", str(write_config(**SPOT, max_cost_usd="0.01")))
    assert result.exit_code == 1
    assert "the caps are reached across the 1 pod(s)" in result.stderr and "not relaunched" in result.stderr
    assert fake.operations().count("podRentInterruptable") == 1 and fake.live_pods() == []


def test_the_plan_says_when_a_relaunched_pod_would_train_from_the_start(fake):
    without_volume = write_config(CONFIG.replace("  network_volume_id: vol1", "  # no network volume"), **SPOT)
    result = t2s_infra("launch", "--dry-run", "--config", str(without_volume))
    assert result.exit_code == 0, result.output
    assert "a new pod trains from the start: set train.checkpoint_sync: hub" in result.stderr
    assert "podRentInterruptable" not in fake.operations()
