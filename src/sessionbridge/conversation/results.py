"""What a turn is to those who wait on it: its outcome, its events, the message it answers."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from ..records import AISessionKind, ApiKey, IdempotencyStart, Message
from ..turn_events import TurnEvents


@dataclass(frozen=True, slots=True)
class TurnResult:
    user_message: Message
    reply: Message
    ai_session: AISessionKind

    def public(self) -> dict[str, Any]:
        return {
            "user_message": self.user_message.public(),
            "reply": self.reply.public(),
            "ai_session": self.ai_session,
        }


@dataclass(eq=False)
class Turn:
    """A turn as its followers see it: its events, and its outcome once it has ended."""

    events: TurnEvents
    outcome: asyncio.Future[TurnResult]
    question: Message | None = None


@dataclass(frozen=True, slots=True)
class Ask:
    """One message to answer, as the client sent it."""

    key: ApiKey
    session_id: str
    content: str
    max_tokens: int | None
    idempotency: IdempotencyStart | None = None
    # A failed question of the same Idempotency-Key, taken up again.
    retry_message_pk: int | None = None


def consume(future: asyncio.Future[Any]) -> None:
    """Mark an outcome as seen: one nobody awaited (a streaming client gone) is fine."""
    if not future.cancelled():
        future.exception()


def settled(result: TurnResult) -> asyncio.Future[TurnResult]:
    """An outcome already known (a replay)."""
    outcome: asyncio.Future[TurnResult] = asyncio.get_running_loop().create_future()
    outcome.set_result(result)
    return outcome
