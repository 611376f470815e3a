"""Real processes for tests/test_process.py: the bridge, the reference AI server, the CLI.

Every process is started through one :class:`Processes` registry whose
``close()`` (called by a fixture's teardown) kills and reaps whatever is still
running, so no test leaves a process behind, even when it fails half-way.
Output goes to files in the test's tmp directory; a failed wait shows them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from .doubles import wait_until

READY_DEADLINE = 10.0
UPSTREAM_USER = "dev"
UPSTREAM_PASSWORD = "dev"

# Variables that would change what the child does if the test run inherited them.
_INHERITED_NOISE = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")


def free_port() -> int:
    """A port nothing listens on right now (bind to port 0 and let the kernel pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """The test run's environment without any SESSIONBRIDGE_* or service-manager variables."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("SESSIONBRIDGE_") and name not in _INHERITED_NOISE
    }
    env.update(extra)
    return env


def bridge_env(**extra: str) -> dict[str, str]:
    return clean_env(
        SESSIONBRIDGE_UPSTREAM_USER=UPSTREAM_USER,
        SESSIONBRIDGE_UPSTREAM_PASSWORD=UPSTREAM_PASSWORD,
        SESSIONBRIDGE_UPSTREAM_TIMEOUT="20",
        **extra,
    )


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def describe(self) -> str:
        return (
            f"{self.name} (pid {self.pid}, returncode {self.popen.poll()})\n"
            f"--- stdout ---\n{self.stdout()}\n--- stderr ---\n{self.stderr()}"
        )

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, signum)

    async def wait_exit(self, timeout: float) -> int:
        """The exit status, polled without blocking the event loop (an in-process
        AI server may have to answer the child meanwhile)."""
        await wait_until(
            lambda: self.popen.poll() is not None, timeout,
            lambda: f"still running: {self.describe()}",
        )
        return self.popen.returncode


class Processes:
    """Starts child processes and guarantees they are killed and reaped at teardown."""

    def __init__(self, workdir: Path) -> None:
        self._workdir = workdir
        self._started: list[Process] = []

    def start(
        self,
        name: str,
        args: Sequence[str],
        env: dict[str, str],
        *,
        program: str = sys.executable,
        preexec: Callable[[], None] | None = None,
    ) -> Process:
        """Start ``program ARGS`` (this Python unless told); ``preexec`` runs in the child."""
        index = len(self._started)
        stdout_path = self._workdir / f"{index:02d}-{name}.stdout"
        stderr_path = self._workdir / f"{index:02d}-{name}.stderr"
        with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
            popen = subprocess.Popen(
                [program, *args], stdout=out, stderr=err, env=env, cwd=self._workdir,
                preexec_fn=preexec,
            )
        process = Process(name, popen, stdout_path, stderr_path)
        self._started.append(process)
        return process

    def close(self) -> None:
        for process in self._started:
            if process.popen.poll() is None:
                process.popen.kill()
        for process in self._started:
            with contextlib.suppress(subprocess.TimeoutExpired):  # a stuck kernel
                process.popen.wait(timeout=10)


async def wait_http_ok(
    url: str, process: Process | None = None, deadline: float = READY_DEADLINE
) -> None:
    """Poll ``url`` until it answers 200, for at most ``deadline`` seconds."""
    timeout = aiohttp.ClientTimeout(total=1)
    async with aiohttp.ClientSession(timeout=timeout) as http:

        async def answers_ok() -> bool:
            if process is not None and process.popen.poll() is not None:
                raise AssertionError(f"exited before {url} answered: {process.describe()}")
            try:
                async with http.get(url) as response:
                    return response.status == 200
            except (TimeoutError, aiohttp.ClientError):
                return False

        await wait_until(
            answers_ok, deadline,
            lambda: f"{url} did not answer 200 {process.describe() if process else ''}",
            every=0.05,  # a child process starting: no need to knock more often
        )


@dataclass
class Bridge:
    process: Process
    port: int
    db: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def start_bridge(
    procs: Processes,
    db: Path,
    upstream: str,
    *,
    env: dict[str, str] | None = None,
    wait: bool = True,
) -> Bridge:
    port = free_port()
    args = ["-m", "sessionbridge", "serve", "--port", str(port), "--db", str(db),
            "--upstream", upstream]
    process = procs.start("bridge", args, bridge_env(**(env or {})))
    bridge = Bridge(process, port, db)
    if wait:
        await wait_http_ok(bridge.url + "/healthz", process)
    return bridge


async def start_devserver(procs: Processes, *, delay: float = 0.0) -> str:
    """The reference AI server as a subprocess; returns its base URL once /health answers."""
    port = free_port()
    args = ["-m", "sessionbridge.reference.seed_server",
            "--host", "127.0.0.1", "--port", str(port),
            "--user", UPSTREAM_USER, "--password", UPSTREAM_PASSWORD, "--delay", str(delay)]
    process = procs.start("devserver", args, clean_env())
    base = f"http://127.0.0.1:{port}"
    await wait_http_ok(base + "/health", process)
    return base


async def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m sessionbridge ARGS`` to completion, off the event loop."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "sessionbridge", *args],
        capture_output=True,
        text=True,
        env=env if env is not None else clean_env(),
        cwd=cwd,
        timeout=30,
    )


async def create_token(db: Path, name: str = "tests") -> str:
    done = await run_cli("keys", "create", name, "--db", str(db))
    assert done.returncode == 0, done.stderr
    return done.stdout.rstrip("\n").splitlines()[-1]


def query(db: Path, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Read the bridge's database directly, as an operator would after a crash."""
    with closing(sqlite3.connect(db)) as conn:
        return list(conn.execute(sql, params).fetchall())


def port_refuses(port: int) -> bool:
    """Whether a TCP connect to the port is refused (nothing listens)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:  # a timeout: something still holds the port
        return False


SIGTERM = signal.SIGTERM
SIGKILL = signal.SIGKILL
