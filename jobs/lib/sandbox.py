"""Untrusted SQL, run read-only in SQLite, where its limits hold whatever the SQL does.

Predicted SQL (eval's scoring, `t2s ask --run`) runs in worker processes that a Sandbox starts and watches:
- an authorizer allows reading only: no write, ATTACH, PRAGMA, extension or unsafe function;
- a progress handler stops a query at its time limit, and when one SQLite call runs on past it anyway (a huge
  printf, a statement that explodes while it is prepared) the Sandbox kills the worker and starts a fresh one;
- a worker's address space is capped (RLIMIT_AS), temporary tables stay in memory under that cap, and rows are
  counted and sized one at a time as they are fetched, so no result grows past its limit in Python;
- a user's database file is opened read-only, and a WAL database (which SQLite opens with -wal and -shm files
  beside it, even read-only) is read from a private copy: nothing is ever written beside the user's file.
run_readonly is the runner itself; it applies every limit but the kill and the memory cap wherever it is called.
"""

from __future__ import annotations

import atexit
import mmap
import os
import pickle
import resource
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, Pipe, wait
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from jobs.lib.errors import T2SError

# Functions a query may call: SQLite's core, aggregate, window, date and math functions. Left out on purpose:
# load_extension, random/randomblob/zeroblob (nondeterminism, memory), sqlite_* and changes-style introspection.
SAFE_FUNCTIONS = frozenset("""
    abs avg char coalesce concat concat_ws count cume_dist date datetime dense_rank first_value format glob
    group_concat hex ifnull iif instr julianday lag last_value lead length like likelihood likely lower ltrim max
    min nth_value ntile nullif octet_length percent_rank printf quote rank replace round row_number rtrim sign
    string_agg strftime substr substring sum time total trim typeof unicode unixepoch unlikely upper
    acos asin atan atan2 ceil ceiling cos degrees exp floor ln log log10 log2 mod pi pow power radians sin sqrt tan
    trunc
""".split())
READ_ACTIONS = (sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_RECURSIVE)
ACTION_NAMES = {getattr(sqlite3, f"SQLITE_{name}"): name.replace("_", " ") for name in (
    "ATTACH", "DETACH", "PRAGMA", "INSERT", "UPDATE", "DELETE", "TRANSACTION", "SAVEPOINT", "ANALYZE", "REINDEX",
    "ALTER_TABLE", "CREATE_TABLE", "CREATE_TEMP_TABLE", "CREATE_VIEW", "CREATE_TEMP_VIEW", "CREATE_INDEX",
    "CREATE_TRIGGER", "CREATE_VTABLE", "DROP_TABLE", "DROP_TEMP_TABLE", "DROP_VIEW", "DROP_TEMP_VIEW",
    "DROP_INDEX", "DROP_TRIGGER", "DROP_VTABLE")}

PROGRESS_STEPS = 1000  # SQLite VM instructions between wall-clock checks
MAX_VALUE_BYTES = 100_000  # longest string or blob a query may build (Python >= 3.11; below, the memory cap holds)
MAX_RESULT_BYTES = 50_000_000  # characters and bytes of a result's values, numbers and NULLs counting 8
WORKER_MEMORY_BYTES = 1 << 30  # address space a worker may add to what it maps at start: SQLite, rows, parsing
MAX_DATABASE_COPIES = 4  # WAL databases a Sandbox keeps a private copy of (one copy each: its latest state)
COPY_ATTEMPTS = 5  # copies of a database being written, before a query on it gives up
KILL_GRACE_S = 0.5  # how long past its time limit a query may run before its worker is killed
TASK_BUDGET_S = 60.0  # a task's time between queries (parsing, building databases) before its worker is killed
WATCH_EVERY_S = 0.05  # how often a Sandbox looks at its busy workers' deadlines
QUEUED_TASKS = 2  # tasks sent to a worker at once, so that it never waits for its next one
OUT_OF_MEMORY_EXIT = 3  # a worker's exit code when Python itself ran out of memory


class QueryError(Exception):
    """A query that did not run to the end in the sandbox; str() is a short reason. When the Sandbox had to kill or
    lost the worker, `role` is what that worker was running: the role its query was given, or "" between queries."""

    role = "query"


class QueryRefused(QueryError):
    """The query tried something besides reading: a write, ATTACH, PRAGMA, an unsafe function."""


class QueryTimeout(QueryError):
    """The query ran past its time limit."""


