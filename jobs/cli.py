"""`t2s prep|train|merge|eval|push|pipeline|compare|ask|serve`: one CLI over the jobs, all taking the same config file.

    t2s <job> --config run.yaml [--set key=value ...] [--force]      (also: python -m jobs.cli <job> ...)

Each job module has `check(cfg, run)` (what can be known wrong before the job changes anything) and
`run(cfg, run) -> str` (its summary line). For a job, this shell loads and validates the config, opens the run
directory, stops a config that differs from the run's settings in what the job reads, skips a finished job unless
--force, then checks, starts and runs it, with its output teed into runs/<id>/logs/<job>.log. A T2SError is one line on
stderr and exit code 2 (jobs.lib.errors.one_line_errors): tracebacks are for bugs.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Optional

import typer

from jobs.ask_command import ask_command
from jobs.lib.config import Config, load_config
from jobs.lib.errors import T2SError, one_line_errors, run_app, version_option
from jobs.lib.rundir import JOBS, RunDir, open_run
from jobs.lib.runlock import hold_run
from jobs.serve import serve_command

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune small chat models into SQL-only text-to-SQL models.")

ConfigOption = typer.Option(None, "--config", "-c", help="Run config (YAML). Defaults apply to what it leaves out.")
SetOption = typer.Option([], "--set", "-s", help="Override one key, e.g. --set train.learning_rate=1e-4 (repeatable).")
ForceOption = typer.Option(False, "--force", help="Redo the job even if its .done marker says it finished (prep and "
                           "train: with your settings; train starts over).")


def job_module(job: str) -> ModuleType:
    """The module that does `job`. Imported when the job runs: torch alone takes seconds to import."""
    if job == "prep":
        from jobs import prep as module
    elif job == "train":
        from jobs import train as module
    elif job == "rl":
        from jobs import rl as module
    elif job == "merge":
        from jobs import merge as module
    elif job == "eval":
        from jobs import eval as module
    elif job == "push":
        from jobs import push as module
    elif job == "export":
        from jobs import export as module
    else:
        raise ValueError(f"no job {job!r}")
    return module


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
    with open(log_path, "a", buffering=1) as log:
        old = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(old[0], log), _Tee(old[1], log)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = old


def run_job(job: str, cfg: Config, force: bool) -> str:
    """Runs one job (skipping it when finished, unless forced); returns its summary line."""
    module = job_module(job)
    run = open_run(cfg)
    with hold_run(run.root, job):
        run.check_settings(job, cfg, force)
        if run.is_done(job) and not force:
            skipped = f"{job}: already finished in {run.root} ({run.marker(job).name}); --force redoes it"
            print(skipped, flush=True)
            return skipped
        with tee_output(run.job_log(job)):
            started = time.monotonic()
            print(f"== t2s {job} · run {cfg.run_id} · {run.root}", flush=True)
            try:
                module.check(cfg, run)
                run.start(job, cfg, force)
                summary = module.run(cfg, run)
            except KeyboardInterrupt:
                raise T2SError(f"interrupted; {what_a_rerun_does(job, run)}", exit_code=130) from None
            print(f"== {job} done in {time.monotonic() - started:.1f}s: {summary}", flush=True)
    return summary


def what_a_rerun_does(job: str, run: RunDir) -> str:
    if job == "train":
        from jobs.train import what_a_rerun_does as train_rerun

        return train_rerun(run)
    if job == "rl":
        from jobs.rl import what_a_rerun_does as rl_rerun

        return rl_rerun(run)
    return "rerun the same command to run it again (nothing it had finished before is lost)"


def _job_command(job: str, help_text: str):
    def command(config: Optional[Path] = ConfigOption, set_: list[str] = SetOption, force: bool = ForceOption):
        with one_line_errors(f"t2s {job}"):
            run_job(job, load_config(config, set_), force)

    command.__doc__ = help_text
    return command


JOB_HELP = {
    "prep": "Validate, split, render and tokenize the dataset into the run directory.",
    "train": "Fine-tune (LoRA / QLoRA / full) through accelerate; resumes from the latest complete checkpoint.",
    "rl": "GRPO with execution rewards (trl) from the trained model; resumes from its latest complete checkpoint.",
    "merge": "Merge the adapter into the fp32 base, check the logits, save in merge.dtype.",
    "eval": "Generate SQL for a split and score SQL-only rate, exact match and execution accuracy.",
    "export": "GGUF files (f16, q8_0, q4_k_m) and an Ollama Modelfile from the merged model, checked against it.",
    "push": "Upload the model, card, report and logs to the Hugging Face Hub (or --set push.dry_run=true).",
}
for _job in JOBS:
    app.command(name=_job)(_job_command(_job, JOB_HELP[_job]))


@app.command()
def pipeline(config: Optional[Path] = ConfigOption, set_: list[str] = SetOption, force: bool = ForceOption):
    """Run prep → train → (rl, if rl.enabled) → merge → (export, if export.enabled) → eval → push; finished jobs are
    skipped unless --force."""
    with one_line_errors("t2s pipeline"):
        cfg = load_config(config, set_)
        for job in JOBS:
            if job == "rl" and not cfg.rl.enabled:
                continue  # rl runs in the pipeline only when rl.enabled
            if job == "export" and not cfg.export.enabled:
                continue  # export too, when export.enabled
            run_job(job, cfg, force)  # prints its summary (or that it was finished before) once
        print(f"report: {RunDir(cfg.run_dir).report_md}")


@app.command()
def compare(run_a: Path = typer.Argument(..., help="A run folder with a finished eval (runs/<id>)."),
            run_b: Path = typer.Argument(..., help="Another one."),
            out: Path = typer.Option(Path("runs/compare"), "--out", help="The folder compare.md and compare.png "
                                     "are written to.")):
    """Put two runs' eval reports side by side: one table, one chart."""
    with one_line_errors("t2s compare"):
        from jobs.compare import compare as compare_runs

        print(compare_runs(run_a, run_b, out))


