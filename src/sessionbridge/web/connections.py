"""The connection guard: a cap on open connections and a deadline for a request's head.

aiohttp's server keeps a connection that sends nothing, or a header at a byte
a second, for its whole keep-alive timeout (3630 s by default), and accepts
until the process runs out of file descriptors; asyncio then logs a traceback
for every ``accept()`` that fails. So the listening socket is served through
:class:`ConnectionGuard`, a protocol factory around aiohttp's ``web.Server``:

- at most ``cap`` connections are open; one past it is answered a canned
  ``503 overloaded`` and closed at once, so its descriptor is free again
  before the next accept;
- a new connection must deliver its first request's head (up to the blank
  line) within ``header_timeout`` seconds, or it is closed; later requests on
  a kept-alive connection are bounded by aiohttp's keep-alive timeout, which
  also closes a connection idle that long;
- the cap never exceeds what the process's descriptor limit leaves after the
  database, the AI-server pool and the interpreter take theirs.

The log gets one line when the cap is reached and then at most one a minute
while connections are refused or slow ones closed, never one per connection.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any, cast

from aiohttp import web

from ..jsoncodec import dumps

log = logging.getLogger(__name__)

# Descriptors kept back from the cap: stdio, the event loop, the listening
# socket, SQLite's files and whatever a library opens. The AI-server pool
# comes on top (see descriptor_reserve).
BASE_RESERVE = 64
SUMMARY_INTERVAL = 60.0
_HEAD_END = b"\r\n\r\n"


def _refusal() -> bytes:
    body = dumps({
        "type": "https://sessionbridge.dev/problems/overloaded",
        "title": "The bridge is at its connection limit",
        "status": 503,
        "detail": "too many open connections; try again shortly",
        "code": "overloaded",
    })
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/problem+json\r\n"
        "Retry-After: 1\r\n"
        "Connection: close\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


REFUSAL = _refusal()


def descriptor_reserve(upstream_pool: int) -> int:
    return BASE_RESERVE + upstream_pool


def effective_cap(configured: int, reserve: int) -> int:
    """``configured``, lowered to what RLIMIT_NOFILE leaves after ``reserve``."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    room = max(soft - reserve, 1)
    if room < configured:
        log.warning(
            "event=connection_cap_lowered cap=%d configured=%d nofile=%d reserve=%d",
            room, configured, soft, reserve,
        )
        return room
    return configured


class _Tally:
    """Counts of an ongoing condition, logged at most once per SUMMARY_INTERVAL."""

    def __init__(self, event: str) -> None:
        self._event = event
        self._count = 0
        self._logged_at = -SUMMARY_INTERVAL

    def add(self, **fields: Any) -> None:
        self._count += 1
        now = time.monotonic()
        if now - self._logged_at >= SUMMARY_INTERVAL:
            extra = "".join(f" {name}={value}" for name, value in fields.items())
            log.warning("event=%s count=%d%s", self._event, self._count, extra)
            self._count = 0
            self._logged_at = now


class ConnectionGuard:
    """A protocol factory for ``loop.create_server`` around aiohttp's ``web.Server``."""

    def __init__(self, server: web.Server, *, cap: int, header_timeout: float) -> None:
        self._server = server
        self.cap = cap
        self.header_timeout = header_timeout
        self.open = 0
        self._refused = _Tally("connections_refused")
        self._slow = _Tally("slow_clients_closed")

    def __call__(self) -> _GuardedConnection:
        return _GuardedConnection(self)

    def admit(self) -> bool:
        if self.open >= self.cap:
            self._refused.add(open=self.open, cap=self.cap)
            return False
        self.open += 1
        return True

    def release(self) -> None:
        self.open -= 1

    def slow_client_closed(self) -> None:
        self._slow.add(header_timeout=self.header_timeout)

    def new_handler(self) -> asyncio.Protocol:
        return self._server()


class _GuardedConnection(asyncio.Protocol):
    """One connection: admitted or refused, then aiohttp's handler behind a head deadline."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self._guard = guard
        self._handler: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._tail = b""  # the last bytes seen while waiting for the head's end

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream socket's transport; uvloop's implement asyncio.Transport
        # without subclassing it, so this is a cast, not a check.
        self._transport = transport = cast(asyncio.Transport, transport)
        if not self._guard.admit():
            transport.write(REFUSAL)
            transport.close()  # the write buffer is empty: the socket closes at once
            return
        self._deadline = asyncio.get_running_loop().call_later(
            self._guard.header_timeout, self._too_slow
        )
        self._handler = self._guard.new_handler()
        self._handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._handler is None:
            return  # refused: whatever it sends is dropped with it
        if self._deadline is not None:
            seen = self._tail + data
            if _HEAD_END in seen:
                self._deadline.cancel()
                self._deadline = None
                self._tail = b""
            else:
                self._tail = seen[-(len(_HEAD_END) - 1):]
        self._handler.data_received(data)

    def eof_received(self) -> bool | None:
        if self._handler is None:
            return None
        return self._handler.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._handler is None:
            return
        self._guard.release()
        handler, self._handler = self._handler, None
        handler.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._handler is not None:
            self._handler.pause_writing()

    def resume_writing(self) -> None:
        if self._handler is not None:
            self._handler.resume_writing()

    def _too_slow(self) -> None:
        self._deadline = None
        self._guard.slow_client_closed()
        if self._transport is not None:
            self._transport.abort()  # nothing is owed to a client that sent no request


_ACCEPT_FAILED = "socket.accept() out of system resource"


def condense_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """One line, at most once a minute, instead of a traceback for each failed accept.

    The cap keeps the process below its descriptor limit, so this is a last
    line of defence (another part of the process may hold many descriptors).
    """
    tally = _Tally("accept_failed")
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") == _ACCEPT_FAILED:
            exc = context.get("exception")
            tally.add(error=type(exc).__name__ if exc is not None else "unknown")
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