class QueryFailed(QueryError):
    """SQLite rejected or failed the query, it ran out of memory, or its result was over the row or size limit."""


@dataclass(frozen=True)
class QueryRows:
    columns: list[str] | None  # None when SQLite gave no names
    rows: list[tuple]


# ---------- the runner ----------

def run_readonly(conn: sqlite3.Connection, sql: str, timeout_s: float, row_limit: int,
                 role: str = "query", stop_at_limit: bool = False) -> QueryRows:
    """The rows of one statement run with reading allowed only, under a time limit, a row limit and a size limit,
    checked row by row as they are fetched. Raises QueryRefused, QueryTimeout or QueryFailed. The connection's
    handlers are removed afterwards. In a Sandbox worker, the Sandbox also kills a query that runs KILL_GRACE_S past
    its limit, and reports it by `role` (e.g. "gold", "prediction"). With `stop_at_limit`, a result over the row
    limit is cut there (its first row_limit rows) instead of failing."""
    refused: list[str] = []
    timed_out = False
    deadline = time.monotonic() + timeout_s

    def authorize(action, arg1, arg2, db_name, trigger):
        if action in READ_ACTIONS or (action == sqlite3.SQLITE_FUNCTION and arg2.lower() in SAFE_FUNCTIONS):
            return sqlite3.SQLITE_OK
        what = f"{arg2}()" if action == sqlite3.SQLITE_FUNCTION else f"{ACTION_NAMES.get(action, action)} {arg1 or ''}"
        refused.append(what.strip())  # e.g. "DELETE singer", "ATTACH /tmp/x.db", "load_extension()"
        return sqlite3.SQLITE_DENY

    def past_deadline():
        nonlocal timed_out
        timed_out = time.monotonic() > deadline
        return timed_out

    if hasattr(conn, "enable_load_extension"):  # absent when Python's sqlite3 was built without extensions
        conn.enable_load_extension(False)
    conn.execute("PRAGMA temp_store = MEMORY")  # sorts and DISTINCT stay under the memory cap, and off the disk
    # Python 3.10 (the CUDA 11.8 image) has no setlimit: there a worker's memory cap bounds one value instead.
    old_length = conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES) if hasattr(conn, "setlimit") else None
    conn.set_authorizer(authorize)
    conn.set_progress_handler(past_deadline, PROGRESS_STEPS)
    _set_deadline(timeout_s + KILL_GRACE_S, timeout_s, role)
    try:
        cursor = conn.execute(sql)
        rows, size = [], 0
        for row in cursor:
            if len(rows) == row_limit:
                if stop_at_limit:
                    break
                raise QueryFailed(f"exceeds row limit of {row_limit}")
            size += sum(len(value) if isinstance(value, (str, bytes)) else 8 for value in row)
            if size > MAX_RESULT_BYTES:
                raise QueryFailed(f"result exceeds {MAX_RESULT_BYTES // 1_000_000} MB")
            rows.append(row)
        return QueryRows([d[0] for d in cursor.description] if cursor.description else None, rows)
    except MemoryError:
        raise QueryFailed("out of memory") from None
    except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError) as error:
        if refused:
            raise QueryRefused(f"{refused[0]} is not allowed") from None
        if timed_out:
            raise QueryTimeout(f"ran past {timeout_s:g} s") from None
        raise QueryFailed(str(error).splitlines()[0] if str(error) else type(error).__name__) from None
    finally:
        working_on(_role)
        conn.set_progress_handler(None, 0)
        # Python 3.10 (the CUDA 11.8 image) takes None as an authorizer that denies everything
        conn.set_authorizer(None if sys.version_info >= (3, 11) else lambda *_: sqlite3.SQLITE_OK)
        if old_length is not None:
            conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, old_length)


# ---------- a user's database file ----------

def is_wal(path: Path) -> bool:
    """Whether SQLite would open the file in WAL mode (bytes 18-19 of its header) or WAL files are beside it."""
    with open(path, "rb") as file:
        versions = file.read(100)[18:20]
    return 2 in versions or any(Path(f"{path}{suffix}").exists() for suffix in ("-wal", "-shm"))


