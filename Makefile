# t2s — the two commands that do all set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/default.yaml
RUN ?=

.PHONY: install demo test pipeline launch-train logs images push-images clean

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

clean:
	rm -rf runs $(VENV)
