"""`t2s-infra launch|logs|ls|down|watch|upload-logs|self-terminate`: runs t2s jobs on RunPod pods.

The shell around infra's modules: it loads the config and secrets, prints (job output on stdout, t2s-infra's
own lines on stderr, every line through `redact`), and turns T2SError into one line and its exit code (2, or 1 for a
job that failed on its pod) through jobs.lib.errors.one_line_errors, as t2s does.
Ctrl-C while following detaches: the job keeps running and the message says how to come back or stop it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from jobs.lib.config import load_config
from jobs.lib.errors import T2SError, one_line_errors, run_app, version_option
from jobs.lib.credentials import find_secret
from jobs.lib.rundir import JOBS, RunDir, read_json, write_atomic
from infra import preflight, records, recovery, watchdog
from infra import runpod_api as api
from infra.hints import me
from infra.launch import launch_pod
from infra.hub_checks import hub_access, hub_whoami
from infra.logs import (BACKFILL_LINES, NoLogs, Outcome, end_note, end_status, exit_line, fetch_run_logs, follow,
                        pod_end_file, upload_run_logs)
from infra.records import Launch
from infra.settings import load_infra_settings, redact, redactor, require_secret
from infra.timing import current_timing

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run t2s jobs on RunPod GPU pods: launch, follow logs, fetch logs, stop pods.")


@app.callback()
def _options(_version: bool = version_option("t2s-infra")):
    """Run t2s jobs on RunPod GPU pods: launch, follow logs, fetch logs, stop pods."""


# rl, export: no image entrypoint of their own; pipeline runs them
LAUNCHABLE = (*(job for job in JOBS if job not in ("rl", "export")), "pipeline")
# Where `logs RUN` (make logs RUN=...) puts a run's logs and report by default, and where `down` keeps a pod's last log
# lines: one place, so that `logs` finds what `down` kept.
LOGS_RUNS_DIR = Path("runs")


def say(message: str) -> None:
    print(f"t2s-infra: {redact(message)}", file=sys.stderr, flush=True)


def shell(command: str, interrupted: str = "interrupted"):
    """A command's body: its T2SError is one line, `t2s-infra <command>: error: ...`, every secret redacted."""
    return one_line_errors(f"t2s-infra {command}", interrupted)


def _runpod_key() -> str:
    key = require_secret("RUNPOD_API_KEY", "an API key from runpod.io > Settings > API Keys")
    api.connect(key)
    return key


class _PodLog:
    """Shows the job's lines and keeps a copy in runs/<id>/logs/pod-<pod>.log: a run stopped by the
    watchdog never uploads its own logs, so this copy may be the only one."""

    def __init__(self, runs_dir: Path, launch: Launch):
        self.path = RunDir(runs_dir / launch.run_id).logs / f"pod-{launch.pod_id}.log"

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(line + "\n")


def _follow_and_report(launch: Launch, runpod_key: str, runs_dir: Path) -> None:
    pod_log = _PodLog(runs_dir, launch)
    try:
        outcome = follow(launch, runpod_key, pod_log, say)
    except KeyboardInterrupt:
        _detached(launch)
    _report(outcome, pod_log.path)


def _detached(launch: Launch) -> None:
    say(f"detached from run {launch.run_id}; its job keeps running on pod {launch.pod_id}. "
        f"Reattach: {me()} logs --follow {launch.run_id} (make follow RUN={launch.run_id}) · stop it: {me()} down "
        f"{launch.run_id}")
    raise typer.Exit(130)


