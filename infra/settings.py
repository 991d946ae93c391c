"""The run config's `infra:` section (RunPod settings) and the two secrets infra needs.

The jobs ignore `infra:`; this module validates it with the same rules as the rest of the config
(unknown keys are errors, no silent coercion) and turns every problem into a one-line T2SError.
Secrets come only from the environment or .env (jobs.credentials) and never appear in any output: `redact` is the
last line of defence for anything printed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from jobs.config import Config, describe_error
from jobs.errors import T2SError
from jobs.credentials import is_secret_name, redact, redactor, secret  # noqa: F401 (redact, redactor: infra's names)
from jobs.hub import HUB_ID

# Environment names infra sets on the pod itself; the config's infra.env must not shadow them.
RESERVED_ENV_PREFIXES = ("T2S_", "RUNPOD_")

# What `make push-images` publishes: $(REGISTRY)/t2s:<job>-<flavor> (moving) and ...-<flavor>-<git sha>.
DEFAULT_REGISTRY = "ghcr.io/t2s"
DEFAULT_IMAGE_TAG = "t2s:pipeline-cu12"
IMAGE_REFERENCE = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]+)?(?:/[a-z0-9]+(?:[._-]+[a-z0-9]+)*)*"
                             r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?$")


class InfraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    # A public image built from images/Dockerfile (its ENTRYPOINT, entrypoints/run-job, runs $T2S_JOB); every
    # job tag holds the same code, so any of them runs any job. None: default_image(), what push-images publishes.
    image: str | None = Field(default=None, pattern=r"^[^\s\"\\]+$")
    gpu_types: list[str] = Field(default=["NVIDIA L4"], min_length=1)  # tried in order when one has no capacity
    gpu_count: int | None = Field(default=None, gt=0)  # None: the processes train.accelerate_config starts
    # SECURE by default: steadier hosts, and network volumes only exist there.
    cloud_type: Literal["SECURE", "COMMUNITY", "ALL"] = "SECURE"
    capacity_rounds: int = Field(default=3, gt=0)  # passes over gpu_types before giving up
    container_disk_gb: int = Field(default=50, gt=0)
    volume_gb: int = Field(default=50, ge=0)  # pod volume; ignored when network_volume_id is set
    network_volume_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]+$")
    volume_mount_path: str = Field(default="/workspace", pattern=r"^/[^\s\"\\]*$")
    # A CUDA image of several GB can take minutes to pull; RunPod reports RUNNING meanwhile.
    provision_timeout_s: float = Field(default=900, gt=0)
    max_runtime_min: float = Field(default=240, gt=0)
    # null: no cost cap, the runtime cap alone (the one way to launch a GPU type RunPod lists no price for).
    max_cost_usd: float | None = Field(default=10.0, gt=0)
    # Wall time you expect (bench/RESULTS.md has figures), for the plan's expected cost; None: the plan shows the caps.
    expected_min: float | None = Field(default=None, gt=0)
    keep_pod: bool = False  # leave the pod up after the job (debugging); you stop it with `t2s-infra down`
    # Hub dataset for the run's logs; None: <the HF_TOKEN's user>/t2s-runs (infra.preflight).
    logs_repo: str | None = Field(default=None, pattern=HUB_ID.pattern)
    env: dict[str, str] = {}  # extra non-secret environment for the job (values are checked with the whole config)
    # Spot pods (infra/recovery.py): RunPod may stop one at any time; the run is relaunched and resumes from its
    # synced checkpoint (train.checkpoint_sync: hub) or its network volume.
    interruptible: bool = False
    bid_per_gpu_usd: float | None = Field(default=None, gt=0, allow_inf_nan=False)  # None: RunPod's listed spot price
    max_recoveries: int | None = Field(default=None, ge=0)  # pods relaunched after one ends unannounced; None: 3 spot, 0
    on_demand_after_preemptions: int | None = Field(default=None, gt=0)  # then on-demand (also after no spot capacity)

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
        return env


def load_infra_settings(cfg: Config, path: str | Path | None = None) -> InfraSettings:
    """The validated `infra:` section of a loaded config, or one clear T2SError naming the key."""
    try:
        return InfraSettings.model_validate(cfg.infra)
    except ValidationError as exc:
        raise T2SError(describe_error(exc.errors()[0], f"in {path}" if path else "in the config", InfraSettings,
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
