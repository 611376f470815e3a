"""The OpenAI face's responses: one model of a conversation behind both faces (docs/openai-api.md).

A response is a turn of a session: its question and answer are messages of
the line it lives in (``lines.py``), so everything the sessions API promises
holds for it (one turn at a time per line, arrival order, durability, the
AI session or the prompt cache kept warm, recovery, idempotency, streams
that outlive their connection, several bridges). What a response adds is a
row: its id, what it asked, its output message's id, and which question is
its own. Its status is its question's: running, answered (completed, or
incomplete when the reply was cut by its token limit), failed or cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .. import jsoncodec
from ..conversation import Conversations, Turn
from ..conversation.results import TurnOptions, TurnResult
from ..errors import (
    IdempotencyInProgress,
    IdempotencyMismatch,
    NotFound,
    error_from_code,
)
from ..records import ApiKey, Message, ResponseRow
from ..store.base import Store
from ..turn_events import TurnEvents
from .lines import Line, choose_line, plan_turn
from .records import (
    MESSAGE_ID_PREFIX,
    RESPONSE_ID_PREFIX,
    Item,
    ResponseError,
    ResponseRecord,
    ResponseRequest,
    ResponseStatus,
    ResponseUsage,
)

log = logging.getLogger(__name__)

# How long a cancel waits for the cut-off turn to record its end.
CANCEL_WAIT = 5.0


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


def new_ids(prefix: str, count: int) -> list[str]:
    """``count`` ids as ``new_id`` makes them, from one read of the system's randomness."""
    digits = secrets.token_hex(16 * count)
    return [prefix + digits[32 * i : 32 * (i + 1)] for i in range(count)]


def unix_seconds(rfc3339: str) -> int:
    """A stored RFC 3339 UTC time (``2026-12-03T06:09:18.123Z``) as unix seconds."""
    # fromisoformat, not strptime: a quarter of the time, once every response.
    seconds = datetime.fromisoformat(rfc3339[:19]).replace(tzinfo=UTC).timestamp()
    return int(seconds)


@dataclass(frozen=True, slots=True)
class Started:
    """A response a request started or found again: its row, and its turn when it runs here."""

    row: ResponseRow
    turn: Turn | None = None
    line: Line | None = None