def _report(outcome: Outcome, pod_log: Path) -> None:
    """One line on how the run ended; exit code 0 only when the job succeeded."""
    launch, code = outcome.launch, outcome.exit_code
    run, pod = launch.run_id, launch.pod_id
    now = records.now_iso()
    minutes = records.minutes_between(launch.started_at, launch.ended_at or now)
    cost = records.cost_so_far(launch, now)
    spent = f"{minutes:.1f} min" + ("" if cost is None else f", ≈ ${cost:.2f}")
    if launch.is_live:  # a kept pod (infra.keep_pod)
        say(f"run {run}: job {launch.job} exited with code {code} ({spent} so far); pod {pod} is kept and still "
            f"billing: {me()} down {run} stops it")
        raise typer.Exit(0 if code == 0 else 1)
    if code == 0:
        # The pod's own `report:` line is a path on the pod: this one says where `logs` (by default) will put it here.
        fetched = RunDir(LOGS_RUNS_DIR / run).report_md
        report = f"; report: {fetched} once fetched" if launch.job in ("pipeline", "eval") else ""
        say(f"run {run}: job {launch.job} succeeded ({spent}); pod {pod} is gone. "
            f"Logs, metrics, report: {me()} logs {run} (make logs RUN={run}){report}")
        return
    if code is not None and outcome.reason:
        raise T2SError(f"run {run}: job {launch.job} {outcome.reason} (exit code {code}, {spent}); pod {pod} is "
                       f"gone. Logs: {me()} logs {run}", exit_code=1)
    if code is not None:
        raise T2SError(f"run {run}: job {launch.job} failed with exit code {code} ({spent}); pod {pod} is gone. "
                       f"Logs: {me()} logs {run}", exit_code=1)
    if launch.status == "stopped":
        raise T2SError(f"run {run}: stopped pod {pod}: {launch.note} ({spent}). Its log as streamed: {pod_log}",
                       exit_code=1)
    raise T2SError(f"run {run}: pod {pod} ended without the job reporting its exit (terminated elsewhere, or the "
                   f"container crashed) ({spent}). Uploaded logs, if any: {me()} logs {run}", exit_code=1)


