# t2s — the two commands that do all set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/default.yaml
RUN ?=

.PHONY: install demo test pipeline launch-train logs watch down images push-images clean

# One-time install into .venv: the CPU build of torch, then the exact package set the cu12 image ships.
install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml images/requirements-cu12.txt
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "t2s needs Python 3.10+"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r images/requirements-cu12.txt -e '.[dev]'
	touch $@

# The whole pipeline on the embedded default: synthetic data, a tiny model, CPU, no network.
demo: install
	$(BIN)/t2s pipeline --config configs/demo.yaml --force

test: install
	$(BIN)/pytest -q

pipeline: install
	$(BIN)/t2s pipeline --config $(CONFIG)

# RunPod (infra/README.md): needs RUNPOD_API_KEY and HF_TOKEN in the environment or .env.
launch-train: install
	$(BIN)/t2s-infra launch --job train --config $(CONFIG)

logs: install
	@test -n "$(RUN)" || { echo "usage: make logs RUN=<run-id>"; exit 2; }
	$(BIN)/t2s-infra logs $(RUN)

watch: install
	$(BIN)/t2s-infra watch

down: install
	@test -n "$(RUN)" || { echo "usage: make down RUN=<run-id>"; exit 2; }
	$(BIN)/t2s-infra down $(RUN)

clean:
	rm -rf runs $(VENV)

# --- images (images/README.md) ---
# cu12 is the flavor whose package set the test suite runs on; cu118 (torch 2.1) is built on request.
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
