"""The run directory: the one truth about a run. Every job reads its inputs and writes its outputs here.

    runs/<run-id>/
      config.resolved.yaml   the settings the run was made with: what prep's data and base depend on (model name,
                             tokenizer, GGUF file; data), then what train's model depends on (model, train)
      data/                  train|validation|test.jsonl, tokenized/, manifest.json, rejects.jsonl
      base/                  the built-in tiny model (model.name_or_path: tiny), built by prep
      checkpoints/           checkpoint-<step>/, settings.yaml (the settings they are being made with) and, once the
                             training they belong to has finished, `finished`
      incomplete/            checkpoints a kill left half-written, set aside
      adapter/  merged/  eval/  push/ (the model card as pushed)
      logs/                  <job>.log, <job>.config.yaml (the config each job ran with), metrics.jsonl, tensorboard/
      <job>.done             written last, so an unfinished job is never mistaken for a finished one

A job's config must agree with the run's settings in what the job reads (READS): a job that would make something other
than what the run is stops with one line, and `--force` on prep or train starts those settings over. A job builds its
outputs beside the old ones (<name>.partial) and `finish` puts them in place: only then do later jobs' markers go, so a
job that fails or is refused loses nothing finished. Jobs may run in separate containers sharing a volume: all they
share is this folder.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from jobs.lib.config import Config, RLConfig, dump_config
from jobs.lib.errors import T2SError

JOBS = ("prep", "train", "rl", "merge", "export", "eval", "push")

# The run's settings, as sections or dotted keys. Each is pinned by the job whose output depends on it, when that job
# finishes; READS: what each job takes from its config that must agree with the run.
BASE_MODEL = ("model.name_or_path", "model.tokenizer", "model.gguf_file")
PINNED_BY = {"prep": (*BASE_MODEL, "data"), "train": ("model", "train"),
             "rl": tuple(f"rl.{key}" for key in RLConfig.model_fields if key != "enabled")}  # (enabled: the pipeline's)
# Where train's checkpoints are kept, not how the model is made: never pinned, so turning it on resumes a run.
UNPINNED = ("train.checkpoint_sync", "train.checkpoint_repo")
READS = {"prep": PINNED_BY["prep"], "train": (*PINNED_BY["prep"], *PINNED_BY["train"]),
         "rl": (*PINNED_BY["prep"], *PINNED_BY["train"], *PINNED_BY["rl"]),
         "merge": BASE_MODEL, "eval": BASE_MODEL, "push": (), "export": BASE_MODEL}


# ---------- pure core ----------

def flat(settings: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lora": {"r": 8}}} → {"train.lora.r": 8}."""
    out = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        out.update(flat(value, f"{name}.") if isinstance(value, dict) else {name: value})
    return out


def _covered(key: str, keys: tuple[str, ...]) -> bool:
    return any(key == k or key.startswith(k + ".") for k in keys)


def select(settings: dict, keys: tuple[str, ...]) -> dict:
    """The part of nested `settings` that `keys` (sections or dotted keys) name, nested as it was."""
    out: dict = {}
    for key, value in flat(settings).items():
        if _covered(key, keys) and not _covered(key, UNPINNED):
            *parents, leaf = key.split(".")
            node = out
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
    return out


def settings_differences(pinned: dict, mine: dict, keys: tuple[str, ...]) -> list[tuple[str, Any, Any]]:
    """(key, the run's value, mine) for every pinned key among `keys` where the two differ. Only what is pinned is
    compared: a run prepared but not yet trained has no train settings."""
    mine_flat = flat(mine)
    return [(key, value, mine_flat.get(key)) for key, value in flat(pinned).items()
            if _covered(key, keys) and key in mine_flat and mine_flat[key] != value]


def describe_differences(differences: list[tuple[str, Any, Any]], shown: int = 3) -> str:
    def short(value) -> str:
        text = json.dumps(value)
        return text if len(text) <= 40 else text[:37] + "..."

    parts = [f"{key}={short(run)} (yours: {short(mine)})" for key, run, mine in differences[:shown]]
    more = f" and {len(differences) - shown} more" if len(differences) > shown else ""
    return ", ".join(parts) + more


