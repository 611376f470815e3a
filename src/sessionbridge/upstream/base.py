"""The interface a conversation needs from any AI server, and the HTTP habits every adapter shares.

A protocol adapter owns its create/reuse/recover strategy: a server that keeps
sessions (the seed protocol) creates one and recovers it when lost; a server
that keeps none (OpenAI chat completions) is sent the stored history and kept
warm through its prompt cache. The conversation service keeps the rules that
hold for every protocol (the lock, ordering, admission, failure bookkeeping,
empty-reply retries, idempotency) and talks to adapters only through
:class:`AIServer` and the :class:`TurnContext` it hands them.

Lower-layer errors are mapped here, once: :func:`mapped_errors` turns
``aiohttp`` and timeout errors into the bridge's upstream errors, and
:func:`read_limited` reads an answer without ever holding more than the
configured limit (an AI server may answer with an endless body).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import aiohttp

from ..errors import (
    SessionLost,
    UpstreamError,
    UpstreamFailure,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from ..records import AISessionKind, ChatSession, HistoryTurn, Usage

log = logging.getLogger(__name__)

# Answers the bridge only inspects (health, models, props, slot actions) are small.
SMALL_BODY = 64 * 1024


@dataclass(frozen=True, slots=True)
class HealthReport:
    healthy: bool
    reason: str
    timed_out: bool = False


@dataclass(frozen=True, slots=True)
class Reply:
    """What one exchange with the AI server produced."""

    text: str
    kind: AISessionKind
    usage: Usage | None = None


# Receives each piece of a reply as it arrives (streaming); None: nobody listens.
DeltaSink = Callable[[str], Awaitable[None]]


class TurnContext(Protocol):
    """What an adapter may know and do about the conversation of one turn.

    ``state`` is the adapter's own note about the conversation (the seed
    protocol keeps its AI session id there; OpenAI-compatible servers the
    start of the history window): the bridge stores it and gives it back,
    and never interprets it.
    """

    session: ChatSession
    content: str
    max_tokens: int

    @property
    def state(self) -> str | None: ...

    async def save_state(self, state: str) -> None:
        """Store the adapter's note at once (even if this turn then fails)."""
        ...

    async def history(self, from_seq: int = 0) -> list[HistoryTurn]:
        """The answered turns from ``from_seq`` on, oldest first, exactly as stored."""
        ...


class AIServer(Protocol):
    """One AI server, whatever protocol it speaks."""

    # Monotonic time of the last successful call, or None: readiness uses it.
    last_success: float | None

    async def health(self, timeout: float) -> HealthReport: ...

    async def check_fits(self, session: ChatSession, content: str, max_tokens: int) -> None:
        """Refuse (InvalidField) a message that can never be answered, before it is stored."""
        ...

    async def exchange(self, turn: TurnContext, on_delta: DeltaSink | None) -> Reply:
        """Answer ``turn.content``; pass pieces to ``on_delta`` as they arrive."""
        ...

    async def forget(self, session: ChatSession) -> None:
        """The conversation was deleted: drop what the adapter keeps for it."""
        ...


# Observes each AI-server call: endpoint, outcome, seconds taken.
CallObserver = Callable[[str, str, float], None]


def no_observer(endpoint: str, outcome: str, seconds: float) -> None:
    return None


@contextlib.contextmanager
def mapped_errors(endpoint: str) -> Iterator[None]:
    """Turn the HTTP client's errors into the bridge's upstream errors."""
    try:
        yield
    except UpstreamFailure:
        raise
    except TimeoutError as exc:
        raise UpstreamTimeout(f"{endpoint} did not answer in time") from exc
    except aiohttp.ClientConnectionError as exc:
        raise UpstreamUnavailable(f"{endpoint}: {type(exc).__name__}") from exc
    except aiohttp.ClientError as exc:
        raise UpstreamError(f"{endpoint}: {type(exc).__name__}") from exc


@contextlib.asynccontextmanager
async def observed(
    endpoint: str, observe: CallObserver, session_id: str = "-"
) -> AsyncIterator[None]:
    """Time one call, report its outcome to metrics and log one line.

    ``endpoint`` is the metrics label: the path without its leading slash.
    """
    started = time.monotonic()
    outcome = "error"
    try:
        with mapped_errors("/" + endpoint.lstrip("/")):
            yield
        outcome = "ok"
    except UpstreamFailure as exc:
        outcome = "session_lost" if isinstance(exc, SessionLost) else exc.code
        raise
    finally:
        seconds = time.monotonic() - started
        observe(endpoint, outcome, seconds)
        log.info(
            "event=upstream_call endpoint=%s session=%s outcome=%s ms=%.1f",
            endpoint, session_id, outcome, seconds * 1000,
        )


def refuse_redirect(response: aiohttp.ClientResponse, endpoint: str) -> None:
    # Redirects are never followed (allow_redirects=False on every call): a
    # 307 would re-send the user's message to wherever it points.
    if 300 <= response.status < 400:
        raise UpstreamError(f"{endpoint} answered a redirect ({response.status})")


async def read_limited(response: aiohttp.ClientResponse, limit: int, endpoint: str) -> bytes:
    """The whole body, refused as soon as it passes ``limit`` bytes."""
    declared = response.content_length
    if declared is not None and declared > limit:
        raise UpstreamError(f"{endpoint} answered {declared} bytes, over the limit of {limit}")
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
