"""The per-session lock registry: one FIFO lock per chat session, held only while in use.

Messages of one session are answered strictly one at a time in arrival order
(asyncio.Lock wakes its waiters first come, first served), while sessions never
wait for each other. An entry lives only as long as someone holds or waits on
it, so the registry is empty whenever the bridge is idle, however many sessions
the database holds.
"""

from __future__ import annotations

import asyncio

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

    def hold(self, session_id: str) -> _Hold:
        """Wait for the session's turn; raise SessionBusy when too many already wait."""
        return _Hold(self, session_id)


class _Hold:
    """``async with locks.hold(id)``: a plain class, as it is entered once a turn.

    (A generator-based context manager costs a turn more than the lock itself.)
    """

    __slots__ = ("_entries", "_entry", "_max_waiting", "_session_id")

    def __init__(self, locks: SessionLocks, session_id: str) -> None:
        self._entries = locks._entries
        self._max_waiting = locks._max_waiting
        self._session_id = session_id

    async def __aenter__(self) -> None:
        entry = self._entries.get(self._session_id)
        if entry is None:
            entry = self._entries[self._session_id] = _Entry()
        elif entry.users - 1 >= self._max_waiting:
            raise SessionBusy(
                f"{entry.users - 1} messages are already waiting on this session"
            )
        entry.users += 1
        self._entry = entry
        try:
            await entry.lock.acquire()
        except BaseException:
            self._leave()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._entry.lock.release()
        self._leave()

    def _leave(self) -> None:
        entry = self._entry
        entry.users -= 1
        if entry.users == 0:
            del self._entries[self._session_id]