def run_settings(cfg: Config) -> dict:
    """What a trained model depends on: the config's model, data and train sections."""
    return select(cfg.model_dump(mode="json"), ("model", "data", "train"))


# ---------- the folder ----------

@dataclass(frozen=True)
class RunDir:
    root: Path

    # --- where things are

    @property
    def settings_file(self) -> Path:
        return self.root / "config.resolved.yaml"

    @property
    def data(self) -> Path:
        return self.root / "data"

    def split(self, name: str) -> Path:
        return self.data / f"{name}.jsonl"

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
    def checkpoint_settings_file(self) -> Path:
        return self.checkpoints / "settings.yaml"

    @property
    def checkpoints_finished_file(self) -> Path:
        """Written when the training the checkpoints belong to finished: they are then the finished model's, and no
        longer an interrupted training that `--force` resumes."""
        return self.checkpoints / "finished"

    @property
    def incomplete(self) -> Path:
        return self.root / "incomplete"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def rl(self) -> Path:
        """What `t2s rl` made from adapter/: the same kind of folder (an adapter, or a whole model)."""
        return self.root / "rl"

    @property
    def rl_checkpoints(self) -> Path:
        return self.root / "rl-checkpoints"

    def trained_model(self) -> Path:
        """The latest trained stage's folder, the one merge, eval, ask and push use: rl/ once rl has finished,
        else adapter/."""
        return self.rl if self.is_done("rl") else self.adapter

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def report(self) -> Path:
        return self.eval / "report.json"

    @property
    def report_md(self) -> Path:
        return self.eval / "report.md"

    @property
    def pushed(self) -> Path:
        return self.root / "push"  # the model card as pushed; merged/ and adapter/ stay as they were

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def metrics(self) -> Path:
        return self.logs / "metrics.jsonl"

    def job_log(self, job: str) -> Path:
        return self.logs / f"{job}.log"

    def job_config(self, job: str) -> Path:
        """The config `job` last ran with (defaults + file + overrides), kept when it started."""
        return self.logs / f"{job}.config.yaml"

    def marker(self, job: str) -> Path:
        return self.root / f"{job}.done"

    # --- what the run holds

    def is_done(self, job: str) -> bool:
        return self.marker(job).is_file()

    def require(self, job: str, needed_by: str) -> None:
        if not self.is_done(job):
            raise T2SError(
                f"{needed_by} needs a finished {job} in {self.root} (no {self.marker(job).name}): run `t2s {job}` first"
            )

    def trained(self) -> Literal["adapter", "model"]:
        """What train left in adapter/: a LoRA / QLoRA adapter, or (a full fine-tune) the whole model."""
        return "adapter" if (self.trained_model() / "adapter_config.json").is_file() else "model"

    def pinned_settings(self) -> dict:
        """The settings the run was made with ({} before prep has finished)."""
        return _read_yaml(self.settings_file)

    def checkpoint_settings(self) -> dict:
        """The settings of the checkpoints a rerun would resume from ({} when there is none, or an older t2s made
        them)."""
        return _read_yaml(self.checkpoint_settings_file) if self.last_checkpoint() else {}

    def trained_settings(self) -> dict:
        """The model, data and train settings the trained model was made with, as train recorded them in train.done
        (a run trained by an older t2s: the run's pinned settings)."""
        done = read_json(self.marker("train")) or {}
        return done["settings"] if isinstance(done.get("settings"), dict) else self.pinned_settings()

    def interrupted_training(self, cfg: Config) -> Path | None:
        """The checkpoint an interrupted training made with `cfg`'s settings left (one whose training has not
        finished): the one `t2s train --force` with those settings resumes instead of discarding. None when there is
        none."""
        checkpoint = self.last_checkpoint()
        if checkpoint is None or self.checkpoints_finished_file.exists() or not self.checkpoint_settings_file.is_file():
            return None
        made_with = self.checkpoint_settings()
        if settings_differences(made_with, cfg.model_dump(mode="json"), READS["train"]) or \
                set(flat(select(made_with, READS["train"]))) != set(flat(run_settings(cfg))):
            return None
        return checkpoint

    def check_settings(self, job: str, cfg: Config, force: bool) -> None:
        """Stops, in one line, a job whose config differs from the run's settings in what the job reads; `--force` on
        prep or train starts that job's own settings over. Train resumes only checkpoints made with its settings."""
        mine = cfg.model_dump(mode="json")
        keys = tuple(k for k in READS[job] if not (force and k in PINNED_BY.get(job, ())))
        differences = settings_differences(self.pinned_settings(), mine, keys)
        if differences:
            redo = next(job for job in PINNED_BY if any(_covered(key, PINNED_BY[job]) for key, _, _ in differences))
            raise T2SError(f"run {cfg.run_id} was made with other settings than yours: "
                           f"{describe_differences(differences)} ({self.settings_file}). Use the run's, or "
                           f"`t2s {redo} --force` to redo {redo} with yours (and what follows it)")
        if job == "train" and not force and not self.is_done("train"):  # (a finished train is skipped, not resumed)
            differences = settings_differences(self.checkpoint_settings(), mine, READS["train"])
            if differences:
                raise T2SError(f"the checkpoints in {self.checkpoints} were made with other settings than yours: "
                               f"{describe_differences(differences)}. Rerun with those to resume (`t2s train --config "
                               f"{self.job_config('train')}`), or `t2s train --force` to start over with yours (the "
                               "checkpoints are discarded)")

    # --- train's checkpoints

    def checkpoint_folders(self) -> list[Path]:
        """checkpoints/checkpoint-<step>, by step."""
        if not self.checkpoints.is_dir():
            return []
        found = [p for p in self.checkpoints.iterdir()
                 if p.is_dir() and p.name.startswith("checkpoint-") and p.name.removeprefix("checkpoint-").isdigit()]
        return sorted(found, key=lambda p: int(p.name.removeprefix("checkpoint-")))

    @staticmethod
    def checkpoint_is_complete(folder: Path) -> bool:
        """The Trainer writes trainer_state.json last: a checkpoint without it (or with half of it) was cut off."""
        try:
            state = json.loads((folder / "trainer_state.json").read_text())
        except (OSError, ValueError):
            return False
        return isinstance(state, dict) and "global_step" in state

    def last_checkpoint(self) -> Path | None:
        """The latest complete checkpoint, the one a rerun resumes from."""
        return next((p for p in reversed(self.checkpoint_folders()) if self.checkpoint_is_complete(p)), None)

    def set_aside_incomplete_checkpoints(self) -> list[tuple[Path, Path]]:
        """Moves every incomplete checkpoint to incomplete/ (a resume from one fails, every time); (from, to) each."""
        moved = []
        for folder in self.checkpoint_folders():
            if not self.checkpoint_is_complete(folder):
                target = self.incomplete / folder.name
                while target.exists():
                    target = target.with_name(target.name + "+")
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(folder, target)
                moved.append((folder, target))
        return moved

    # --- a job's life: start, finish

    def start(self, job: str, cfg: Config, force: bool) -> None:
        """The job's checks passed and it begins: it keeps the config it runs with in logs/. Every job, train too,
        leaves what it finished before (its outputs, its marker, the later jobs' markers) in place until `finish`
        replaces them, so an interrupted or failed run loses nothing finished. Train works in checkpoints/: --force
        discards them (training starts over), unless they are an interrupted training with the same settings, which it
        resumes (so rerunning an interrupted `t2s train --force ...` goes on where it stopped); a fresh start records
        the settings the checkpoints are made with."""
        write_atomic(self.job_config(job), dump_config(cfg))
        if job == "rl" and force:  # rl, like train, resumes from its checkpoints; --force starts it over
            shutil.rmtree(self.rl_checkpoints, ignore_errors=True)
        if job != "train":
            return
        if force and self.interrupted_training(cfg) is None:
            shutil.rmtree(self.checkpoints, ignore_errors=True)
        self.checkpoints_finished_file.unlink(missing_ok=True)  # what is trained from here on has not finished
        if self.last_checkpoint() is None:
            # a fresh start: an earlier attempt's TensorBoard events would be uploaded beside this one's by push
            shutil.rmtree(self.logs / "tensorboard", ignore_errors=True)
            self.checkpoints.mkdir(exist_ok=True)
            write_atomic(self.checkpoint_settings_file, yaml.safe_dump(run_settings(cfg), sort_keys=False))

    def finish(self, job: str, cfg: Config, staged: list[tuple[Path, Path]] = (), **summary) -> None:
        """Puts the job's outputs in place and marks it done. Later jobs' markers go first, since their outputs were
        made from what this job replaces (and after prep, train's checkpoints too); then each staged folder replaces
        its final one, the settings the job used are pinned, and the marker comes last."""
        for later in JOBS[JOBS.index(job) + 1:]:
            self.marker(later).unlink(missing_ok=True)
        if job == "prep":
            shutil.rmtree(self.checkpoints, ignore_errors=True)
        for staging, final in staged:
            replace_dir(staging, final)
        if job in PINNED_BY:
            self._pin(job, cfg)
        if job == "train" and self.checkpoints.is_dir():
            write_atomic(self.checkpoints_finished_file, "the training these checkpoints belong to finished\n")
        self.mark_done(job, **summary)

    def _pin(self, job: str, cfg: Config) -> None:
        # prep starts the record over (what train pinned went with train.done); train adds its sections to prep's.
        pinned = {} if job == "prep" else self.pinned_settings()
        if job == "train":
            pinned.pop("rl", None)  # what rl pinned went with rl.done
        pinned.update(select(cfg.model_dump(mode="json"), PINNED_BY[job]))
        pinned = {"run_id": cfg.run_id, **{k: v for k, v in pinned.items() if k != "run_id"}}
        header = ("# The settings run {} was made with, pinned by prep and train as they finished. A job whose config "
                  "differs in what it reads\n# stops; `t2s prep --force` or `t2s train --force` makes the run again "
                  "with other settings.\n").format(cfg.run_id)
        write_atomic(self.settings_file, header + yaml.safe_dump(pinned, sort_keys=False))

    def mark_done(self, job: str, **summary) -> None:
        """Written last, atomically: its presence means every output of `job` is complete."""
        payload = {"job": job, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **summary}
        write_atomic(self.marker(job), json.dumps(payload, indent=2, default=str) + "\n")


