"""The rules of a conversation that hold for every AI server, free of HTTP and of any protocol.

Messages of one session are answered one at a time, in arrival order (the
session lock); admission (the per-session queue and the in-flight limit);
a question is stored before the AI server is asked and its answer before the
client is told; a failed turn keeps its question as ``failed`` with its error
code and stores no answer; an empty or blank reply is retried and never
stored nor streamed; ``Idempotency-Key`` replays, refuses or follows.

How a conversation maps onto the AI server (create, reuse, recover; the
history sent; the prompt cache) is the protocol adapter's (``upstream/``).

A turn does not belong to the request that started it: it runs as a task of
its own, so a client that goes away does not stop it, and anyone may follow
its events (``turn_events``) while it runs.
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
from dataclasses import dataclass
from typing import Any

from .config import Settings
from .errors import (
    BridgeError,
    IdempotencyInProgress,
    IdempotencyMismatch,
    NotFound,
    Overloaded,
    UpstreamEmptyReply,
    UpstreamError,
    UpstreamUnavailable,
    error_from_code,
)
from .locks import SessionLocks
from .metrics import Metrics
from .records import (
    AISessionKind,
    ApiKey,
    ChatSession,
    HistoryTurn,
    IdempotencyRecord,
    IdempotencyStart,
    Message,
)
from .store import SessionGone, Store
from .turn_events import COMPLETED, TurnEvents, stored_events
from .upstream import AIServer, Reply

log = logging.getLogger(__name__)

# Session rows kept for recently active conversations (a few hundred bytes to a
# scenario's length each).
CONTEXT_CACHE_SIZE = 1024
# Which kind a turn reports when its attempts differ (an empty reply retried).
_KIND_RANK: dict[AISessionKind, int] = {"reused": 0, "recovered": 1, "created": 2}


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
class _Ask:
    """One message to answer, as the client sent it."""

    key: ApiKey
    session_id: str
    content: str
    max_tokens: int | None
    idempotency: IdempotencyStart | None = None
    # A failed question of the same Idempotency-Key, taken up again.
    retry_message_pk: int | None = None


def request_fingerprint(session_id: str, content: str, max_tokens: int | None) -> str:
    canonical = json.dumps([session_id, content, max_tokens], ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _consume(future: asyncio.Future[Any]) -> None:
    # An outcome nobody awaited (a streaming client that went away) is fine.
    if not future.cancelled():
        future.exception()


class _TurnContext:
    """What the adapter may know and do about the conversation of one turn."""

    def __init__(
        self, service: Conversations, session: ChatSession, content: str, max_tokens: int
    ) -> None:
        self._service = service
        self.session = session
        self.content = content
        self.max_tokens = max_tokens

    @property
    def state(self) -> str | None:
        return self.session.ai_session_id

    async def save_state(self, state: str) -> None:
        await self._service._store.set_ai_session(self.session.pk, state)
        self.session = dataclasses.replace(self.session, ai_session_id=state)
        self._service._remember(self.session)

    async def history(self, from_seq: int = 0) -> list[HistoryTurn]:
        return await self._service._store.history(self.session.pk, from_seq)


class _ReplyGate:
    """Passes a reply's pieces to the turn's events, once the reply holds a non-blank character.

    A blank reply is retried and must never reach a client, so leading blank
    pieces wait here; text that cannot be stored (a lone surrogate) or a reply
    over the limit fails the turn as an upstream error.
    """

    def __init__(self, events: TurnEvents, limit_bytes: int) -> None:
        self._events = events
        self._limit = limit_bytes
        self._held: list[str] = []
        self._size = 0
        self.sent: list[str] = []

    async def push(self, piece: str) -> None:
        if not piece:
            return
        try:
            self._size += len(piece.encode("utf-8"))
        except UnicodeEncodeError:
            raise UpstreamError(
                "the AI server sent text that cannot be stored (lone surrogate)"
            ) from None
        if self._size > self._limit:
            raise UpstreamError(f"the AI server's reply is over the limit of {self._limit} bytes")
        if not self.sent and not piece.strip() and not any(p.strip() for p in self._held):
            self._held.append(piece)
            return
        self._held.append(piece)
        for held in self._held:
            self._events.delta(held)
            self.sent.append(held)
        self._held.clear()

    def discard(self) -> None:
        """Forget a blank attempt's pieces (none was sent)."""
        self._held.clear()
        self._size = 0

    def finish(self, text: str) -> str | None:
        """Send what the adapter returned beyond the pieces; the pieces' ends, if several."""
        streamed = "".join(self.sent)
        if not text.startswith(streamed):
            # The adapter's text and its pieces disagree: the pieces went out,
            # so they are what is stored.
            text = streamed
        rest = text[len(streamed):]
        if rest:
            self._events.delta(rest)
            self.sent.append(rest)
        if len(self.sent) < 2:
            return None
        ends, position = [], 0
        for piece in self.sent:
            position += len(piece)
            ends.append(str(position))
        return ",".join(ends)

    @property
    def text(self) -> str:
        return "".join(self.sent)


