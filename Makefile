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

.PHONY: help setup browser run sweep test lock bench clean

help:
	@echo "make run    set up .venv and run the pipeline (dvc repro) on the embedded digits data"
	@echo "make sweep  the privacy-utility curve: DP runs at SWEEP_EPSILONS (default [1,2,5,10])"
	@echo "make test   set up .venv and run the test suite"
	@echo "make bench  run the benchmarks in benchmarks/"
	@echo "make lock   recompile requirements.lock from requirements.in"
	@echo "make clean  remove artifacts/, mlflow.db and DVC's run cache (keeps .venv)"
	@echo "make push / make pull    dvc push / dvc pull to the default DVC remote (S3/MinIO)"
	@echo "make mlflow-server MLFLOW_ARTIFACTS=s3://bucket/mlflow   shared tracking server on 127.0.0.1"

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
	dvc repro report; \
	dpsynth summary --artifacts artifacts --seconds $$(( $$(date +%s) - start ))

# The privacy-utility curve at SWEEP_EPSILONS: a DVC experiment (`dvc exp run -S`, see
# `dvc exp show`) that sets sweep.epsilons in params.yaml and re-runs only the sweep and
# report stages (after make run's, which it brings up to date). Not part of `make run`
# (time). Each extra target is a DP fine-tuning, a privacy ledger entry; all are
# reserved before any trains. `git checkout params.yaml` goes back to make run's curve.
SWEEP_EPSILONS ?= [1,2,5,10]
sweep: setup
	@set -e; export PATH="$(CURDIR)/$(BIN):$$PATH"; \
	export DPSYNTH_PIPELINE_ID="$${DPSYNTH_PIPELINE_ID:-sweep-$$(date -u +%Y%m%dT%H%M%SZ)}"; \
	start=$$(date +%s); \
	dvc exp run -S 'sweep.epsilons=$(SWEEP_EPSILONS)'; \
	dpsynth summary --artifacts artifacts --seconds $$(( $$(date +%s) - start ))

# Two workers, each taking whole test files (module fixtures run once per file):
# 595 s against 988 s serial on 2 cores. PYTEST_WORKERS= runs serially.
PYTEST_WORKERS ?= -n 2 --dist loadfile
test: setup browser
	$(BIN)/python -m pytest $(PYTEST_WORKERS) $(PYTEST_ARGS)

# The report test (tests/test_report_browser.py) renders the HTML report in headless
# Chromium: Debian's `chromium` package, installed once (as root, or with sudo).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || { echo "installing chromium (apt-get) for the report test"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

bench: setup
	$(BIN)/python benchmarks/sampling.py
	$(BIN)/python benchmarks/dp_step.py
	$(BIN)/python benchmarks/fid.py

# Needs uv (pip install uv). The extra index is where the build machines keep torch.
lock:
	uv pip compile requirements.in -o requirements.lock --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 --index-strategy unsafe-best-match \
	  --extra-index-url file:///opt/pypi-more/simple --custom-compile-command "make lock"

clean:
	rm -rf artifacts mlflow.db .dvc/cache .dvc/tmp

# ---- container image and Helm chart (docker/, charts/) ----------------------
# `make image` builds the CUDA image $(IMAGE):<version>, `make image-cpu` the CPU
# one $(IMAGE):<version>-cpu (what the chart runs); IMAGE=registry/name to tag
# for a registry. `make chart` lints the chart and packages it into dist/.
VERSION ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
# the name components/images.py and the chart default to
IMAGE ?= ghcr.io/dpsynth/dpsynth
VCS_REF ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
DOCKER_BUILD = docker build -f docker/Dockerfile --build-arg VERSION=$(VERSION) --build-arg VCS_REF=$(VCS_REF)
# $(call NEED_DOCKER,target,tag-suffix): stop with a clear message, and the
# command to run elsewhere, where there is no Docker CLI or no reachable daemon.
NEED_DOCKER = @docker info >/dev/null 2>&1 || { echo "make $@: no Docker here ($$(command -v docker >/dev/null \
  && echo 'the docker CLI cannot reach a daemon' || echo 'no docker command')). Install Docker \
  (https://docs.docker.com/engine/install/) or build where it runs: \
  docker build -f docker/Dockerfile --target $(1) -t $(IMAGE):$(VERSION)$(2) ." >&2; exit 1; }

.PHONY: image image-cpu chart

image:
	$(call NEED_DOCKER,cuda,)
	$(DOCKER_BUILD) --target cuda -t $(IMAGE):$(VERSION) .

image-cpu:
	$(call NEED_DOCKER,cpu,-cpu)
	$(DOCKER_BUILD) --target cpu -t $(IMAGE):$(VERSION)-cpu .

chart: setup
	$(BIN)/python -m pytest -q tests/cluster/test_chart.py
	@mkdir -p dist
	$(BIN)/python -c "import helm_python as h; print('packaged', h.package('charts/dpsynth', destination='dist'))"

# ---- shared storage and tracking (README "Shared storage and tracking") -----
# `make push` / `make pull`: DVC's cache <-> its default remote (S3/MinIO, set up
# once with `dvc remote add -d ...`). `make mlflow-server MLFLOW_ARTIFACTS=s3://bucket/mlflow`:
# a tracking server on 127.0.0.1:$(MLFLOW_PORT), artifacts proxied to S3, runs in
# MLFLOW_BACKEND (default: $MLFLOW_BACKEND_STORE_URI, else sqlite:///mlflow-server.db).
# S3 credentials: the standard AWS chain (env, ~/.aws), never arguments.
MLFLOW_PORT ?= 5000
MLFLOW_BACKEND ?=
MLFLOW_ARTIFACTS ?=
NEED_REMOTE = @$(BIN)/dvc remote default >/dev/null 2>&1 || { echo "make $@: no default DVC \
  remote. Add one (credentials stay in the environment or ~/.aws): \
  $(BIN)/dvc remote add -d storage s3://my-bucket/dpsynth-dvc, and for MinIO \
  $(BIN)/dvc remote modify storage endpointurl http://minio.example:9000" >&2; exit 1; }

.PHONY: push pull mlflow-server

push: setup
	$(NEED_REMOTE)
	$(BIN)/dvc push

# --allow-missing: the private split is never pushed (push: false in dvc.yaml)
pull: setup
	$(NEED_REMOTE)
	$(BIN)/dvc pull --allow-missing

mlflow-server: setup
	$(BIN)/dpsynth mlflow-server --port $(MLFLOW_PORT) \
	  $(if $(MLFLOW_BACKEND),--backend-store-uri $(MLFLOW_BACKEND)) \
	  $(if $(MLFLOW_ARTIFACTS),--artifacts-destination $(MLFLOW_ARTIFACTS))

# ---- Kubeflow pipeline (components/, pipelines/) ------------------------------
# `make pipeline` compiles pipelines/dpsynth_pipeline.py to pipelines/dpsynth.yaml
# (commit it: a test checks it is current). Compile-time settings, e.g. your
# registry: DPSYNTH_IMAGE=registry.example.com/dpsynth:0.1.0 make pipeline
# (pipelines/README.md); commit only the default compile.
.PHONY: pipeline

pipeline: setup
	$(BIN)/python -m pipelines.dpsynth_pipeline --output pipelines/dpsynth.yaml
