"""Everything a launch checks before any pod exists, the defaults it derives, and the plan it shows.

Pure functions on the run config, the accelerate config it names, the image's requirement set and the Hub's
`whoami` answer; `infra/cli.py` calls them in order (local checks, then the Hub, then RunPod's prices) and stops
at the first check that fails, each failure one line. The one place infra reads training settings: only to
know which packages and how many GPUs the run needs, never to change them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from jobs.lib import accelerate_config
from jobs.lib.accelerate_config import Accelerate
from jobs.lib.config import Config, dump_config, names_local_path
from jobs.lib.errors import T2SError
from jobs.lib.hub import check_repo_id
from infra import tables
from infra.settings import IMAGE_REFERENCE, InfraSettings, default_image, image_flavor

REQUIREMENTS = Path(__file__).resolve().parent.parent / "images"
# Installed from a pinned wheel in every real flavor (images/Dockerfile), so not in the requirement files.
WHEEL_PACKAGES = {"flash-attn"}
# Names t2s derives when the config sets none: the model repo per run, one logs dataset for every run.
MODEL_REPO = "{user}/t2s-{run_id}"
LOGS_REPO = "{user}/t2s-runs"
WRITE_ROLES = ("write", "admin", "contributor")


def read_accelerate(cfg: Config) -> Accelerate:
    """The accelerate config the run trains with (a shipped one, or a file: the pod has only the shipped ones)."""
    accelerate = accelerate_config.read_accelerate(cfg.train.accelerate_config)
    if not accelerate.shipped:
        raise T2SError(f"train.accelerate_config {accelerate.name} is a file on this machine, which the pod does not "
                       "have: use one shipped in configs/accelerate/ (single, ddp, zero3) or add yours there and "
                       "rebuild the image")
    return accelerate


def gpu_count_for(settings: InfraSettings, accelerate: Accelerate) -> int:
    """One GPU per training process, on one machine: derived unless the user set it, and then it must agree."""
    if accelerate.machines > 1:
        raise T2SError(f"train.accelerate_config {accelerate.name} spans {accelerate.machines} machines, but a pod "
                       "is one machine: use single, ddp or zero3")
    if settings.gpu_count is not None and settings.gpu_count != accelerate.processes:
        raise T2SError(f"infra.gpu_count is {settings.gpu_count} but train.accelerate_config {accelerate.name} starts "
                       f"{accelerate.processes} process(es), one per GPU (a process that sees several GPUs is refused "
                       "by trl, and unused GPUs bill): drop infra.gpu_count / --gpus, or pick an accelerate config "
                       "with that many processes")
    return accelerate.processes


def needed_packages(cfg: Config, accelerate: Accelerate) -> list[tuple[str, str]]:
    """(package, the setting that needs it) for every optional package the run imports."""
    needs = []
    if cfg.train.liger_kernel:
        needs.append(("liger-kernel", "train.liger_kernel"))
    if cfg.train.method == "qlora":
        needs.append(("bitsandbytes", "train.method: qlora"))
    if accelerate.deepspeed:
        needs.append(("deepspeed", f"train.accelerate_config: {accelerate.name}"))
    if cfg.model.attn_implementation == "flash_attention_2":
        needs.append(("flash-attn", "model.attn_implementation: flash_attention_2"))
    if cfg.model.gguf_file:
        needs.append(("gguf", "model.gguf_file"))
    return needs


def image_packages(flavor: str) -> set[str] | None:
    """The package names images/requirements-<flavor>.txt installs (plus the wheels), or None for no such flavor."""
    path = REQUIREMENTS / f"requirements-{flavor}.txt"
    if not path.is_file():
        return None
    names = set(WHEEL_PACKAGES)
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if match := re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)", line):
            names.add(_normalized(match.group(1)))
    return names


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def package_problem(cfg: Config, accelerate: Accelerate, image: str) -> str | None:
    flavor = image_flavor(image)
    if flavor is None:
        return None  # an image of your own: its packages are yours to know (the plan says so)
    installed = image_packages(flavor)
    if installed is None:
        known = ", ".join(sorted(p.stem.removeprefix("requirements-") for p in REQUIREMENTS.glob("requirements-*.txt")))
        return f"infra.image {image} names flavor {flavor}, which images/ does not build (flavors: {known})"
    missing = [(package, why) for package, why in needed_packages(cfg, accelerate) if package not in installed]
    if not missing:
        return None
    listed = ", ".join(f"{package} (for {why})" for package, why in missing)
    return (f"the image {image} does not install {listed}: images/requirements-{flavor}.txt lacks it; turn the "
            f"setting off, or add the package there and publish the image again (make push-images)")


def local_path_problem(cfg: Config) -> str | None:
    """The pod sees the Hub, not this machine: a model or dataset given as a local path cannot reach it."""
    for source in hub_sources(cfg):
        if source.skipped == LOCAL_PATH:
            return (f"{source.key} is {source.name}, a path on this machine, which the pod cannot see: use a Hub id "
                    "(upload it with `huggingface-cli upload`), or a network volume (infra.network_volume_id)")
    return None


def job_problem(job: str, settings: InfraSettings) -> str | None:
    """Without a network volume a pod's volume starts empty and goes with the pod: only the pipeline, which ends by
    pushing the model to the Hub, leaves anything behind. A job that needs an earlier job's output, or whose output
    is all on that volume (prep's data, train's adapter), is refused before any pod exists."""
    if job == "pipeline" or settings.network_volume_id:
        return None
    if job in ("merge", "eval", "push"):
        return (f"--job {job} needs the output of the jobs before it, but a pod's own volume starts empty and "
                "goes with the pod: launch the pipeline (the default), or keep runs on a network volume "
                "(infra.network_volume_id) where the earlier jobs ran")
    return (f"--job {job} leaves its output ({JOB_OUTPUTS.get(job, 'the run')}) on the pod's own volume, which goes "
            "with the pod: launch the pipeline (the default; it pushes the model to the Hub), or keep runs on a "
            "network volume (infra.network_volume_id)")


JOB_OUTPUTS = {"prep": "the prepared data", "train": "the trained adapter or model"}


def check_locally(cfg: Config, settings: InfraSettings, job: str = "pipeline") -> tuple[InfraSettings, Accelerate]:
    """The checks that need no network: job, image, GPU count, packages, paths. Returns the settings with image
    and gpu_count filled in."""
    if problem := job_problem(job, settings):
        raise T2SError(problem)
    image = settings.image or default_image()
    if not IMAGE_REFERENCE.match(image):
        raise T2SError(f"infra.image {image!r} is not an image reference (registry/name:tag): set infra.image, or "
                       "REGISTRY in .env for the default <REGISTRY>/t2s:pipeline-cu12")
    accelerate = read_accelerate(cfg)
    settings = settings.model_copy(update={"image": image, "gpu_count": gpu_count_for(settings, accelerate)})
    for problem in (package_problem(cfg, accelerate, image), local_path_problem(cfg)):
        if problem:
            raise T2SError(problem)
    return settings, accelerate


# ---------------------------------------------------------------- the Hub token


@dataclass(frozen=True)
class HubIdentity:
    user: str
    orgs: tuple[str, ...]  # organisations where the user may write
    role: str  # the token's: read, write, fineGrained, ...
    scoped: tuple[str, ...] | None  # for a fine-grained token: the namespaces it may write to

    def may_write(self, namespace: str) -> bool:
        if self.role == "fineGrained":
            return namespace in (self.scoped or ())
        return self.role in WRITE_ROLES and namespace in (self.user, *self.orgs)


def hub_identity(whoami: dict) -> HubIdentity:
    """The Hub's `whoami-v2` answer, reduced to what a launch needs."""
    token = (whoami.get("auth") or {}).get("accessToken") or {}
    orgs = tuple(org["name"] for org in whoami.get("orgs") or []
                 if org.get("name") and org.get("roleInOrg", "write") in WRITE_ROLES)
    scoped = None
    if token.get("role") == "fineGrained":
        scoped = tuple(entry.get("entity", {}).get("name", "")
                       for entry in (token.get("fineGrained") or {}).get("scoped") or []
                       if "repo.write" in (entry.get("permissions") or []))
    return HubIdentity(user=str(whoami.get("name") or ""), orgs=orgs, role=str(token.get("role") or "unknown"),
                       scoped=scoped)


