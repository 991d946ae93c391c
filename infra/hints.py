"""How printed next steps name t2s-infra, so that each runs as shown."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def me() -> str:
    """t2s-infra as the user can type it again: by name when that is on PATH, else by the path it was run by
    (`make` runs .venv/bin/t2s-infra, which is not on PATH), so that every printed next step runs as shown.
    Run some other way (python -m infra.cli, in-process), by its name."""
    on_path = shutil.which("t2s-infra")
    ran = Path(sys.argv[0] if sys.argv else "")
    if ran.name == "t2s-infra" and ran.is_file():
        if on_path and Path(on_path).resolve() == ran.resolve():
            return "t2s-infra"
        relative = os.path.relpath(ran.absolute(), Path.cwd())
        return relative if not relative.startswith("..") else str(ran.absolute())
    return "t2s-infra"
