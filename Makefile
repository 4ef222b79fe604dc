# midimatch — the two commands in the README set everything up from a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install test lint bench clean train images locks

# Re-install when the project's dependencies change.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

# checkov (the policy check of k8s/, tests/k8s/test_policy.py) has many pinned dependencies of
# its own, so it lives in a venv of its own inside .venv.
CHECKOV_VERSION := 3.3.30
CHECKOV := $(VENV)/checkov/bin/checkov
$(CHECKOV):
	test -x $(VENV)/checkov/bin/python || $(PYTHON) -m venv $(VENV)/checkov
	$(VENV)/checkov/bin/python -m pip install -q checkov==$(CHECKOV_VERSION)

# pytest exits 5 when no test ran, which fails this target as it should.
test: $(STAMP) lint $(CHECKOV)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/hashdtw.py
	$(BIN)/python bench/features.py
	$(BIN)/python bench/index_build.py
	$(BIN)/python bench/model_bc.py

# Retrain the model from scratch in one command (`midimatch train run`: data, pairs and training
# within 60 minutes on 2 CPU cores, CUDA when present; docs/model.md). It writes
# model/weights/default.pt; the shipped one is such a model (model/weights/base.pt) with its
# embedding fine-tuned three times (`midimatch train fit --init ...`; the commands are in docs/model.md).
# The renderers it trains with come from Debian's packages; missing ones are installed first.
TRAIN_PACKAGES := fluidsynth fluid-soundfont-gm musescore-general-soundfont-small \
                  timgm6mb-soundfont timidity freepats
train: $(STAMP)
	@missing=""; for p in $(TRAIN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y -q $$missing; else sudo apt-get install -y -q $$missing; fi; \
	fi
	$(BIN)/midimatch train run

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info test-artifacts

# The live service on http://$(SERVE_HOST):$(SERVE_PORT)/: the first run converts part of the
# music21 corpus and indexes it (cached under ~/.cache/midimatch, or $MIDIMATCH_CACHE), later
# runs start at once. `midimatch serve --help` lists the settings.
SERVE_HOST ?= 127.0.0.1
SERVE_PORT ?= 8080
DEMO_INDEX ?= $${MIDIMATCH_CACHE:-$$HOME/.cache/midimatch}/demo-index
.PHONY: serve
serve: $(STAMP)
	test -f "$(DEMO_INDEX)/CURRENT" || $(BIN)/midimatch demo prepare --index "$(DEMO_INDEX)"
	$(BIN)/midimatch serve --index "$(DEMO_INDEX)" --host $(SERVE_HOST) --port $(SERVE_PORT)

# Container images for k8s/ (docs/deploy.md): the gateway (no torch), the worker with CUDA and
# its CPU variant. DOCKER=podman or DOCKER=buildah also work (BUILDAH_FORMAT=docker: their default
# OCI format drops HEALTHCHECK; docker ignores the variable); BASE= a local base image if no
# registry is reachable. `make locks` rewrites k8s/images/*.lock from the .venv.
DOCKER ?= docker
IMAGE_REPO ?= midimatch
IMAGE_TAG ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
BASE ?= python:3.11-slim-bookworm
images:
	BUILDAH_FORMAT=docker $(DOCKER) build -f k8s/images/gateway.Dockerfile --build-arg BASE=$(BASE) -t $(IMAGE_REPO)/gateway:$(IMAGE_TAG) .
	BUILDAH_FORMAT=docker $(DOCKER) build -f k8s/images/worker.Dockerfile --build-arg BASE=$(BASE) -t $(IMAGE_REPO)/worker:$(IMAGE_TAG) .
	BUILDAH_FORMAT=docker $(DOCKER) build -f k8s/images/worker.Dockerfile --build-arg BASE=$(BASE) --build-arg TORCH=cpu -t $(IMAGE_REPO)/worker:$(IMAGE_TAG)-cpu .

locks: $(STAMP)
	$(BIN)/python k8s/images/lock.py
