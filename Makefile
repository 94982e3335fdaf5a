# dpsynth: the two commands a newcomer runs.
#   make run   set up .venv, then run the whole pipeline on the embedded default
#   make test  set up .venv, then run the test suite
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The stamp is named after the lock's hash: a changed lock reinstalls.
LOCK_HASH := $(shell sha256sum requirements.lock pyproject.toml | sha256sum | cut -c1-12)
STAMP := $(VENV)/.installed-$(LOCK_HASH)

.PHONY: help setup run test lock bench clean

help:
	@echo "make run    set up .venv and run the pipeline (dvc repro) on the embedded digits data"
	@echo "make test   set up .venv and run the test suite"
	@echo "make bench  run the benchmarks in benchmarks/"
	@echo "make lock   recompile requirements.lock from requirements.in"
	@echo "make clean  remove artifacts/, mlflow.db and DVC's run cache (keeps .venv)"

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing dependencies from requirements.lock into $(VENV) (a few minutes the first time)"
	@# (the grep drops pip's notes about local package mirrors that lack a package)
	set -o pipefail; $(BIN)/python -m pip install --quiet --disable-pip-version-check \
	  -r requirements.lock 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }
	set -o pipefail; $(BIN)/python -m pip install --quiet --disable-pip-version-check \
	  --no-deps --no-build-isolation -e . 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }
	@rm -f $(VENV)/.installed-*
	@touch $@

run: setup
	@set -e; export PATH="$(CURDIR)/$(BIN):$$PATH"; \
	export DPSYNTH_PIPELINE_ID="$${DPSYNTH_PIPELINE_ID:-run-$$(date -u +%Y%m%dT%H%M%SZ)}"; \
	start=$$(date +%s); \
	dvc repro; \
	dpsynth summary --artifacts artifacts --seconds $$(( $$(date +%s) - start ))

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/sampling.py

# Needs uv (pip install uv). The extra index is where the build machines keep torch.
lock:
	uv pip compile requirements.in -o requirements.lock --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 --index-strategy unsafe-best-match \
	  --extra-index-url file:///opt/pypi-more/simple --custom-compile-command "make lock"

clean:
	rm -rf artifacts mlflow.db .dvc/cache .dvc/tmp