@app.command()
def launch(
    config: Path = typer.Option(..., "--config", "-c", help="Run config (YAML); its infra: section is optional."),
    job: str = typer.Option("pipeline", "--job", help=f"What the pod runs: {', '.join(LAUNCHABLE)} (pipeline: all "
                            "of them, the default, since the pod's volume goes with the pod)."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override one key, e.g. --set train.epochs=1 "
                                   "--set infra.max_cost_usd=5 (repeatable)."),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="GPU type, instead of infra.gpu_types."),
    gpus: Optional[int] = typer.Option(None, "--gpus", min=1, max=8, help="GPU count, instead of infra.gpu_count "
                                       "(must equal the processes train.accelerate_config starts)."),
    follow_logs: bool = typer.Option(True, "--follow/--no-follow", help="Stream the job's log until it ends."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Launch without asking to confirm the plan (scripts)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Run every check and show the plan, then stop: nothing is "
                                 "asked or created (make launch-train ... DRY_RUN=1)."),
):
    """Check everything, show the plan and its cost, then create a pod that runs the config's run and (by
    default) follow its log. The pod trains, evaluates, pushes and terminates itself."""
    # (Once a pod may exist, launch_pod turns Ctrl-C into a T2SError after ending it or saying how: none exists here.)
    with shell("launch", "interrupted before any pod was created"):
        if job not in LAUNCHABLE:
            raise T2SError(f"--job {job!r} is not a job: use one of {', '.join(LAUNCHABLE)}")
        cfg = load_config(config, set_)  # every override validated here, before any network call
        settings = load_infra_settings(cfg, config, set_)
        chosen = {"gpu_types": [gpu]} if gpu else {}
        if gpus:
            chosen["gpu_count"] = gpus
        settings, accelerate = preflight.check_locally(cfg, settings.model_copy(update=chosen), job)
        passed = preflight.local_checks_passed(cfg, settings, accelerate, job)
        hf_token = require_secret("HF_TOKEN", "a Hub token with write access: the pod pushes the model and logs")
        runpod_key = require_secret("RUNPOD_API_KEY", "an API key from runpod.io > Settings > API Keys")
        identity = preflight.hub_identity(hub_whoami(hf_token))
        model_repo, logs_repo = preflight.resolve_repos(cfg, settings, identity)
        passed.append(f"HF_TOKEN: a {identity.role} token of {identity.user} that may write to {model_repo} and "
                      f"{logs_repo}")
        for source in preflight.hub_sources(cfg):  # what the pod downloads: there, with this token
            if source.skipped:
                passed.append(source.line(source.skipped))
                continue
            if problem := preflight.source_problem(source, hub_access(hf_token, source.name, source.repo_type),
                                                   identity.user):
                raise T2SError(problem)
            passed.append(source.line("on the Hub, readable with HF_TOKEN"))
        _check_checkpoint_repo(cfg, settings, identity, model_repo)
        settings = settings.model_copy(update={"logs_repo": logs_repo})
        pod_cfg = preflight.pod_config(cfg, settings, model_repo=model_repo, logs_repo=logs_repo)
        api.connect(runpod_key)
        prices = {gpu_type: api.gpu_price_per_hr(gpu_type, settings.gpu_count, settings.cloud_type)
                  for gpu_type in settings.gpu_types}
        if problem := preflight.price_problem(settings, prices):
            raise T2SError(problem)
        passed.append(f"RUNPOD_API_KEY accepted; RunPod knows {', '.join(settings.gpu_types)}")
        bid_per_gpu = _spot_bids(settings)

        def config_text(gpu_type: str, price_per_hr: float | None) -> str:
            text = preflight.config_for_gpu(pod_cfg, gpu_type, settings.gpu_count, settings.cloud_type, price_per_hr)
            # load_config refused secrets in what the user wrote; this holds for what the launcher derived too.
            if (found := find_secret(text)) is not None:
                raise T2SError(f"the pod's config would hold {found.what}: secrets go in .env, never in a config "
                               "(the pod's config is stored with the run and uploaded with its logs)")
            return text

        config_text(settings.gpu_types[0], prices[settings.gpu_types[0]])
        for line in [*preflight.plan_lines(run_id=cfg.run_id, job=job, settings=settings, prices=prices,
                                           model_repo=model_repo, logs_repo=logs_repo, private=cfg.push.private),
                     *preflight.check_lines(passed)]:
            say(line)
        for line in _recovery_plan_lines(pod_cfg, settings, prices, bid_per_gpu):
            say(line)
        if dry_run:
            say("dry run: every check passed; nothing was asked and no pod was created (launch it without --dry-run)")
            return
        _confirm(yes)
        recovering = settings.interruptible or settings.recoveries > 0
        try:
            if recovering:
                started = recovery.start(recovery.plan_for(pod_cfg, settings, run_id=cfg.run_id, job=job, prices=prices,
                                                           bid_per_gpu=bid_per_gpu, runs_dir=str(cfg.runs_dir)),
                                         hf_token=hf_token, runpod_key=runpod_key, say=say)
            else:
                started = launch_pod(settings, run_id=cfg.run_id, job=job, config_text=config_text, prices=prices,
                                     hf_token=hf_token, runpod_api_key=runpod_key, say=say)
        except KeyboardInterrupt:  # a second Ctrl-C, while launch_pod was squaring the first with RunPod
            raise T2SError(f"interrupted while launching run {cfg.run_id}: if RunPod made its pod, it runs on; "
                           f"`{me()} down {cfg.run_id}` finds it by its recorded name and stops it (`{me()} ls` "
                           "shows it)") from None
        try:
            price = "" if started.cost_per_hr is None else f" at ${started.cost_per_hr:.2f}/h"
            cost_cap = "no cost cap" if settings.max_cost_usd is None else f"${settings.max_cost_usd:g}"
            say(f"run {cfg.run_id}: job {job} is running on pod {started.pod_id} ({started.gpu_count}x {started.gpu}"
                f"{price}; stops at {settings.max_runtime_min:g} min or {cost_cap})")
            if not follow_logs:
                say(f"follow: {me()} logs --follow {cfg.run_id} (make follow RUN={cfg.run_id}) · stop: {me()} down "
                    f"{cfg.run_id} · the pod stops itself at its caps; the launcher's second line while nobody "
                    f"follows: {me()} watch")
                return
        except KeyboardInterrupt:  # the pod runs: detach, as a Ctrl-C while following does
            _detached(started)
        if recovering:
            _follow_recovering_and_report(started, hf_token, runpod_key, Path(cfg.runs_dir))
        else:
            _follow_and_report(started, runpod_key, Path(cfg.runs_dir))