class Responses:
    """Creates, finds, cancels and deletes responses; knows the store and the conversation rules."""

    def __init__(
        self,
        store: Store,
        conversations: Conversations,
        model: str,
        max_tokens: int,
        count_response: Callable[[str], None] = lambda status: None,
    ) -> None:
        self._store = store
        self._count_response = count_response
        self._conversations = conversations
        self.model = model
        # When the model was first served (unix seconds), as /v1/models shows it.
        self.started_at = int(time.time())
        self._max_tokens = max_tokens
        self._tasks: set[asyncio.Task[None]] = set()

    # -- creating ----------------------------------------------------------------------------

    async def create(
        self,
        key: ApiKey,
        request: ResponseRequest,
        *,
        idempotency_key: str | None = None,
        fingerprint: str | None = None,
    ) -> Started:
        """Start a response; return once its question is stored (or it is found again)."""
        if idempotency_key is not None:
            assert fingerprint is not None
            found = await self._idempotent(key, idempotency_key, fingerprint, request.stream)
            if found is not None:
                return found
        line, question, row, options = await self._prepare(key, request)
        try:
            turn = await self._conversations.begin(
                key, line.session.id, question, request.max_output_tokens,
                idempotency_key, follow_running=request.stream, fingerprint=fingerprint,
                options=options,
            )
        except BaseException:
            await self._undo(line)
            raise
        if idempotency_key is not None and turn.question is not None:
            mine = await self._store.response_for_question(turn.question.pk)
            if mine is not None and mine.id != row.id:
                # An identical request ran first: this one follows it.
                await self._undo(line)
                return Started(mine, turn)
        turn.outcome.add_done_callback(lambda done: self._settled(done, line, row))
        return Started(row, turn, line)

    async def answer(self, key: ApiKey, request: ResponseRequest) -> ResponseRow:
        """A response answered in the caller's own task: its row as it ended (a failure raises).

        For a request that neither streams, runs in the background nor
        carries an Idempotency-Key, from a caller whose task is not
        cancelled when its client goes away (the web server's handlers): no
        task and no futures of its own (``Conversations.answer_here``).
        """
        line, question, row, options = await self._prepare(key, request)
        try:
            result = await self._conversations.answer_here(
                key, line.session.id, question, request.max_output_tokens, options=options
            )
        except BaseException as exc:
            await self._failed(line, row, exc)
            raise
        finally:
            if line.temporary:
                await self._drop(line)
        self._count_response(result_status(result))
        return answered(row, result)

    async def _prepare(
        self, key: ApiKey, request: ResponseRequest
    ) -> tuple[Line, str, ResponseRow, TurnOptions]:
        """The line a new response goes on, its question, its row and its turn's options."""
        max_tokens = request.max_output_tokens or self._max_tokens
        line = await choose_line(
            self._store, self._conversations.session, key, request, max_tokens
        )
        try:
            plan = await plan_turn(self._store, request, line)
        except BaseException:
            await self._undo(line)
            raise
        # Stored with its question, in the question's transaction: its pk
        # stays unknown here (nothing needs it) and one commit is saved.
        row = self._new_row(key, request, line, len(plan.context))
        options = TurnOptions(
            context=plan.context,
            prompt_prefix=plan.prompt_prefix,
            scenario=plan.scenario,
            fresh_ai_session=plan.fresh_ai_session,
            response=row,
            sampling={
                name: value
                for name, value in (("temperature", request.temperature), ("top_p", request.top_p))
                if value is not None
            },
            trim=request.truncation == "auto",
            # A chain and its branches stay where its cache is (docs/ai-servers.md).
            affinity_key=request.prompt_cache_key or _chain_key(line, row),
        )
        return line, plan.question, row, options

    async def _failed(self, line: Line, row: ResponseRow, error: BaseException) -> None:
        """After a response answered here failed: undone if refused, else counted as stored."""
        with contextlib.suppress(Exception):
            # The row is stored with its question: none, and nothing was stored.
            if await self._store.get_response(row.api_key_id, row.id) is None:
                await self._undo(line)
                return
            if line.claimed is not None:
                await self._store.release_continuation(line.claimed.pk)
            if isinstance(error, asyncio.CancelledError):
                await self._count_end(row)
            else:
                self._count_response(error_status(error))

    def _new_row(
        self, key: ApiKey, request: ResponseRequest, line: Line, context_count: int
    ) -> ResponseRow:
        # The response's id, its output message's, one per input item: one
        # system call for all of them rather than one each.
        response_id, output_id, *item_ids = new_ids("", 2 + len(request.input))
        body = {
            "session_id": line.session.id,
            "chain_root": line.root,
            "conversation_id": line.conversation_id,
            "context_count": context_count,
            "instructions": request.instructions,
            "previous_response_id": request.previous_response_id,
            "input": [
                {"id": MESSAGE_ID_PREFIX + item_id, "role": m.role, "texts": list(m.texts)}
                for item_id, m in zip(item_ids, request.input, strict=True)
            ],
            "metadata": dict(request.metadata),
            "background": request.background,
            "store": request.store,
            "max_output_tokens": request.max_output_tokens,
            "truncation": request.truncation,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "prompt_cache_key": request.prompt_cache_key,
        }
        return ResponseRow(
            0, RESPONSE_ID_PREFIX + response_id, key.id, line.session.pk, int(time.time()),
            self.model, MESSAGE_ID_PREFIX + output_id, jsoncodec.dumps_text(body),
        )

    async def _idempotent(
        self, key: ApiKey, idempotency_key: str, fingerprint: str, stream: bool
    ) -> Started | None:
        """A request with this key seen before: its response (replayed or followed), or None."""
        record = await self._store.get_idempotency(key.id, idempotency_key)
        if record is None or record.state == "failed":
            return None  # tried again as a new response
        if record.fingerprint != fingerprint:
            raise IdempotencyMismatch("this Idempotency-Key was used with another body")
        row = None
        if record.user_message_pk is not None:
            row = await self._store.response_for_question(record.user_message_pk)
        if row is None:
            raise NotFound("the outcome of this Idempotency-Key is no longer stored")
        if record.state == "in_progress" and not stream:
            raise IdempotencyInProgress("the request with this Idempotency-Key is still running")
        return Started(row)

    def _settled(self, outcome: asyncio.Future[Any], line: Line, row: ResponseRow) -> None:
        # A continuation that failed leaves its line as it was: the next one may go on in it.
        failed = outcome.cancelled() or outcome.exception() is not None
        if failed and line.claimed is not None:
            self._spawn(self._store.release_continuation(line.claimed.pk), "release-continuation")
        if outcome.cancelled():
            self._spawn(self._count_end(row), "count-response")
        else:
            # The status the stored response now has, told by the turn's outcome.
            self._count_response(ended_status(outcome))

    async def _count_end(self, row: ResponseRow) -> None:
        with contextlib.suppress(Exception):
            ended = await self._store.get_response(row.api_key_id, row.id)
            if ended is not None:
                self._count_response(status_of(ended, background=False))

    @staticmethod
    def ended(started: Started) -> ResponseRow | None:
        """The row of a response this request started, as its turn answered it; else None.

        What reading it back would give (its question answered, its answer,
        whether the reply was cut), without the reads.
        """
        turn = started.turn
        if started.line is None or turn is None or not turn.outcome.done():
            return None
        if turn.outcome.cancelled() or turn.outcome.exception() is not None:
            return None
        return answered(started.row, turn.outcome.result())

    async def _undo(self, line: Line) -> None:
        """A response refused before its question was stored leaves nothing behind."""
        with contextlib.suppress(Exception):
            if line.claimed is not None:
                await self._store.release_continuation(line.claimed.pk)
            if line.created:
                await self._store.delete_session(line.session.api_key_id, line.session.id)

    async def discard(self, started: Started) -> None:
        """A response that is not stored (``store: false``) goes, once it has been shown."""
        line = started.line
        if line is None or not line.temporary:
            return
        if started.turn is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(started.turn.outcome)
        await self._drop(line)

    async def _drop(self, line: Line) -> None:
        with contextlib.suppress(Exception):
            await self._store.delete_session(line.session.api_key_id, line.session.id)
            await self._conversations.deleted(line.session)

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- reading -----------------------------------------------------------------------------

    async def get(self, key: ApiKey, response_id: str) -> ResponseRow:
        row = await self._store.get_response(key.id, response_id)
        if row is None:
            raise NotFound(f"no response {response_id}")
        return row

    async def events(self, key: ApiKey, row: ResponseRow) -> TurnEvents | None:
        """The turn events of a response from their start; None once its question is deleted.

        (A response is stored with its question, so a stored one always had one.)
        """
        question = row.question
        if question is None:
            return None
        body = jsoncodec.loads_text(row.body)
        return await self._conversations.follow(key, body["session_id"], question.id)

    async def cancel(self, key: ApiKey, response_id: str) -> ResponseRow:
        """Stop a running response (its AI-server call is dropped); an ended one is as it was."""
        row = await self.get(key, response_id)
        if row.question is None or row.question.status != "pending":
            return row
        await self._conversations.cancel_anywhere(row.question)
        deadline = time.monotonic() + CANCEL_WAIT
        while time.monotonic() < deadline:
            row = await self.get(key, response_id)
            if row.question is None or row.question.status != "pending":
                break
            await asyncio.sleep(0.02)  # observed state: the cut-off turn recording its end
        return row

    async def delete(self, key: ApiKey, response_id: str) -> None:
        if not await self._store.delete_response(key.id, response_id):
            raise NotFound(f"no response {response_id}")


