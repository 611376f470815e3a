"""What the real-model parts (real, responses, replicas) share when run by themselves."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from llama_server import LlamaServerFailed
from procs import clean_env, create_key, free_port

# A real model's turn may take minutes on a loaded machine.
TURN_TIMEOUT = 600.0
BRIDGE_READY_DEADLINE = 60.0


def run_part_alone(
    name: str,
    measure: Callable[[Path], Awaitable[dict[str, Any]]],
    print_report: Callable[[dict[str, Any]], None],
) -> tuple[int, dict[str, Any] | None]:
    """Run one part by itself (``python bench/<part>.py``): its exit status and figures.

    The work folder goes afterwards unless KEEP_WORKDIR is set.
    """
    workdir = Path(tempfile.mkdtemp(prefix=f"sessionbridge-{name.replace(' ', '-')}-"))
    try:
        result = asyncio.run(measure(workdir))
    except (LlamaServerFailed, RuntimeError, OSError, aiohttp.ClientError) as exc:
        print(f"{name}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1, None
    finally:
        if os.environ.get("KEEP_WORKDIR"):
            print(f"work folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print_report(result)
    return 0, result


class ModelBridge:
    """A bridge process in front of a real model's server (OpenAI-compatible), with a key.

    ``env`` adds settings (SESSIONBRIDGE_… names) to the ones every part uses;
    it is ready once ``ready_path`` answers 200.
    """

    def __init__(
        self, workdir: Path, upstream: str, name: str, *, ready_path: str = "/healthz",
        **env: str,
    ) -> None:
        self.port = free_port()
        self.db = workdir / f"{name}.db"
        self.log_path = workdir / f"{name}.log"
        settings = clean_env(
            SESSIONBRIDGE_UPSTREAM_FLAVOR="openai",
            SESSIONBRIDGE_UPSTREAM_URL=upstream,
            SESSIONBRIDGE_UPSTREAM_MAX_TOKENS="1-500",
            SESSIONBRIDGE_UPSTREAM_TIMEOUT=str(TURN_TIMEOUT),
            SESSIONBRIDGE_LOG_LEVEL="WARNING",
            **env,
        )
        self.token = create_key(self.db)
        with self.log_path.open("wb") as log:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "sessionbridge", "serve", "--host", "127.0.0.1",
                 "--port", str(self.port), "--db", str(self.db)],
                env=settings, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        try:
            self._wait_ready(ready_path)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _wait_ready(self, path: str) -> None:
        deadline = time.monotonic() + BRIDGE_READY_DEADLINE
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"the bridge exited: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + path, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"the bridge's {path} did not answer 200")

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as response:
            return str(response.read().decode())

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
