"""One turn of a conversation: lock, reuse/create/recover the AI session, store.

This is where the bridge's rules live, free of HTTP: a conversation maps to one
AI session for its whole life; messages of one session are answered one at a
time; a lost AI session is recovered once, with the recent transcript; an empty
reply is retried and never stored; a failed turn keeps its question as
``failed`` and stores no answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from .config import Settings
from .errors import (
    BridgeError,
    IdempotencyInProgress,
    IdempotencyMismatch,
    NotFound,
    Overloaded,
    SessionLost,
    UpstreamEmptyReply,
    UpstreamError,
)
from .locks import SessionLocks
from .metrics import Metrics
from .records import (
    AISessionKind,
    ApiKey,
    ChatSession,
    IdempotencyRecord,
    IdempotencyStart,
    Message,
    TranscriptTurn,
)
from .store import SessionGone, Store
from .upstream import AIServer

log = logging.getLogger(__name__)

T = TypeVar("T")

# Session rows kept for recently active conversations (a few hundred bytes to a
# scenario's length each).
CONTEXT_CACHE_SIZE = 1024


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


def recovery_scenario(scenario: str, transcript: list[TranscriptTurn]) -> str:
    """The scenario of a recovered AI session: the original one, then the recent turns."""
    if not transcript:
        return scenario
    lines = [scenario, "", "The conversation so far (oldest first):"]
    for turn in transcript:
        lines.append(f"User: {turn.user}")
        lines.append(f"Assistant: {turn.assistant}")
    return "\n".join(lines)


def request_fingerprint(session_id: str, content: str, max_tokens: int | None) -> str:
    canonical = json.dumps([session_id, content, max_tokens], ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


class Conversations:
    """Answers messages; knows the store, the AI server and the lock registry, not HTTP."""

    def __init__(
        self,
        store: Store,
        ai_server: AIServer,
        settings: Settings,
        metrics: Metrics,
    ) -> None:
        self._store = store
        self._ai = ai_server
        self._settings = settings
        self._metrics = metrics
        self.locks = SessionLocks(settings.session_queue)
        self.inflight = 0
        # Idempotency keys being answered right now, with their fingerprints:
        # a duplicate must be turned away before it queues on the session lock.
        self._running_keys: dict[tuple[int, str], str] = {}
        # The session rows of recently active conversations, so a turn needs no
        # database read to learn its AI session. Only turns change a session's
        # AI session id, one at a time under the session's lock, so a row read
        # under that lock stays right (single bridge per database); a session
        # deleted meanwhile is caught when the turn stores its question.
        self._contexts: OrderedDict[str, ChatSession] = OrderedDict()

    def forget(self, session_id: str) -> None:
        """Drop a deleted session's cached row."""
        self._contexts.pop(session_id, None)

    def _remember(self, session: ChatSession) -> None:
        self._contexts[session.id] = session
        self._contexts.move_to_end(session.id)
        if len(self._contexts) > CONTEXT_CACHE_SIZE:
            self._contexts.popitem(last=False)

    async def _context(self, key: ApiKey, session_id: str) -> ChatSession:
        session = self._contexts.get(session_id)
        if session is not None and session.api_key_id == key.id:
            self._contexts.move_to_end(session_id)
            return session
        session = await self._store.get_session(key.id, session_id)
        if session is None:
            raise NotFound("no such session")
        self._remember(session)
        return session

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no turn runs or waits, at most ``timeout`` seconds; say whether it did."""
        deadline = time.monotonic() + timeout
        while len(self.locks) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return not len(self.locks)

    async def send(
        self,
        key: ApiKey,
        session_id: str,
        content: str,
        max_tokens: int | None,
        idempotency_key: str | None = None,
    ) -> TurnResult:
        if idempotency_key is None:
            return await self._turn(key, session_id, content, max_tokens, None, None)

        fingerprint = request_fingerprint(session_id, content, max_tokens)
        slot = (key.id, idempotency_key)
        running = self._running_keys.get(slot)
        if running is not None:
            if running != fingerprint:
                raise IdempotencyMismatch("this Idempotency-Key was used with another body")
            raise IdempotencyInProgress("the request with this Idempotency-Key is still running")
        self._running_keys[slot] = fingerprint
        try:
            record = await self._store.get_idempotency(key.id, idempotency_key)
            retry_message_pk = None
            if record is not None:
                if record.fingerprint != fingerprint:
                    raise IdempotencyMismatch("this Idempotency-Key was used with another body")
                if record.state == "succeeded":
                    return await self._replay(key, session_id, record)
                # A failed attempt is tried again on the same question row.
                retry_message_pk = record.user_message_pk
            idempotency = IdempotencyStart(key.id, idempotency_key, fingerprint, time.time())
            return await self._turn(
                key, session_id, content, max_tokens, idempotency, retry_message_pk
            )
        finally:
            del self._running_keys[slot]

    async def _replay(self, key: ApiKey, session_id: str, record: IdempotencyRecord) -> TurnResult:
        """The first outcome again, rebuilt from the stored question and its answer."""
        session = await self._store.get_session(key.id, session_id)
        if session is None or record.user_message_pk is None:
            raise NotFound("no such session")
        question = await self._store.get_message(session.pk, record.user_message_pk)
        answer = None if question is None else await self._store.answer_to(session.pk, question.seq)
        kind = record.ai_session
        if question is None or answer is None or kind not in ("created", "reused", "recovered"):
            raise NotFound("the outcome of this Idempotency-Key is no longer stored")
        return TurnResult(question, answer, kind)  # type: ignore[arg-type]

    async def _turn(
        self,
        key: ApiKey,
        session_id: str,
        content: str,
        max_tokens: int | None,
        idempotency: IdempotencyStart | None,
        retry_message_pk: int | None,
    ) -> TurnResult:
        async with self.locks.hold(session_id):
            # Read under the lock: the turn before may have created the AI session.
            session = await self._context(key, session_id)
            if self.inflight >= self._settings.max_inflight:
                raise Overloaded(f"{self.inflight} turns are already in flight")
            self.inflight += 1
            try:
                return await self._run(session, content, max_tokens, idempotency, retry_message_pk)
            finally:
                self.inflight -= 1

    async def _run(
        self,
        session: ChatSession,
        content: str,
        max_tokens: int | None,
        idempotency: IdempotencyStart | None,
        retry_message_pk: int | None,
    ) -> TurnResult:
        try:
            question = await self._store.begin_turn(
                session.pk, content, retry_message_pk=retry_message_pk, idempotency=idempotency
            )
        except SessionGone:
            self.forget(session.id)
            raise NotFound("no such session") from None
        try:
            reply, kind = await self._exchange(session, content, self._tokens(session, max_tokens))
        except BaseException as exc:
            # Shielded: a turn cancelled by shutdown still records its failure.
            await asyncio.shield(self._store.fail_turn(session.pk, question.pk, idempotency))
            outcome = exc.code if isinstance(exc, BridgeError) else type(exc).__name__
            self._metrics.count_turn(outcome)
            log.info("event=turn_failed session=%s outcome=%s", session.id, outcome)
            raise
        try:
            answer = await self._store.finish_turn(
                session.pk, question.pk, reply, kind, idempotency
            )
        except SessionGone:
            # Deleted while the AI server was answering: nothing is left to store into.
            self.forget(session.id)
            self._metrics.count_turn("not_found")
            raise NotFound("the session was deleted during the turn") from None
        except Exception:
            # The answer could not be stored (disk full, I/O error): the question
            # must not stay pending until the next start.
            log.exception("event=answer_not_stored session=%s", session.id)
            with contextlib.suppress(Exception):
                await asyncio.shield(self._store.fail_turn(session.pk, question.pk, idempotency))
            raise
        self._metrics.count_turn("answered")
        return TurnResult(
            Message(question.pk, question.id, question.seq, "user", question.content,
                    "answered", question.created_at),
            answer,
            kind,
        )

    def _tokens(self, session: ChatSession, requested: int | None) -> int:
        # A session keeps the max_tokens it was created with; if the operator
        # has since narrowed the AI server's range, the value is moved into it
        # so the AI server never sees one it rejects.
        wanted = requested if requested is not None else session.max_tokens
        return self._settings.upstream_max_tokens.clamp(wanted)

    async def _exchange(
        self, session: ChatSession, content: str, max_tokens: int
    ) -> tuple[str, AISessionKind]:
        kind: AISessionKind = "reused"
        ai_session_id = session.ai_session_id
        if ai_session_id is None:
            kind = "created"
            ai_session_id = await self._create_ai_session(session, session.scenario, kind)
        else:
            self._metrics.count_ai_session(kind)
        try:
            return await self._chat(session, ai_session_id, content, max_tokens, kind), kind
        except SessionLost:
            if kind == "created":
                raise UpstreamError("the AI server lost a session it had just created") from None
        # The AI server restarted or evicted the session: one new session that
        # carries the scenario and the recent transcript, then the message.
        kind = "recovered"
        transcript = await self._store.recent_turns(session.pk, self._settings.recovery_budget)
        scenario = recovery_scenario(session.scenario, transcript)
        ai_session_id = await self._create_ai_session(session, scenario, kind)
        try:
            return await self._chat(session, ai_session_id, content, max_tokens, kind), kind
        except SessionLost:
            raise UpstreamError("the AI server lost a session it had just recovered") from None

    async def _create_ai_session(
        self, session: ChatSession, scenario: str, kind: AISessionKind
    ) -> str:
        ai_session_id = await self._logged(
            self._ai.create_session(scenario), self._ai.create_endpoint, session, kind
        )
        # Stored at once: even if the first /chat fails, the next message reuses it.
        await self._store.set_ai_session(session.pk, ai_session_id)
        self._remember(dataclasses.replace(session, ai_session_id=ai_session_id))
        self._metrics.count_ai_session(kind)
        return ai_session_id

    async def _chat(
        self,
        session: ChatSession,
        ai_session_id: str,
        content: str,
        max_tokens: int,
        kind: AISessionKind,
    ) -> str:
        attempts = 1 + self._settings.empty_reply_retries
        for attempt in range(1, attempts + 1):
            reply = await self._logged(
                self._ai.chat(ai_session_id, content, max_tokens), "chat", session, kind
            )
            if reply.strip():
                return reply
            self._metrics.empty_replies.inc()
            log.warning(
                "event=empty_reply session=%s attempt=%d of=%d", session.id, attempt, attempts
            )
        raise UpstreamEmptyReply(f"the AI server answered an empty reply {attempts} times")

    async def _logged(
        self, call: Awaitable[T], endpoint: str, session: ChatSession, kind: AISessionKind
    ) -> T:
        started = time.monotonic()
        outcome = "ok"
        try:
            return await call
        except BridgeError as exc:
            outcome = "session_lost" if isinstance(exc, SessionLost) else exc.code
            raise
        finally:
            log.info(
                "event=upstream_call endpoint=%s session=%s ai_session=%s outcome=%s ms=%.1f",
                endpoint, session.id, kind, outcome, (time.monotonic() - started) * 1000,
            )
