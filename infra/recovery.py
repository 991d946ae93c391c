"""Spot pods and recovery: a pod that ends without its job's end line is relaunched.

RunPod may take an interruptible (spot) pod back at any time, without notice: the pod is then seen EXITED, its
container gone, no exit line in its log (infra.watchdog ends such a launch `gone`). A pod lost any other way looks
the same. The launcher (`t2s-infra launch`), or `t2s-infra watch` for a launcher that detached, then asks RunPod
for a new pod of the same run, up to `infra.max_recoveries` times; it falls back to on-demand after
`infra.on_demand_after_preemptions` preemptions, or when no spot pod is to be had. The new pod resumes from the
run's synced checkpoint (train.checkpoint_sync: hub) or its network volume. A job that failed (its exit line says a
non-zero code) is never relaunched: only a pod that vanished is.

Every attempt is its own launch record (pod id, GPU, start, end, cost), sharing the first one's pod name as
`series`; the caps (infra.max_runtime_min, infra.max_cost_usd) count the sum over the attempts, so each new pod
gets what is left of them. What a relaunch needs (the settings and the pod's config, which holds no secret) is
kept in <state dir>/recovery/<series>.json, so that `watch` can relaunch too.

`bids`, `plan_rows` and `decide` are pure; `start`, `follow_recovering` and `recover` call RunPod.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from jobs.lib.config import Config, dump_config
from jobs.lib.credentials import find_secret
from jobs.lib.errors import T2SError
from infra import preflight, records
from infra import runpod_api as api
from infra.launch import launch_pod
from infra.logs import Outcome
from infra.records import Launch
from infra.settings import InfraSettings
from infra.timing import Say


# ---------------------------------------------------------------- prices and the plan


def bids(settings: InfraSettings, spot: dict[str, api.SpotPrice]) -> dict[str, float]:
    """The bid per GPU for each GPU type: infra.bid_per_gpu_usd, else RunPod's listed spot price; one line when
    RunPod lists none, or the bid is below its minimum."""
    out = {}
    for gpu in settings.gpu_types:
        price = spot[gpu]
        bid = settings.bid_per_gpu_usd if settings.bid_per_gpu_usd is not None else price.listed_per_gpu
        if bid is None:
            raise T2SError(f"RunPod lists no {settings.cloud_type.lower()}-cloud spot price for {gpu}: set "
                           "infra.bid_per_gpu_usd, drop it from infra.gpu_types, or set infra.interruptible: false")
        if price.minimum_bid_per_gpu is not None and bid < price.minimum_bid_per_gpu:
            raise T2SError(f"infra.bid_per_gpu_usd={bid:g} is below RunPod's minimum bid for {gpu} "
                           f"(${price.minimum_bid_per_gpu:g}/GPU/h): raise it")
        out[gpu] = round(float(bid), 4)
    return out


def spot_prices(settings: InfraSettings, bid_per_gpu: dict[str, float]) -> dict[str, float]:
    """$/h of the whole pod at the bid, per GPU type."""
    return {gpu: round(bid * settings.gpu_count, 4) for gpu, bid in bid_per_gpu.items()}


def plan_rows(settings: InfraSettings, on_demand: dict[str, float | None], spot: dict[str, float]) -> list[str]:
    """The plan's lines for a spot launch: each GPU type's spot and on-demand price side by side, the saving."""
    rows = []
    for gpu in settings.gpu_types:
        listed = on_demand.get(gpu)
        saving = f", saves {100 * (1 - spot[gpu] / listed):.0f}%" if listed else ""
        expected = ""
        if listed and settings.expected_min is not None:
            expected = f" (≈ ${(listed - spot[gpu]) * settings.expected_min / 60:.2f} over infra.expected_min)"
        on_demand_text = "not listed" if listed is None else f"${listed:.2f}/h"
        rows.append(f"  spot      {settings.gpu_count}x {gpu}: ${spot[gpu]:.2f}/h spot vs {on_demand_text} "
                    f"on-demand{saving}{expected}")
    fallback = (f"; on-demand after {settings.on_demand_after_preemptions} preemption(s) or no spot capacity"
                if settings.on_demand_after_preemptions else "")
    rows.append(f"  recovery  RunPod may stop a spot pod at any time: up to {settings.recoveries} new pod(s), the "
                f"caps counting all of them{fallback}")
    return rows


def checkpoint_problem(cfg: Config, settings: InfraSettings) -> str | None:
    """A relaunched pod starts with an empty volume: without a network volume or synced checkpoints, training
    starts over on it. Said in the plan (not refused: a short job may not care)."""
    if settings.recoveries and not settings.network_volume_id and cfg.train.checkpoint_sync != "hub":
        return ("  note      a new pod trains from the start: set train.checkpoint_sync: hub (or a network volume) "
                "so that it resumes")
    return None


# ---------------------------------------------------------------- the rule


@dataclass(frozen=True)
class Decision:
    relaunch: bool
    reason: str  # why not, or what the next pod is
    on_demand: bool = False
    runtime_min: float = 0.0  # what is left of infra.max_runtime_min
    cost_usd: float | None = None  # what is left of infra.max_cost_usd (None: no cost cap)


def spent(launches: list[Launch], at_iso: str) -> tuple[float, float | None]:
    """(minutes, $) over the attempts; $ is None when a price is unknown."""
    minutes = sum(records.minutes_between(launch.started_at, launch.ended_at or at_iso) for launch in launches)
    costs = [launch.cost_usd if launch.ended_at else records.cost_so_far(launch, at_iso) for launch in launches]
    return minutes, (None if any(c is None for c in costs) else round(sum(costs), 4))


def preemptions(launches: list[Launch]) -> int:
    return sum(1 for launch in launches if launch.interruptible and launch.status == "gone")


def decide(settings: InfraSettings, launches: list[Launch], at_iso: str) -> Decision:
    """Whether the run gets a new pod after its latest one ended without the job's end, and on what terms."""
    used = len(launches) - 1
    if used >= settings.recoveries:
        return Decision(False, f"gave up after {len(launches)} pod(s) ended without the job's end "
                               f"(infra.max_recoveries={settings.recoveries})")
    minutes, cost = spent(launches, at_iso)
    runtime_left = settings.max_runtime_min - minutes
    cost_left = None if settings.max_cost_usd is None else settings.max_cost_usd - (cost or 0.0)
    if runtime_left <= 0.5 or (cost_left is not None and cost_left <= 0.01):
        money = "" if cost is None else f", ≈ ${cost:.2f}"
        return Decision(False, f"the caps are reached across the {len(launches)} pod(s) ({minutes:.1f} min{money} "
                               f"of infra.max_runtime_min={settings.max_runtime_min:g} / "
                               f"infra.max_cost_usd={settings.max_cost_usd}): not relaunched")
    fallback = settings.on_demand_after_preemptions
    on_demand = not settings.interruptible or bool(fallback and preemptions(launches) >= fallback)
    return Decision(True, "on-demand" if on_demand else "spot", on_demand=on_demand,
                    runtime_min=round(runtime_left, 3), cost_usd=None if cost_left is None else round(cost_left, 4))