# ---------------------------------------------------------------- spot pods and recovery (infra/recovery.py)


def _check_checkpoint_repo(cfg, settings, identity: preflight.HubIdentity, model_repo: str) -> None:
    """train.checkpoint_sync: hub needs a token that may write the checkpoints' repo: one line before any pod."""
    if cfg.train.checkpoint_sync != "hub" or settings.network_volume_id:
        return
    repo = cfg.train.checkpoint_repo or f"{model_repo}-checkpoints"
    if not identity.may_write(repo.split("/")[0]):
        raise T2SError(f"train.checkpoint_sync: hub, but HF_TOKEN ({identity.user}, {identity.role} token) may not "
                       f"write to {repo}: use a token that may write there, set train.checkpoint_repo under a "
                       "namespace it may write to, or set train.checkpoint_sync: none")


def _spot_bids(settings) -> dict[str, float] | None:
    if not settings.interruptible:
        return None
    return recovery.bids(settings, {gpu: api.spot_price(gpu, settings.gpu_count, settings.cloud_type)
                                    for gpu in settings.gpu_types})


def _recovery_plan_lines(pod_cfg, settings, prices, bid_per_gpu) -> list[str]:
    lines = recovery.plan_rows(settings, prices, recovery.spot_prices(settings, bid_per_gpu)) if bid_per_gpu else []
    if settings.recoveries and not bid_per_gpu:
        lines.append(f"  recovery  a pod lost without its job's end is relaunched, up to {settings.recoveries} "
                     "time(s), the caps counting all of them")
    if note := recovery.checkpoint_problem(pod_cfg, settings):
        lines.append(note)
    return lines


def _follow_recovering_and_report(first: Launch, hf_token: str, runpod_key: str, runs_dir: Path) -> None:
    logs: dict[str, _PodLog] = {}

    def follow_one(launch: Launch) -> Outcome:
        logs[launch.pod_id] = _PodLog(runs_dir, launch)  # one log per attempt, kept whatever becomes of the pod
        return follow(launch, runpod_key, logs[launch.pod_id], say)

    try:
        outcome = recovery.follow_recovering(first, follow_one, hf_token=hf_token, runpod_key=runpod_key, say=say)
    except KeyboardInterrupt:
        latest = records.latest_of(first.run_id) or first
        say(f"detached from run {first.run_id}; its job keeps running on pod {latest.pod_id}. "
            f"Reattach: {me()} logs --follow {first.run_id} · stop it: {me()} down {first.run_id} · "
            f"relaunch after a preemption: {me()} watch")
        raise typer.Exit(130)
    if outcome.launch.attempt > 1 or outcome.launch.series:
        say(f"run {first.run_id}: {recovery.summary(first.series_key)}")
    _report(outcome, logs[outcome.launch.pod_id].path)


def _interactive() -> bool:
    return sys.stdin.isatty()


def _confirm(yes: bool) -> None:
    """Asks before anything bills; never waits on a stdin that nobody types into."""
    if yes:
        return
    if not _interactive():
        raise T2SError("stdin is not a terminal, so nothing can be asked: pass --yes to launch this plan "
                       "(make launch-train ... YES=1)")
    try:
        answer = typer.confirm("t2s-infra: launch it?", default=False, err=True)
    except typer.Abort:
        answer = False
    if not answer:
        say("not launched: no pod was created")
        raise typer.Exit(1)


