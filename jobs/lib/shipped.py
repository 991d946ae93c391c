"""The configs t2s ships (run configs and accelerate configs), wherever t2s is installed from.

One copy lives in the repository, `configs/`, where the README's `configs/...` paths point. A wheel carries the same
files as package data in `jobs/configs/` (pyproject.toml maps the package `jobs.configs` onto the folder `configs/`),
so an installed t2s finds them beside its package. A checkout (and the editable installs of `make install` and the
images) uses the repository's folder.

    t2s configs list                      # every shipped config, with its first comment line
    t2s configs copy demo my-run.yaml     # a copy to edit (torchtune's `tune cp`)
"""

from __future__ import annotations

import shutil
from pathlib import Path

from jobs.lib.errors import T2SError

_PACKAGE = Path(__file__).resolve().parents[1]  # jobs/, this module being jobs/lib/shipped.py


def configs_dir() -> Path:
    """The folder of shipped configs: the checkout's configs/, else the installed package's jobs/configs/."""
    for candidate in (_PACKAGE.parent / "configs", _PACKAGE / "configs"):
        if (candidate / "accelerate").is_dir():
            return candidate
    return _PACKAGE / "configs"  # not there: lookups fail with the list of what is (empty)


def accelerate_configs_dir() -> Path:
    return configs_dir() / "accelerate"


def shipped_configs() -> dict[str, Path]:
    """name → file: run configs by their stem ("demo"), accelerate configs as "accelerate/<stem>"."""
    root = configs_dir()
    found = {path.stem: path for path in sorted(root.glob("*.yaml"))}
    found.update({f"accelerate/{path.stem}": path for path in sorted((root / "accelerate").glob("*.yaml"))})
    return found


def description(path: Path, limit: int = 110) -> str:
    """What the file says it is: the first sentence of its leading comment, cut to `limit` characters."""
    words = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        words += line.lstrip("#").split()
    text = " ".join(words)
    end = text.find(". ")
    text = text[:end + 1] if end >= 0 else text
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def resolve(name: str) -> Path:
    """A shipped config by name ("demo", "accelerate/single"; ".yaml" and a leading "configs/" may be given)."""
    key = name.removeprefix("configs/").removesuffix(".yaml").removesuffix(".yml")
    configs = shipped_configs()
    if key not in configs:
        raise T2SError(f"no shipped config '{name}': `t2s configs list` shows them ({', '.join(configs)})")
    return configs[key]


def copy_config(name: str, dest: Path, force: bool = False) -> Path:
    """Copies a shipped config to `dest` (a file, or a folder to copy it into); refuses to overwrite unless `force`."""
    source = resolve(name)
    target = dest / source.name if dest.is_dir() else dest
    if target.exists() and not force:
        raise T2SError(f"{target} exists: choose another destination, or pass --force to overwrite it")
    if not target.parent.is_dir():
        raise T2SError(f"folder {target.parent} does not exist: create it first, or copy to an existing folder")
    shutil.copyfile(source, target)
    return target
