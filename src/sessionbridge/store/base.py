"""The Store interface: what the bridge needs from storage, whichever database holds it.

Each backend declares its :class:`Features`; how bridges sharing a database
agree on turns is the :class:`~.coordination.Coordination` it hands out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..records import (
    AISessionKind,
    ApiKey,
    ChatSession,
    ContextMessage,
    HistoryTurn,
    IdempotencyRecord,
    IdempotencyStart,
    Message,
    ResponseRow,
    SessionKind,
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
    def watch_turns(self, in_flight: Callable[[], int]) -> None:
        """How to read the number of turns in flight in this process.

        A store that gathers concurrent writes into one commit need not wait
        for company when no other turn is running.
        """
        ...

    async def create_key(self, name: str, token_hash: bytes) -> ApiKey: ...
    async def list_keys(self) -> list[ApiKey]: ...
    async def revoke_key(self, name: str) -> bool: ...
    async def key_for_token_hash(self, token_hash: bytes) -> ApiKey | None: ...

    async def create_session(
        self,
        api_key_id: int,
        title: str | None,
        scenario: str,
        max_tokens: int,
        *,
        session_id: str | None = None,
        kind: SessionKind = "session",
        metadata: str | None = None,
        items: Sequence[ContextMessage] = (),
    ) -> ChatSession:
        """A new session (its id given, or a new UUID), with ``items`` as its first messages."""
        ...
    async def get_session(self, api_key_id: int, session_id: str) -> ChatSession | None: ...
    async def list_sessions(
        self, api_key_id: int, limit: int, before_pk: int | None
    ) -> list[ChatSession]: ...
    async def delete_session(self, api_key_id: int, session_id: str) -> bool: ...
    async def set_metadata(self, session_pk: int, metadata: str) -> None: ...
    async def set_scenario(self, session_pk: int, scenario: str) -> None:
        """A new scenario; the AI session made with the old one is let go (set to none)."""
        ...

    async def fork_session(
        self, source: ChatSession, upto_seq: int, scenario: str, max_tokens: int
    ) -> ChatSession:
        """A new chain session holding copies of ``source``'s answered messages up to ``upto_seq``.

        Copies are byte for byte, answered, with their usage: the new line's
        prompts begin as the old line's did.
        """
        ...

    async def add_items(
        self, session_pk: int, items: Sequence[ContextMessage]
    ) -> list[Message]:
        """Append ``items`` as answered context messages (a conversation's items)."""
        ...

    async def delete_message(self, session_pk: int, message_id: str) -> bool: ...
    async def answered_since(self, session_pk: int, from_seq: int) -> list[Message]:
        """The session's answered messages (both roles) from ``from_seq`` on, oldest first."""
        ...

    async def added_since_answer(self, session_pk: int, within: int) -> list[Message]:
        """Of the session's last ``within`` places (by seq), the answered messages
        after the last answer a turn gave.

        A turn's answer is an assistant message with its ``ai_session``; what
        follows it was added as items since (none, most often). The bound is
        read from the session's row in the same statement.
        """
        ...

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
        context: Sequence[ContextMessage] = (),
        response: ResponseRow | None = None,
    ) -> Message:
        """Store the question as pending, after ``context`` (answered context messages).

        ``response``: the response this question asks, stored with it in the
        same transaction (its ``pk`` is ignored), so a response is never
        stored without its question.
        """
        ...
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
        truncated: bool = False,
    ) -> Message:
        """Store the answer; ``truncated``: cut by its token limit (its response is incomplete)."""
        ...
    async def fail_turn(
        self,
        session_pk: int,
        user_message_pk: int,
        idempotency: IdempotencyStart | None = None,
        error_code: str | None = None,
        context_count: int = 0,
    ) -> None:
        """Mark the question failed, and the ``context_count`` context messages stored before it."""
        ...

    async def get_idempotency(self, api_key_id: int, key: str) -> IdempotencyRecord | None: ...

    async def get_result(self, api_key_id: int, key: str) -> tuple[str, str] | None:
        """The fingerprint and answer (JSON) an idempotent request that is not a turn gave."""
        ...

    async def put_result(self, api_key_id: int, key: str, fingerprint: str, body: str) -> bool:
        """Keep that answer; False if the key already has one (another request was first)."""
        ...

    # -- responses of the OpenAI face ------------------------------------------------------

    async def get_response(self, api_key_id: int, response_id: str) -> ResponseRow | None:
        """The response with its question and answer as they are now."""
        ...

    async def response_for_question(self, question_pk: int) -> ResponseRow | None: ...
    async def delete_response(self, api_key_id: int, response_id: str) -> bool: ...
    async def claim_continuation(self, response_pk: int) -> bool:
        """Mark the response continued in its own line; False if another already is."""
        ...

    async def release_continuation(self, response_pk: int) -> None: ...
    async def purge_idempotency(self, older_than: float) -> int: ...
    async def fail_pending_turns(self) -> int: ...
