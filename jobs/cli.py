"""`t2s prep|train|merge|eval|push|pipeline|ask`: one CLI over the jobs, all taking the same config file.

Each job module exposes `run(cfg, run_dir) -> str` (its summary line). This shell loads and validates the
config, opens the run directory, tees output into runs/<id>/logs/<job>.log, and turns T2SError into one
line on stderr and exit code 2: tracebacks are for bugs.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from jobs.ask import ask_command
from jobs.config import Config, load_config
from jobs.errors import T2SError
from jobs.rundir import JOBS, RunDir, open_run

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune small chat models into SQL-only text-to-SQL models.")

ConfigOption = typer.Option(None, "--config", "-c", help="Run config (YAML). Defaults apply to what it leaves out.")
SetOption = typer.Option([], "--set", "-s", help="Override one key, e.g. --set train.learning_rate=1e-4 (repeatable).")
ForceOption = typer.Option(False, "--force", help="Redo the job even if its .done marker says it finished.")


class _Tee:
    """Writes to the terminal and to the job's log file."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text):
        self.stream.write(text)
        self.log.write(text)
        return len(text)

    def flush(self):
        self.stream.flush()
        self.log.flush()

    def isatty(self):
        return self.stream.isatty()

    def fileno(self):
        return self.stream.fileno()


@contextlib.contextmanager
def tee_output(log_path: Path):
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", buffering=1) as log:
        old = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(old[0], log), _Tee(old[1], log)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = old


def fail(prefix: str, message: str, code: int = 2) -> None:
    print(f"{prefix}: error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def run_job(job: str, cfg: Config, force: bool) -> str:
    """Runs one job (skipping it when finished, unless forced); returns its summary line."""
    module = importlib.import_module(f"jobs.{job}")
    run = open_run(cfg)
    if run.is_done(job) and not force:
        return f"{job}: already finished in {run.root} ({run.marker(job).name}); --force redoes it"
    run.clear_done(job)
    with tee_output(run.logs / f"{job}.log"):
        started = time.monotonic()
        print(f"== t2s {job} · run {cfg.run_id} · {run.root}", flush=True)
        summary = module.run(cfg, run)
        print(f"== {job} done in {time.monotonic() - started:.1f}s: {summary}", flush=True)
    return summary


def _job_command(job: str):
    def command(config: Optional[Path] = ConfigOption, set_: list[str] = SetOption, force: bool = ForceOption):
        try:
            cfg = load_config(config, set_)
            run_job(job, cfg, force)
        except T2SError as exc:
            fail(f"t2s {job}", str(exc))
        except KeyboardInterrupt:
            fail(f"t2s {job}", "interrupted; rerun the same command to resume", code=130)

    command.__doc__ = {
        "prep": "Validate, split, render and tokenize the dataset into the run directory.",
        "train": "Fine-tune (LoRA / QLoRA / full) through accelerate; resumes from the latest checkpoint.",
        "merge": "Merge the adapter into the bf16 base and verify the logits match.",
        "eval": "Generate SQL for a split and score SQL-only rate, exact match and execution accuracy.",
        "push": "Upload the model, card, report and logs to the Hugging Face Hub (or --set push.dry_run=true).",
    }[job]
    return command


for _job in JOBS:
    if _job != "eval":
        app.command(name=_job)(_job_command(_job))


@app.command(name="eval")
def eval_command(config: Optional[Path] = ConfigOption, set_: list[str] = SetOption, force: bool = ForceOption,
                 compare: list[Path] = typer.Option([], "--compare", help="Two run folders to put side by side "
                                                    "(e.g. --compare runs/a --compare runs/b); writes compare.md/png."),
                 out: Path = typer.Option(Path("runs/compare"), "--out", help="Where --compare writes.")):
    """Generate SQL for a split and score SQL-only rate, exact match and execution accuracy."""
    if not compare:
        return _job_command("eval")(config, set_, force)
    if len(compare) != 2:
        fail("t2s eval", "--compare takes two run folders: --compare runs/a --compare runs/b")
    from jobs.eval import compare as compare_runs

    try:
        print(compare_runs(compare[0], compare[1], out))
    except T2SError as exc:
        fail("t2s eval", str(exc))


@app.command()
def pipeline(config: Optional[Path] = ConfigOption, set_: list[str] = SetOption, force: bool = ForceOption):
    """Run prep → train → merge → eval → push in order; finished jobs are skipped unless --force."""
    try:
        cfg = load_config(config, set_)
        for job in JOBS:
            print(run_job(job, cfg, force), flush=True)
        print(f"report: {RunDir(cfg.run_dir).eval / 'report.md'}")
    except T2SError as exc:
        fail("t2s pipeline", str(exc))
    except KeyboardInterrupt:
        fail("t2s pipeline", "interrupted; rerun the same command to resume", code=130)


app.command(name="ask")(ask_command)


def main() -> None:
    app()


def job_main(job: str) -> None:
    """`python -m jobs.<job> ...` is `t2s <job> ...`."""
    sys.argv = [f"t2s {job}", job, *sys.argv[1:]]
    app(prog_name="t2s")


if __name__ == "__main__":
    main()
