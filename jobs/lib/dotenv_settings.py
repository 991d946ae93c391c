"""The non-secret settings that t2s and t2s-infra read from `.env` as well as from the environment (.env.example's
section "read from .env by t2s and t2s-infra"). The environment wins; .env fills in what it leaves unset, before a
command runs, so that every reader (and every process a command starts: the training workers) sees the same value.
Secrets are not among them: jobs.lib.credentials reads those where they are needed and never puts them in the environment.
"""

from __future__ import annotations

import os
from pathlib import Path

from dotenv import dotenv_values

# name → where it is read (for .env.example's comments; tests/test_ux.py checks that the two agree)
DOTENV_SETTINGS = {
    "T2S_DECODER": "eval.decoder (jobs.lib.config), and jobs.lib.generate: ask and the Python API",
    "T2S_LLAMA_CPP_DIR": "jobs.export: llama.cpp's converter",
    "T2S_PUSH_BACKOFF_S": "push.backoff_s (jobs.lib.config)",
    "T2S_PUSH_TIMEOUT_S": "push.timeout_s (jobs.lib.config)",
    "T2S_STATE_DIR": "infra.records: t2s-infra",
    "T2S_LOGS_REPO": "t2s-infra logs, upload-logs",
}


def load_dotenv_settings(env_file: str | Path = ".env") -> dict[str, str]:
    """Sets each DOTENV_SETTINGS variable that the environment leaves unset (or empty) from `env_file`; returns
    what it set."""
    path = Path(env_file)
    if not path.is_file():
        return {}
    try:
        values = dotenv_values(path)
    except (OSError, UnicodeDecodeError):  # an unreadable .env: the secrets' reader says so where one is needed
        return {}
    found = {name: values[name] for name in DOTENV_SETTINGS
             if not os.environ.get(name) and isinstance(values.get(name), str) and values[name].strip()}
    os.environ.update(found)
    return found
