"""One job at a time in a run folder. Two jobs in one run (a second `docker run t2s:train` on the same volume, a
hand-run `t2s export` beside a pipeline) would resume from, stage into and replace the same folders: the second one
gets one line instead. The lock is the kernel's (flock), so a job that is killed, however, never leaves it held."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

from jobs.lib.errors import T2SError

LOCK_FILE = ".t2s.lock"  # in the run folder; it says which job holds it (for the line the next one prints)
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # a file system without flock (some network mounts)


@contextlib.contextmanager
def hold_run(root: Path, job: str):
    """Holds the run folder's lock while the block runs, or raises one line naming the job that holds it. Where the
    file system has no locks, the block runs unlocked (as before there was a lock)."""
    try:
        handle = open(root / LOCK_FILE, "a+")
    except OSError as exc:
        raise T2SError(f"cannot open the run's lock file {root / LOCK_FILE} ({exc.strerror or exc}): remove what is "
                       "there, or make the run folder writable") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            handle.seek(0)
            holder = " ".join(handle.read(200).split()) or "another t2s job"  # one short line, whatever the file holds
            raise T2SError(f"{holder} is running in {root}: one job at a time in a run; wait for it to end (or stop "
                           f"it), then run this again") from None
        except OSError as exc:
            if exc.errno not in _NO_LOCKS:
                raise
            locked = False  # (the job runs outside this handler: its errors are not chained to the OSError)
        if not locked:
            yield
            return
        handle.truncate(0)  # ("a+" writes at the end, which is now the start)
        handle.write(f"t2s {job} (pid {os.getpid()})")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)