def open_run(cfg: Config) -> RunDir:
    """The run's folder (made if new), or one line when runs_dir cannot hold it."""
    run = RunDir(Path(cfg.run_dir))
    try:
        run.logs.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise T2SError(f"cannot make the run folder {run.root} ({exc.strerror or exc}): set runs_dir to a folder "
                       f"you can write to (runs_dir: {cfg.runs_dir})") from None
    if not os.access(run.logs, os.W_OK | os.X_OK):
        raise T2SError(f"the run folder {run.root} is not writable: set runs_dir to a folder you can write to, or "
                       "fix its permissions")
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


def staging_path(final: Path) -> Path:
    """Where `final` is written before it is put in place: `<final>.partial` beside it (fresh_staging empties it)."""
    return final.with_name(final.name + ".partial")


def fresh_staging(final: Path, keep: tuple[str, ...] = ()) -> Path:
    """An empty staging folder beside `final`, but for the entries named in `keep` that an interrupted job left."""
    staging = staging_path(final)
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


def _read_yaml(path: Path) -> dict:
    """A settings file t2s wrote ({} when missing); a clear error when it was damaged."""
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        raise T2SError(f"{path} is not valid YAML: restore it, or redo the job that wrote it with --force") from None
    return data if isinstance(data, dict) else {}
