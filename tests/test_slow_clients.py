"""Slow clients against the real process: a slowloris run at a low descriptor limit.

Hundreds of connections that send nothing, or a request head at a byte a
second, must not keep a real client from being served within seconds, and the
log must stay a few lines long (it used to take a traceback per failed accept).
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from .processes import (
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


async def stall(port: int, drip: bool, closed: list[float]) -> None:
    """Hold one connection: silent, or a request head at one byte a second."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return
    head = b"GET /healthz HTTP/1.1\r\nHost: slow\r\nX-Padding: " + b"a" * 200
    try:
        for byte in head if drip else []:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(1.0)
            if reader.at_eof():
                break
        with contextlib.suppress(ConnectionError):
            await reader.read()  # until the bridge closes it
        closed.append(time.monotonic())
    except (ConnectionError, OSError):
        closed.append(time.monotonic())
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

    closed: list[float] = []
    stalled_at = time.monotonic()
    for n in range(STALLED):
        stalled_tasks.append(asyncio.create_task(stall(port, drip=n % 2 == 1, closed=closed)))
    await asyncio.sleep(0.5)  # every stalled connection is open or refused by now

    started = time.monotonic()
    while True:
        try:
            await serve_one_conversation(base, token)
            break
        except (AssertionError, aiohttp.ClientError, TimeoutError) as exc:
            assert time.monotonic() - started < SERVED_WITHIN, f"not served: {exc!r}"
            await asyncio.sleep(0.2)  # a refused client retries, as Retry-After says
    served_after = time.monotonic() - started

    await asyncio.sleep(HEADER_TIMEOUT + 1.0)
    # Every stalled connection was refused or closed; none holds a descriptor.
    assert len(closed) == STALLED
    assert max(closed) - stalled_at < HEADER_TIMEOUT + 3.0
    assert bridge.popen.poll() is None
    log = bridge.stderr()
    assert "Traceback" not in log
    assert "out of system resource" not in log
    assert len(log.splitlines()) < 20, log
    print(f"served after {served_after:.2f} s; log lines: {len(log.splitlines())}")