# ---------------------------------------------------------------- what a relaunch needs, kept for `watch`


@dataclass(frozen=True)
class Plan:
    run_id: str
    job: str
    settings: dict  # InfraSettings, as JSON
    pod_config: str  # the resolved config the pod runs (YAML, no secrets)
    prices: dict  # on-demand $/h per GPU type (whole pod)
    bid_per_gpu: dict | None  # spot bids per GPU type, None for on-demand launches
    runs_dir: str

    @property
    def infra(self) -> InfraSettings:
        return InfraSettings.model_validate(self.settings, strict=False)


def plan_path(series: str) -> Path:
    return records.state_dir() / "recovery" / f"{series}.json"


def save_plan(series: str, plan: Plan) -> None:
    path = plan_path(series)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan.__dict__))


def load_plan(series: str) -> Plan | None:
    try:
        return Plan(**json.loads(plan_path(series).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def attempts_of(series: str) -> list[Launch]:
    return [launch for launch in records.load_all() if launch.series_key == series]


# ---------------------------------------------------------------- launching


def config_text(plan: Plan, gpu: str, price_per_hr: float | None, attempt: int, earlier: list[Launch],
                spot: bool) -> str:
    """The YAML a pod of this attempt runs: the card's hardware, $/h and attempts filled in."""
    cfg = Config.model_validate(yaml.safe_load(plan.pod_config))
    settings = plan.infra
    minutes, cost = spent(earlier, records.now_iso())
    push = cfg.push.model_copy(update={
        "hardware": cfg.push.hardware or (f"{settings.gpu_count}x {gpu} (RunPod {settings.cloud_type.lower()} cloud"
                                          f"{', spot' if spot else ''})"),
        "attempts": attempt,
        "earlier_attempts_min": round(minutes, 2) if earlier else None,
        "earlier_attempts_usd": cost if earlier else None,
    })
    text = preflight.config_for_gpu(cfg.model_copy(update={"push": push}), gpu, settings.gpu_count,
                                    settings.cloud_type, price_per_hr)
    if (found := find_secret(text)) is not None:
        raise T2SError(f"the pod's config would hold {found.what}: secrets go in .env, never in a config")
    return text


def launch_attempt(plan: Plan, *, attempt: int, series: str, on_demand: bool, runtime_min: float,
                   cost_usd: float | None, hf_token: str, runpod_key: str, say: Say) -> Launch:
    """One pod of the run (spot, or on-demand), with what is left of the caps; a spot launch that finds no capacity
    falls back to on-demand when infra.on_demand_after_preemptions is set."""
    settings = plan.infra.model_copy(update={"max_runtime_min": runtime_min, "max_cost_usd": cost_usd})
    earlier = attempts_of(series) if series else []
    spot = plan.bid_per_gpu is not None and not on_demand
    prices = spot_prices(settings, plan.bid_per_gpu) if spot else plan.prices

    def text(gpu: str, price: float | None) -> str:
        return config_text(plan, gpu, price, attempt, earlier, spot)

    try:
        return launch_pod(settings, run_id=plan.run_id, job=plan.job, config_text=text, prices=prices,
                          hf_token=hf_token, runpod_api_key=runpod_key, say=say,
                          bid_per_gpu=plan.bid_per_gpu if spot else None, attempt=attempt, series=series)
    except T2SError as exc:
        if not (spot and settings.on_demand_after_preemptions and str(exc).startswith("could not get")):
            raise
        say(f"no spot pod to be had ({exc}); falling back to on-demand")

        def on_demand_text(gpu: str, price: float | None) -> str:
            return config_text(plan, gpu, price, attempt, earlier, False)

        return launch_pod(settings, run_id=plan.run_id, job=plan.job, config_text=on_demand_text,
                          prices=plan.prices, hf_token=hf_token, runpod_api_key=runpod_key, say=say,
                          attempt=attempt, series=series)


def start(plan: Plan, *, hf_token: str, runpod_key: str, say: Say) -> Launch:
    """The first pod of a recovering launch; its plan is kept under the pod's name for later attempts."""
    settings = plan.infra
    first = launch_attempt(plan, attempt=1, series="", on_demand=plan.bid_per_gpu is None,
                           runtime_min=settings.max_runtime_min, cost_usd=settings.max_cost_usd, hf_token=hf_token,
                           runpod_key=runpod_key, say=say)
    save_plan(first.series_key, plan)
    return first


UNANNOUNCED = "without the job's end"  # in the note of a launch whose pod RunPod shows EXITED (infra.watchdog)


def recover(ended: Launch, *, hf_token: str, runpod_key: str, say: Say, followed: bool = False) -> Launch | None:
    """A new pod for a run whose latest pod ended without the job's end, or None (no plan kept, a later attempt
    exists already, or the rule says no: the line says why). followed: the caller read the pod's log to its end
    and saw no exit line; else (`watch`) only a pod RunPod shows EXITED counts, since a pod that is simply gone
    may have finished its job and terminated itself."""
    if ended.status != "gone" or not (followed or UNANNOUNCED in ended.note):
        return None
    series = ended.series_key
    plan = load_plan(series)
    if plan is None:
        return None
    launches = attempts_of(series)
    if not launches or launches[-1].key != ended.key:
        return None  # another t2s-infra (the launcher, or watch) relaunched it already
    if (code := reported_exit(ended, hf_token)) is not None:
        say(f"run {ended.run_id}: the job on pod {ended.pod_id} reported its end (exit {code}) in the run's uploaded "
            f"logs: not relaunched. Logs: t2s-infra logs {ended.run_id}")
        return None
    decision = decide(plan.infra, launches, records.now_iso())
    if not decision.relaunch:
        say(f"run {ended.run_id}: {decision.reason}")
        return None
    attempt = len(launches) + 1
    say(f"run {ended.run_id}: pod {ended.pod_id} ended without the job's end ({ended.note}); launching pod {attempt} "
        f"of at most {plan.infra.recoveries + 1} ({decision.reason}; {decision.runtime_min:g} min"
        + ("" if decision.cost_usd is None else f", ${decision.cost_usd:g}") + " of the caps left)")
    return launch_attempt(plan, attempt=attempt, series=series, on_demand=decision.on_demand,
                          runtime_min=decision.runtime_min, cost_usd=decision.cost_usd, hf_token=hf_token,
                          runpod_key=runpod_key, say=say)


def reported_exit(launch: Launch, hf_token: str) -> int | None:
    """The exit code the pod's entrypoint uploaded (logs/pod-end.json in the logs dataset) before it terminated its
    pod, when it did: a pod gone before its log was read to the end may have finished its job. None: no such file,
    another pod's, or the Hub cannot say."""
    import tempfile

    from infra import logs

    if not launch.logs_repo:
        return None
    with tempfile.TemporaryDirectory(prefix="t2s-pod-end-") as folder:
        try:
            logs.snapshot_download(launch.logs_repo, repo_type="dataset", local_dir=folder, token=hf_token,
                                   allow_patterns=[f"{launch.run_id}/logs/pod-end.json"])
            end = json.loads((Path(folder) / launch.run_id / "logs" / "pod-end.json").read_text())
        except Exception:  # absent, unreadable, or the Hub unreachable: the rule goes on without it
            return None
    if isinstance(end, dict) and end.get("pod_id") == launch.pod_id and isinstance(end.get("exit_code"), int):
        return end["exit_code"]
    return None


def follow_recovering(first: Launch, follow_one: Callable[[Launch], Outcome], *, hf_token: str, runpod_key: str,
                      say: Say) -> Outcome:
    """Follows the run's pods until one reports its job's end (or no new pod is launched); returns that outcome."""
    launch = first
    while True:
        outcome = follow_one(launch)
        if outcome.exit_code is not None:
            return outcome
        relaunched = recover(outcome.launch, hf_token=hf_token, runpod_key=runpod_key, say=say, followed=True)
        if relaunched is None:
            return outcome
        launch = relaunched


def summary(series: str) -> str:
    """`N pods, X min, ≈ $Y in all` over a launch's attempts."""
    launches = attempts_of(series)
    minutes, cost = spent(launches, records.now_iso())
    money = "" if cost is None or math.isnan(cost) else f", ≈ ${cost:.2f}"
    return f"{len(launches)} pod(s), {minutes:.1f} min{money} in all"


def plan_for(cfg_pod: Config, settings: InfraSettings, *, run_id: str, job: str, prices: dict,
             bid_per_gpu: dict | None, runs_dir: str) -> Plan:
    return Plan(run_id=run_id, job=job, settings=settings.model_dump(mode="json"), pod_config=dump_config(cfg_pod),
                prices=dict(prices), bid_per_gpu=dict(bid_per_gpu) if bid_per_gpu is not None else None,
                runs_dir=runs_dir)
