"""Logs after the run: the pod uploads runs/<id>/'s logs to a Hub dataset, `t2s-infra logs RUN` fetches them.

The Hub is tests/fake_hub.LocalHub, a folder that answers the huggingface_hub calls infra makes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from infra import logs as infra_logs
from infra import records
from infra.cli import app
from infra.records import Launch
from tests.fake_hub import LocalHub

HF_TOKEN = "hf_SECRETTOKEN0123456789"
REPO = "someone/t2s-runs"

RUN_FILES = {
    "config.resolved.yaml": "run_id: demo\nmodel:\n  name_or_path: tiny\n",
    "logs/train.config.yaml": f"run_id: demo\ninfra:\n  logs_repo: {REPO}\n",
    "logs/train.log": "step 1\n",
    "logs/entrypoint-train.log": "== entrypoint train\n",
    "metrics.jsonl": '{"step": 1}\n',
    "eval/report.md": "# report\n",
    "eval/report.json": "{}\n",
    "prep.done": "{}\n",
    "train.done": "{}\n",
}
LEFT_OUT = {"eval/predictions.jsonl": "{}\n", "checkpoints/checkpoint-1/model.safetensors": "weights",
            "data/train.jsonl": "{}\n"}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    monkeypatch.setenv("T2S_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("T2S_LOGS_REPO", raising=False)
    local = LocalHub(tmp_path / "hub").install(monkeypatch)
    return local


def make_run(root: Path = Path("runs/demo")) -> Path:
    for name, text in {**RUN_FILES, **LEFT_OUT}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def t2s_infra(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if "error:" in line]


def test_upload_then_fetch_on_another_machine_restores_the_run_logs(hub, tmp_path, monkeypatch):
    run = make_run()
    uploaded = t2s_infra("upload-logs", str(run))  # the repo comes from the config the run's jobs ran with
    assert uploaded.exit_code == 0, uploaded.output
    assert f"uploaded {len(RUN_FILES)} files of runs/demo to Hub dataset {REPO}" in uploaded.stderr
    assert hub.private == {REPO: True}
    stored = {p.relative_to(hub.root / REPO / "demo").as_posix() for p in (hub.root / REPO / "demo").rglob("*")
              if p.is_file()}
    assert stored == set(RUN_FILES)

    elsewhere = tmp_path / "laptop"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    fetched = t2s_infra("logs", "demo", "--repo", REPO)
    assert fetched.exit_code == 0, fetched.output
    assert f"fetched {len(RUN_FILES)} files of run demo from Hub dataset {REPO} into runs/demo:" in fetched.stdout
    assert "eval report: runs/demo/eval/report.md" in fetched.stdout
    for name, text in RUN_FILES.items():
        assert (elsewhere / "runs/demo" / name).read_text() == text
    assert set(hub.tokens) == {HF_TOKEN}


def test_logs_uses_the_repo_recorded_at_launch_and_logs_follow_falls_back_to_it(hub):
    infra_logs.upload_run_logs(make_run(), REPO, HF_TOKEN)
    records.save(Launch(run_id="demo", pod_id="p1", job="train", gpu="NVIDIA L4", gpu_count=2, cost_per_hr=0.86,
                        started_at=records.now_iso(), status="succeeded", logs_repo=REPO))
    result = t2s_infra("logs", "--follow", "demo")
    assert result.exit_code == 0, result.output
    assert "the pod of run demo has ended (succeeded); fetching its uploaded logs" in result.stderr
    assert f"fetched {len(RUN_FILES)} files" in result.stdout


def test_what_goes_wrong_is_one_line(hub, monkeypatch):
    no_repo = t2s_infra("logs", "demo")
    assert no_repo.exit_code == 2 and errors(no_repo) == [
        "t2s-infra logs: error: no logs repo known for run demo: pass --repo you/t2s-runs (the config's "
        "infra.logs_repo)"]
    assert "not found, or HF_TOKEN cannot read it" in errors(t2s_infra("logs", "demo", "--repo", REPO))[0]
    infra_logs.upload_run_logs(make_run(), REPO, HF_TOKEN)
    assert "has no logs of run other yet" in errors(t2s_infra("logs", "other", "--repo", REPO))[0]
    hub.offline = True
    [offline] = errors(t2s_infra("logs", "demo", "--repo", REPO))
    assert "cannot reach the Hugging Face Hub" in offline
    hub.offline = False
    assert "not found" in errors(t2s_infra("upload-logs", "runs/nope"))[0]
    monkeypatch.delenv("HF_TOKEN")
    [no_token] = errors(t2s_infra("upload-logs", "runs/demo"))
    assert no_token.startswith("t2s-infra upload-logs: error: HF_TOKEN is not set")


def test_upload_logs_takes_the_repo_from_the_environment_the_launcher_set(hub, monkeypatch):
    run = make_run(Path("runs/other"))
    (run / "logs" / "train.config.yaml").write_text("run_id: other\n")  # no infra.logs_repo in it
    assert "no logs repo for runs/other" in errors(t2s_infra("upload-logs", str(run)))[0]
    local = t2s_infra("upload-logs", str(run), "--if-configured")  # a local docker run keeps its logs on the volume
    assert local.exit_code == 0 and "no logs repo configured (infra.logs_repo): the logs stay in runs/other/logs" \
        in local.output and not errors(local)
    monkeypatch.setenv("T2S_LOGS_REPO", "team/logs")
    result = t2s_infra("upload-logs", str(run))
    assert result.exit_code == 0, result.output
    assert (hub.root / "team/logs/other/logs/train.log").is_file()
