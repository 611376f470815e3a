"""Following a turn: live while it runs here or on another bridge, rebuilt from the store after.

A turn's events are read from its log while it runs here; from what the
bridge running it relays, when that is another bridge; and from the stored
question and answer once it has ended (the same pieces, the same end).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from ..errors import NotFound, UpstreamError, error_from_code
from ..records import ApiKey, ChatSession, IdempotencyRecord, Message
from ..store.base import Store
from ..turn_events import COMPLETED, TurnEvents, stored_events
from .results import Turn, TurnResult, consume, settled

# Starts a task the service keeps (and cuts off at shutdown).
Spawn = Callable[[Coroutine[Any, Any, None], str], object]


class Followers:
    def __init__(self, store: Store, running: dict[str, Turn], spawn: Spawn) -> None:
        self._store = store
        # Turns running here, by their question's id.
        self._running = running
        self._spawn = spawn

    async def follow(self, key: ApiKey, session_id: str, message_id: str) -> TurnEvents:
        """The events of the turn of question ``message_id``: live while it runs, else stored."""
        session = await self._store.get_session(key.id, session_id)
        if session is None:
            raise NotFound("no such session")
        turn = self._running.get(message_id)
        if turn is not None:
            return turn.events
        question = await self._store.get_message_by_id(session.pk, message_id)
        if question is None or question.role != "user":
            raise NotFound("no such message")
        if question.status != "pending":
            return await self.stored_turn(session, question)
        return self._pending(session, question)

    def _pending(self, session: ChatSession, question: Message) -> TurnEvents:
        """Pending, but not running here: just starting or ending here, or running elsewhere.

        The log fills from whichever source has more.
        """
        message_id = question.id
        coordination = self._store.coordination

        async def poll(events: TurnEvents) -> bool:
            known = len(events)
            running = self._running.get(message_id)
            if running is not None:
                events.extend(running.events.since(known))
                return len(events) > known
            # Running on another bridge: what it relays (nothing for one process).
            relayed = await coordination.relayed_events(question.pk, known)
            if relayed:
                events.extend(relayed)
                return True
            current = await self._store.get_message_by_id(session.pk, message_id)
            if current is None:
                events.failed(NotFound("the session was deleted during the turn"))
            elif current.status != "pending":
                stored = await self.stored_turn(session, current)
                events.extend(stored.since(known))
            return len(events) > known

        events = TurnEvents(poller=poll)
        events.started(question)
        return events

    async def stored_turn(self, session: ChatSession, question: Message) -> TurnEvents:
        answer = None
        if question.status == "answered":
            answer = await self._store.answer_to(session.pk, question.seq)
        if answer is None or answer.ai_session is None:
            error = error_from_code(question.error_code, "this turn failed")
            return stored_events(question, None, None, error)
        result = TurnResult(question, answer, answer.ai_session)
        return stored_events(question, answer, result.public(), UpstreamError(""))

    async def replay(self, key: ApiKey, session_id: str, record: IdempotencyRecord) -> Turn:
        """The first outcome of an Idempotency-Key again, rebuilt from its question and answer."""
        session = await self._store.get_session(key.id, session_id)
        if session is None or record.user_message_pk is None:
            raise NotFound("no such session")
        question = await self._store.get_message(session.pk, record.user_message_pk)
        answer = None if question is None else await self._store.answer_to(session.pk, question.seq)
        kind = record.ai_session
        if question is None or answer is None or kind not in ("created", "reused", "recovered"):
            raise NotFound("the outcome of this Idempotency-Key is no longer stored")
        result = TurnResult(question, answer, kind)  # type: ignore[arg-type]
        events = stored_events(question, answer, result.public(), UpstreamError(""))
        return Turn(events, settled(result), question)

    async def elsewhere(
        self, key: ApiKey, session_id: str, idempotency_key: str, record: IdempotencyRecord
    ) -> Turn:
        """The turn of an idempotent request running on another bridge, followed from here."""
        session = await self._store.get_session(key.id, session_id)
        question = None
        if session is not None and record.user_message_pk is not None:
            question = await self._store.get_message(session.pk, record.user_message_pk)
        if question is None:
            raise NotFound("no such session")
        events = await self.follow(key, session_id, question.id)
        outcome: asyncio.Future[TurnResult] = asyncio.get_running_loop().create_future()
        outcome.add_done_callback(consume)

        async def settle() -> None:
            # The outcome, once the turn has ended there (the service waits for
            # it to let the key go here).
            ending = None
            async for event in events.follow():
                ending = event
            try:
                if ending is None or ending.name != COMPLETED:
                    raise error_from_code(ending.data.get("code") if ending else None, "failed")
                done = await self._store.get_idempotency(key.id, idempotency_key)
                if done is None or done.state != "succeeded":
                    raise UpstreamError("the turn ended without its outcome stored")
                replayed = await self.replay(key, session_id, done)
                outcome.set_result(await replayed.outcome)
            except Exception as exc:
                outcome.set_exception(exc)

        self._spawn(settle(), f"follow-{session_id}")
        return Turn(events, outcome, question)
