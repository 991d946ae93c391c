"""What running predicted SQL in sandbox workers costs eval's scoring, against scoring in the job's own process.

    git archive 320ff8e | tar -x -C /tmp/before     # the last commit that scored in the job's own process
    python bench/sandbox_cost.py --rows ../shared/data/sql-create-context/validation.jsonl --out bench/results/cpu \
        --before /tmp/before [--repeats 3] [--workers 1,2]

Scores every row with its gold query as the prediction (jobs.lib.scoring.score_answer: SQL-only, exact match,
execution on 3 generated databases, 1 s limit), as eval does, in the same invocation:
  before       --before's eval.score in a plain loop (in a child process, which imports that tree's jobs package)
  in_process   this tree's score_answer in a plain loop in this process: the same work as the workers do
  workers_N    eval.score_answers through a Sandbox of N workers (started before the clock runs)
then the sandbox's fixed costs: starting a worker, and a printf bomb killed at its limit and its worker replaced.
Wall seconds and CPU seconds (this process's, plus its workers' from /proc): on a shared machine CPU seconds say
more about the cost. Prints and writes one JSON file (sandbox_cost_py<version>.json).
"""

import argparse
import functools
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import time
from collections import Counter
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from jobs import eval as eval_job  # noqa: E402
from jobs.lib.config import EvalConfig  # noqa: E402
from jobs.lib.sandbox import KILL_GRACE_S, Sandbox  # noqa: E402
from jobs.lib.scoring import score_answer  # noqa: E402

PRINTF_BOMB = " UNION ALL ".join(["SELECT printf('%.*c', 2147483647, 'x')"] * 6)

parser = argparse.ArgumentParser()
parser.add_argument("--rows", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--repeats", type=int, default=3)
parser.add_argument("--workers", default="1,2")
parser.add_argument("--before", help="a checkout of t2s from before the sandbox, to time its in-process scoring")
args = parser.parse_args()

rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines() if line.strip()]
answers = [row["answer"] for row in rows]
cfg = EvalConfig()  # eval's defaults: 3 databases of 8 rows a table, 1 s and 10,000 rows a query
settings = {"databases": cfg.databases_per_example, "rows_per_table": cfg.rows_per_table,
            "timeout_s": cfg.query_timeout_s, "row_limit": cfg.row_limit}
score_one = functools.partial(score_answer, **settings)


def in_process() -> list[dict]:
    return [score_one(row["context"], row["answer"], answer, seed)
            for seed, (row, answer) in enumerate(zip(rows, answers))]


BEFORE = """
import json, sys, time
from collections import Counter
from jobs import eval
from jobs.lib.config import EvalConfig
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
started, cpu = time.perf_counter(), time.process_time()
scored = [eval.score(row, row["answer"], EvalConfig(), seed=i) for i, row in enumerate(rows)]
print(json.dumps([time.perf_counter() - started, time.process_time() - cpu, Counter(s["execution"] for s in scored)]))
"""


def before() -> tuple[float, float, list[dict]]:
    """The older tree's scoring, timed inside its own process (its imports left out)."""
    done = subprocess.run([sys.executable, "-c", BEFORE, str(Path(args.rows).resolve())], capture_output=True,
                          text=True, check=True, cwd=args.before, env={**os.environ, "PYTHONPATH": args.before})
    seconds, cpu_seconds, outcomes = json.loads(done.stdout)
    return seconds, cpu_seconds, [{"execution": outcome} for outcome, count in outcomes.items() for _ in range(count)]


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(score, sandbox: Sandbox | None = None) -> tuple[float, float, list[dict]]:
    """Wall and CPU seconds of score(): this process's CPU, plus its sandbox workers'."""
    workers = [worker.process.pid for worker in sandbox._workers] if sandbox else []
    started, cpu, workers_cpu = time.perf_counter(), time.process_time(), sum(map(cpu_seconds, workers))
    scored = score()
    return (time.perf_counter() - started, time.process_time() - cpu + sum(map(cpu_seconds, workers)) - workers_cpu,
            scored)