def _chain_key(line: Line, row: ResponseRow) -> str | None:
    """A chain's affinity: its first response's id (this one's, when it starts the chain)."""
    if line.conversation_id is not None:
        return None
    return line.root or row.id


def record_of(row: ResponseRow) -> ResponseRecord:
    """The response as the OpenAI face shows it now, from its row, question and answer."""
    body = jsoncodec.loads_text(row.body)
    status = status_of(row, bool(body.get("background")))
    usage = None
    answer: Message | None = row.answer
    if answer is not None and answer.usage is not None:
        usage = ResponseUsage(
            answer.usage.prompt_tokens, answer.usage.cached_tokens, answer.usage.completion_tokens
        )
    error = None
    if status == "failed" and row.question is not None:
        code = row.question.error_code or "upstream_error"
        error = ResponseError(code, error_from_code(code, "").title)
    return ResponseRecord(
        id=row.id,
        api_key_id=row.api_key_id,
        status=status,
        created_at=row.created_at,
        model=row.model,
        output_message_id=row.output_message_id,
        input_items=tuple(
            Item(item["id"], item["role"], tuple(item["texts"])) for item in body["input"]
        ),
        instructions=body.get("instructions"),
        previous_response_id=body.get("previous_response_id"),
        conversation_id=body.get("conversation_id"),
        output_text=answer.content if answer is not None else "",
        usage=usage,
        metadata=body.get("metadata") or {},
        error=error,
        incomplete_reason="max_output_tokens" if status == "incomplete" else None,
        background=bool(body.get("background")),
        store=bool(body.get("store", True)),
        max_output_tokens=body.get("max_output_tokens"),
        truncation=body.get("truncation", "disabled"),
        temperature=body.get("temperature"),
        top_p=body.get("top_p"),
        prompt_cache_key=body.get("prompt_cache_key"),
        completed_at=unix_seconds(answer.created_at) if answer is not None else None,
    )


def answered(row: ResponseRow, result: TurnResult) -> ResponseRow:
    """``row`` as its turn answered it: what reading it back would give, without the reads."""
    return dataclasses.replace(
        row, question=result.user_message, answer=result.reply, incomplete=result.truncated
    )


def ended_status(outcome: asyncio.Future[Any]) -> ResponseStatus:
    """The status of a response whose turn ended with ``outcome`` (not cancelled)."""
    error = outcome.exception()
    return result_status(outcome.result()) if error is None else error_status(error)


def result_status(result: TurnResult) -> ResponseStatus:
    return "incomplete" if result.truncated else "completed"


def error_status(error: BaseException) -> ResponseStatus:
    return "cancelled" if getattr(error, "code", None) == "cancelled" else "failed"


def status_of(row: ResponseRow, background: bool) -> ResponseStatus:
    question = row.question
    if question is None:
        return "queued" if background else "in_progress"
    if question.status == "pending":
        return "in_progress"
    if question.status == "answered":
        return "incomplete" if row.incomplete else "completed"
    return "cancelled" if question.error_code == "cancelled" else "failed"
