"""What a turn is to those who wait on it: its outcome, its events, the message it answers."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..records import (
    AISessionKind,
    ApiKey,
    ContextMessage,
    IdempotencyStart,
    Message,
    ResponseRow,
)
from ..turn_events import TurnEvents


@dataclass(frozen=True, slots=True)
class TurnResult:
    user_message: Message
    reply: Message
    ai_session: AISessionKind
    # The reply was cut by its token limit (known to the turn that answered; a
    # replay rebuilt from the store does not say).
    truncated: bool = False

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
    # Set when a client cancelled the turn (its failure is then "cancelled").
    cancelled: bool = False
    task: asyncio.Task[None] | None = None


def _nothing() -> Mapping[str, float]:
    return {}


@dataclass(frozen=True, slots=True)
class TurnOptions:
    """What a turn may ask beyond a message (the OpenAI face's responses); defaults: nothing."""

    # Messages stored as context just before the question (a response's input items).
    context: tuple[ContextMessage, ...] = ()
    # Text the AI server is given before the question (items added since the
    # last answer); stored as those items, not as part of the question.
    prompt_prefix: str = ""
    # The scenario this turn answers with; set before it when it differs, and
    # then the AI session made with the old one is let go.
    scenario: str | None = None
    # Let the AI session go even if the scenario is the same (context brought
    # answers the AI server has not seen).
    fresh_ai_session: bool = False
    # The response this turn answers: stored with its question.
    response: ResponseRow | None = None
    sampling: Mapping[str, float] = field(default_factory=_nothing)
    # May the oldest turns be dropped to fit the context?
    trim: bool = True
    # What keeps this turn's line on one AI server among several (a chain's
    # first response, or a client's prompt_cache_key); None: the session.
    affinity_key: str | None = None


NO_OPTIONS = TurnOptions()


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
    options: TurnOptions = NO_OPTIONS


def consume(future: asyncio.Future[Any]) -> None:
    """Mark an outcome as seen: one nobody awaited (a streaming client gone) is fine."""
    if not future.cancelled():
        future.exception()


def settled(result: TurnResult) -> asyncio.Future[TurnResult]:
    """An outcome already known (a replay)."""
    outcome: asyncio.Future[TurnResult] = asyncio.get_running_loop().create_future()
    outcome.set_result(result)
    return outcome