runs: dict[str, dict] = {}
load_before = os.getloadavg()  # the machine may be shared: its load says how far to trust small differences
sandboxes = {f"workers_{n}": Sandbox(workers=int(n)) for n in args.workers.split(",")}
for name, sandbox in sandboxes.items():  # start-up and first imports (sqlglot) out of the timed runs
    eval_job.score_answers(rows[:8], answers[:8], cfg, sandbox)
for repeat in range(args.repeats):  # interleaved, so a noisy neighbour hits every configuration alike
    configurations = [("in_process", lambda: timed(in_process)),
                      *((n, lambda s=s: timed(lambda: eval_job.score_answers(rows, answers, cfg, s), s))
                        for n, s in sandboxes.items())]
    for name, measure in ([("before", before)] if args.before else []) + configurations:
        seconds, cpu, scored = measure()
        run = runs.setdefault(name, {"seconds": [], "cpu_seconds": [],
                                     "outcomes": dict(Counter(s["execution"] for s in scored))})
        run["seconds"].append(round(seconds, 3))
        run["cpu_seconds"].append(round(cpu, 3))
        print(f"{name} #{repeat + 1}: {seconds:.2f} s, {len(rows) / seconds:.0f} rows/s, {cpu:.2f} CPU s", flush=True)
for name, sandbox in sandboxes.items():
    runs[name]["peak_worker_memory_mib"] = round(sandbox.peak_worker_memory_bytes / 2**20, 1)
    runs[name]["kills"] = sandbox.kills
    sandbox.close()
for name, run in runs.items():
    run["median_s"] = statistics.median(run["seconds"])
    run["median_cpu_s"] = statistics.median(run["cpu_seconds"])
    run["rows_per_s"] = round(len(rows) / run["median_s"], 1)
    run["cpu_ms_per_row"] = round(run["median_cpu_s"] / len(rows) * 1000, 3)
for run in runs.values():
    for baseline in ("in_process", "before"):
        if baseline in runs:
            run[f"speed_vs_{baseline}"] = round(runs[baseline]["median_s"] / run["median_s"], 2)
            run[f"cpu_vs_{baseline}"] = round(run["median_cpu_s"] / runs[baseline]["median_cpu_s"], 2)

starts = []
for _ in range(5):  # a worker from nothing to its first answer (what a kill costs on top of the time limit)
    started = time.perf_counter()
    with Sandbox() as sandbox:
        sandbox.run(score_one, rows[0]["context"], rows[0]["answer"], answers[0], 0)
    starts.append(time.perf_counter() - started)
with Sandbox() as sandbox:
    sandbox.run(score_one, rows[0]["context"], rows[0]["answer"], answers[0], 0)
    started = time.perf_counter()
    [bomb] = eval_job.score_answers(rows[:1], [PRINTF_BOMB], cfg, sandbox)
    killed_after = time.perf_counter() - started
    started = time.perf_counter()
    eval_job.score_answers(rows[:1], answers[:1], cfg, sandbox)
    next_answer = time.perf_counter() - started

commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                       text=True)
cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
results = {
    "machine": {"cpu": cpu, "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                else os.cpu_count(), "os": platform.platform(),
                "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()}},
    "versions": {"python": platform.python_version(), "sqlite": sqlite3.sqlite_version, "sqlglot": version("sqlglot")},
    "commit": commit.stdout.strip() + ("+changes" if dirty.stdout.strip() else ""),
    "config": {"rows": len(rows), "source": args.rows, "prediction": "the gold query", **settings,
               "repeats": args.repeats, "before": args.before},
    "runs": runs,
    "worker_start_to_first_answer_s": {"median": round(statistics.median(starts), 3),
                                       "all": [round(s, 3) for s in starts]},
    "printf_bomb": {"outcome": bomb["execution"], "detail": bomb["execution_detail"], "limit_s": cfg.query_timeout_s,
                    "kill_grace_s": KILL_GRACE_S, "answered_after_s": round(killed_after, 3),
                    "next_answer_after_s": round(next_answer, 3)},
}
print(json.dumps(results, indent=2))
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
name = f"sandbox_cost_py{sys.version_info.major}{sys.version_info.minor}.json"
(out / name).write_text(json.dumps(results, indent=2) + "\n")