@app.command()
def logs(
    run: str = typer.Argument(..., help="Run id (the config's run_id)."),
    follow_logs: bool = typer.Option(False, "--follow", "-f", help="Stream the live log of the run's pod."),
    repo: Optional[str] = typer.Option(None, "--repo", help="Hub dataset with the logs (default: the launch's)."),
    runs_dir: Path = typer.Option(LOGS_RUNS_DIR, "--runs-dir", help="Where runs/<id>/ lives locally."),
):
    """Fetch a finished run's logs, metrics and eval report from the Hub into runs/<id>/, or --follow a live one."""
    with shell("logs"):
        latest = records.latest_of(run, say)
        if follow_logs:
            if latest is None:
                raise T2SError(f"no launch of run {run} in {records.records_path()}: `{me()} ls` lists them")
            if latest.is_live:
                runpod_key = _runpod_key()
                latest = watchdog.check(latest, say)
            if latest.status == "creating":
                raise T2SError(f"pod {latest.pod_name} of run {run} is still being created (or RunPod cannot say "
                               f"whether it was): try again in a minute; `{me()} down {run}` stops it")
            if latest.is_live:
                say(f"following run {run} (job {latest.job}) on pod {latest.pod_id}; Ctrl-C detaches")
                _follow_and_report(latest, runpod_key, runs_dir)
                return
            say(f"the pod of run {run} has ended ({latest.status}); fetching its uploaded logs")
        repo = repo or (latest.logs_repo if latest else None) or os.environ.get("T2S_LOGS_REPO")
        if not repo:
            raise T2SError(f"no logs repo known for run {run}: pass --repo you/t2s-runs (the config's infra.logs_repo)")
        try:
            token = require_secret("HF_TOKEN", "to read the private logs dataset")
            fetched = fetch_run_logs(run, repo, runs_dir, token)
        except NoLogs as exc:
            raise T2SError(_no_logs_yet(str(exc), run, latest, runs_dir)) from None
        print(f"fetched {len(fetched)} files of run {run} from Hub dataset {repo} into {runs_dir / run}:")
        for name in fetched:
            print(f"  {name}")
        report = RunDir(runs_dir / run).report_md
        if report.is_file():
            print(f"eval report: {report}")
        _record_pod_end(latest, pod_end_file(runs_dir / run))


def _no_logs_yet(nothing: str, run: str, latest: Launch | None, runs_dir: Path) -> str:
    """Why the Hub has no logs of the run, from its record, and what this machine kept of them (a follower's copy,
    the lines `down` kept): the truth, not a promise that an ended pod can no longer keep."""
    kept = sorted(str(path) for path in RunDir(runs_dir / run).logs.glob("pod-*.log"))
    here = f"; kept on this machine: {', '.join(kept)}" if kept else "; nothing of it was kept on this machine"
    if latest is not None and latest.is_live:
        return (f"{nothing} yet: its job uploads them when it ends, and it is still {latest.status}; now: "
                f"`{me()} logs --follow {run}` (make follow RUN={run}){here}")
    if latest is not None:
        return (f"{nothing}: its pod {latest.pod_id or latest.pod_name} ended ({latest.status}"
                f"{': ' + latest.note if latest.note else ''}) without uploading them{here}")
    return (f"{nothing} yet: no launch of it from this machine (one launched elsewhere uploads them when its job "
            f"ends); check the run id (`{me()} ls`) and --repo{here}")


def _record_pod_end(latest: Launch | None, end_file: Path) -> None:
    """What the pod wrote as its job ended settles a record nobody was following (detached, --no-follow)."""
    end = read_json(end_file)
    if latest is None or not isinstance(end, dict) or end.get("pod_id") != latest.pod_id:
        return
    if latest.status not in (*records.LIVE_STATUSES, "gone") or not isinstance(end.get("exit_code"), int):
        return
    code, reason = end["exit_code"], end.get("reason") or None
    ended = records.end(latest, end_status(code, reason), end_note(code, reason), at_iso=end.get("ended_at"))
    say(f"run {latest.run_id}: job {latest.job} ended on pod {latest.pod_id}: {ended.status} ({ended.note})")


