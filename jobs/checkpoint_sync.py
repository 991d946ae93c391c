"""Train's checkpoints kept outside the pod: `train.checkpoint_sync: hub`.

As the trainer writes a complete checkpoint, the main process hands it to a `HubCheckpointSync`, which uploads it in
a thread of its own to a private Hub model repo of the run (`train.checkpoint_repo`, else <push.repo_id>-checkpoints):
newest only (one commit replaces the checkpoint-* folder there), with the checkpoints' settings.yaml beside it, every
text file's secrets redacted. Training never waits on the Hub: while one upload runs, only the newest checkpoint
saved meanwhile waits for the next one; the end of training waits a bounded time for the last.

A new pod of the same run (a spot preemption, a lost pod) whose volume has no checkpoint calls `restore` before
training: the synced checkpoint comes back into checkpoints/ only if it is complete (trainer_state.json with its
global_step) and was made with the run's settings (train's pinned settings, jobs/lib/rundir.py); else training starts
over, and says why. With a network volume (infra.network_volume_id) the checkpoints outlive the pod already, and
nothing is synced.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import yaml

from jobs.lib.config import Config
from jobs.lib.credentials import known_secrets, redacted_bytes, redactor
from jobs.lib.errors import T2SError
from jobs.lib.rundir import READS, RunDir, describe_differences, settings_differences

CHECKPOINT_GLOB = "checkpoint-*"
SETTINGS_NAME = "settings.yaml"
FINAL_WAIT_S = 600.0  # the most the end of training waits for the last upload


def sync_repo(cfg: Config) -> str | None:
    """The Hub repo the run's checkpoints go to, or None when they are not synced (off, or a network volume)."""
    if cfg.train.checkpoint_sync != "hub" or cfg.infra.get("network_volume_id"):
        return None
    repo = cfg.train.checkpoint_repo or (f"{cfg.push.repo_id}-checkpoints" if cfg.push.repo_id else None)
    if repo is None:
        raise T2SError("train.checkpoint_sync: hub needs a Hub repo for the checkpoints: set train.checkpoint_repo "
                       "(or push.repo_id, whose <repo>-checkpoints is used)")
    return repo


def hub_token() -> str:
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if not token:
        raise T2SError("train.checkpoint_sync: hub needs HF_TOKEN (a token that may write) in the environment or "
                       ".env, or set train.checkpoint_sync: none")
    return token


def stage(checkpoint: Path, settings_file: Path, staging: Path) -> None:
    """staging/checkpoint-<step>/... and staging/settings.yaml: binaries hard-linked (instant, and they survive the
    trainer deleting its older checkpoints), text files copied with their secrets hidden."""
    known = known_secrets()
    hide = redactor(known)
    target_dir = staging / checkpoint.name
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        target = target_dir / path.relative_to(checkpoint)
        target.parent.mkdir(parents=True, exist_ok=True)
        hidden = redacted_bytes(path, hide, known)  # ValueError: a binary with a secret in it is not uploaded
        if hidden is not None:
            target.write_bytes(hidden)
            continue
        try:
            os.link(path, target)
        except OSError:
            shutil.copyfile(path, target)
    if settings_file.is_file():
        (staging / SETTINGS_NAME).write_text(hide(settings_file.read_text()))


def upload(staging: Path, repo: str, token: str, step_name: str) -> None:
    """One commit: the staged checkpoint in, every older checkpoint-* folder out (newest only)."""
    from huggingface_hub import HfApi

    hub = HfApi(token=token)
    hub.create_repo(repo, repo_type="model", private=True, exist_ok=True)
    hub.upload_folder(repo_id=repo, repo_type="model", folder_path=str(staging),
                      delete_patterns=[CHECKPOINT_GLOB, SETTINGS_NAME], commit_message=f"{step_name} of training")