app.command(name="ask")(ask_command)
app.command(name="serve")(serve_command)


@app.callback()
def _options(_version: bool = version_option("t2s")):
    """Fine-tune small chat models into SQL-only text-to-SQL models."""


@app.command()
def runs(config: Optional[Path] = typer.Option(None, "--config", "-c", help="A run config: list its runs_dir."),
         runs_dir: Optional[Path] = typer.Option(None, "--runs-dir", help="The folder of runs (default: runs, or the "
                                                 "config's runs_dir)."),
         json_: bool = typer.Option(False, "--json", help="One JSON list instead of the table.")):
    """Every run under runs_dir: its jobs done, its model, its headline metrics, its size on disk."""
    with one_line_errors("t2s runs"):
        import json

        from jobs.runlist import as_json, list_runs, render_table

        folder = runs_dir or Path(load_config(config).runs_dir if config else "runs")
        if folder.exists() and not folder.is_dir():
            raise T2SError(f"{folder} is a file, not a folder of runs: pass --runs-dir the folder that holds them")
        found = list_runs(folder)
        if json_:
            print(json.dumps(as_json(found), indent=2))
        elif not found:
            print(f"no runs in {folder}: `t2s pipeline --config configs/demo.yaml` makes one")
        else:
            from rich.console import Console

            Console(width=200 if not sys.stdout.isatty() else None).print(render_table(found, folder))


configs_app = typer.Typer(no_args_is_help=True, help="The configs t2s ships: list them, copy one to edit.")
app.add_typer(configs_app, name="configs")


@configs_app.command("list")
def configs_list():
    """Every shipped run config and accelerate config, with what it is for."""
    with one_line_errors("t2s configs list"):
        from jobs.lib.shipped import configs_dir, description, shipped_configs

        found = shipped_configs()
        width = max(map(len, found), default=0)
        print(f"shipped configs ({configs_dir()}):")
        for name, path in found.items():
            print(f"  {name:<{width}}  {description(path)}")
        print("copy one to edit it: t2s configs copy NAME DEST; accelerate configs are named by their stem in "
              "train.accelerate_config (e.g. single)")


@configs_app.command("copy")
def configs_copy(name: str = typer.Argument(..., help="A shipped config, e.g. demo or accelerate/zero3."),
                 dest: Path = typer.Argument(..., help="A file to write, or a folder to copy it into."),
                 force: bool = typer.Option(False, "--force", help="Overwrite DEST if it exists.")):
    """Copy a shipped config to DEST, to edit it and pass it as --config (or as train.accelerate_config)."""
    with one_line_errors("t2s configs copy"):
        from jobs.lib.shipped import copy_config

        print(f"copied {name} to {copy_config(name, dest, force)}")


def main() -> None:
    from jobs.lib.dotenv_settings import load_dotenv_settings
    from jobs.lib.quiet import quiet_library_output

    quiet_library_output(sys.stderr)
    load_dotenv_settings()
    run_app(app)


if __name__ == "__main__":
    main()