@app.command("ls")
def list_launches(
    offline: bool = typer.Option(False, "--offline", help="Do not ask RunPod whether live pods still exist."),
):
    """List every launch recorded on this machine, with its cost (live pods: so far)."""
    with shell("ls"):
        launches = records.load_all(say)
        if not launches:
            print(f"no launches recorded in {records.records_path()}")
            return
        if not offline and any(launch.is_live for launch in launches):
            _runpod_key()
            try:
                _reconcile(launches, api.list_pods())
            except api.ApiUnavailable as exc:
                say(f"{exc}: showing the local record as it is")
            launches = records.load_all()
        print(records.format_table(launches, records.now_iso()))


def _reconcile(launches: list[Launch], pods: list[api.Pod]) -> list[Launch]:
    """The live launches squared with RunPod's pods: a pod being created found by its name, a pod gone ended."""
    now, existing = records.now_iso(), {pod.id for pod in pods}
    settled = []
    for launch in launches:
        if launch.status == "creating":
            launch = watchdog.settle_creating(launch, pods, now)
        if launch.is_live and launch.status != "creating" and launch.pod_id not in existing:
            launch = records.end(launch, "gone", "pod no longer exists")
        settled.append(launch)
    return settled


@app.command()
def down(
    run: Optional[str] = typer.Argument(None, help="Run id whose pods to terminate."),
    all_runs: bool = typer.Option(False, "--all", help="Terminate every pod launched from this machine."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Terminate without asking (scripts; make down ... YES=1)."),
    runs_dir: Path = typer.Option(LOGS_RUNS_DIR, "--runs-dir", help="Where runs/<id>/ lives locally (a terminated "
                                  "pod's last log lines are kept in its logs/)."),
):
    """Terminate the pods of a run (or --all pods t2s-infra launched from here): billing stops. Asks first;
    the log a pod had printed is kept in runs/<id>/logs/, since a terminated pod uploads nothing."""
    with shell("down", "interrupted: a pod not reported as terminated above is still running (run down again)"):
        if bool(run) == all_runs:
            raise T2SError(f"name one run ({me()} down RUN) or pass --all")
        mine = [launch for launch in records.load_all(say) if all_runs or launch.run_id == run]
        if run and not mine:
            raise T2SError(f"no launch of run {run} in {records.records_path()}: `{me()} ls` lists them")
        runpod_key = _runpod_key()
        pods = api.list_pods()
        existing = {pod.id: pod for pod in pods}
        mine = _reconcile(mine, pods)  # a pod whose creation answer was lost is ours too, found by its name
        ours = {launch.pod_id: launch for launch in mine if launch.pod_id}
        doomed = [(pod_id, launch) for pod_id, launch in ours.items() if pod_id in existing]
        if doomed:
            _confirm_down(doomed, yes, run)
        stopped = 0
        for pod_id, launch in doomed:
            kept = _keep_pod_log(launch, runpod_key, runs_dir)
            api.terminate_pod(pod_id)
            stopped += 1
            # A pod that outlived its job (kept, or a failed self-terminate) keeps its job's status.
            records.end(launch, "stopped" if launch.is_live else launch.status, "t2s-infra down")
            say(f"terminated pod {pod_id} ({existing[pod_id].name}) of run {launch.run_id}" + (
                f"; its log as RunPod kept it (the last {kept[1]} lines): {kept[0]}" if kept else ""))
        for launch in mine:
            if launch.status == "creating":
                say(f"pod {launch.pod_name} of run {launch.run_id} is being created right now (no pod of that name "
                    f"yet): run `{me()} down {launch.run_id}` again in a minute if its launcher does not follow it")
        if all_runs:
            for pod in pods:
                if pod.id not in ours and pod.name.startswith(api.POD_NAME_PREFIX):
                    say(f"left pod {pod.id} ({pod.name}) alone: it is not in {records.records_path()}")
        if not stopped:
            say("nothing to stop: no pod " + (f"of run {run} " if run else "launched from here ") + "is left")


def _confirm_down(doomed: list[tuple[str, Launch]], yes: bool, run: str | None) -> None:
    """Terminating stops a job mid-way (`sky down` asks too); never waits on a stdin that nobody types into."""
    if yes:
        return
    if not _interactive():
        again = f"make down RUN={run} YES=1" if run else f"{me()} down --all --yes"
        raise T2SError(f"stdin is not a terminal, so nothing can be asked: pass --yes to terminate "
                       f"{len(doomed)} pod(s) ({again})")
    now = records.now_iso()
    for pod_id, launch in doomed:
        cost = records.cost_so_far(launch, now)
        minutes = records.minutes_between(launch.started_at, now)
        say(f"pod {pod_id}: run {launch.run_id}, job {launch.job}, {launch.status}, {minutes:.0f} min"
            + ("" if cost is None else f", ≈ ${cost:.2f}"))
    try:
        answer = typer.confirm(f"t2s-infra: terminate {'it' if len(doomed) == 1 else f'these {len(doomed)} pods'}? "
                               "A running job stops where it is", default=False, err=True)
    except typer.Abort:
        answer = False
    if not answer:
        say("nothing was terminated")
        raise typer.Exit(1)


def _keep_pod_log(launch: Launch, runpod_key: str, runs_dir: Path) -> tuple[Path, int] | None:
    """A pod terminated from here never uploads its logs (its entrypoint dies with it): keep what RunPod still has
    of its log, redacted, in runs/<id>/logs/pod-<pod>-down.log. Best effort: None when RunPod shows nothing."""
    lines = api.recent_log_lines(launch.pod_id, runpod_key, "container", current_timing().keep_log_s,
                                 tail=BACKFILL_LINES)
    if not lines:
        return None
    path = RunDir(runs_dir / launch.run_id).logs / f"pod-{launch.pod_id}-down.log"
    hide = redactor()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, "".join(hide(line) + "\n" for line in lines))
    except OSError as error:  # the pod is terminated all the same: its billing matters more than its log
        say(f"could not keep pod {launch.pod_id}'s log in {path} ({error.strerror or error}); terminating it anyway")
        return None
    return path, len(lines)


