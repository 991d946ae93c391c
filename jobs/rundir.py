"""The run directory: where every job reads its inputs and writes its outputs.

    runs/<run-id>/
      config.resolved.yaml   data/ (train|validation|test.jsonl, tokenized/, manifest.json, rejects.jsonl)
      base/ (the built-in tiny model)   checkpoints/   adapter/   merged/   eval/   logs/
      <job>.done             written last, so an unfinished job is never mistaken for a finished one

Jobs may run in separate containers sharing a volume: all they share is this folder.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from jobs.config import Config, dump_config
from jobs.errors import T2SError

JOBS = ("prep", "train", "merge", "eval", "push")


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def resolved_config(self) -> Path:
        return self.root / "config.resolved.yaml"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def tokenized(self) -> Path:
        return self.data / "tokenized"

    @property
    def manifest(self) -> Path:
        return self.data / "manifest.json"

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def marker(self, job: str) -> Path:
        return self.root / f"{job}.done"

    def is_done(self, job: str) -> bool:
        return self.marker(job).is_file()

    def mark_done(self, job: str, **summary) -> None:
        """Written last, atomically: its presence means every output of `job` is complete."""
        payload = {"job": job, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **summary}
        write_atomic(self.marker(job), json.dumps(payload, indent=2, default=str) + "\n")

    def clear_done(self, job: str) -> None:
        """A job that starts again is unfinished until it writes its marker anew (so are later jobs)."""
        for later in JOBS[JOBS.index(job):]:
            self.marker(later).unlink(missing_ok=True)

    def require(self, job: str, needed_by: str) -> None:
        if not self.is_done(job):
            raise T2SError(
                f"{needed_by} needs a finished {job} in {self.root} (no {self.marker(job).name}): run `t2s {job}` first"
            )


def open_run(cfg: Config) -> RunDir:
    """The run's folder, with the config this job runs under written in as config.resolved.yaml."""
    run = RunDir(Path(cfg.run_dir))
    run.root.mkdir(parents=True, exist_ok=True)
    run.logs.mkdir(exist_ok=True)
    write_atomic(run.resolved_config, dump_config(cfg))
    return run


def write_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never half of one. The temporary name is unique (hidden, .tmp),
    so two processes writing the same path each replace it whole instead of writing into one another's file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as out:  # "x": never someone else's file
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def replace_dir(staging: Path, final: Path) -> None:
    """Move a fully written folder into place, so readers never see a half-written one."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)


def fresh_staging(final: Path, keep: tuple[str, ...] = ()) -> Path:
    """An empty staging folder beside `final`, but for the entries named in `keep` that an interrupted job left."""
    staging = final.with_name(final.name + ".partial")
    if staging.is_dir() and keep:
        for entry in staging.iterdir():
            if entry.name not in keep:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    elif staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True, exist_ok=True)
    return staging


def read_json(path: Path) -> dict | None:
    """A JSON object a job wrote: None when the file is missing; a clear error when it is not valid JSON."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise T2SError(f"{path} is not valid JSON: rerun the job that writes it with --force") from None
    return data if isinstance(data, dict) else None
