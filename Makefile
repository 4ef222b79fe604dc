# midimatch — the two commands in the README set everything up from a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install test lint bench clean

# Re-install when the project's dependencies change.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

# pytest exits 5 when no test ran, which fails this target as it should.
test: $(STAMP) lint
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/hashdtw.py
	$(BIN)/python bench/features.py
	$(BIN)/python bench/index_build.py
	$(BIN)/python bench/model_bc.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info test-artifacts

# The live service is issue #6; until it lands this target says so instead of failing obscurely.
.PHONY: serve
serve: $(STAMP)
	@echo "make serve: the gateway and worker are not built yet (issues #5 and #6)." >&2
	@echo "Today you can build and inspect an index: see README.md, 'Using it today'." >&2
	@exit 1
