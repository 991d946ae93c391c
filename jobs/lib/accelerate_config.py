"""The accelerate config a run trains with (`train.accelerate_config`): where it is, what it says, checked.

One reader for everyone: train launches accelerate with it, and t2s-infra's preflight sizes the pod from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from jobs.lib.config import read_yaml_mapping
from jobs.lib.errors import T2SError
from jobs.lib.shipped import accelerate_configs_dir

ACCELERATE_CONFIGS = accelerate_configs_dir()  # configs/accelerate/, in a checkout or the installed package


@dataclass(frozen=True)
class Accelerate:
    """What t2s reads from an accelerate config."""
    name: str  # as the config names it
    processes: int  # in total
    machines: int
    deepspeed: bool
    shipped: bool  # one of configs/accelerate/ (a pod has only these), not a file of this machine


def accelerate_config_path(name: str) -> Path:
    path = Path(name)
    if path.suffix in {".yaml", ".yml"} and path.is_file():
        return path
    shipped = ACCELERATE_CONFIGS / f"{name}.yaml"
    if shipped.is_file():
        return shipped
    known = ", ".join(sorted(p.stem for p in ACCELERATE_CONFIGS.glob("*.yaml")))
    raise T2SError(f"train.accelerate_config '{name}' is neither a YAML file nor a shipped config ({known})")


def check_accelerate_config(accelerate: dict, where: Path) -> None:
    """The keys t2s reads from an accelerate config hold what accelerate expects (accelerate itself would fail only
    after the launch, in every process)."""
    for key in ("num_processes", "num_machines"):
        value = accelerate.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise T2SError(f"accelerate config {where}: {key} must be a whole number >= 1 (got {value!r})")
    deepspeed = accelerate.get("deepspeed_config", {})
    if not isinstance(deepspeed, dict):
        raise T2SError(f"accelerate config {where}: deepspeed_config must be a mapping (got {deepspeed!r})")
    stage = deepspeed.get("zero_stage", 0)
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        raise T2SError(f"accelerate config {where}: deepspeed_config.zero_stage must be 0, 1, 2 or 3 (got {stage!r})")


def read_accelerate_config(name: str) -> tuple[Path, dict]:
    """(path, settings) of train.accelerate_config, checked; one line for a file that is not one."""
    path = accelerate_config_path(name)
    accelerate = read_yaml_mapping(path, "accelerate config", "e.g. train.accelerate_config: single")
    check_accelerate_config(accelerate, path)
    return path, accelerate


def read_accelerate(name: str) -> Accelerate:
    """train.accelerate_config summed up: how many processes on how many machines, DeepSpeed or not."""
    path, accelerate = read_accelerate_config(name)
    return Accelerate(name=name, processes=int(accelerate.get("num_processes", 1)),
                      machines=int(accelerate.get("num_machines", 1)),
                      deepspeed=accelerate.get("distributed_type") == "DEEPSPEED",
                      shipped=path.parent == ACCELERATE_CONFIGS)
