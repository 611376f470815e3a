"""Which replica holds each conversation in use, and how many each holds: the placement's load.

A conversation is held by the replica its last turn was sent to, for as long
as it stays in use: one that has had no turn for ``idle`` seconds is let go
(its cache is likely gone by then, and it should not keep a replica full),
and at most ``limit`` conversations are remembered, the least recently used
let go first, so memory stays bounded whatever the traffic. Each bridge
counts its own turns.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

# A conversation with no turn for this long holds no replica.
IDLE_SECONDS = 900.0
# Conversations remembered at most (about 200 bytes each).
LIMIT = 8192


class Residency:
    def __init__(
        self,
        idle: float = IDLE_SECONDS,
        limit: int = LIMIT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._idle = idle
        self._limit = limit
        self._clock = clock
        # key -> (replica, monotonic time of its last turn), oldest first.
        self._where: collections.OrderedDict[str, tuple[str, float]] = collections.OrderedDict()
        self._counts: collections.Counter[str] = collections.Counter()

    def where(self, key: str) -> str | None:
        """The replica holding ``key``, if it is in use."""
        self._let_go_idle()
        entry = self._where.get(key)
        return entry[0] if entry is not None else None

    def counts(self) -> collections.Counter[str]:
        """Conversations in use by replica."""
        self._let_go_idle()
        return self._counts

    def sent(self, key: str, replica: str) -> None:
        """A turn of ``key`` goes to ``replica``: it holds the conversation from now on."""
        previous = self._where.pop(key, None)
        if previous is not None:
            self._drop(previous[0])
        self._where[key] = (replica, self._clock())
        self._counts[replica] += 1
        while len(self._where) > self._limit:
            _, (oldest, _) = self._where.popitem(last=False)
            self._drop(oldest)

    def _let_go_idle(self) -> None:
        cutoff = self._clock() - self._idle
        while self._where:
            key, (replica, last) = next(iter(self._where.items()))
            if last > cutoff:
                return
            del self._where[key]
            self._drop(replica)

    def _drop(self, replica: str) -> None:
        self._counts[replica] -= 1
        if self._counts[replica] <= 0:
            del self._counts[replica]
