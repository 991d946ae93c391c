"""The run config's `infra:` section (RunPod settings) and the two secrets infra needs.

The jobs ignore `infra:`; this module validates it with the same rules as the rest of the config
(unknown keys are errors, no silent coercion) and turns every problem into a one-line T2SError.
Secrets come only from the environment or .env (jobs.lib.credentials) and never appear in any output: `redact` is the
last line of defence for anything printed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from jobs.lib.config import Config, describe_error, where_given
from jobs.lib.errors import T2SError
from jobs.lib.credentials import is_secret_name, redact, redactor, secret  # noqa: F401 (redact, redactor: infra's names)
from jobs.lib.hub import HUB_ID
from infra.caps import MAX_COST_USD, MAX_RUNTIME_MIN

# Environment names infra sets on the pod itself; the config's infra.env must not shadow them.
RESERVED_ENV_PREFIXES = ("T2S_", "RUNPOD_")

# What else infra.env may not set (issue 31), matched on the whole name, any case. The job shares the pod's environment
# with the entrypoint, the pod's caps, its log upload and its self-terminate, and with HF_TOKEN: a name that sends
# traffic elsewhere would send the token with it; one that loads code runs it beside the token; one the runner needs
# can stop the caps and the self-terminate from running. Everything else is the job's (DS_ACCELERATOR, NCCL_*,
# OMP_NUM_THREADS, PYTORCH_CUDA_ALLOC_CONF, TOKENIZERS_PARALLELISM, HF_HUB_ENABLE_HF_TRANSFER, ...).
DENIED_ENV = (
    ("redirects the pod's traffic (and HF_TOKEN with it)",
     re.compile(r".*_PROXY|.*_ENDPOINT|.*_URL|.*_URI|.*_HOST|.*_CA_BUNDLE|.*_CA_CERTS?|SSL_CERT_(?:FILE|DIR)|"
                r"CURL_.*|GIT_.*|SSH_.*|DOCKER_.*", re.I)),
    ("loads code into the job or the entrypoint",
     re.compile(r"PYTHON.*|LD_.*|DYLD_.*|BASH_ENV|ENV|BASH_FUNC_.*|PERL5?LIB|PERL5OPT|NODE_OPTIONS|RUBYOPT|"
                r"JAVA_TOOL_OPTIONS|PIP_.*|UV_.*", re.I)),
    ("is what the entrypoint, the pod's caps and its self-terminate run on",
     re.compile(r"PATH|HOME|TMPDIR|TMP|TEMP|SHELL|SHELLOPTS|BASHOPTS|IFS|PS4|USER|LOGNAME|PWD|OLDPWD|LANG|LANGUAGE|"
                r"LC_.*|TZ|XDG_.*|HF_HOME|HF_HUB_CACHE|HUGGINGFACE_HUB_CACHE|HF_HUB_OFFLINE|HF_TOKEN_PATH|"
                r"HF_STORED_TOKENS_PATH", re.I)),
)


def denied_env(name: str) -> str | None:
    """Why infra.env may not set this name, or None when the job may have it."""
    return next((why for why, pattern in DENIED_ENV if pattern.fullmatch(name)), None)

# What `make push-images` publishes: $(REGISTRY)/t2s:<job>-<flavor> (moving) and ...-<flavor>-<git sha>.
DEFAULT_REGISTRY = "ghcr.io/t2s"
DEFAULT_IMAGE_TAG = "t2s:pipeline-cu12"
IMAGE_REFERENCE = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]+)?(?:/[a-z0-9]+(?:[._-]+[a-z0-9]+)*)*"
                             r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?$")


# Bounds for every number of the section: a value past them is a typo or a cap that would never fire (a cap of
# 1e300 or .inf launches a pod nothing stops), and is refused in one line before any pod exists.
MAX_GPUS = 8  # the most GPUs RunPod puts in one pod
MAX_CAPACITY_ROUNDS = 20  # with the doubling wait (capped at Timing.backoff_max_s), about an hour of asking
MAX_DISK_GB = 4000
MAX_PROVISION_TIMEOUT_S = 7200.0  # two hours to pull an image is a stuck host
MAX_BID_PER_GPU_USD = 100.0  # far above any GPU-hour RunPod lists: a larger bid is a typo
MAX_RECOVERIES = 20  # each relaunch pays a new start; the caps still count every attempt


class InfraSettings(BaseModel):
    # allow_inf_nan=False: infinity (.inf, 1e400) and NaN are refused, as in the jobs' sections (jobs.lib.config.Section).
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    # A public image built from images/Dockerfile (its ENTRYPOINT, entrypoints/run-job, runs $T2S_JOB); every
    # job tag holds the same code, so any of them runs any job. None: default_image(), what push-images publishes.
    image: str | None = Field(default=None, pattern=r"^[^\s\"\\]+$")
    gpu_types: list[str] = Field(default=["NVIDIA L4"], min_length=1)  # tried in order when one has no capacity
    gpu_count: int | None = Field(default=None, gt=0, le=MAX_GPUS)  # None: the processes train.accelerate_config starts
    # SECURE by default: steadier hosts, and network volumes only exist there.
    cloud_type: Literal["SECURE", "COMMUNITY", "ALL"] = "SECURE"
    capacity_rounds: int = Field(default=3, gt=0, le=MAX_CAPACITY_ROUNDS)  # passes over gpu_types before giving up
    container_disk_gb: int = Field(default=50, gt=0, le=MAX_DISK_GB)
    volume_gb: int = Field(default=50, ge=0, le=MAX_DISK_GB)  # pod volume; ignored when network_volume_id is set
    network_volume_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]+$")
    volume_mount_path: str = Field(default="/workspace", pattern=r"^/[^\s\"\\]*$")
    # A CUDA image of several GB can take minutes to pull; RunPod reports RUNNING meanwhile.
    provision_timeout_s: float = Field(default=900, gt=0, le=MAX_PROVISION_TIMEOUT_S)
    max_runtime_min: float = Field(default=240, gt=0, le=MAX_RUNTIME_MIN)
    # null: no cost cap, the runtime cap alone (the one way to launch a GPU type RunPod lists no price for).
    max_cost_usd: float | None = Field(default=10.0, gt=0, le=MAX_COST_USD)
    # Wall time you expect (bench/RESULTS.md has figures), for the plan's expected cost; None: the plan shows the caps.
    expected_min: float | None = Field(default=None, gt=0, le=MAX_RUNTIME_MIN)
    keep_pod: bool = False  # leave the pod up after the job (debugging); you stop it with `t2s-infra down`
    # Hub dataset for the run's logs; None: <the HF_TOKEN's user>/t2s-runs (infra.preflight).
    logs_repo: str | None = Field(default=None, pattern=HUB_ID.pattern)
    env: dict[str, str] = {}  # extra non-secret environment for the job (values are checked with the whole config)
    # Spot pods (infra/recovery.py): RunPod may stop one at any time; the run is relaunched and resumes from its
    # synced checkpoint (train.checkpoint_sync: hub) or its network volume.
    interruptible: bool = False
    # None: RunPod's listed spot price
    bid_per_gpu_usd: float | None = Field(default=None, gt=0, le=MAX_BID_PER_GPU_USD, allow_inf_nan=False)
    # Pods relaunched after one ends unannounced; None: 3 spot, 0 on-demand.
    max_recoveries: int | None = Field(default=None, ge=0, le=MAX_RECOVERIES)
    # Then on-demand (also after no spot capacity).
    on_demand_after_preemptions: int | None = Field(default=None, gt=0, le=MAX_RECOVERIES)

    @property
    def recoveries(self) -> int:
        return self.max_recoveries if self.max_recoveries is not None else (3 if self.interruptible else 0)

    @field_validator("env")
    @classmethod
    def _env_is_not_secret_or_reserved(cls, env: dict[str, str]) -> dict[str, str]:
        for key in env:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise ValueError(f"{key!r} is not an environment variable name (letters, digits, _)")
            if is_secret_name(key):
                raise ValueError(f"{key} is a secret's name: secrets never go in the config (the pod gets HF_TOKEN "
                                 "from the environment or .env, and no other secret)")
            if key.startswith(RESERVED_ENV_PREFIXES):
                raise ValueError(f"{key} is set by t2s-infra itself; pick another name")
            if why := denied_env(key):
                raise ValueError(f"{key} {why}, so a pod's environment may not set it (infra/README.md lists what "
                                 "infra.env may hold: the job's own settings)")
        return env


def load_infra_settings(cfg: Config, path: str | Path | None = None, overrides: list[str] | tuple = ()) -> InfraSettings:
    """The validated `infra:` section of a loaded config, or one clear T2SError naming the key (and the --set among
    `overrides` that gave it, when one did)."""
    try:
        return InfraSettings.model_validate(cfg.infra)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise T2SError(describe_error(error, where_given(("infra", *error["loc"]) if error["loc"] else (), path, overrides), InfraSettings,
                                      prefix="infra")) from None


def default_image() -> str:
    """The pipeline image `make push-images` publishes, under REGISTRY (environment or .env, as the secrets are)."""
    registry = (secret("REGISTRY") or DEFAULT_REGISTRY).rstrip("/")  # not a secret; read the same way
    return f"{registry}/{DEFAULT_IMAGE_TAG}"


def image_flavor(image: str) -> str | None:
    """The image's flavor from its tag (t2s:<job>-<flavor>[-<sha>]), e.g. cu12; None when the tag names none."""
    name = image.split("@", 1)[0]
    tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else ""
    match = re.search(r"-(cu\d+)(?:-[0-9a-f]{7,40})?$", tag)
    return match.group(1) if match else None


def require_secret(name: str, why: str) -> str:
    value = secret(name)
    if not value:
        raise T2SError(f"{name} is not set: put it in the environment or in .env ({why})")
    return value