@app.command()
def watch(
    once: bool = typer.Option(False, "--once", help="Check once (for cron) instead of until no pod is live."),
):
    """Terminate pods past their run's infra.max_runtime_min or infra.max_cost_usd."""
    with shell("watch", f"stopped watching; the pods keep running ({me()} ls shows them)"):
        _runpod_key()
        live = [launch for launch in records.load_all(say) if launch.is_live]
        if not once:
            say(f"watching {len(live)} live run(s); Ctrl-C stops watching, not the pods")
        try:
            stopped = watchdog.watch(say, once, on_gone=_recover_for_watch)
        except KeyboardInterrupt:  # what Ctrl-C is for here: not an error
            say(f"stopped watching; the pods keep running and stop themselves at their caps ({me()} ls shows them)")
            return
        say(f"done: stopped {stopped} pod(s)")


def _recover_for_watch(ended: Launch) -> None:
    """`watch` relaunches a pod that ended without its job's end, as the launcher would have (infra/recovery.py)."""
    if recovery.load_plan(ended.series_key) is None:
        return
    hf_token = require_secret("HF_TOKEN", "a Hub token with write access: the relaunched pod pushes the model")
    relaunched = recovery.recover(ended, hf_token=hf_token, runpod_key=_runpod_key(), say=say)
    if relaunched is not None:
        say(f"run {relaunched.run_id}: relaunched on pod {relaunched.pod_id} (attempt {relaunched.attempt}); "
            f"follow it: t2s-infra logs --follow {relaunched.run_id}")


