"""train.checkpoint_sync: hub — checkpoints that outlive the pod, against tests/fake_hub.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from jobs import checkpoint_sync
from jobs.lib.config import Config, load_config
from jobs.lib.errors import T2SError
from jobs.lib.rundir import RunDir, run_settings
from tests.conftest import t2s, tiny_config, write_config
from tests.fake_hub import FakeHub

TOKEN = "hf_SYNCsecret0123456789abcdefABCDEF"
REPO = "alice/t2s-sync-checkpoints"


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants

    with FakeHub({TOKEN: ["alice"]}) as fake:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", fake.url)  # read at import
        template = fake.url + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        # huggingface_hub < 1.0 (the cu118 set) copied the template into file_download when it was first imported.
        import huggingface_hub.file_download

        if hasattr(huggingface_hub.file_download, "HUGGINGFACE_CO_URL_TEMPLATE"):
            monkeypatch.setattr(huggingface_hub.file_download, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield fake


def config(tmp_path: Path, **train) -> Config:
    raw = tiny_config(tmp_path / "runs", run_id="sync",
                      train={"checkpoint_sync": "hub", "checkpoint_repo": REPO, **train})
    return Config.model_validate(raw)


def fake_checkpoint(run: RunDir, cfg: Config, step: int, complete: bool = True, says: str = "") -> Path:
    folder = run.checkpoints / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(os.urandom(64))
    (folder / "notes.txt").write_text(f"step {step} {says}")
    if complete:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    run.checkpoint_settings_file.write_text(yaml.safe_dump(run_settings(cfg)))
    return folder


def test_only_the_newest_checkpoint_is_on_the_hub_with_its_secrets_hidden(tmp_path, hub):
    cfg = config(tmp_path)
    run = RunDir(Path(cfg.run_dir))
    sync = checkpoint_sync.HubCheckpointSync(REPO, TOKEN, say=lambda line: None)
    sync.submit(fake_checkpoint(run, cfg, 2, says=f"token {TOKEN}"), run.checkpoint_settings_file)
    assert sync.wait(60)
    sync.submit(fake_checkpoint(run, cfg, 4), run.checkpoint_settings_file)
    assert sync.wait(60) and sync.uploaded == ["checkpoint-2", "checkpoint-4"]
    repo = hub.repo(REPO)
    assert repo.private
    names = sorted(name for name in repo.files if name != ".gitattributes")
    assert names == ["checkpoint-4/adapter_model.safetensors", "checkpoint-4/notes.txt",
                     "checkpoint-4/trainer_state.json", "settings.yaml"]
    assert not any(TOKEN.encode() in f.content for f in repo.files.values())
    assert not list(run.root.glob("t2s-ckpt-*"))  # staging cleaned up


def test_a_new_volume_resumes_from_the_synced_checkpoint_only_when_complete_and_of_the_runs_settings(tmp_path, hub):
    cfg = config(tmp_path)
    first = RunDir(Path(cfg.run_dir))
    sync = checkpoint_sync.HubCheckpointSync(REPO, TOKEN, say=lambda line: None)
    sync.submit(fake_checkpoint(first, cfg, 4), first.checkpoint_settings_file)
    assert sync.wait(60)

    said: list[str] = []
    other = config(tmp_path / "other", learning_rate=1e-3)
    assert checkpoint_sync.restore(RunDir(Path(other.run_dir)), other, REPO, TOKEN, said.append) is None
    assert "other settings" in said[-1] and "train.learning_rate" in said[-1]

    fresh = config(tmp_path / "fresh")
    run = RunDir(Path(fresh.run_dir))
    restored = checkpoint_sync.restore(run, fresh, REPO, TOKEN, said.append)
    assert restored == run.checkpoints / "checkpoint-4" and run.last_checkpoint() == restored
    assert yaml.safe_load(run.checkpoint_settings_file.read_text()) == run_settings(fresh)
    assert "restored checkpoint-4" in said[-1]
    # A volume that has its own checkpoint keeps it.
    assert checkpoint_sync.restore(run, fresh, REPO, TOKEN, said.append) is None

    # An incomplete checkpoint on the Hub (a hand upload, an older tool) is not resumed from.
    partial = config(tmp_path / "partial")
    prun = RunDir(Path(partial.run_dir))
    staging = tmp_path / "staging"
    checkpoint_sync.stage(fake_checkpoint(prun, partial, 6, complete=False), prun.checkpoint_settings_file, staging)
    checkpoint_sync.upload(staging, REPO, TOKEN, "checkpoint-6")
    empty = config(tmp_path / "empty")
    assert checkpoint_sync.restore(RunDir(Path(empty.run_dir)), empty, REPO, TOKEN, said.append) is None
    assert "incomplete" in said[-1]


def test_sync_is_off_with_a_network_volume_and_needs_a_repo_and_a_token(tmp_path, monkeypatch):
    cfg = config(tmp_path)
    assert checkpoint_sync.sync_repo(cfg) == REPO
    assert checkpoint_sync.sync_repo(cfg.model_copy(update={"infra": {"network_volume_id": "vol1"}})) is None
    derived = cfg.model_copy(update={"train": cfg.train.model_copy(update={"checkpoint_repo": None})})
    assert checkpoint_sync.sync_repo(derived) == "someone/t2s-test-checkpoints"
    nameless = derived.model_copy(update={"push": cfg.push.model_copy(update={"repo_id": None})})
    with pytest.raises(T2SError, match="train.checkpoint_repo"):
        checkpoint_sync.sync_repo(nameless)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    with pytest.raises(T2SError, match="needs HF_TOKEN"):
        checkpoint_sync.hub_token()


def test_turning_sync_on_does_not_change_the_runs_settings(tmp_path):
    on, off = config(tmp_path), config(tmp_path, checkpoint_sync="none", checkpoint_repo=None)
    assert run_settings(on) == run_settings(off)
    with pytest.raises(T2SError, match="train.checkpoint_sync"):
        load_config(write_config(tmp_path / "bad.yaml", tiny_config(tmp_path, train={"checkpoint_sync": "s3"})))


@pytest.mark.slow
def test_train_syncs_and_a_fresh_volume_resumes_to_the_same_step_count(copy_run, tmp_path, monkeypatch):
    with FakeHub({TOKEN: ["alice"]}) as fake:
        env = {"HF_TOKEN": TOKEN, "HF_ENDPOINT": fake.url, "HF_HUB_DISABLE_XET": "1"}
        train = {"checkpoint_sync": "hub", "checkpoint_repo": REPO, "max_steps": 4, "save_every_steps": 2,
                 "save_total_limit": 4}
        run, cfg_path = copy_run("first", train=train)
        first = t2s("train", "--config", str(cfg_path), env=env)
        assert first.returncode == 0, first.stderr[-3000:]
        assert "checkpoint sync: checkpoint-2 is on the Hub" in first.stdout
        assert "checkpoint sync: checkpoint-4 is on the Hub" in first.stdout
        assert sorted({n.split("/")[0] for n in fake.repo(REPO).files} - {".gitattributes"}) == [
            "checkpoint-4", "settings.yaml"]
        # As if the pod had been preempted after step 2: the Hub holds checkpoint-2 (as synced then).
        staging = tmp_path / "staging"
        checkpoint_sync.stage(RunDir(run).checkpoints / "checkpoint-2", RunDir(run).checkpoint_settings_file, staging)
        import huggingface_hub.constants as constants

        monkeypatch.setattr(constants, "ENDPOINT", fake.url)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        checkpoint_sync.upload(staging, REPO, TOKEN, "checkpoint-2")
        # A new pod: a volume with prep's output and no checkpoint, the same settings.
        run2, cfg2 = copy_run("second", train=train)
        second = t2s("train", "--config", str(cfg2), env=env)
        assert second.returncode == 0, second.stderr[-3000:]
        assert "restored checkpoint-2 from the Hub" in second.stdout and "resuming from" in second.stdout
        assert json.loads((run2 / "train.done").read_text())["global_step"] == 4  # as the uninterrupted run
        assert json.loads((run / "train.done").read_text())["global_step"] == 4


@pytest.mark.slow
def test_a_synced_checkpoint_of_the_last_step_is_the_trained_model_without_a_step_more(copy_run, tmp_path,
                                                                                      monkeypatch):
    """A pod lost after training (during merge or eval): the new one restores the last step's checkpoint and takes
    its weights as they are, rather than resuming into one optimizer step more."""
    with FakeHub({TOKEN: ["alice"]}) as fake:
        env = {"HF_TOKEN": TOKEN, "HF_ENDPOINT": fake.url, "HF_HUB_DISABLE_XET": "1"}
        train = {"checkpoint_sync": "hub", "checkpoint_repo": REPO, "max_steps": 4, "save_every_steps": 2}
        run, cfg_path = copy_run("first", train=train)
        assert t2s("train", "--config", str(cfg_path), env=env).returncode == 0
        run2, cfg2 = copy_run("second", train=train)
        second = t2s("train", "--config", str(cfg2), env=env)
        assert second.returncode == 0, second.stderr[-3000:]
        assert "restored checkpoint-4 from the Hub" in second.stdout
        assert "checkpoint-4 is the last step" in second.stdout
        assert json.loads((run2 / "train.done").read_text())["global_step"] == 4
        import safetensors.torch as st

        first_weights = st.load_file(str(run / "adapter" / "adapter_model.safetensors"))
        second_weights = st.load_file(str(run2 / "adapter" / "adapter_model.safetensors"))
        assert first_weights.keys() == second_weights.keys()
        assert all((first_weights[k] == second_weights[k]).all() for k in first_weights)
