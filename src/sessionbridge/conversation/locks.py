"""The per-session lock registry: one FIFO lock per chat session, held only while in use.

Messages of one session are answered strictly one at a time in arrival order
(asyncio.Lock wakes its waiters first come, first served), while sessions never
wait for each other. An entry lives only as long as someone holds or waits on
it, so the registry is empty whenever the bridge is idle, however many sessions
the database holds.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ..errors import SessionBusy


class _Entry:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0  # the holder plus everyone waiting


class SessionLocks:
    def __init__(self, max_waiting: int) -> None:
        self._max_waiting = max_waiting
        self._entries: dict[str, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def waiting(self, session_id: str) -> int:
        entry = self._entries.get(session_id)
        return 0 if entry is None else max(entry.users - 1, 0)

    @asynccontextmanager
    async def hold(self, session_id: str) -> AsyncIterator[None]:
        """Wait for the session's turn; raise SessionBusy when too many already wait."""
        entry = self._entries.get(session_id)
        if entry is None:
            entry = self._entries[session_id] = _Entry()
        elif entry.users - 1 >= self._max_waiting:
            raise SessionBusy(
                f"{entry.users - 1} messages are already waiting on this session"
            )
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._entries[session_id]