def readable_path(path: Path, private_dir: Path) -> Path:
    """A path SQLite can open read-only without writing anything beside `path`: the file itself for a
    rollback-journal database; for a WAL database, a copy of it and of its -wal (what is not yet checkpointed) in a
    new folder under `private_dir`. Raises OSError when the file cannot be read or copied."""
    path = path.resolve()  # SQLite follows a symbolic link and looks for the -wal beside its target
    if not is_wal(path):
        return path
    copy = Path(tempfile.mkdtemp(dir=private_dir)) / "database.sqlite"
    shutil.copyfile(path, copy)
    try:
        shutil.copyfile(f"{path}-wal", f"{copy}-wal")
    except FileNotFoundError:  # none, or the last writer checkpointed and removed it as it closed
        pass
    return copy


def connect_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection to a database file (a readable_path)."""
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)


_connections: dict[str, sqlite3.Connection] = {}  # in a worker: the files it has opened


def rows_from_file(path: str, sql: str, timeout_s: float, row_limit: int, stop_at_limit: bool = False) -> QueryRows:
    """Runs in a worker: the query's rows on a database file (a readable_path), opened read-only once a worker. A
    connection to a copy the Sandbox has since freed is closed, so the copy's disk space is given back."""
    for stale in [p for p in _connections if p != path and not Path(p).exists()]:
        _connections.pop(stale).close()
    if path not in _connections:
        try:
            _connections[path] = connect_readonly(Path(path))
        except sqlite3.Error as error:
            raise QueryFailed(f"cannot open the database ({error})") from None
    return run_readonly(_connections[path], sql, timeout_s, row_limit, stop_at_limit=stop_at_limit)