def resolve_repos(cfg: Config, settings: InfraSettings, identity: HubIdentity) -> tuple[str, str]:
    """(model repo, logs dataset): the config's, else derived from the token's user; both must be writable."""
    if identity.role not in (*WRITE_ROLES, "fineGrained"):
        raise T2SError(f"HF_TOKEN is a {identity.role} token of {identity.user}: the pod pushes the model and its "
                       "logs with it, so it needs write access: make a write token at "
                       "https://huggingface.co/settings/tokens and put it in .env")
    model_repo = cfg.push.repo_id or MODEL_REPO.format(user=identity.user, run_id=cfg.run_id)
    logs_repo = settings.logs_repo or LOGS_REPO.format(user=identity.user)
    check_repo_id(model_repo, dry_run=False)
    for key, repo in (("push.repo_id", model_repo), ("infra.logs_repo", logs_repo)):
        namespace = repo.split("/")[0]
        if not identity.may_write(namespace):
            raise T2SError(f"HF_TOKEN ({identity.user}, {identity.role} token) may not write to {repo} ({key}): "
                           f"set {key} under a namespace it may write to, or use a token that may write to "
                           f"{namespace}")
    return model_repo, logs_repo


def pod_config(cfg: Config, settings: InfraSettings, *, model_repo: str, logs_repo: str) -> Config:
    """The config the pod runs, resolved: defaults + file + overrides + the derived names. The run lives in
    runs/ under the pod's volume, whatever runs_dir is on this machine."""
    infra = settings.model_copy(update={"logs_repo": logs_repo}).model_dump(mode="json")
    return cfg.model_copy(update={"runs_dir": "runs", "push": cfg.push.model_copy(update={"repo_id": model_repo}),
                                  "infra": infra})


