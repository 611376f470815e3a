# Every target sets up what it needs: a virtual environment in .venv with the
# package installed in editable mode and its test tools.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DB ?= var/sessionbridge.db

.PHONY: install system-deps run test bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## system-deps: the Debian packages tests need (add yours to the list)
# postgresql: the server the PostgreSQL store's tests start for themselves.
# chromium, chromium-driver: the browser the page's tests drive (tests/test_page.py).
SYSTEM_PACKAGES := postgresql chromium chromium-driver
system-deps:
	@missing=""; for package in $(SYSTEM_PACKAGES); do \
		dpkg -s $$package >/dev/null 2>&1 || missing="$$missing $$package"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	else \
		echo "system-deps: cannot install$$missing (not root, or no apt-get): their tests skip"; \
	fi

## run: a working bridge on 127.0.0.1:8080 (the reference AI server unless SESSIONBRIDGE_UPSTREAM_URL is set)
run: $(STAMP)
	mkdir -p $(dir $(DB))
	$(BIN)/sessionbridge demo --db $(DB)

## test: the whole suite
test: system-deps $(STAMP)
	@# In CI a PostgreSQL test that cannot get a server fails instead of skipping.
	SESSIONBRIDGE_REQUIRE_POSTGRES=$${SESSIONBRIDGE_REQUIRE_POSTGRES:-$${CI:+1}} $(BIN)/python -m pytest

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
