"""The conversation service: a turn from arrival to answer, free of HTTP and of any protocol.

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
its events (``following.py``) while it runs. A plain turn that nobody else
waits on may instead run in its caller's task (``answer_here``), for a caller
that is never cancelled by its client leaving.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Coroutine
from typing import Any

from ..errors import (
    BridgeError,
    Cancelled,
    IdempotencyInProgress,
    IdempotencyMismatch,
    NotFound,
    Overloaded,
    UpstreamEmptyReply,
    UpstreamError,
    UpstreamUnavailable,
)
from ..records import AISessionKind, ApiKey, ChatSession, IdempotencyStart, Message
from ..store.base import SessionGone, Store
from ..turn_events import TurnEvents
from ..upstream.base import AIServer, Reply
from .following import Followers
from .idempotency import RunningKeys, request_fingerprint
from .locks import SessionLocks
from .reply_gate import ReplyGate
from .results import NO_OPTIONS, Ask, Turn, TurnOptions, TurnResult, consume
from .rules import Limits, TurnMetrics
from .session_rows import SessionRows
from .turn_context import TurnContext

log = logging.getLogger(__name__)

# Which kind a turn reports when its attempts differ (an empty reply retried).
_KIND_RANK: dict[AISessionKind, int] = {"reused": 0, "recovered": 1, "created": 2}


class Conversations:
    """Answers messages; knows the store, the AI server and the lock registry, not HTTP."""

    def __init__(
        self,
        store: Store,
        ai_server: AIServer,
        limits: Limits,
        metrics: TurnMetrics,
    ) -> None:
        self._store = store
        self._coordination = store.coordination
        self._ai = ai_server
        self._limits = limits
        self._metrics = metrics
        self.locks = SessionLocks(limits.session_queue)
        self.inflight = 0
        # Idempotency keys being answered right now: a duplicate is turned
        # away (or follows) before it queues.
        self._running_keys = RunningKeys()
        # Turns running now, by their question's id, for followers.
        self._running: dict[str, Turn] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Callers' tasks answering a turn themselves (answer_here), and their turns.
        self._here: dict[asyncio.Task[Any], Turn] = {}
        self._stopping = False
        self._rows = SessionRows(store)
        self._followers = Followers(store, self._running, self._spawn)
        self._coordination.on_cancel(self._cancel_by_pk)
        # Every turn holds its session's lock entry while it runs or waits.
        store.watch_turns(self.locks.__len__)

    # -- the session row cache ---------------------------------------------------------

    async def session(self, key: ApiKey, session_id: str) -> ChatSession:
        """The key's session as its turns see it: its cached row, else read (NotFound if none).

        Right for what turns change (the AI session, the scenario); its
        counters may lag behind the database.
        """
        return await self._rows.get(key, session_id)

    def forget(self, session_id: str) -> None:
        """Drop a deleted session's cached row."""
        self._rows.forget(session_id)

    async def deleted(self, session: ChatSession) -> None:
        """A session was deleted: forget its row, and let the adapter drop what it keeps."""
        self.forget(session.id)
        try:
            await self._ai.forget(session)
        except Exception as exc:  # cleaning up must not fail the delete
            log.warning("event=forget_failed session=%s error=%s", session.id, exc)

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _cancel_by_pk(self, question_pk: int) -> bool:
        for question_id, turn in list(self._running.items()):
            if turn.question is not None and turn.question.pk == question_pk:
                return self.cancel(question_id)
        return False

    async def cancel_anywhere(self, question: Message) -> None:
        """Cut off the turn of ``question`` here, or ask the bridge that runs it."""
        if not self.cancel(question.id):
            await self._coordination.request_cancel(question.pk)

    def cancel(self, question_id: str) -> bool:
        """Cut off the turn of question ``question_id`` if it runs here; its failure is "cancelled".

        Its AI-server call is dropped; what it brought adds nothing to its
        conversation (a failed question and its context are left out).
        """
        turn = self._running.get(question_id)
        if turn is None or turn.task is None or turn.events.ended:
            return False
        turn.cancelled = True
        turn.task.cancel()
        return True

    # -- lifetime ------------------------------------------------------------------------

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no turn runs or waits, at most ``timeout`` seconds; say whether it did."""
        deadline = time.monotonic() + timeout
        while self._busy() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return not self._busy()

    def _busy(self) -> bool:
        return bool(len(self.locks) or self._tasks or self._here)

    async def stop(self) -> None:
        """Cut off the turns still running (shutdown); each records its failure, ends its events."""
        self._stopping = True
        tasks = list(self._tasks)
        here = list(self._here.items())
        for task in [*tasks, *(task for task, _ in here)]:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if here:
            # Until each turn answered in its caller's task has recorded its
            # failure: not until the caller is done (it still writes its answer
            # to a client that may not read it).
            await asyncio.wait([turn.outcome for _, turn in here])

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
        if idempotency_key is None:
            # Nothing to wait for but the outcome (a refusal before the question
            # is stored is its outcome too): no wait for the question alone.
            turn = self._launch(Ask(key, session_id, content, max_tokens), None)
        else:
            turn = await self.begin(key, session_id, content, max_tokens, idempotency_key)
        # Shielded: a client that goes away does not stop the turn, nor settle
        # its outcome (which others may wait on: its Idempotency-Key, say).
        return await asyncio.shield(turn.outcome)

    async def answer_here(
        self,
        key: ApiKey,
        session_id: str,
        content: str,
        max_tokens: int | None,
        *,
        options: TurnOptions = NO_OPTIONS,
    ) -> TurnResult:
        """Answer one message in the caller's own task: no task, no wait on another.

        For a caller whose task is not cancelled when its client goes away
        (the web server's request handlers are not: ``web/api.py``), so the
        turn is still not the request's to stop. Cancelling the task does
        what :meth:`cancel` and :meth:`stop` do to any turn: the turn records
        its failure, and the failure is raised here. Anyone may follow the
        turn as they follow one of :meth:`send`.
        """
        task = asyncio.current_task()
        assert task is not None
        turn = Turn(TurnEvents(), asyncio.get_running_loop().create_future(), task=task)
        self._here[task] = turn
        try:
            await self._run_turn(
                Ask(key, session_id, content, max_tokens, options=options), turn, None
            )
        except asyncio.CancelledError:
            # Cut off by a client's cancel or by the shutdown: the turn has
            # recorded its failure, which is this caller's answer. Any other
            # cancellation is not the service's to take back.
            if not turn.outcome.done():
                raise
            if not (turn.cancelled or self._stopping):
                consume(turn.outcome)  # the failure is recorded; nobody is left to tell
                raise
            task.uncancel()
        finally:
            del self._here[task]
        return turn.outcome.result()

    async def begin(
        self,
        key: ApiKey,
        session_id: str,
        content: str,
        max_tokens: int | None,
        idempotency_key: str | None = None,
        *,
        follow_running: bool = False,
        fingerprint: str | None = None,
        options: TurnOptions = NO_OPTIONS,
    ) -> Turn:
        """Start a turn and return it once its question is stored.

        Whatever refuses the message before its question is stored raises
        here. ``follow_running``: an idempotent retry of a turn still running
        follows it instead of being refused (streaming clients).
        ``fingerprint``: of the request as its face received it (default: the
        session, the message and its max_tokens).
        """
        if idempotency_key is None:
            return await self._start(Ask(key, session_id, content, max_tokens, options=options))
        if fingerprint is None:
            fingerprint = request_fingerprint(session_id, content, max_tokens)
        slot = (key.id, idempotency_key)
        running = self._running_keys.get(slot)
        if running is not None:
            if running[0] != fingerprint:
                raise IdempotencyMismatch("this Idempotency-Key was used with another body")
            if not follow_running:
                raise IdempotencyInProgress(
                    "the request with this Idempotency-Key is still running"
                )
            return await asyncio.shield(running[1])
        starting = self._running_keys.claim(slot, fingerprint)

        def release(_: object = None) -> None:
            self._running_keys.release(slot, starting)

        try:
            turn = await self._begin_idempotent(
                key, session_id, content, max_tokens, idempotency_key, fingerprint,
                follow_running, options,
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
        options: TurnOptions,
    ) -> Turn:
        record = await self._store.get_idempotency(key.id, idempotency_key)
        retry_message_pk = None
        if record is not None:
            if record.fingerprint != fingerprint:
                raise IdempotencyMismatch("this Idempotency-Key was used with another body")
            if record.state == "succeeded":
                return await self._followers.replay(key, session_id, record)
            if record.state == "in_progress":
                # Being answered by another bridge on this database (one here
                # would be among the running keys): refused, or followed there.
                if not follow_running:
                    raise IdempotencyInProgress(
                        "the request with this Idempotency-Key is still running"
                    )
                return await self._followers.elsewhere(key, session_id, idempotency_key, record)
            # A failed attempt is tried again on the same question row (a
            # response is a new one, in a line of its own choosing).
            if options.response is None:
                retry_message_pk = record.user_message_pk
        idempotency = IdempotencyStart(key.id, idempotency_key, fingerprint, time.time())
        return await self._start(
            Ask(key, session_id, content, max_tokens, idempotency, retry_message_pk, options)
        )

    async def follow(self, key: ApiKey, session_id: str, message_id: str) -> TurnEvents:
        """The events of the turn of question ``message_id``: live while it runs, else stored."""
        return await self._followers.follow(key, session_id, message_id)

    async def _start(self, ask: Ask) -> Turn:
        stored: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        stored.add_done_callback(consume)
        turn = self._launch(ask, stored)
        # Waiting for the question to be stored is what the client waits on;
        # leaving it (a client gone) cancels this future only, not the turn.
        await stored
        return turn

    def _launch(self, ask: Ask, stored: asyncio.Future[Message] | None) -> Turn:
        """The turn of ``ask``, started as a task of its own; ``stored`` is told its question."""
        turn = Turn(TurnEvents(), asyncio.get_running_loop().create_future())
        turn.outcome.add_done_callback(consume)
        turn.task = self._spawn(self._run_turn(ask, turn, stored), f"turn-{ask.session_id}")
        return turn

    # -- one turn --------------------------------------------------------------------

    async def _run_turn(
        self, ask: Ask, turn: Turn, stored: asyncio.Future[Message] | None
    ) -> None:
        try:
            # The message's place in its session's line among every bridge on
            # the database is taken on arrival, before it waits here.
            place = (await self._rows.get(ask.key, ask.session_id)).pk
            async with (
                self._coordination.turn_lease(place) as lease,
                self.locks.hold(ask.session_id),
            ):
                # Read under the lock: the turn before may have changed the AI
                # session. On a database shared by bridges the cached row may be
                # another bridge's past: the lease hands over the row as it is.
                fresh = await lease.take()
                if fresh is not None:
                    self._rows.remember(fresh)
                session = await self._rows.get(ask.key, ask.session_id)
                if self.inflight >= self._limits.max_inflight:
                    raise Overloaded(f"{self.inflight} turns are already in flight")
                self.inflight += 1
                try:
                    await self._answer(session, ask, turn, stored)
                finally:
                    self.inflight -= 1
        except BaseException as exc:
            # Refused before the question was stored: the client's own answer.
            if stored is not None and not stored.done():
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
        self, session: ChatSession, ask: Ask, turn: Turn, stored: asyncio.Future[Message] | None
    ) -> None:
        options = ask.options
        if options.scenario is not None and (
            options.fresh_ai_session or options.scenario != session.scenario
        ):
            # Under the session's lock: no turn of it runs. The AI session made
            # with the old scenario (or without this context) is let go.
            await self._store.set_scenario(session.pk, options.scenario)
            session = dataclasses.replace(
                session, scenario=options.scenario, ai_session_id=None
            )
            self._rows.remember(session)
        tokens = self._tokens(session, ask.max_tokens)
        await self._ai.check_fits(session, options.prompt_prefix + ask.content, tokens)
        try:
            question = await self._store.begin_turn(
                session.pk, ask.content, retry_message_pk=ask.retry_message_pk,
                idempotency=ask.idempotency, context=options.context,
                response=options.response,
            )
        except SessionGone:
            self.forget(session.id)
            raise NotFound("no such session") from None
        turn.question = question
        self._running[question.id] = turn
        # A bridge other than this one may follow the turn (GET .../events).
        self._coordination.relay_turn(question.pk, turn.events)
        try:
            turn.events.started(question)
            if stored is not None and not stored.done():
                stored.set_result(question)
            await self._complete(session, question, ask, tokens, turn)
        finally:
            del self._running[question.id]
            self._coordination.end_relay(question.pk)

    async def _complete(
        self,
        session: ChatSession,
        question: Message,
        ask: Ask,
        tokens: int,
        turn: Turn,
    ) -> None:
        """Everything after the question is stored: the exchange, then the answer or the failure."""
        gate = ReplyGate(turn.events, self._limits.max_reply_bytes)
        idempotency = ask.idempotency
        try:
            reply, piece_ends = await self._exchange(session, ask, tokens, gate)
            answer = await self._store.finish_turn(
                session.pk, question.pk, reply.text, reply.kind, idempotency,
                usage=reply.usage, piece_ends=piece_ends, truncated=reply.truncated,
            )
        except BaseException as exc:
            error = self._failure(exc, session, turn)
            # Shielded: a turn cancelled by shutdown still records its failure.
            with contextlib.suppress(Exception):
                await asyncio.shield(self._store.fail_turn(
                    session.pk, question.pk, idempotency, error.code,
                    context_count=len(ask.options.context),
                ))
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
        result = TurnResult(answered, answer, reply.kind, reply.truncated)
        turn.events.completed(result.public)
        if not turn.outcome.done():
            turn.outcome.set_result(result)

    def _failure(self, exc: BaseException, session: ChatSession, turn: Turn) -> BridgeError:
        """The error a failed turn reports (docs/api.md)."""
        if turn.cancelled:
            return Cancelled("the turn was cancelled")
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
        return self._limits.upstream_max_tokens.clamp(wanted)

    async def _exchange(
        self, session: ChatSession, ask: Ask, max_tokens: int, gate: ReplyGate
    ) -> tuple[Reply, str | None]:
        """Ask the AI server, again after an empty reply; the reply and its pieces' ends."""
        attempts = 1 + self._limits.empty_reply_retries
        kind: AISessionKind | None = None
        context = TurnContext(
            self._store, self._rows, session, ask.content, max_tokens, ask.options,
            gate.withdraw,
        )
        for attempt in range(1, attempts + 1):
            reply = await self._ai.exchange(context, gate.push)
            if kind is None or _KIND_RANK[reply.kind] > _KIND_RANK[kind]:
                kind = reply.kind
            if reply.text.strip():
                piece_ends = gate.finish(reply.text)
                if gate.text == reply.text and kind == reply.kind:
                    return reply, piece_ends  # as it came: no copy (the usual turn)
                return dataclasses.replace(reply, text=gate.text, kind=kind), piece_ends
            gate.discard()
            self._metrics.count_empty_reply()
            log.warning(
                "event=empty_reply session=%s attempt=%d of=%d", session.id, attempt, attempts
            )
        raise UpstreamEmptyReply(f"the AI server answered an empty reply {attempts} times")
