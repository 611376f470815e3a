"""Idempotency-Key bookkeeping of one bridge: the requests being answered here right now.

A retry with the same key and body replays the first outcome from the store;
while the first still runs here it is refused (or followed, for a streaming
client) before it queues; another body is a mismatch. The stored side of the
key (succeeded, failed, in progress on another bridge) is the store's.
"""

from __future__ import annotations

import asyncio
import hashlib
import json

from .results import Turn, consume

# An API key's id and the Idempotency-Key it sent.
Slot = tuple[int, str]


def request_fingerprint(session_id: str, content: str, max_tokens: int | None) -> str:
    canonical = json.dumps([session_id, content, max_tokens], ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def has_ended(starting: asyncio.Future[Turn]) -> bool:
    """Whether the turn an idempotency key started has ended its events."""
    return (
        starting.done() and not starting.cancelled() and starting.exception() is None
        and starting.result().events.ended
    )


class RunningKeys:
    """The keys being answered here, with their body's fingerprint and their turn (once started)."""

    def __init__(self) -> None:
        self._running: dict[Slot, tuple[str, asyncio.Future[Turn]]] = {}

    def get(self, slot: Slot) -> tuple[str, asyncio.Future[Turn]] | None:
        running = self._running.get(slot)
        if running is not None and has_ended(running[1]):
            # Its turn has ended, so its outcome is stored (a turn ends its
            # events only after that); only the settling here lags behind (a
            # turn followed from another bridge reads its outcome back): the
            # store answers, as it would a moment later.
            return None
        return running

    def claim(self, slot: Slot, fingerprint: str) -> asyncio.Future[Turn]:
        """Take the key before the first await, so a duplicate arriving meanwhile sees it."""
        starting: asyncio.Future[Turn] = asyncio.get_running_loop().create_future()
        starting.add_done_callback(consume)
        self._running[slot] = (fingerprint, starting)
        return starting

    def release(self, slot: Slot, starting: asyncio.Future[Turn]) -> None:
        running = self._running.get(slot)
        if running is not None and running[1] is starting:
            del self._running[slot]
