"""Whether each replica of a pool takes turns: out on a failure, back when its probe passes.

A replica is **out** from the moment a turn finds it failing (it refuses the
connection, answers 5xx, or 429/503, or does not answer in time) or its
health probe says so, and **back** at the first probe that passes after
that, and not before the ``Retry-After`` of a 429/503. A probe that does not
answer in time is **busy**, still taking turns, while the replica is running
one of this bridge's turns or answered one within the readiness grace (a
seed-protocol server does not answer /health while it generates), the rule
readiness applies to one AI server.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import UpstreamFailure, UpstreamTimeout, UpstreamUnavailable
from .base import AIServer, DeltaSink, HealthReport, ReplicaHealth, Reply, TurnContext
from .http import ServerBusy, ServerFailed

log = logging.getLogger(__name__)


class CannotContinue(Exception):
    """This server cannot go on with a reply another one began."""


class ReplicaAdapter(AIServer, Protocol):
    """An adapter one replica is spoken to with: the AIServer interface, and recovery on demand."""

    async def recover(self, turn: TurnContext, on_delta: DeltaSink | None) -> Reply:
        """Answer on this server though it holds no up-to-date copy of the conversation."""
        ...

    async def continue_reply(self, turn: TurnContext, start: str, on_delta: DeltaSink) -> Reply:
        """Go on with a reply that another replica began, ``start`` being what a client has.

        Returns the whole reply (``start`` and what follows); raises
        :class:`CannotContinue` where the server cannot.
        """
        ...

    @property
    def cache_slots(self) -> int | None:
        """How many conversations it keeps cached at once (llama.cpp's slots); None: unknown."""
        ...


def is_replica_fault(exc: BaseException) -> bool:
    """Whether the failure is the replica's own (another may answer), not the request's."""
    return isinstance(exc, (UpstreamUnavailable, UpstreamTimeout, ServerFailed))


@dataclass(eq=False)
class Replica:
    """One replica: its id in stored states, its URL, its adapter and what is known of it."""

    id: str  # a short hash of the URL, kept in the conversations' states
    url: str  # as configured (placement hashes it), without credentials
    adapter: ReplicaAdapter
    on_change: Callable[[Replica], None] = lambda replica: None
    running: int = 0  # this bridge's turns on it now
    state: str = "unknown"  # healthy, busy, out; unknown until the first probe
    detail: str = "not probed yet"
    # Monotonic time a turn found it failing; only a probe started later brings it back.
    failed_at: float | None = None
    back_after: float = 0.0  # a 429/503's Retry-After
    _last: str = field(default="unknown", repr=False)

    @property
    def usable(self) -> bool:
        return self.state != "out"

    def failed(self, exc: BaseException) -> None:
        """A turn found it failing: out until a probe started from now on passes."""
        now = time.monotonic()
        self.failed_at = now
        busy_for = exc.retry_after if isinstance(exc, ServerBusy) else None
        if isinstance(exc, ServerFailed):
            busy_for = exc.busy_for
        if busy_for:
            self.back_after = now + busy_for
        detail = exc.detail if isinstance(exc, UpstreamFailure) else type(exc).__name__
        self._set("out", f"failed a turn: {detail}")

    def probed(self, report: HealthReport, started: float, grace: float) -> None:
        """A health probe started at ``started`` (monotonic) answered ``report``."""
        now = time.monotonic()
        if self.failed_at is not None:
            if not report.healthy or started < self.failed_at or now < self.back_after:
                return  # out until a later probe passes, and not before its Retry-After
            self.failed_at = None
        if report.healthy:
            self._set("healthy", "healthy")
            return
        last = self.adapter.last_success
        recently_ok = last is not None and now - last <= grace
        if report.timed_out and (recently_ok or self.running > 0):
            self._set("busy", "its health check did not answer while it generates")
            return
        self._set("out", report.reason)

    def describe(self) -> ReplicaHealth:
        return ReplicaHealth(self.url, self.state, self.detail, self.running)

    def _set(self, state: str, detail: str) -> None:
        self.state, self.detail = state, detail
        if state == self._last:
            return
        if state == "out":
            log.warning("event=replica_out replica=%s reason=%r", self.url, detail)
        elif self._last == "out":
            log.info("event=replica_back replica=%s state=%s", self.url, state)
        self._last = state
        self.on_change(self)
