"""Helpers for the tests of several AI servers: reference replicas that stop and come back.

A :class:`ReplicaServer` serves a reference AI server in this process on a
fixed loopback port and can stop (the port refuses connections) and start again on the same
port around the **same** state object: a seed-protocol replica that was only
unreachable comes back still holding its AI sessions, as a real one that was
busy or cut off by the network would. A :class:`ReferenceProcess` runs one as
a process of its own, which a test kills (SIGKILL) and starts again on its
port with an empty memory, as a crashed server restarts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import aiohttp
from aiohttp import web

import sessionbridge
from sessionbridge.reference.seed_server import DevServerState, DevSession
from tests.processes import (
    SIGKILL,
    UPSTREAM_PASSWORD,
    UPSTREAM_USER,
    Process,
    Processes,
    clean_env,
    free_port,
    wait_http_ok,
)

# The child processes run the code under test, wherever pytest was started from.
SOURCE = str(Path(sessionbridge.__file__).resolve().parents[1])


def env(**extra: str) -> dict[str, str]:
    return {"PYTHONPATH": SOURCE, **extra}


class ReplicaServer:
    def __init__(self, make_app: Callable[[], web.Application], path: str = "") -> None:
        self._make_app = make_app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}{path}"
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        assert self._runner is None
        runner = web.AppRunner(self._make_app(), shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self._runner = runner

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    @property
    def running(self) -> bool:
        return self._runner is not None


def sessions_of(state: DevServerState, marker: str) -> list[DevSession]:
    """The AI sessions a seed-protocol replica holds for the conversation whose scenario has
    ``marker`` (recovered ones included: their scenario starts with the original)."""
    return [s for s in state.sessions.values() if s.scenario.startswith(marker)]


class ReferenceProcess:
    """A reference AI server (``sessionbridge.reference.<module>``) as a process, on a kept port."""

    def __init__(self, procs: Processes, module: str, *args: str, path: str = "") -> None:
        self._procs = procs
        self._module = module
        self._args = args
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = self.base + path  # what the bridge is given, and placement hashes
        self.process: Process | None = None

    async def start(self) -> None:
        self.process = self._procs.start(
            self._module,
            ["-m", f"sessionbridge.reference.{self._module}", "--port", str(self.port),
             *self._args],
            clean_env(**env()),
        )
        await wait_http_ok(self.base + "/health", self.process)

    async def kill(self) -> None:
        assert self.process is not None
        self.process.signal(SIGKILL)
        assert await self.process.wait_exit(10) == -SIGKILL


class SeedProcess(ReferenceProcess):
    """The reference seed-protocol server as a process."""

    def __init__(self, procs: Processes, *args: str) -> None:
        super().__init__(
            procs, "seed_server", "--user", UPSTREAM_USER, "--password", UPSTREAM_PASSWORD, *args
        )

    async def sessions(self, http: aiohttp.ClientSession) -> int:
        async with http.get(self.base + "/health") as response:
            return int((await response.json())["sessions"])


class OpenAIProcess(ReferenceProcess):
    """The reference OpenAI-compatible server (llama.cpp persona) as a process."""

    def __init__(self, procs: Processes, *args: str) -> None:
        super().__init__(procs, "openai_server", *args, path="/v1")

    async def streaming(self, http: aiohttp.ClientSession) -> bool:
        """Whether a slot is generating a reply right now (llama.cpp's /slots)."""
        async with http.get(self.base + "/slots") as response:
            return any(slot["is_processing"] for slot in await response.json())