def schema_from_sqlite(path: str | Path) -> str:
    """The tables of a SQLite file as a context string in the training format, `CREATE TABLE name (column TYPE, ...)`
    joined by "; ", with declared types and no constraints. Nothing is written beside the file."""
    file = Path(path)
    if not file.is_file():
        what = "a folder, not a file" if file.is_dir() else "no such file"
        raise T2SError(f"{path}: {what}; pass --db the path of a SQLite database file")
    try:
        with tempfile.TemporaryDirectory(prefix="t2s-schema-") as private:
            conn = connect_readonly(readable_path(file, Path(private)))
            try:
                names = [name for (name,) in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY rowid")]
                tables = {name: conn.execute("SELECT name, type FROM pragma_table_info(?)", (name,)).fetchall()
                          for name in names}
            finally:
                conn.close()
    except OSError as error:
        raise T2SError(f"{path}: cannot be read ({error.strerror or error}); pass --db a readable SQLite "
                       "file") from None
    except sqlite3.DatabaseError as error:
        raise T2SError(f"{path}: not a readable SQLite database ({error}); pass --db a SQLite file") from None
    if not tables:
        raise T2SError(f"{path}: the database has no tables; pass --db a SQLite file with tables")
    return "; ".join(
        f"CREATE TABLE {identifier(name)} ({', '.join(f'{identifier(c)} {t}'.strip() for c, t in columns)})"
        for name, columns in tables.items())


def identifier(name: str) -> str:
    """A name as the training contexts write it: bare, quoted only where it must be."""
    from sqlglot import exp  # here, so that a worker's start-up does not import sqlglot

    from jobs.lib.sqlcheck import DIALECT

    return exp.to_identifier(name).sql(dialect=DIALECT)


# ---------- worker processes ----------

# A worker's deadline, shared with its Sandbox through a small memory-mapped file: when it must be done by
# (time.monotonic(), the same clock in every process), the running query's time limit (0 between queries) and the
# role of its work. The worker writes it as each query starts and ends, without waking the Sandbox, which reads it
# as it watches, and reports the role when it kills the worker.
DEADLINE = struct.Struct("dd32s")
_deadline: mmap.mmap | None = None  # set in a worker
_role = ""  # in a worker: what it works on between queries
_budget_s = TASK_BUDGET_S  # in a worker: its Sandbox's time allowed between queries


def working_on(role: str) -> None:
    """In a worker: from now on its work (between queries) is `role`'s, e.g. the prediction's; a no-op elsewhere."""
    global _role
    _role = role
    _set_deadline(_budget_s, 0.0, role)


def _set_deadline(seconds: float, limit_s: float, role: str) -> None:
    if _deadline is not None:
        DEADLINE.pack_into(_deadline, 0, time.monotonic() + seconds, limit_s, role.encode()[:32])


def serve() -> None:
    """A worker's loop (`python -c "...; jobs.lib.sandbox.serve()" PIPE_FD DEADLINE_FILE MEMORY_BYTES BUDGET_S`,
    started by a Sandbox): cap the address space, then run each (function, args) received and send back what came
    of it, with the worker's peak resident memory."""
    global _deadline, _budget_s
    pipe = Connection(int(sys.argv[1]))
    with open(sys.argv[2], "r+b") as file:
        _deadline = mmap.mmap(file.fileno(), DEADLINE.size)
    _budget_s = float(sys.argv[4])
    cap = _status_bytes("VmSize") + int(sys.argv[3])  # above what this Python maps at start, whatever the build
    try:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    except (ValueError, OSError):  # a platform without RLIMIT_AS (macOS): the time and size limits still hold
        pass
    pipe.send(("ready",))
    while True:
        try:
            task = pipe.recv_bytes()
        except (EOFError, OSError):  # the Sandbox closed, or its process ended (a reset pipe is an OSError)
            return
        working_on("")
        try:
            function, args = pickle.loads(task)  # here, so that a function it cannot import is reported as a bug
            outcome = ("done", function(*args))
        except QueryError as error:
            outcome = ("raised", error)
        except MemoryError:
            os._exit(OUT_OF_MEMORY_EXIT)
        except Exception:
            outcome = ("crashed", traceback.format_exc())
        DEADLINE.pack_into(_deadline, 0, 0.0, 0.0, b"")
        pipe.send((*outcome, peak_memory_bytes()))


def peak_memory_bytes() -> int:
    """This process's peak resident memory. Linux's VmHWM, not getrusage: its ru_maxrss carries over the parent's
    peak through fork and exec."""
    return _status_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS


def _status_bytes(name: str) -> int:
    """A size from Linux's /proc/self/status (VmSize, VmHWM...); 0 elsewhere."""
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.exists() else []:
        if line.startswith(f"{name}:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass(eq=False)
class _Worker:
    process: subprocess.Popen
    pipe: Connection
    deadline: mmap.mmap  # shared with the worker: see DEADLINE
    budget_s: float  # the time it may spend between queries
    started: bool = False  # it has said it is ready
    tasks: deque = field(default_factory=deque)  # indices of the tasks sent to it, the one it runs first
    since: float = 0.0  # when it last started a task, as far as the Sandbox knows

    def overdue(self) -> QueryTimeout | None:
        """The timeout to kill it for, when it is past its deadline; None otherwise."""
        stamp, limit_s, role = DEADLINE.unpack_from(self.deadline)
        deadline = stamp or self.since + self.budget_s  # 0: it has not begun the task yet
        if time.monotonic() < deadline or DEADLINE.unpack_from(self.deadline)[0] != stamp:
            return None  # in time, or it moved on while being read
        error = QueryTimeout(f"ran past {limit_s:g} s" if limit_s else
                             f"its work between queries ran past {self.budget_s:g} s")
        error.role = role.rstrip(b"\0").decode(errors="replace")
        return error


class Sandbox:
    """A pool of worker processes that run functions calling run_readonly, each under the worker's memory cap.
    The Sandbox kills a worker whose query runs KILL_GRACE_S past its time limit, or that spends `task_budget_s`
    between queries, and starts a fresh one in its place.

        with Sandbox(workers=4) as sandbox:
            for result in sandbox.map(function, tasks, if_killed): ...
            rows = sandbox.query_file("shop.sqlite", "SELECT ...", timeout_s=5, row_limit=1000)
    """

    def __init__(self, workers: int = 1, memory_bytes: int = WORKER_MEMORY_BYTES,
                 task_budget_s: float = TASK_BUDGET_S):
        self.memory_bytes, self.task_budget_s = memory_bytes, task_budget_s
        self.kills = 0  # workers killed or lost
        self.peak_worker_memory_bytes = 0  # the largest resident size a worker reported
        self._private = tempfile.TemporaryDirectory(prefix="t2s-sandbox-")  # deadline files, copies of WAL databases
        self._copies: OrderedDict[str, tuple[tuple, Path]] = OrderedDict()  # database → (its state, readable path)
        self._workers: list[_Worker] = []
        self._closer = weakref.finalize(self, _stop_workers, self._workers)
        self._workers.extend(self._start() for _ in range(workers))

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._closer()
        self._private.cleanup()

    def map(self, function: Callable, tasks: Iterable[tuple],
            if_killed: Callable[[tuple, QueryError], Any]) -> Iterator:
        """function(*task) for each task, run in the workers, in the tasks' order. A task that ends in a QueryError
        (raised by the function, or made here when the Sandbox killed or lost its worker, with `role` set) gives
        if_killed(task, error) instead, computed here. `function` must be importable by name (it is pickled by
        reference); any other exception in it is a bug: RuntimeError with the worker's traceback."""
        tasks = list(tasks)
        unsent, results = deque(range(len(tasks))), {}
        yielded = 0
        try:
            while yielded < len(tasks):
                for worker in self._workers:
                    while unsent and len(worker.tasks) < QUEUED_TASKS:
                        self._send(worker, function, tasks, unsent.popleft())
                while yielded in results:
                    yield results.pop(yielded)
                    yielded += 1
                if yielded < len(tasks):
                    self._watch(tasks, unsent, results, if_killed)
        finally:  # a consumer that stops early leaves no worker busy with a task nobody waits for
            for index, worker in enumerate(self._workers):
                if worker.tasks:
                    self._replace(index)

    def run(self, function: Callable, *args) -> Any:
        """function(*args) in a worker; raises the QueryError the task ended in, if any."""

        def reraise(task: tuple, error: QueryError):
            raise error

        return next(self.map(function, [args], reraise))

    def query_file(self, path: str | Path, sql: str, timeout_s: float, row_limit: int,
                   stop_at_limit: bool = False) -> QueryRows:
        """The query's rows on a SQLite file, read-only, with nothing written beside it (see readable_path); with
        `stop_at_limit`, at most row_limit of them instead of a failure past it."""
        for attempt in range(2):
            readable = self._readable(Path(path))
            try:
                return self.run(rows_from_file, str(readable), sql, timeout_s, row_limit, stop_at_limit)
            except QueryFailed:  # the database changed under the query (switched to WAL, say): once more, as it is now
                known = self._copies.get(str(Path(path).resolve()))
                if attempt or known is None or known[0] == _file_stamps(Path(path).resolve()):
                    raise
        raise AssertionError("unreachable")

    # ---- inside ----

    def _start(self) -> _Worker:
        ours, theirs = Pipe()
        deadline_file = Path(tempfile.mkstemp(dir=self._private.name, suffix=".deadline")[1])
        deadline_file.write_bytes(bytes(DEADLINE.size))
        with open(deadline_file, "r+b") as file:
            deadline = mmap.mmap(file.fileno(), DEADLINE.size)
        # sys.path[0] is the working directory under -c: the worker imports this very jobs package instead
        package_root = str(Path(__file__).resolve().parents[2])
        boot = f"import sys; sys.path[0] = {package_root!r}; import jobs.lib.sandbox as s; s.serve()"
        process = subprocess.Popen(
            [sys.executable, "-c", boot, str(theirs.fileno()), str(deadline_file), str(self.memory_bytes),
             str(self.task_budget_s)],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            start_new_session=True)  # Ctrl-C in a terminal reaches the job, not its workers
        theirs.close()
        return _Worker(process, ours, deadline, self.task_budget_s)

    def _send(self, worker: _Worker, function: Callable, tasks: list[tuple], index: int) -> None:
        if not worker.tasks:
            worker.since = time.monotonic()
        worker.tasks.append(index)
        try:
            worker.pipe.send((function, tasks[index]))
        except (BrokenPipeError, ConnectionResetError):
            pass  # it died while idle: _watch sees the closed pipe and reports the task as lost

    def _watch(self, tasks: list[tuple], unsent: deque, results: dict[int, Any], if_killed: Callable) -> None:
        """Waits for a busy worker's message, or WATCH_EVERY_S, then kills the workers past their deadline."""
        busy = [(index, worker) for index, worker in enumerate(self._workers) if worker.tasks]
        ready = wait([worker.pipe for _, worker in busy], WATCH_EVERY_S)
        for index, worker in busy:
            if worker.pipe in ready:
                self._receive(index, tasks, unsent, results, if_killed)
            elif (timeout := worker.overdue()) is not None:
                self._give_up(index, timeout, tasks, unsent, results, if_killed)

    def _receive(self, index: int, tasks: list[tuple], unsent: deque, results: dict[int, Any],
                 if_killed: Callable) -> None:
        worker = self._workers[index]
        try:
            kind, *body = worker.pipe.recv()
        except (EOFError, OSError):
            lost = QueryFailed(self._death(worker))
            lost.role = DEADLINE.unpack_from(worker.deadline)[2].rstrip(b"\0").decode(errors="replace")
            self._give_up(index, lost, tasks, unsent, results, if_killed)
            return
        if kind == "ready":
            worker.started = True
            return
        value, peak_bytes = body
        self.peak_worker_memory_bytes = max(self.peak_worker_memory_bytes, peak_bytes)
        task, worker.since = worker.tasks.popleft(), time.monotonic()
        if kind == "crashed":
            raise RuntimeError(f"a sandbox worker failed on task {tasks[task]!r:.200}:\n{value}")
        results[task] = if_killed(tasks[task], value) if kind == "raised" else value

    def _give_up(self, index: int, error: QueryError, tasks: list[tuple], unsent: deque, results: dict[int, Any],
                 if_killed: Callable) -> None:
        """Kills the worker, puts a fresh one in its place, and records the task it ran as ended in `error`; the
        tasks queued behind it go to be sent again."""
        worker = self._workers[index]
        if not worker.started and worker.process.poll() is not None:
            raise RuntimeError(f"a sandbox worker could not start ({self._death(worker)}); its error is above")
        task, *queued = worker.tasks
        unsent.extendleft(reversed(queued))
        self._replace(index)
        self.kills += 1
        results[task] = if_killed(tasks[task], error)

    def _replace(self, index: int) -> None:
        _stop_workers([self._workers[index]])
        self._workers[index] = self._start()

    def _death(self, worker: _Worker) -> str:
        """Why a worker's pipe closed, in a few words."""
        try:
            code = worker.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "its worker stopped answering"
        if code == OUT_OF_MEMORY_EXIT:
            return f"out of memory (past the sandbox's {self.memory_bytes >> 20} MiB)"
        if code < 0:
            return f"its worker was killed by {signal.Signals(-code).name}"
        return f"its worker ended (exit code {code})"

    def _readable(self, path: Path) -> Path:
        """readable_path, copied once per state of the database (the identity, modification time and size of the
        file and of its -wal): the copy of an earlier state is freed when a new one is made, at most
        MAX_DATABASE_COPIES databases keep a copy (the least recently queried goes first), and a copy is kept only
        when the database did not change while it was copied (a database being written is copied again)."""
        path = path.resolve()
        name = str(path)
        for _ in range(COPY_ATTEMPTS):
            state = _file_stamps(path)
            known = self._copies.get(name)
            if known is not None and known[0] == state:
                self._copies.move_to_end(name)
                return known[1]
            readable = readable_path(path, Path(self._private.name))
            if _file_stamps(path) == state:  # one state, whole: not a database torn by a write during the copy
                self._keep(name, state, readable)
                return readable
            self._free(readable)
        raise QueryFailed(f"the database changed while it was copied, {COPY_ATTEMPTS} times running: query it again "
                          "when writes to it pause")

    def _keep(self, name: str, state: tuple, readable: Path) -> None:
        if name in self._copies:
            self._free(self._copies.pop(name)[1])
        self._copies[name] = (state, readable)
        while len(self._copies) > MAX_DATABASE_COPIES:
            self._free(self._copies.popitem(last=False)[1][1])

    def _free(self, readable: Path) -> None:
        """Deletes a copy readable_path made (never the user's own file): the folder it was made in."""
        folder = readable.parent
        if folder.parent == Path(self._private.name):
            shutil.rmtree(folder, ignore_errors=True)


def _file_stamps(path: Path) -> tuple:
    """The state of a database: (name, device, inode, modification time, size) of the file and of its -wal when there
    is one, and the header bytes that say whether it is in WAL mode."""
    stamps = []
    for file in (path, Path(f"{path}-wal")):
        try:
            stat = file.stat()
        except FileNotFoundError:
            continue
        stamps.append((file.name, stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size))
    try:
        with open(path, "rb") as file:
            stamps.append(file.read(100)[18:20])
    except OSError:
        pass
    return tuple(stamps)


def _stop_workers(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.pipe.close()
        worker.process.kill()  # a worker holds nothing worth a graceful stop
        worker.process.wait()
        worker.deadline.close()


_shared: Sandbox | None = None


def shared() -> Sandbox:
    """One worker for this process's occasional queries (`t2s ask --run`), started on first use, closed at exit."""
    global _shared
    if _shared is None:
        _shared = Sandbox(workers=1)
        atexit.register(_shared.close)
    return _shared
