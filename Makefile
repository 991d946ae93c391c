# t2s — the two commands that do all set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
# The cu12 set's pins (transformers 5.x, trl 1.x, typer 0.29, matplotlib 3.11) need Python 3.11+; the image ships 3.11.
PYTHON ?= $(or $(shell command -v python3.11 2>/dev/null),python3)
VENV := .venv
BIN := $(VENV)/bin
VENV_CU118 := .venv-cu118
# The cu118 image's Python: python3.10, else pyenv's.
PYTHON_CU118 ?= $(firstword $(foreach python,python3.10 $(wildcard $(or $(PYENV_ROOT),$(HOME)/.pyenv)/versions/3.10*/bin/python3.10),\
  $(shell $(python) -c 'print("$(python)")' 2>/dev/null)))
CONFIG ?= configs/default.yaml
RUN ?=

.PHONY: install install-cu118 demo test test-cu12 test-cu118 test-fast pipeline launch-train logs follow ls watch down images images-committed push-images image-smoke clean clean-runs

# One-time install into .venv: the CPU build of torch, then the exact package set the cu12 image ships.
# torch comes from TORCH_INDEX_URL (PyTorch's CPU-only index: PyPI's torch is the CUDA build, with GBs of nvidia-*
# wheels); point it at your own mirror of it. When it does not answer, pip's own indexes are used.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml images/requirements-cu12.txt $(wildcard images/llama-cpp.sh)
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { echo "install: error: $(PYTHON)\
	 is $$($(PYTHON) --version 2>/dev/null || echo "not found"), but t2s needs Python 3.11+: install python3.11 with its venv module\
	 (apt-get install python3.11-venv, or pyenv install 3.11) and rerun with PYTHON=python3.11 (or its path)" >&2; exit 2; }
	@$(PYTHON) -c 'import ensurepip' 2>/dev/null || { echo "install: error: $(PYTHON) has no venv/ensurepip module:\
	 install it (apt-get install python3.11-venv) or point PYTHON= at a full Python 3.11" >&2; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@if $(BIN)/python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=10)' "$(TORCH_INDEX_URL)" 2>/dev/null; then \
	  echo "$(BIN)/pip install -q '$(TORCH_SPEC)' --index-url $(TORCH_INDEX_URL)"; \
	  $(BIN)/pip install -q '$(TORCH_SPEC)' --index-url $(TORCH_INDEX_URL); \
	else \
	  echo "install: TORCH_INDEX_URL=$(TORCH_INDEX_URL) does not answer: $(TORCH_SPEC) from pip's own indexes"; \
	  echo "$(BIN)/pip install -q '$(TORCH_SPEC)'"; \
	  $(BIN)/pip install -q '$(TORCH_SPEC)'; \
	fi
	$(BIN)/pip install -q -r images/requirements-cu12.txt -e '.[dev]'
	images/llama-cpp.sh $(BIN)/python  # t2s export's pinned llama.cpp pair; the wheel is built once, then cached
	touch $@

# The same for the cu118 image's set: its Python 3.10 and torch 2.1.2 (PyPI's CUDA build, which runs on the CPU).
install-cu118: $(VENV_CU118)/.installed
$(VENV_CU118)/.installed: pyproject.toml images/requirements-cu118.txt $(wildcard images/llama-cpp.sh)
	@test -n "$(PYTHON_CU118)" || { echo "install-cu118: error: no Python 3.10 found: install one (pyenv install 3.10) or set PYTHON_CU118" >&2; exit 2; }
	$(PYTHON_CU118) -c 'import sys; assert sys.version_info[:2] == (3, 10), "the cu118 set runs on Python 3.10"'
	$(PYTHON_CU118) -m venv $(VENV_CU118)
	$(VENV_CU118)/bin/pip install -q --upgrade pip
	$(VENV_CU118)/bin/pip install -q torch==2.1.2
	$(VENV_CU118)/bin/pip install -q -r images/requirements-cu118.txt -e '.[dev]'
	images/llama-cpp.sh $(VENV_CU118)/bin/python  # the same cached wheel (py3-none: any Python)
	touch $@

# The whole pipeline on the embedded default: synthetic data, a tiny model, CPU, no network.
demo: install
	$(BIN)/t2s pipeline --config configs/demo.yaml --force

# The suite on each image's package set, so that the code is tested on the stack each image ships.
test: test-cu12 test-cu118

