"""Helpers for the tests of several AI servers: reference replicas that stop and come back.

A :class:`ReplicaServer` serves a reference AI server on a fixed loopback
port and can stop (the port refuses connections) and start again on the same
port around the **same** state object: a seed-protocol replica that was only
unreachable comes back still holding its AI sessions, as a real one that was
busy or cut off by the network would.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from sessionbridge.reference.seed_server import DevServerState, DevSession
from tests.processes import free_port


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