def config_for_gpu(cfg: Config, gpu: str, gpu_count: int, cloud: str, price_per_hr: float | None) -> str:
    """The YAML text sent to the pod for one GPU type: the card's hardware and $/h, unless the config set them."""
    push = cfg.push.model_copy(update={
        "hardware": cfg.push.hardware or f"{gpu_count}x {gpu} (RunPod {cloud.lower()} cloud)",
        "cost_per_hour_usd": cfg.push.cost_per_hour_usd if cfg.push.cost_per_hour_usd is not None else price_per_hr,
    })
    return dump_config(cfg.model_copy(update={"push": push}))


# ---------------------------------------------------------------- what the pod reads from the Hub


@dataclass(frozen=True)
class Source:
    """A model or dataset the pod will read, and whether (and why not) it is looked up on the Hub first."""
    key: str  # the config key that names it
    name: str
    repo_type: str  # "model" or "dataset"
    skipped: str | None = None  # why it is not looked up; None: it is

    def line(self, outcome: str) -> str:
        return f"{self.key} {self.name}: {outcome}"


LOCAL_PATH = "a local path, not on the Hub (not looked up)"


def hub_sources(cfg: Config) -> list[Source]:
    """The base model, its tokenizer (when it is another repo) and the dataset, each a Hub repo the pod downloads
    with HF_TOKEN, or something that is not looked up (built in; a local path, which check_locally refused)."""
    tokenizer = cfg.model.tokenizer if cfg.model.tokenizer not in (None, cfg.model.name_or_path) else None
    sources = []
    for key, name, repo_type, built_in in (("model.name_or_path", cfg.model.name_or_path, "model", "tiny"),
                                           ("model.tokenizer", tokenizer, "model", "tiny"),
                                           ("data.source", cfg.data.source, "dataset", "synthetic")):
        if not name:
            continue
        skipped = None
        if name == built_in:
            skipped = "built in, made on the pod (not looked up)"
        elif names_local_path(name) or Path(name).expanduser().exists():
            skipped = LOCAL_PATH
        sources.append(Source(key, name, repo_type, skipped))
    return sources


def source_problem(source: Source, answer: str, user: str) -> str | None:
    """The one line for a source HF_TOKEN cannot read (answer: "ok", "gated" or "missing", from
    hub_checks.hub_access)."""
    kind = source.repo_type
    url = f"https://huggingface.co/{'datasets/' if kind == 'dataset' else ''}{source.name}"
    if answer == "gated":
        return (f"{source.key} {source.name} is a gated {kind} that HF_TOKEN's user {user} has not been granted: ask "
                f"for access at {url} (the pod downloads it with this token), then launch again")
    if answer == "missing":
        return (f"{source.key} {source.name}: no such {kind} on the Hub, or a private one HF_TOKEN ({user}) cannot "
                f"read: check the id at {url}")
    return None


# ---------------------------------------------------------------- the plan


