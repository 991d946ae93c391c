# t2s — the two commands that do all set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
VENV_CU118 := .venv-cu118
# The cu118 image's Python: python3.10, else pyenv's.
PYTHON_CU118 ?= $(firstword $(foreach python,python3.10 $(wildcard $(or $(PYENV_ROOT),$(HOME)/.pyenv)/versions/3.10*/bin/python3.10),\
  $(shell $(python) -c 'print("$(python)")' 2>/dev/null)))
CONFIG ?= configs/default.yaml
RUN ?=

.PHONY: install install-cu118 demo test test-cu12 test-cu118 pipeline launch-train logs watch down images push-images clean

# One-time install into .venv: the CPU build of torch, then the exact package set the cu12 image ships.
install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml images/requirements-cu12.txt
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "t2s needs Python 3.10+"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r images/requirements-cu12.txt -e '.[dev]'
	touch $@

# The same for the cu118 image's set: its Python 3.10 and torch 2.1.2 (PyPI's CUDA build, which runs on the CPU).
install-cu118: $(VENV_CU118)/.installed
$(VENV_CU118)/.installed: pyproject.toml images/requirements-cu118.txt
	@test -n "$(PYTHON_CU118)" || { echo "install-cu118: error: no Python 3.10 found: install one (pyenv install 3.10) or set PYTHON_CU118" >&2; exit 2; }
	$(PYTHON_CU118) -c 'import sys; assert sys.version_info[:2] == (3, 10), "the cu118 set runs on Python 3.10"'
	$(PYTHON_CU118) -m venv $(VENV_CU118)
	$(VENV_CU118)/bin/pip install -q --upgrade pip
	$(VENV_CU118)/bin/pip install -q torch==2.1.2
	$(VENV_CU118)/bin/pip install -q -r images/requirements-cu118.txt -e '.[dev]'
	touch $@

# The whole pipeline on the embedded default: synthetic data, a tiny model, CPU, no network.
demo: install
	$(BIN)/t2s pipeline --config configs/demo.yaml --force

# The suite on each image's package set, so that the code is tested on the stack each image ships.
test: test-cu12 test-cu118

test-cu12: install
	@echo "== tests on the cu12 set (.venv: torch 2.13.0 CPU, images/requirements-cu12.txt)"
	$(BIN)/pytest -q

test-cu118: install-cu118
	@echo "== tests on the cu118 set (.venv-cu118: Python 3.10, torch 2.1.2, images/requirements-cu118.txt)"
	$(VENV_CU118)/bin/pytest -q

pipeline: install
	$(BIN)/t2s pipeline --config $(CONFIG)

# RunPod (infra/README.md): needs RUNPOD_API_KEY and HF_TOKEN in the environment or .env.
# The whole pipeline on one pod, which pushes the model and ends itself:
#   make launch-train CONFIG=configs/l4x2-qlora.yaml SET="train.epochs=1 infra.max_cost_usd=3" [JOB=train] [YES=1]
SET ?=
JOB ?=
YES ?=
launch-train: install
	$(BIN)/t2s-infra launch --config $(CONFIG) $(foreach item,$(SET),--set $(item)) $(if $(JOB),--job $(JOB)) $(if $(YES),--yes)

logs: install
	@test -n "$(RUN)" || { echo "usage: make logs RUN=<run-id>"; exit 2; }
	$(BIN)/t2s-infra logs $(RUN)

watch: install
	$(BIN)/t2s-infra watch

down: install
	@test -n "$(RUN)" || { echo "usage: make down RUN=<run-id>"; exit 2; }
	$(BIN)/t2s-infra down $(RUN)

clean:
	rm -rf runs $(VENV) $(VENV_CU118)

# --- images (images/README.md) ---
# cu12 is the default flavor; cu118 (torch 2.1) is built on request. `make test` runs the suite on both sets.
FLAVOR ?= cu12
IMAGE_JOBS := prep train merge eval push pipeline
# REGISTRY and IMAGE_TAG: from the command line or the environment, else from .env (only these two lines are read).
REGISTRY ?= $(shell sed -n 's/^REGISTRY=//p' .env 2>/dev/null)
IMAGE_TAG ?= $(or $(shell sed -n 's/^IMAGE_TAG=//p' .env 2>/dev/null),$(FLAVOR)-$(shell git rev-parse --short HEAD 2>/dev/null || echo dev))

images:
	@for job in $(IMAGE_JOBS); do \
	  DOCKER_BUILDKIT=1 docker build -f images/Dockerfile --build-arg FLAVOR=$(FLAVOR) --target $$job \
	    -t t2s:$$job -t t2s:$$job-$(FLAVOR) . || exit 1; \
	done

push-images: images
	@test -n "$(REGISTRY)" || { echo "push-images: error: set REGISTRY (e.g. REGISTRY=docker.io/you in .env)" >&2; exit 2; }
	@for job in $(IMAGE_JOBS); do \
	  docker tag t2s:$$job $(REGISTRY)/t2s:$$job-$(IMAGE_TAG) && docker push $(REGISTRY)/t2s:$$job-$(IMAGE_TAG) || exit 1; \
	done