class HubCheckpointSync:
    """Uploads checkpoints in the background, newest first; `submit` returns at once (after hard-linking the
    checkpoint's files), `wait` blocks until nothing is left to upload or the time is up."""

    def __init__(self, repo: str, token: str, say: Callable[[str], None] = print):
        self.repo, self.token, self.say = repo, token, say
        self._lock = threading.Lock()
        self._pending: tuple[Path, str] | None = None  # (staging folder, checkpoint name) waiting for the thread
        self._thread: threading.Thread | None = None
        self._idle = threading.Event()
        self._idle.set()
        self.uploaded: list[str] = []

    def submit(self, checkpoint: Path, settings_file: Path) -> None:
        staging = Path(tempfile.mkdtemp(prefix="t2s-ckpt-", dir=checkpoint.parent.parent))
        try:
            stage(checkpoint, settings_file, staging)
        except (OSError, ValueError) as exc:
            shutil.rmtree(staging, ignore_errors=True)
            self.say(f"checkpoint sync: {checkpoint.name} not uploaded ({exc})")
            return
        with self._lock:
            if self._pending is not None:  # a newer checkpoint replaces one that never went up
                shutil.rmtree(self._pending[0], ignore_errors=True)
            self._pending = (staging, checkpoint.name)
            self._idle.clear()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="checkpoint sync", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._pending is None:
                    self._idle.set()
                    return
                staging, name = self._pending
                self._pending = None
            try:
                upload(staging, self.repo, self.token, name)
                self.uploaded.append(name)
                self.say(f"checkpoint sync: {name} is on the Hub ({self.repo})")
            except Exception as exc:  # never the trainer's problem: the next checkpoint tries again
                self.say(f"checkpoint sync: uploading {name} to {self.repo} failed ({type(exc).__name__}); "
                         "the next checkpoint tries again")
            finally:
                shutil.rmtree(staging, ignore_errors=True)

    def wait(self, timeout_s: float = FINAL_WAIT_S) -> bool:
        return self._idle.wait(timeout_s)


def _remote_checkpoint(files: list[str]) -> str | None:
    steps = {name.split("/", 1)[0] for name in files if name.startswith("checkpoint-") and "/" in name}
    numbered = [name for name in steps if name.removeprefix("checkpoint-").isdigit()]
    return max(numbered, key=lambda name: int(name.removeprefix("checkpoint-")), default=None)


def restore(run: RunDir, cfg: Config, repo: str, token: str, say: Callable[[str], None] = print) -> Path | None:
    """Brings the run's synced checkpoint into checkpoints/ when the volume has none; returns it, or None (nothing
    synced, or not usable: the line says why, and training starts over)."""
    if run.last_checkpoint() is not None:
        return None
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    hub = HfApi(token=token)
    try:
        files = hub.list_repo_files(repo, repo_type="model")
    except RepositoryNotFoundError:
        say(f"checkpoint sync: no checkpoint of run {cfg.run_id} on the Hub yet ({repo}): training starts")
        return None
    except Exception as exc:
        raise T2SError(f"checkpoint sync: cannot read {repo} on the Hub ({type(exc).__name__}): check the network "
                       "and HF_TOKEN, or set train.checkpoint_sync: none to train from the start") from None
    name = _remote_checkpoint(files)
    if name is None or SETTINGS_NAME not in files:
        say(f"checkpoint sync: no checkpoint of run {cfg.run_id} on the Hub yet ({repo}): training starts")
        return None
    run.root.mkdir(parents=True, exist_ok=True)
    download = Path(tempfile.mkdtemp(prefix="t2s-restore-", dir=run.root))
    try:
        hub.snapshot_download(repo, repo_type="model", allow_patterns=[f"{name}/*", SETTINGS_NAME],
                              local_dir=str(download))
        folder = download / name
        if not run.checkpoint_is_complete(folder):
            say(f"checkpoint sync: {name} on the Hub is incomplete (no trainer_state.json with its step): "
                "training starts over")
            return None
        remote_settings = yaml.safe_load((download / SETTINGS_NAME).read_text()) or {}
        differences = settings_differences(remote_settings, cfg.model_dump(mode="json"), READS["train"])
        if differences or not remote_settings:
            say(f"checkpoint sync: {name} on the Hub was made with other settings "
                f"({describe_differences(differences) or 'none recorded'}): training starts over")
            return None
        run.checkpoints.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(run.checkpoints / name, ignore_errors=True)
        os.replace(folder, run.checkpoints / name)
        os.replace(download / SETTINGS_NAME, run.checkpoint_settings_file)
        say(f"checkpoint sync: restored {name} from the Hub ({repo}); training resumes from it")
        return run.checkpoints / name
    except T2SError:
        raise
    except Exception as exc:
        raise T2SError(f"checkpoint sync: downloading {name} from {repo} failed ({type(exc).__name__}): rerun to "
                       "try again, or set train.checkpoint_sync: none to train from the start") from None
    finally:
        shutil.rmtree(download, ignore_errors=True)
