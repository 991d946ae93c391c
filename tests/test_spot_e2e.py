"""A spot run taken back mid-train, end to end in the pod simulator: the fake RunPod kills the pod's container (status
EXITED, no notice, no end line); the launcher relaunches the run on a new pod, which resumes from the checkpoint the
first pod synced to the (fake) Hub and finishes with as many optimizer steps as an uninterrupted run."""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.test_launch_e2e import POD_TIMEOUT_S, USER, world  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow

RUN = "e2e-spot"
STEPS, EVERY = 24, 4
SPOT = [f"run_id={RUN}", "infra.interruptible=true", "train.checkpoint_sync=hub", f"train.max_steps={STEPS}",
        f"train.save_every_steps={EVERY}", "train.logging_steps=4", "eval.models=[merged]", "eval.max_examples=6"]


def wait_for_synced_checkpoint(world, repo_id: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        repo = world.hub.repo(repo_id)
        names = sorted({path.split("/")[0] for path in (repo.files if repo else {}) if path.startswith("checkpoint-")})
        if names:
            return names[-1]
        time.sleep(0.1)
    raise AssertionError(f"no checkpoint synced to {repo_id} within {timeout_s}s")


def test_a_preempted_spot_pod_resumes_on_a_new_pod_from_the_synced_checkpoint(world):
    running = world.start_launch(*SPOT)
    synced = wait_for_synced_checkpoint(world, f"{USER}/t2s-{RUN}-checkpoints", POD_TIMEOUT_S)
    [first] = world.runpod.live_pods()
    world.runpod.preempt(first.id)  # RunPod takes the spot pod back: no SIGTERM, no end line
    assert running.finish(timeout=POD_TIMEOUT_S) == 0, "".join(running.lines)[-5000:]
    output = "".join(running.lines)
    assert "spot pod taken back by RunPod" in output and "launching pod 2 of at most 4 (spot" in output
    assert re.search(r"checkpoint sync: restored checkpoint-\d+ from the Hub", output), output[-4000:]
    resumed = int(re.search(r"restored checkpoint-(\d+)", output).group(1))
    assert int(synced.removeprefix("checkpoint-")) <= resumed < STEPS
    world.assert_nothing_left()

    records = list(world.records().values())
    assert [(r["attempt"], r["interruptible"], r["status"]) for r in records] == [
        (1, True, "gone"), (2, True, "succeeded")]
    assert records[1]["series"] == records[0]["pod_name"]
    # The model, the card (saying the run took two pods) and the report are on the Hub.
    card = world.hub_file(f"{USER}/t2s-{RUN}", "README.md")
    assert "| attempts | 2 pods: 1 preempted or lost before the one that finished" in card
    assert "spot" in card  # the hardware line
    assert "exact match" in world.hub_file(f"{USER}/t2s-{RUN}", "eval/report.md").lower()
    # As many optimizer steps as an uninterrupted run, the second pod training only the ones left.
    fetched = world.make("logs", f"RUN={RUN}")
    assert fetched.returncode == 0, fetched.stderr
    run = world.checkout / "runs" / RUN
    assert json.loads((run / "train.done").read_text())["global_step"] == STEPS
    # (not anchored: a progress bar's unterminated line may precede a step line in the log)
    train_log = (run / "logs" / "train.log").read_text()
    steps_second = [int(m) for m in re.findall(rf"\bstep (\d+)/{STEPS}\b", train_log)]
    assert steps_second and min(steps_second) > resumed and max(steps_second) == STEPS, train_log[-3000:]
    # Each attempt's log, as streamed, is on this machine.
    for record in records:
        assert (run / "logs" / f"pod-{record['pod_id']}.log").stat().st_size > 0
    world.assert_no_secret_anywhere()


def test_watch_recovers_a_preempted_run_whose_launcher_detached(world):
    import os
    import signal

    run_id = "e2e-watch"
    running = world.start_launch(*[f"run_id={run_id}" if s.startswith("run_id=") else s for s in SPOT])
    wait_for_synced_checkpoint(world, f"{USER}/t2s-{run_id}-checkpoints", POD_TIMEOUT_S)
    os.killpg(running.process.pid, signal.SIGINT)  # Ctrl-C: the launcher detaches, the pod goes on
    assert running.finish(timeout=60) != 0
    assert "relaunch after a preemption: .venv/bin/t2s-infra watch" in "".join(running.lines)  # as make ran it
    [first] = world.runpod.live_pods()
    world.runpod.preempt(first.id)
    watched = world.make("watch")  # until no pod is live: the relaunched one included
    assert watched.returncode == 0, watched.stderr[-4000:]
    assert re.search(r"run e2e-watch: relaunched on pod pod\d+fake \(attempt 2\)", watched.stderr), watched.stderr
    world.assert_nothing_left()
    records = list(world.records().values())
    assert [(r["attempt"], r["status"]) for r in records][0] == (1, "gone")
    assert records[1]["attempt"] == 2
    fetched = world.make("logs", f"RUN={run_id}")
    assert fetched.returncode == 0, fetched.stderr
    run = world.checkout / "runs" / run_id
    assert json.loads((run / "train.done").read_text())["global_step"] == STEPS
    assert "checkpoint sync: restored checkpoint-" in (run / "logs" / "train.log").read_text()
    assert "| attempts | 2 pods" in world.hub_file(f"{USER}/t2s-{run_id}", "README.md")
    world.assert_no_secret_anywhere()