# pytest-xdist: one worker per core; a file's tests stay on one worker (they share its module fixtures).
PYTEST_PARALLEL ?= -n auto --dist loadfile
test-cu12: install
	@echo "== tests on the cu12 set (.venv: torch 2.13.0 CPU, images/requirements-cu12.txt)"
	$(BIN)/pytest -q $(PYTEST_PARALLEL) --durations=8

test-cu118: install-cu118
	@echo "== tests on the cu118 set (.venv-cu118: Python 3.10, torch 2.1.2, images/requirements-cu118.txt)"
	$(VENV_CU118)/bin/pytest -q $(PYTEST_PARALLEL) --durations=8

# The developers' fast lane: every module's core, without the end-to-end runs of real jobs (marked slow).
test-fast: install
	$(BIN)/pytest -q $(PYTEST_PARALLEL) -m "not slow"

pipeline: install
	$(BIN)/t2s pipeline --config $(CONFIG)

# RunPod (infra/README.md): needs RUNPOD_API_KEY and HF_TOKEN in the environment or .env.
# The whole pipeline on one pod, which pushes the model and ends itself:
#   make launch-train CONFIG=configs/l4x2-qlora.yaml SET="train.epochs=1 infra.max_cost_usd=3" [SET_FILE=f] [YES=1] [DRY_RUN=1]
#   (JOB=train and the other single jobs need infra.network_volume_id: a pod's own volume goes with the pod)
SET ?=
JOB ?=
YES ?=
DRY_RUN ?=
# SET splits at spaces; SET_FILE names a file of overrides, one key=value per line (a value may hold spaces, e.g.
# infra.gpu_types=["NVIDIA L40S"]; blank lines and lines starting with # are skipped), passed after SET's.
SET_FILE ?=
launch-train: install
	@overrides=(); \
	if [ -n "$(SET_FILE)" ]; then \
	  [ -f "$(SET_FILE)" ] || { echo "launch-train: error: SET_FILE=$(SET_FILE) not found: a file of key=value lines" >&2; exit 2; }; \
	  while IFS= read -r line || [ -n "$$line" ]; do \
	    case "$$line" in ''|'#'*) ;; *) overrides+=(--set "$$line") ;; esac; \
	  done < "$(SET_FILE)"; \
	fi; \
	command=($(BIN)/t2s-infra launch --config $(CONFIG) $(foreach item,$(SET),--set $(item)) "$${overrides[@]}" \
	  $(if $(JOB),--job $(JOB)) $(if $(YES),--yes) $(if $(DRY_RUN),--dry-run)); \
	echo "$${command[*]}"; "$${command[@]}"

logs: install
	@test -n "$(RUN)" || { echo "usage: make logs RUN=<run-id>"; exit 2; }
	$(BIN)/t2s-infra logs $(RUN)

# The live log of a run's pod (Ctrl-C detaches; the job goes on), and every launch from this machine.
follow: install
	@test -n "$(RUN)" || { echo "usage: make follow RUN=<run-id>"; exit 2; }
	$(BIN)/t2s-infra logs --follow $(RUN)

ls: install
	$(BIN)/t2s-infra ls

watch: install
	$(BIN)/t2s-infra watch

down: install
	@test -n "$(RUN)" || { echo "usage: make down RUN=<run-id>"; exit 2; }
	$(BIN)/t2s-infra down $(RUN) $(if $(YES),--yes)

# The virtual environments only: runs/ (every trained model) stays; `make clean-runs` deletes it.
clean:
	rm -rf $(VENV) $(VENV_CU118)

clean-runs:
	rm -rf runs

# --- images (images/README.md) ---
# Local tags t2s:<job> and t2s:<job>-<flavor>; push-images publishes $(REGISTRY)/t2s:<job>-<flavor> (moving) and
# $(REGISTRY)/t2s:<job>-<flavor>-<git short sha> (immutable). t2s-infra launches $(REGISTRY)/t2s:pipeline-cu12 by default.
# FLAVOR and REGISTRY: from the command line or the environment, else from .env (only these two lines are read),
# else cu12 and ghcr.io/t2s.
FLAVOR ?= $(or $(shell sed -n 's/^FLAVOR=//p' .env 2>/dev/null),cu12)
REGISTRY ?= $(or $(shell sed -n 's/^REGISTRY=//p' .env 2>/dev/null),ghcr.io/t2s)
IMAGE_JOBS := prep train rl merge export eval push serve pipeline
# The flavor's base (images/Dockerfile's default unless BASE_IMAGE=...), passed for BOTH flavor stages: the legacy
# builder builds every stage up to the target and would otherwise pull the other flavor's base too.
BASE_IMAGE ?= $(shell sed -n 's/^ARG BASE_IMAGE_$(shell echo $(FLAVOR) | tr a-z A-Z)=//p' images/Dockerfile)
# BuildKit where buildx is installed, else the legacy builder; DOCKER_BUILDKIT=0|1 from the environment decides.
DOCKER_BUILDKIT ?= $(if $(shell docker buildx version 2>/dev/null),1,0)
# BUILD_NETWORK=host for an engine without a bridge network (images/smoke.sh).
BUILD_NETWORK ?=
IMAGE_BUILD_ARGS = --build-arg FLAVOR=$(FLAVOR) --build-arg BASE_IMAGE_CU12=$(BASE_IMAGE) --build-arg BASE_IMAGE_CU118=$(BASE_IMAGE) \
  $(if $(filter undefined,$(origin FLASH_ATTN_WHEEL)),,--build-arg FLASH_ATTN_WHEEL=$(FLASH_ATTN_WHEEL)) \
  $(if $(BUILD_NETWORK),--network $(BUILD_NETWORK))
