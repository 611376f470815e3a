"""The rows of recently active sessions, so a turn needs no read to learn its AI session.

Only turns change a session's adapter state, one at a time under the
session's lock, so a row read under that lock stays right for one bridge; on
a database shared by bridges the coordination's lease hands each turn the
row as it is. A session deleted meanwhile is caught when the turn stores its
question.
"""

from __future__ import annotations

from collections import OrderedDict

from ..errors import NotFound
from ..records import ApiKey, ChatSession
from ..store.base import Store

# Rows kept (a few hundred bytes to a scenario's length each).
SESSION_ROWS = 1024


class SessionRows:
    def __init__(self, store: Store, size: int = SESSION_ROWS) -> None:
        self._store = store
        self._size = size
        self._rows: OrderedDict[str, ChatSession] = OrderedDict()

    def forget(self, session_id: str) -> None:
        self._rows.pop(session_id, None)

    def remember(self, session: ChatSession) -> None:
        self._rows[session.id] = session
        self._rows.move_to_end(session.id)
        if len(self._rows) > self._size:
            self._rows.popitem(last=False)

    async def get(self, key: ApiKey, session_id: str) -> ChatSession:
        """The key's session, from memory or the store; NotFound if it has none by that id."""
        session = self._rows.get(session_id)
        if session is not None and session.api_key_id == key.id:
            self._rows.move_to_end(session_id)
            return session
        session = await self._store.get_session(key.id, session_id)
        if session is None:
            raise NotFound("no such session")
        self.remember(session)
        return session