def _ended(starting: asyncio.Future[Turn]) -> bool:
    """Whether the turn an idempotency key started has ended its events."""
    return (
        starting.done() and not starting.cancelled() and starting.exception() is None
        and starting.result().events.ended
    )


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
        # Idempotency keys being answered right now, with their fingerprints
        # and turns: a duplicate is turned away (or follows) before it queues.
        self._running_keys: dict[tuple[int, str], tuple[str, asyncio.Future[Turn]]] = {}
        # Turns running now, by their question's id, for followers.
        self._running: dict[str, Turn] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # The session rows of recently active conversations, so a turn needs no
        # database read to learn its AI session. Only turns change a session's
        # adapter state, one at a time under the session's lock, so a row read
        # under that lock stays right for one bridge; on a database shared by
        # bridges the store's lease hands each turn the row as it is. A session
        # deleted meanwhile is caught when the turn stores its question.
        self._contexts: OrderedDict[str, ChatSession] = OrderedDict()

    # -- the session row cache ---------------------------------------------------------

    def forget(self, session_id: str) -> None:
        """Drop a deleted session's cached row."""
        self._contexts.pop(session_id, None)

    async def deleted(self, session: ChatSession) -> None:
        """A session was deleted: forget its row, and let the adapter drop what it keeps."""
        self.forget(session.id)
        try:
            await self._ai.forget(session)
        except Exception as exc:  # cleaning up must not fail the delete
            log.warning("event=forget_failed session=%s error=%s", session.id, exc)

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

    # -- lifetime ------------------------------------------------------------------------

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no turn runs or waits, at most ``timeout`` seconds; say whether it did."""
        deadline = time.monotonic() + timeout
        while (len(self.locks) or self._tasks) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return not (len(self.locks) or self._tasks)

    async def stop(self) -> None:
        """Cut off the turns still running (shutdown); each records its failure, ends its events."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- starting and following turns ----------------------------------------------------

    async def send(
        self,
        key: ApiKey,
        session_id: str,
        content: str,
        max_tokens: int | None,
        idempotency_key: str | None = None,
    ) -> TurnResult:
        """Answer one message and return the outcome (a failure raises its error)."""
        turn = await self.begin(key, session_id, content, max_tokens, idempotency_key)
        # Shielded: a client that goes away does not stop the turn, nor settle
        # its outcome (which others may wait on: its Idempotency-Key, say).
        return await asyncio.shield(turn.outcome)

    async def begin(
        self,
        key: ApiKey,
        session_id: str,
        content: str,
        max_tokens: int | None,
        idempotency_key: str | None = None,
        *,
        follow_running: bool = False,
    ) -> Turn:
        """Start a turn and return it once its question is stored.

        Whatever refuses the message before its question is stored raises
        here. ``follow_running``: an idempotent retry of a turn still running
        follows it instead of being refused (streaming clients).
        """
        if idempotency_key is None:
            return await self._start(_Ask(key, session_id, content, max_tokens))
        fingerprint = request_fingerprint(session_id, content, max_tokens)
        slot = (key.id, idempotency_key)
        running = self._running_keys.get(slot)
        if running is not None and _ended(running[1]):
            # Its turn has ended, so its outcome is stored (a turn ends its
            # events only after that); only the settling here lags behind (a
            # turn followed from another bridge reads its outcome back): the
            # store answers, as it would a moment later.
            running = None
        if running is not None:
            if running[0] != fingerprint:
                raise IdempotencyMismatch("this Idempotency-Key was used with another body")
            if not follow_running:
                raise IdempotencyInProgress(
                    "the request with this Idempotency-Key is still running"
                )
            return await asyncio.shield(running[1])
        # Taken before the first await, so a duplicate arriving meanwhile sees it.
        starting: asyncio.Future[Turn] = asyncio.get_running_loop().create_future()
        starting.add_done_callback(_consume)
        self._running_keys[slot] = (fingerprint, starting)

        def release(_: object = None) -> None:
            if self._running_keys.get(slot, (None, None))[1] is starting:
                del self._running_keys[slot]

        try:
            turn = await self._begin_idempotent(
                key, session_id, content, max_tokens, idempotency_key, fingerprint,
                follow_running,
            )
        except BaseException as exc:
            release()
            starting.set_exception(exc if isinstance(exc, Exception) else NotFound("cancelled"))
            raise
        starting.set_result(turn)
        if turn.outcome.done():
            release()
        else:
            turn.outcome.add_done_callback(release)
        return turn

    async def _begin_idempotent(
        self,
        key: ApiKey,
        session_id: str,
        content: str,
        max_tokens: int | None,
        idempotency_key: str,
        fingerprint: str,
        follow_running: bool,
    ) -> Turn:
        record = await self._store.get_idempotency(key.id, idempotency_key)
        retry_message_pk = None
        if record is not None:
            if record.fingerprint != fingerprint:
                raise IdempotencyMismatch("this Idempotency-Key was used with another body")
            if record.state == "succeeded":
                return await self._replay(key, session_id, record)
            if record.state == "in_progress":
                # Being answered by another bridge on this database (one here
                # would be in _running_keys): refused, or followed there.
                if not follow_running:
                    raise IdempotencyInProgress(
                        "the request with this Idempotency-Key is still running"
                    )
                return await self._follow_elsewhere(key, session_id, idempotency_key, record)
            # A failed attempt is tried again on the same question row.
            retry_message_pk = record.user_message_pk
        idempotency = IdempotencyStart(key.id, idempotency_key, fingerprint, time.time())
        return await self._start(
            _Ask(key, session_id, content, max_tokens, idempotency, retry_message_pk)
        )

    async def _follow_elsewhere(
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
        outcome.add_done_callback(_consume)

        async def settle() -> None:
            # The outcome, once the turn has ended there (begin() waits for it
            # to let the key go here).
            ending = None
            async for event in events.follow():
                ending = event
            try:
                if ending is None or ending.name != COMPLETED:
                    raise error_from_code(ending.data.get("code") if ending else None, "failed")
                done = await self._store.get_idempotency(key.id, idempotency_key)
                if done is None or done.state != "succeeded":
                    raise UpstreamError("the turn ended without its outcome stored")
                replayed = await self._replay(key, session_id, done)
                outcome.set_result(await replayed.outcome)
            except Exception as exc:
                outcome.set_exception(exc)

        task = asyncio.create_task(settle(), name=f"follow-{session_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return Turn(events, outcome, question)

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
            return await self._stored_turn(session, question)

        # Pending, but not running here: it is just starting or ending here, or
        # it runs elsewhere. The log fills from whichever source has more.
        async def poll(events: TurnEvents) -> bool:
            known = len(events)
            running = self._running.get(message_id)
            if running is not None:
                events.extend(running.events.since(known))
                return len(events) > known
            # Running on another bridge: what it relays (nothing from SQLite).
            relayed = await self._store.relayed_events(question.pk, known)
            if relayed:
                events.extend(relayed)
                return True
            current = await self._store.get_message_by_id(session.pk, message_id)
            if current is None:
                events.failed(NotFound("the session was deleted during the turn"))
            elif current.status != "pending":
                stored = await self._stored_turn(session, current)
                events.extend(stored.since(known))
            return len(events) > known

        events = TurnEvents(poller=poll)
        events.started(question)
        return events

    async def _stored_turn(self, session: ChatSession, question: Message) -> TurnEvents:
        answer = None
        if question.status == "answered":
            answer = await self._store.answer_to(session.pk, question.seq)
        if answer is None or answer.ai_session is None:
            error = error_from_code(question.error_code, "this turn failed")
            return stored_events(question, None, None, error)
        result = TurnResult(question, answer, answer.ai_session)
        return stored_events(question, answer, result.public(), UpstreamError(""))

    async def _replay(self, key: ApiKey, session_id: str, record: IdempotencyRecord) -> Turn:
        """The first outcome again, rebuilt from the stored question and its answer."""
        session = await self._store.get_session(key.id, session_id)
        if session is None or record.user_message_pk is None:
            raise NotFound("no such session")
        question = await self._store.get_message(session.pk, record.user_message_pk)
        answer = None if question is None else await self._store.answer_to(session.pk, question.seq)
        kind = record.ai_session
        if question is None or answer is None or kind not in ("created", "reused", "recovered"):
            raise NotFound("the outcome of this Idempotency-Key is no longer stored")
        result = TurnResult(question, answer, kind)  # type: ignore[arg-type]
        outcome: asyncio.Future[TurnResult] = asyncio.get_running_loop().create_future()
        outcome.set_result(result)
        events = stored_events(question, answer, result.public(), UpstreamError(""))
        return Turn(events, outcome, question)

    async def _start(self, ask: _Ask) -> Turn:
        loop = asyncio.get_running_loop()
        turn = Turn(TurnEvents(), loop.create_future())
        turn.outcome.add_done_callback(_consume)
        stored: asyncio.Future[Message] = loop.create_future()
        stored.add_done_callback(_consume)
        task = asyncio.create_task(
            self._run_turn(ask, turn, stored), name=f"turn-{ask.session_id}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # Waiting for the question to be stored is what the client waits on;
        # leaving it (a client gone) cancels this future only, not the turn.
        await stored
        return turn

    # -- one turn --------------------------------------------------------------------

    async def _run_turn(self, ask: _Ask, turn: Turn, stored: asyncio.Future[Message]) -> None:
        try:
            # The message's place in its session's line among every bridge on
            # the database is taken on arrival, before it waits here.
            place = (await self._context(ask.key, ask.session_id)).pk
            async with self._store.turn_lease(place) as lease, self.locks.hold(ask.session_id):
                # Read under the lock: the turn before may have changed the AI
                # session. On a database shared by bridges the cached row may be
                # another bridge's past: the lease hands over the row as it is.
                fresh = await lease.take()
                if fresh is not None:
                    self._remember(fresh)
                session = await self._context(ask.key, ask.session_id)
                if self.inflight >= self._settings.max_inflight:
                    raise Overloaded(f"{self.inflight} turns are already in flight")
                self.inflight += 1
                try:
                    await self._answer(session, ask, turn, stored)
                finally:
                    self.inflight -= 1
        except BaseException as exc:
            # Refused before the question was stored: the client's own answer.
            if not stored.done():
                stored.set_exception(exc if isinstance(exc, Exception) else UpstreamUnavailable(
                    "the bridge is shutting down"
                ))
            if not turn.outcome.done():
                turn.outcome.set_exception(
                    exc if isinstance(exc, Exception) else UpstreamUnavailable("cut off")
                )
            if not isinstance(exc, Exception):
                raise

    async def _answer(
        self, session: ChatSession, ask: _Ask, turn: Turn, stored: asyncio.Future[Message]
    ) -> None:
        tokens = self._tokens(session, ask.max_tokens)
        await self._ai.check_fits(session, ask.content, tokens)
        try:
            question = await self._store.begin_turn(
                session.pk, ask.content, retry_message_pk=ask.retry_message_pk,
                idempotency=ask.idempotency,
            )
        except SessionGone:
            self.forget(session.id)
            raise NotFound("no such session") from None
        turn.question = question
        self._running[question.id] = turn
        # A bridge other than this one may follow the turn (GET .../events).
        self._store.relay_turn(question.pk, turn.events)
        try:
            turn.events.started(question)
            if not stored.done():
                stored.set_result(question)
            await self._complete(session, question, ask.content, tokens, ask.idempotency, turn)
        finally:
            del self._running[question.id]
            self._store.end_relay(question.pk)

    async def _complete(
        self,
        session: ChatSession,
        question: Message,
        content: str,
        tokens: int,
        idempotency: IdempotencyStart | None,
        turn: Turn,
    ) -> None:
        """Everything after the question is stored: the exchange, then the answer or the failure."""
        gate = _ReplyGate(turn.events, self._settings.max_reply_bytes)
        try:
            reply, piece_ends = await self._exchange(session, content, tokens, gate)
            answer = await self._store.finish_turn(
                session.pk, question.pk, reply.text, reply.kind, idempotency,
                usage=reply.usage, piece_ends=piece_ends,
            )
        except BaseException as exc:
            error = self._failure(exc, session)
            # Shielded: a turn cancelled by shutdown still records its failure.
            with contextlib.suppress(Exception):
                await asyncio.shield(
                    self._store.fail_turn(session.pk, question.pk, idempotency, error.code)
                )
            self._metrics.count_turn(error.code)
            log.info("event=turn_failed session=%s outcome=%s", session.id, error.code)
            turn.events.failed(error)
            if not turn.outcome.done():
                turn.outcome.set_exception(error)
            if not isinstance(exc, Exception):
                raise
            return
        self._metrics.count_turn("answered")
        self._metrics.count_ai_session(reply.kind)
        if reply.usage is not None:
            self._metrics.count_prompt_tokens(reply.usage)
        answered = Message(
            question.pk, question.id, question.seq, "user", question.content, "answered",
            question.created_at,
        )
        result = TurnResult(answered, answer, reply.kind)
        turn.events.completed(result.public)
        if not turn.outcome.done():
            turn.outcome.set_result(result)

    def _failure(self, exc: BaseException, session: ChatSession) -> BridgeError:
        """The contract error a failed turn reports."""
        if isinstance(exc, SessionGone):
            # Deleted while the AI server was answering: nothing is left to store into.
            self.forget(session.id)
            return NotFound("the session was deleted during the turn")
        if isinstance(exc, BridgeError):
            return exc
        if isinstance(exc, asyncio.CancelledError):
            return UpstreamUnavailable("the turn was cut off by the bridge shutting down")
        log.error("event=turn_error session=%s error=%s", session.id, type(exc).__name__)
        return UpstreamError(f"the turn failed: {type(exc).__name__}")

    def _tokens(self, session: ChatSession, requested: int | None) -> int:
        # A session keeps the max_tokens it was created with; if the operator
        # has since narrowed the AI server's range, the value is moved into it
        # so the AI server never sees one it rejects.
        wanted = requested if requested is not None else session.max_tokens
        return self._settings.upstream_max_tokens.clamp(wanted)

    async def _exchange(
        self, session: ChatSession, content: str, max_tokens: int, gate: _ReplyGate
    ) -> tuple[Reply, str | None]:
        """Ask the AI server, again after an empty reply; the reply and its pieces' ends."""
        attempts = 1 + self._settings.empty_reply_retries
        kind: AISessionKind | None = None
        context = _TurnContext(self, session, content, max_tokens)
        for attempt in range(1, attempts + 1):
            reply = await self._ai.exchange(context, gate.push)
            if kind is None or _KIND_RANK[reply.kind] > _KIND_RANK[kind]:
                kind = reply.kind
            if reply.text.strip():
                piece_ends = gate.finish(reply.text)
                return dataclasses.replace(reply, text=gate.text, kind=kind), piece_ends
            gate.discard()
            self._metrics.empty_replies.inc()
            log.warning(
                "event=empty_reply session=%s attempt=%d of=%d", session.id, attempt, attempts
            )
        raise UpstreamEmptyReply(f"the AI server answered an empty reply {attempts} times")