GIT_SHA = $(shell git rev-parse --short HEAD 2>/dev/null)
# What goes into the image (.dockerignore's allow-list): a pushed tag names a commit only when these are committed.
IMAGE_SOURCES := pyproject.toml README.md jobs infra configs entrypoints images
LLAMA_CPP_CACHE = $(or $(T2S_WHEEL_CACHE),$(HOME)/.cache/t2s/wheels)

images:
	@test -n "$(BASE_IMAGE)" || { echo "images: error: FLAVOR=$(FLAVOR) is not a flavor: use cu12 or cu118" >&2; exit 2; }
	@command -v docker >/dev/null || { echo "images: error: no docker command: install Docker (docs.docker.com/engine/install)" >&2; exit 2; }
	@# t2s export's llama.cpp pair as `make install` cached it (images/llama-cpp.sh): the sdist (the converter; the
	@# build never downloads it) and the wheel built from it (without it the image makes f16/q8_0 only)
	@ls $(LLAMA_CPP_CACHE)/sdist/llama_cpp_python-*.tar.gz >/dev/null 2>&1 || { echo "images: error: no llama-cpp-python\
	 sdist in $(LLAMA_CPP_CACHE)/sdist: run \`make install\` first (it caches what t2s export needs for the images)" >&2; exit 2; }
	@rm -rf images/wheels/*.whl images/wheels/sdist; mkdir -p images/wheels/sdist
	@cp $(LLAMA_CPP_CACHE)/sdist/llama_cpp_python-*.tar.gz images/wheels/sdist/
	@cp $(LLAMA_CPP_CACHE)/llama_cpp_python-*-py3-none-*.whl images/wheels/ 2>/dev/null || true
	@for job in $(IMAGE_JOBS); do \
	  echo "== t2s:$$job ($(FLAVOR), base $(BASE_IMAGE), DOCKER_BUILDKIT=$(DOCKER_BUILDKIT))"; \
	  DOCKER_BUILDKIT=$(DOCKER_BUILDKIT) docker build -f images/Dockerfile $(strip $(IMAGE_BUILD_ARGS)) --target $$job \
	    -t t2s:$$job -t t2s:$$job-$(FLAVOR) . || exit 1; \
	done

push-images: images-committed images
	@for job in $(IMAGE_JOBS); do \
	  for tag in $(REGISTRY)/t2s:$$job-$(FLAVOR) $(REGISTRY)/t2s:$$job-$(FLAVOR)-$(GIT_SHA); do \
	    docker tag t2s:$$job-$(FLAVOR) $$tag && docker push $$tag || { echo "push-images: error: docker push $$tag failed\
	 (its message is above; not logged in? docker login $(firstword $(subst /, ,$(REGISTRY))))" >&2; exit 1; }; \
	  done; \
	done

# Checked before building: the pushed -<sha> tag must name what the image holds.
images-committed:
	@test -n "$(GIT_SHA)" || { echo "push-images: error: not a git checkout: the pushed tags name the commit they were built from" >&2; exit 2; }
	@test -z "$$(git status --porcelain -- $(IMAGE_SOURCES))" || { echo "push-images: error: uncommitted changes in\
	 $(IMAGE_SOURCES): commit them first, so that the tag -$(GIT_SHA) names what the image holds" >&2; exit 2; }

# Builds the cu12 and cu118 images on CPU stand-in bases and runs every job image on the tiny model (images/smoke.sh).
image-smoke: install
	images/smoke.sh
