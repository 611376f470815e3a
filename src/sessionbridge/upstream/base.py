"""The interface a conversation needs from any AI server, whatever protocol it speaks.

A protocol adapter owns its create/reuse/recover strategy: a server that keeps
sessions (the seed protocol) creates one and recovers it when lost; a server
that keeps none (OpenAI chat completions) is sent the stored history and kept
warm through its prompt cache. The conversation service keeps the rules that
hold for every protocol (the lock, ordering, admission, failure bookkeeping,
empty-reply retries, idempotency) and talks to adapters only through
:class:`AIServer` and the :class:`TurnContext` it hands them.

This module imports no HTTP library: the conversation rules import it, and
must load without one (``http.py`` holds what the adapters share on the wire).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from ..records import AISessionKind, ChatSession, HistoryTurn, Usage


@dataclass(frozen=True, slots=True)
class ReplicaHealth:
    """One replica of a pool of AI servers, as /readyz lists it."""

    url: str
    state: str  # "healthy", "busy", "out" or "unknown" (not probed yet)
    detail: str
    running: int  # this bridge's turns on it now


@dataclass(frozen=True, slots=True)
class HealthReport:
    healthy: bool
    reason: str
    timed_out: bool = False
    # Several AI servers (upstream/replicas.py): each one's state; empty for one server.
    replicas: tuple[ReplicaHealth, ...] = ()


@dataclass(frozen=True, slots=True)
class Reply:
    """What one exchange with the AI server produced."""

    text: str
    kind: AISessionKind
    usage: Usage | None = None
    # The reply was cut by its token limit (max_tokens), not ended by the model.
    truncated: bool = False


# Receives each piece of a reply as it arrives (streaming); None: nobody listens.
DeltaSink = Callable[[str], Awaitable[None]]


class TurnContext(Protocol):
    """What an adapter may know and do about the conversation of one turn.

    ``state`` is the adapter's own note about the conversation (the seed
    protocol keeps its AI session id there; OpenAI-compatible servers the
    start of the history window): the bridge stores it and gives it back,
    and never interprets it.

    ``affinity_key`` says which turns belong together on one AI server: with
    several replicas, turns of one key go to the same one while it is
    healthy (its AI session or prompt cache is there). The conversation's
    session id, unless a face says otherwise.
    """

    session: ChatSession
    content: str
    max_tokens: int
    # Sampling settings a client asked for (temperature, top_p), for servers that take them.
    sampling: Mapping[str, float]
    # Whether the oldest turns may be dropped to fit the context (else: ContextLengthExceeded).
    trim: bool
    affinity_key: str

    @property
    def state(self) -> str | None: ...

    async def save_state(self, state: str) -> None:
        """Store the adapter's note at once (even if this turn then fails)."""
        ...

    async def history(self, from_seq: int = 0) -> list[HistoryTurn]:
        """The answered turns from ``from_seq`` on, oldest first, exactly as stored."""
        ...

    def withdraw_reply(self) -> bool:
        """Take back the pieces of the reply passed on so far, if no client has seen one.

        True when nothing of the reply is out (none was passed on, or what
        was is taken back): the turn may be answered afresh, by another AI
        server. False when a client may have seen part of it.
        """
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
