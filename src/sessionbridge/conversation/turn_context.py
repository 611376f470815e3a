"""What an AI-server adapter may know and do about the conversation of one turn."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ..records import ChatSession, HistoryTurn
from ..store.base import Store
from .results import NO_OPTIONS, TurnOptions
from .session_rows import SessionRows


class TurnContext:
    """The ``upstream.base.TurnContext`` a turn hands its adapter."""

    def __init__(
        self,
        store: Store,
        rows: SessionRows,
        session: ChatSession,
        content: str,
        max_tokens: int,
        options: TurnOptions = NO_OPTIONS,
        withdraw: Callable[[], bool] = lambda: True,
    ) -> None:
        self._store = store
        self._rows = rows
        self.session = session
        self.content = options.prompt_prefix + content
        self.max_tokens = max_tokens
        self.sampling = options.sampling
        self.trim = options.trim
        # Turns with one key go to one AI server among several: the session's,
        # unless the turn's options name another (a chain of responses).
        self.affinity_key = options.affinity_key or session.id
        self.withdraw_reply = withdraw

    @property
    def state(self) -> str | None:
        return self.session.ai_session_id

    async def save_state(self, state: str) -> None:
        await self._store.set_ai_session(self.session.pk, state)
        self.session = dataclasses.replace(self.session, ai_session_id=state)
        self._rows.remember(self.session)

    async def history(self, from_seq: int = 0) -> list[HistoryTurn]:
        return await self._store.history(self.session.pk, from_seq)
