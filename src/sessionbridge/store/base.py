"""The Store interface: what the bridge needs from storage, whichever database holds it.

Each backend declares its :class:`Features`; how bridges sharing a database
agree on turns is the :class:`~.coordination.Coordination` it hands out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..records import (
    AISessionKind,
    ApiKey,
    ChatSession,
    HistoryTurn,
    IdempotencyRecord,
    IdempotencyStart,
    Message,
    Usage,
)
from .coordination import Coordination


class DuplicateKeyName(Exception):
    """A live API key already has this name."""


class SessionGone(LookupError):
    """The chat session was deleted while a turn was writing to it."""


@dataclass(frozen=True, slots=True)
class Features:
    """What a backend can do, declared by the backend so callers ask a flag, not its name."""

    # Several bridges may serve this database at once (llama.cpp slot files,
    # which are one bridge's bookkeeping, are then off).
    shared_between_processes: bool


class Store(Protocol):
    """What the bridge needs from storage; each database has one implementation."""

    features: Features
    # How this bridge coordinates turns with other bridges on the database.
    coordination: Coordination

    async def ping(self) -> None: ...
    async def close(self) -> None: ...

    async def create_key(self, name: str, token_hash: bytes) -> ApiKey: ...
    async def list_keys(self) -> list[ApiKey]: ...
    async def revoke_key(self, name: str) -> bool: ...
    async def key_for_token_hash(self, token_hash: bytes) -> ApiKey | None: ...

    async def create_session(
        self, api_key_id: int, title: str | None, scenario: str, max_tokens: int
    ) -> ChatSession: ...
    async def get_session(self, api_key_id: int, session_id: str) -> ChatSession | None: ...
    async def list_sessions(
        self, api_key_id: int, limit: int, before_pk: int | None
    ) -> list[ChatSession]: ...
    async def delete_session(self, api_key_id: int, session_id: str) -> bool: ...

    async def list_messages(
        self, session_pk: int, limit: int, after_seq: int | None
    ) -> list[Message]: ...
    async def get_message(self, session_pk: int, message_pk: int) -> Message | None: ...
    async def get_message_by_id(self, session_pk: int, message_id: str) -> Message | None: ...
    async def answer_to(self, session_pk: int, user_seq: int) -> Message | None: ...
    async def history(self, session_pk: int, from_seq: int = 0) -> list[HistoryTurn]: ...

    async def begin_turn(
        self,
        session_pk: int,
        content: str,
        *,
        retry_message_pk: int | None = None,
        idempotency: IdempotencyStart | None = None,
    ) -> Message: ...
    async def set_ai_session(self, session_pk: int, ai_session_id: str) -> None: ...
    async def finish_turn(
        self,
        session_pk: int,
        user_message_pk: int,
        reply: str,
        kind: AISessionKind,
        idempotency: IdempotencyStart | None = None,
        usage: Usage | None = None,
        piece_ends: str | None = None,
    ) -> Message: ...
    async def fail_turn(
        self,
        session_pk: int,
        user_message_pk: int,
        idempotency: IdempotencyStart | None = None,
        error_code: str | None = None,
    ) -> None: ...

    async def get_idempotency(self, api_key_id: int, key: str) -> IdempotencyRecord | None: ...
    async def purge_idempotency(self, older_than: float) -> int: ...
    async def fail_pending_turns(self) -> int: ...