@app.command("upload-logs")
def upload_logs(
    run_dir: Path = typer.Argument(..., help="The run directory, runs/<run_id>."),
    repo: Optional[str] = typer.Option(None, "--repo", envvar="T2S_LOGS_REPO",
                                       help="Hub dataset (default: $T2S_LOGS_REPO, else the run's infra.logs_repo)."),
    exit_code: Optional[int] = typer.Option(None, "--exit-code", help="The job's exit code, kept in "
                                            "logs/pod-end.json."),
    reason: Optional[str] = typer.Option(None, "--reason", help="Why the pod stopped the job (its caps), if it did."),
    if_configured: bool = typer.Option(False, "--if-configured", help="With no logs repo configured, say so and "
                                       "exit 0 (a local `docker run` that keeps its logs on the volume)."),
):
    """Upload a run's logs, metrics, eval report and markers to the Hub (the entrypoint runs this at job end)."""
    with shell("upload-logs"):
        if not run_dir.is_dir():
            raise T2SError(f"run directory {run_dir} not found: pass runs/<run_id> as the job wrote it")
        if exit_code is not None:  # how the job ended, for `t2s-infra logs` on a machine that was not following
            pod_end_file(run_dir).parent.mkdir(parents=True, exist_ok=True)
            write_atomic(pod_end_file(run_dir), json.dumps({
                "job": os.environ.get("T2S_JOB"), "pod_id": os.environ.get("RUNPOD_POD_ID"), "exit_code": exit_code,
                "reason": reason, "ended_at": records.now_iso()}) + "\n")
        repo = repo or _logs_repo_of(run_dir, required=not if_configured)
        if repo is None:
            say(f"no logs repo configured (infra.logs_repo): the logs stay in {RunDir(run_dir).logs}")
            return
        count = upload_run_logs(run_dir, repo, require_secret("HF_TOKEN", "to write to the logs dataset"), say)
        say(f"uploaded {count} files of {run_dir} to Hub dataset {repo}")


def _logs_repo_of(run_dir: Path, required: bool = True) -> str | None:
    """infra.logs_repo of the configs the run's jobs ran with, the latest first (a run made by an older t2s: of the
    config it kept as config.resolved.yaml); None when there is none and it is not `required`."""
    run = RunDir(run_dir)
    configs = sorted((run.job_config(job) for job in JOBS if run.job_config(job).is_file()),
                     key=lambda path: path.stat().st_mtime, reverse=True)
    for config in [*configs, run.settings_file]:
        if config.is_file():
            settings = load_infra_settings(load_config(config), config)
            if settings.logs_repo:
                return settings.logs_repo
    if not required:
        return None
    raise T2SError(f"no logs repo for {run_dir}: set infra.logs_repo in the config, or pass --repo")


@app.command("self-terminate")
def self_terminate(
    exit_code: Optional[int] = typer.Option(None, "--exit-code", help="The job's exit code, announced in the log."),
    reason: Optional[str] = typer.Option(None, "--reason", help="Why the pod stopped the job (its caps), if it did."),
):
    """Terminate the pod this runs on (the entrypoint's last step); no-op off RunPod or with T2S_KEEP_POD=1.
    Uses the pod's own RUNPOD_API_KEY, which RunPod scopes to the pod."""
    with shell("self-terminate"):
        pod_id = os.environ.get("RUNPOD_POD_ID")
        if not pod_id:
            say("not on a RunPod pod (RUNPOD_POD_ID is unset): nothing to terminate")
            return
        keep = os.environ.get("T2S_KEEP_POD") == "1"
        # The last line of the pod's log: the follower's signal that the job ended, and how.
        ending = f"leaving pod {pod_id} running (T2S_KEEP_POD=1)" if keep else f"terminating pod {pod_id}"
        print(f"{exit_line(exit_code, reason) if exit_code is not None else 't2s-infra: job ended'}; {ending}",
              flush=True)
        if keep:
            return
        api.connect(require_secret("RUNPOD_API_KEY", "RunPod sets a pod-scoped key in every pod"))
        api.terminate_pod(pod_id)


def main() -> None:
    from jobs.lib.dotenv_settings import load_dotenv_settings

    load_dotenv_settings()  # .env's T2S_STATE_DIR, T2S_LOGS_REPO, ... (the environment wins)
    run_app(app)


if __name__ == "__main__":
    main()
