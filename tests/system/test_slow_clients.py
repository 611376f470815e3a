"""Slow clients against the real process: a slowloris run at a low descriptor limit.

Hundreds of connections that send nothing, or a request head at a byte a
second, must not keep a real client from being served within seconds, and the
log must stay a few lines long (it used to take a traceback per failed accept).
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.doubles import wait_until
from tests.processes import (
    Processes,
    bridge_env,
    create_token,
    free_port,
    start_devserver,
    wait_http_ok,
)

FD_LIMIT = 256
STALLED = 300
HEADER_TIMEOUT = 2.0
SERVED_WITHIN = 8.0


def low_fd_limit() -> None:
    # Runs in the child between fork and exec: the bridge starts with few descriptors.
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


async def stall(port: int, drip: bool, opened: list[bool], closed: list[bool]) -> None:
    """Hold one connection: silent, or a request head at one byte a second.

    ``opened`` gets an entry once the connection is open or refused, ``closed``
    once it is refused or closed by the bridge.
    """
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        opened.append(False)
        closed.append(True)
        return
    opened.append(True)
    head = b"GET /healthz HTTP/1.1\r\nHost: slow\r\nX-Padding: " + b"a" * 200
    try:
        for byte in head if drip else []:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(1.0)  # kept: a byte a second is the slow client tested
            if reader.at_eof():
                break
        with contextlib.suppress(ConnectionError):
            await reader.read()  # until the bridge closes it
        closed.append(True)
    except (ConnectionError, OSError):
        closed.append(True)
    finally:
        writer.close()


async def serve_one_conversation(base: str, token: str) -> None:
    auth = {"Authorization": f"Bearer {token}"}
    timeout = aiohttp.ClientTimeout(total=2)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with http.post(base + "/v1/sessions", json={"scenario": "s"}, headers=auth) as r:
            assert r.status == 201, await r.text()
            session_id = (await r.json())["id"]
        async with http.post(f"{base}/v1/sessions/{session_id}/messages",
                             json={"content": "hello"}, headers=auth) as r:
            assert r.status == 200, await r.text()


@pytest.fixture
async def stalled_tasks() -> AsyncIterator[list[asyncio.Task[None]]]:
    tasks: list[asyncio.Task[None]] = []
    yield tasks
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_real_client_is_served_through_a_slowloris_run(
    procs: Processes, tmp_path: Path, stalled_tasks: list[asyncio.Task[None]]
) -> None:
    upstream = await start_devserver(procs)
    db = tmp_path / "bridge.db"
    token = await create_token(db)
    port = free_port()
    bridge = procs.start(
        "bridge",
        ["-m", "sessionbridge", "serve", "--port", str(port), "--db", str(db),
         "--upstream", upstream],
        bridge_env(SESSIONBRIDGE_HEADER_TIMEOUT=str(HEADER_TIMEOUT)),
        preexec=low_fd_limit,
    )
    base = f"http://127.0.0.1:{port}"
    await wait_http_ok(base + "/healthz", bridge)

    opened: list[bool] = []
    closed: list[bool] = []
    for n in range(STALLED):
        stalled_tasks.append(
            asyncio.create_task(stall(port, drip=n % 2 == 1, opened=opened, closed=closed))
        )
    await wait_until(lambda: len(opened) == STALLED)  # each stalled connection is open or refused

    failures: list[BaseException] = []

    async def served() -> bool:
        try:
            await serve_one_conversation(base, token)
        except (AssertionError, aiohttp.ClientError, TimeoutError) as exc:
            failures.append(exc)
            return False
        return True

    # A refused client retries, as Retry-After says; it is served within seconds.
    await wait_until(served, SERVED_WITHIN, lambda: f"not served: {failures[-1]!r}", every=0.2)

    # Every stalled connection is refused or closed by the header timeout; none
    # holds a descriptor.
    await wait_until(
        lambda: len(closed) == STALLED, HEADER_TIMEOUT + 3.0,
        lambda: f"{STALLED - len(closed)} stalled connections still open",
    )
    assert bridge.popen.poll() is None
    log = bridge.stderr()
    assert "Traceback" not in log
    assert "out of system resource" not in log
    assert len(log.splitlines()) < 20, log