def price_problem(settings: InfraSettings, prices: dict[str, float | None]) -> str | None:
    """A cost cap cannot hold on a GPU type RunPod lists no price for (the pod's cap and the watchdog both count
    cost as $/h × time): such a launch is refused, unless the config gives up the cost cap explicitly."""
    unlisted = [gpu for gpu in settings.gpu_types if prices[gpu] is None]
    if not unlisted or settings.max_cost_usd is None:
        return None
    return (f"RunPod lists no {settings.cloud_type.lower()}-cloud price for {settings.gpu_count}x "
            f"{', '.join(unlisted)}, so infra.max_cost_usd={settings.max_cost_usd:g} could not be enforced there: "
            "drop it from infra.gpu_types, try infra.cloud_type: ALL, or set infra.max_cost_usd: null to launch "
            f"with the runtime cap alone ({settings.max_runtime_min:g} min)")


def plan_lines(*, run_id: str, job: str, settings: InfraSettings, prices: dict[str, float | None],
               model_repo: str, logs_repo: str, private: bool) -> list[str]:
    """What the launch will do and may cost, for the user to confirm."""
    jobs = "prep → train → merge → eval → push" if job == "pipeline" else job
    count, cloud = settings.gpu_count, settings.cloud_type
    gpus = ", then ".join(f"{count}x {gpu} ({_price(prices[gpu])})" for gpu in settings.gpu_types)
    listed = [p for p in (prices[g] for g in settings.gpu_types) if p is not None]
    plan = Table.grid(padding=(0, 2))
    rows = [
        ("GPUs", f"{gpus}; {cloud} cloud"),
        ("image", settings.image or ""),
        ("model", f"{model_repo} ({'private' if private else 'public'})   logs  {logs_repo} (private dataset)"),
    ]
    if settings.expected_min is not None:
        first = prices[settings.gpu_types[0]]
        cost = "" if first is None else f", ≈ ${first * settings.expected_min / 60:.2f}"
        rows.append(("expected", f"≈ {settings.expected_min:g} min{cost} (infra.expected_min)"))
    else:
        rows.append(("expected", "no estimate (set infra.expected_min; bench/RESULTS.md has figures): at most the "
                                 "caps below"))
    runtime_cap = max(listed, default=0) * settings.max_runtime_min / 60  # on the dearest type it may get
    if settings.max_cost_usd is None:
        worst = f"; at most ≈ ${runtime_cap:.2f} at the listed price" if listed else ""
        rows.append(("caps", f"{settings.max_runtime_min:g} min; no cost cap (infra.max_cost_usd: null){worst}; "
                             "the pod stops itself, the launcher is the second line"))
    elif len(listed) < len(settings.gpu_types):
        rows.append(("caps", f"{settings.max_runtime_min:g} min; RunPod lists no price for some of these GPUs, so "
                             f"max_cost_usd={settings.max_cost_usd:g} cannot be enforced on them"))
    else:
        worst = min(settings.max_cost_usd, runtime_cap)
        rows.append(("caps", f"{settings.max_runtime_min:g} min or ${settings.max_cost_usd:g}, whichever comes first "
                             f"(at most ≈ ${worst:.2f}); the pod stops itself, the launcher is the second line"))
    if image_flavor(settings.image or "") is None:
        rows.append(("note", "the image's tag names no flavor (-cu12, -cu118): its packages were not checked"))
    for label, value in rows:
        tables.add_row(plan, label, value)
    return [f"plan for run {run_id}: {jobs} on one pod", *tables.plain(plan, indent=2)]


def check_lines(passed: list[str]) -> list[str]:
    """The checks that passed, for the plan (each failure would have stopped the launch in one line)."""
    return ["checks passed:", *(f"  ✓ {line}" for line in passed)]


def local_checks_passed(cfg: Config, settings: InfraSettings, accelerate: Accelerate, job: str) -> list[str]:
    flavor = image_flavor(settings.image or "")
    return [
        f"config and --set valid; --job {job} " + ("keeps its output on network volume "
                                                   f"{settings.network_volume_id}" if settings.network_volume_id and
                                                   job != "pipeline" else "leaves the model on the Hub"),
        f"image {settings.image}; {settings.gpu_count} GPU(s) for the {accelerate.processes} process(es) of "
        f"train.accelerate_config {accelerate.name}",
        f"packages the run needs are in images/requirements-{flavor}.txt" if flavor else
        "packages not checked (the image's tag names no flavor)",
        "no local path and no secret in the config",
    ]


def _price(per_hr: float | None) -> str:
    return "price not listed" if per_hr is None else f"${per_hr:.2f}/h"
