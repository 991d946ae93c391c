"""Tasks for tests of jobs.lib.sandbox.Sandbox: importable by its workers (they run from the repository root)."""

import os
import time

from jobs.lib import sandbox


def square(x: int) -> int:
    return x * x


def die() -> None:
    sandbox.working_on("prediction")
    os._exit(9)


def run_out_of_memory() -> None:
    sandbox.working_on("gold")
    bytearray(4 << 30)  # 4 GiB, far past the cap


def sleep(seconds: float) -> float:
    sandbox.working_on("prediction")
    time.sleep(seconds)
    return seconds


def fail() -> None:
    raise ValueError("a bug")


def open_connections() -> int:
    """How many database files this worker holds open."""
    return len(sandbox._connections)
