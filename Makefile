# Every target sets up what it needs: a virtual environment in .venv with the
# package installed in editable mode and its test tools.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DB ?= var/sessionbridge.db

.PHONY: install run test bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## run: a working bridge on 127.0.0.1:8080 (the reference AI server unless SESSIONBRIDGE_UPSTREAM_URL is set)
run: $(STAMP)
	mkdir -p $(dir $(DB))
	$(BIN)/sessionbridge demo --db $(DB)

## test: the whole suite
test: $(STAMP)
	$(BIN)/python -m pytest

## bench: side-by-side figures (never fails on timing)
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	@# wrk is the load generator; without it (not root, no apt) bench/run.py
	@# falls back to a Python generator and says so.
	command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; } || true
	$(BIN)/python bench/run.py $(BENCH_ARGS)

## lint: style and strict typing of the package
lint: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[lint]'
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy src

clean:
	rm -rf $(VENV) var build src/*.egg-info
