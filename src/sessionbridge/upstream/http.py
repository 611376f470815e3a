"""What every adapter does on the wire: one mapping of lower-layer errors, bounded reads.

Lower-layer errors are mapped here, once: :class:`observed` turns
``aiohttp`` and timeout errors into the bridge's upstream errors (``raise ...
from``), and :func:`read_limited` reads an answer without ever holding more
than the configured limit (an AI server may answer with an endless body).

Two of those errors say the AI server itself failed rather than the request:
:class:`ServerFailed` (a 5xx, an answer broken off) and :class:`ServerBusy`
(429 or 503 with its ``Retry-After``). A client sees them as any
``upstream_error`` and ``upstream_unavailable``; a pool of replicas
(``replicas.py``) takes the replica out and asks another.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import aiohttp

from ..errors import (
    SessionLost,
    UpstreamError,
    UpstreamFailure,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from .base import CallObserver

log = logging.getLogger(__name__)

# Answers the bridge only inspects (health, models, props, slot actions) are small.
SMALL_BODY = 64 * 1024
RETRY_AFTER_DEFAULT = 5


class ServerFailed(UpstreamError):
    """The AI server answered 5xx or broke its answer off (502 ``upstream_error``).

    ``busy_for``: the ``Retry-After`` of a 429 or 503 (not sent to the client,
    whose answer stays what it is with one AI server).
    """

    def __init__(self, detail: str, *, busy_for: int | None = None) -> None:
        super().__init__(detail)
        self.busy_for = busy_for


class ServerBusy(UpstreamUnavailable):
    """The AI server answered 429 or 503: busy or loading (503, with its ``Retry-After``)."""


def retry_after(response: aiohttp.ClientResponse) -> int:
    """The answer's ``Retry-After`` in seconds (1-3600), else the default."""
    raw = response.headers.get("Retry-After", "")
    return int(raw) if raw.isdigit() and 0 < int(raw) <= 3600 else RETRY_AFTER_DEFAULT


def status_error(response: aiohttp.ClientResponse, endpoint: str) -> UpstreamError:
    """The error for a refusal that is not the AI server's own failure (4xx), else ServerFailed."""
    message = f"{endpoint} answered {response.status}"
    if response.status in (429, 503):
        return ServerFailed(message, busy_for=retry_after(response))
    if response.status >= 500:
        return ServerFailed(message)
    return UpstreamError(message)


class observed:
    """Time one call, report its outcome to metrics and log one line; map its errors.

    ``endpoint`` is the metrics label: the path without its leading slash. A
    plain class rather than a generator-based context manager: it wraps every
    AI-server call, and the generator's machinery cost a turn more than all
    the rest of this.
    """

    __slots__ = ("_endpoint", "_observe", "_session_id", "_started")

    def __init__(self, endpoint: str, observe: CallObserver, session_id: str = "-") -> None:
        self._endpoint = endpoint
        self._observe = observe
        self._session_id = session_id
        self._started = 0.0

    async def __aenter__(self) -> None:
        self._started = time.monotonic()

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        outcome = "ok"
        mapped: UpstreamFailure | None = None
        if exc is not None:
            mapped = exc if isinstance(exc, UpstreamFailure) else _mapped(exc, self._endpoint)
            if mapped is None:
                outcome = "error"
            else:
                outcome = "session_lost" if isinstance(mapped, SessionLost) else mapped.code
        seconds = time.monotonic() - self._started
        self._observe(self._endpoint, outcome, seconds)
        log.info(
            "event=upstream_call endpoint=%s session=%s outcome=%s ms=%.1f",
            self._endpoint, self._session_id, outcome, seconds * 1000,
        )
        if mapped is not None and mapped is not exc:
            raise mapped from exc


def _mapped(exc: BaseException, endpoint: str) -> UpstreamFailure | None:
    """The bridge's error for a lower layer's, or None for one that is not the AI server's."""
    where = "/" + endpoint.lstrip("/")
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(f"{where} did not answer in time")
    if isinstance(exc, aiohttp.ClientConnectionError):
        return UpstreamUnavailable(f"{where}: {type(exc).__name__}")
    if isinstance(exc, aiohttp.ClientPayloadError):
        # The answer broke off half-way: the server died or dropped it.
        return ServerFailed(f"{where}: {type(exc).__name__}")
    if isinstance(exc, aiohttp.ClientError):
        return UpstreamError(f"{where}: {type(exc).__name__}")
    return None


def refuse_redirect(response: aiohttp.ClientResponse, endpoint: str) -> None:
    # Redirects are never followed (allow_redirects=False on every call): a
    # 307 would re-send the user's message to wherever it points.
    if 300 <= response.status < 400:
        raise UpstreamError(f"{endpoint} answered a redirect ({response.status})")


async def read_limited(response: aiohttp.ClientResponse, limit: int, endpoint: str) -> bytes:
    """The whole body, refused as soon as it passes ``limit`` bytes."""
    declared = response.content_length
    if declared is not None:
        if declared > limit:
            raise UpstreamError(f"{endpoint} answered {declared} bytes, over the limit of {limit}")
        # A declared length within the limit is what the parser reads, no more.
        return await response.read()
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(16 * 1024):
        size += len(chunk)
        if size > limit:
            raise UpstreamError(f"{endpoint} answered more than the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_lines(
    response: aiohttp.ClientResponse, line_limit: int, total_limit: int, endpoint: str
) -> AsyncIterator[bytes]:
    """The lines of a streamed body (without their line ends), each and all bounded."""
    buffer = b""
    total = 0
    async for chunk in response.content.iter_any():
        total += len(chunk)
        if total > total_limit:
            raise UpstreamError(f"{endpoint} streamed more than the limit of {total_limit} bytes")
        buffer += chunk
        while True:
            end = buffer.find(b"\n")
            if end < 0:
                break
            line, buffer = buffer[:end], buffer[end + 1 :]
            yield line.rstrip(b"\r")
        if len(buffer) > line_limit:
            raise UpstreamError(f"{endpoint} streamed a line longer than {line_limit} bytes")
    if buffer:
        yield buffer.rstrip(b"\r")
