"""The PostgreSQL store (asyncpg, one connection pool): the queries.

Every method is one statement where it can be, so one round trip
(``queries.py``). SQLite does the same with triggers; here the store's
statements do it, so the schema has no logic of its own to keep in step.

Each statement commits on its own (autocommit), and PostgreSQL acknowledges a
commit only once its WAL is flushed (``synchronous_commit=on``, the server's
default): an acknowledged answer survives the bridge and the server.
``db_synchronous`` is SQLite's setting and does not apply here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from ...config import Settings
from ...errors import IdempotencyInProgress, StorageUnavailable
from ...records import (
    AISessionKind,
    ApiKey,
    ChatSession,
    ContextMessage,
    HistoryTurn,
    IdempotencyRecord,
    IdempotencyStart,
    Message,
    MessageStatus,
    ResponseRow,
    Role,
    SessionKind,
    Usage,
)
from ..base import DuplicateKeyName, Features, SessionGone
from ..history import group_turns
from ..ids import time_ordered_id
from ..keycache import KeyCache
from . import queries as q
from .coordination import TURN_LEASE, PostgresCoordination
from .pool import CLOSE_TIMEOUT, POOL_SIZE, PoolQueries, create_pool

log = logging.getLogger(__name__)


def _draft(role: Role, content: str, status: MessageStatus) -> Message:
    """A message to store (its pk, seq and time are placeholders until it is)."""
    return Message(0, time_ordered_id(), 0, role, content, status, "")


def _stored(drafts: Sequence[Message], rows: Sequence[asyncpg.Record]) -> list[Message]:
    """``drafts`` as stored by ``insert_messages``, whose rows (pk, seq, time) follow seq order."""
    ordered = sorted(rows, key=lambda row: int(row[1]))
    return [
        dataclasses.replace(draft, pk=pk, seq=seq, created_at=created_at)
        for draft, (pk, seq, created_at) in zip(drafts, ordered, strict=True)
    ]


class PostgresStore(PoolQueries):
    # Any number of bridges may serve one database at once.
    features = Features(shared_between_processes=True)

    def __init__(
        self,
        pool: asyncpg.Pool,
        key_cache_seconds: float = 0.0,
        *,
        dsn: str = "",
        turn_lease: float = TURN_LEASE,
    ) -> None:
        self._pool = pool
        self._keys = KeyCache(key_cache_seconds)
        self.coordination = PostgresCoordination(pool, dsn=dsn, turn_lease=turn_lease)
        # The lease this bridge holds on a session: every write of a turn checks it.
        self._held = self.coordination.ticket_held

    @classmethod
    async def from_settings(cls, target: str, settings: Settings) -> PostgresStore:
        return await cls.open(
            target, key_cache_seconds=settings.key_cache_seconds, turn_lease=settings.turn_lease
        )

    @classmethod
    async def open(
        cls,
        dsn: str,
        key_cache_seconds: float = 0.0,
        pool_size: int = POOL_SIZE,
        turn_lease: float = TURN_LEASE,
    ) -> PostgresStore:
        """Open a pool on a migrated database, and count as a bridge on it.

        The bridge says it is alive every third of ``turn_lease`` and listens
        for sessions given up and for turns other bridges want to follow
        (``coordination.py``).
        """
        pool = await create_pool(dsn, pool_size)
        store = cls(pool, key_cache_seconds, dsn=dsn, turn_lease=turn_lease)
        try:
            await store.coordination.start()
        except BaseException:
            await store.close()
            raise
        return store

    async def close(self) -> None:
        await self.coordination.close()
        try:
            await asyncio.wait_for(self._pool.close(), CLOSE_TIMEOUT)
        except TimeoutError:
            # A connection still busy (the server hung): do not wait for it.
            self._pool.terminate()

    def watch_turns(self, in_flight: Callable[[], int]) -> None:
        """Nothing to read it for: each write is a transaction on a connection of its own."""

    async def ping(self) -> None:
        """Return if the database can take a write now, else raise StorageUnavailable.

        A round trip through the pool (a connection can be had and the server
        answers) that also asks whether this is a standby in recovery, which
        answers reads but refuses every write (a failover not yet followed).
        """
        row = await self._fetchrow("SELECT pg_is_in_recovery()")
        if row is not None and row[0]:
            log.warning("event=storage_unavailable operation=ping reason=read_only_standby")
            raise StorageUnavailable("the database is a read-only standby")

    # -- API keys ---------------------------------------------------------

    async def create_key(self, name: str, token_hash: bytes) -> ApiKey:
        try:
            row = await self._fetchrow(
                "INSERT INTO api_keys (name, token_hash) VALUES ($1, $2)"
                f" RETURNING id, {q.ts('created_at')}",
                name, token_hash,
            )
        except asyncpg.UniqueViolationError as exc:
            raise DuplicateKeyName(name) from exc
        assert row is not None
        return ApiKey(row[0], name, row[1])

    async def list_keys(self) -> list[ApiKey]:
        rows = await self._fetch(f"SELECT {q.KEY_COLUMNS} FROM api_keys ORDER BY id")
        return [ApiKey(*row) for row in rows]

    async def revoke_key(self, name: str) -> bool:
        rows = await self._fetch(
            "UPDATE api_keys SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL"
            " RETURNING id",
            name,
        )
        self._keys.clear()
        return bool(rows)

    async def key_for_token_hash(self, token_hash: bytes) -> ApiKey | None:
        cached = self._keys.get(token_hash)
        if cached is not None:
            return cached
        row = await self._fetchrow(
            f"SELECT {q.KEY_COLUMNS} FROM api_keys WHERE token_hash = $1 AND revoked_at IS NULL",
            token_hash,
        )
        key = None if row is None else ApiKey(*row)
        self._keys.put(token_hash, key)
        return key

    # -- chat sessions ------------------------------------------------------

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
        """A new session with ``items`` as its first (answered) messages: one statement."""
        arrays = q.message_arrays([_draft(item.role, item.content, "answered") for item in items])
        return await self._new_session(
            api_key_id, str(uuid.uuid4()) if session_id is None else session_id, title,
            scenario, max_tokens, kind, metadata, arrays,
        )

    async def _new_session(
        self,
        api_key_id: int,
        session_id: str,
        title: str | None,
        scenario: str,
        max_tokens: int,
        kind: SessionKind,
        metadata: str | None,
        arrays: list[list[Any]],
    ) -> ChatSession:
        count = len(arrays[0])
        row = await self._fetchrow(
            q.CREATE_SESSION,
            session_id, api_key_id, title, scenario, max_tokens, kind, metadata, count, *arrays,
        )
        assert row is not None
        pk, now = row
        return ChatSession(
            pk, session_id, api_key_id, title, scenario, max_tokens, None, count, now, now,
            kind, metadata,
        )

    async def get_session(self, api_key_id: int, session_id: str) -> ChatSession | None:
        row = await self._fetchrow(
            f"SELECT {q.SESSION_COLUMNS} FROM chat_sessions WHERE id = $1 AND api_key_id = $2",
            session_id, api_key_id,
        )
        return None if row is None else ChatSession(*row)

    async def list_sessions(
        self, api_key_id: int, limit: int, before_pk: int | None
    ) -> list[ChatSession]:
        rows = await self._fetch(
            f"SELECT {q.SESSION_COLUMNS} FROM chat_sessions"
            " WHERE api_key_id = $1 AND ($2::bigint IS NULL OR pk < $2) ORDER BY pk DESC LIMIT $3",
            api_key_id, before_pk, limit,
        )
        return [ChatSession(*row) for row in rows]

    async def delete_session(self, api_key_id: int, session_id: str) -> bool:
        rows = await self._fetch(
            "DELETE FROM chat_sessions WHERE id = $1 AND api_key_id = $2 RETURNING pk",
            session_id, api_key_id,
        )
        return bool(rows)

    async def set_metadata(self, session_pk: int, metadata: str) -> None:
        await self._execute(
            "UPDATE chat_sessions SET metadata = $2, updated_at = now() WHERE pk = $1",
            session_pk, metadata,
        )

    async def set_scenario(self, session_pk: int, scenario: str) -> None:
        # The AI session was made with the old scenario: let go of it. Like
        # set_ai_session, only while this store's lease (if any) is the session's.
        await self._execute(
            "UPDATE chat_sessions SET scenario = $2, ai_session_id = NULL"
            " WHERE pk = $1 AND ($3::bigint IS NULL OR turn_ticket = $3)",
            session_pk, scenario, self._held(session_pk),
        )

    async def fork_session(
        self, source: ChatSession, upto_seq: int, scenario: str, max_tokens: int
    ) -> ChatSession:
        """A new chain session with copies of ``source``'s answered messages up to ``upto_seq``.

        The copies' columns are passed on as read (no round trip through
        ``Usage``), so a copy is the same bytes and numbers as its original.
        """
        rows = await self._fetch(
            "SELECT role, content, ai_session, prompt_tokens, cached_tokens, completion_tokens,"
            " piece_ends FROM messages"
            " WHERE session_pk = $1 AND seq <= $2 AND status = 'answered' ORDER BY seq",
            source.pk, upto_seq,
        )
        role, content, ai_session, prompt, cached, completion, piece_ends = (
            [row[column] for row in rows] for column in range(7)
        )
        arrays = [
            [time_ordered_id() for _ in rows], role, content, ["answered"] * len(rows),
            ai_session, prompt, cached, completion, piece_ends,
        ]
        return await self._new_session(
            source.api_key_id, str(uuid.uuid4()), None, scenario, max_tokens, "chain", None,
            arrays,
        )

    async def add_items(
        self, session_pk: int, items: Sequence[ContextMessage]
    ) -> list[Message]:
        """Append ``items`` as answered messages: one statement, under the lease if held."""
        if not items:
            return []
        drafts = [_draft(item.role, item.content, "answered") for item in items]
        rows = await self._fetch(
            q.STORE_MESSAGES, session_pk, len(drafts), self._held(session_pk),
            *q.message_arrays(drafts),
        )
        if not rows:
            await self._not_stored(session_pk, None)
        return _stored(drafts, rows)

    async def delete_message(self, session_pk: int, message_id: str) -> bool:
        """Delete the message; the session counts one message fewer (its last seq stays)."""
        count = await self._fetchval(
            "WITH gone AS (DELETE FROM messages WHERE session_pk = $1 AND id = $2 RETURNING pk),"
            " counted AS (UPDATE chat_sessions SET message_count = message_count - 1"
            "             FROM gone WHERE chat_sessions.pk = $1)"
            " SELECT count(*) FROM gone",
            session_pk, message_id,
        )
        return bool(count)

    async def answered_since(self, session_pk: int, from_seq: int) -> list[Message]:
        rows = await self._fetch(
            f"SELECT {q.MESSAGE_COLUMNS} FROM messages"
            " WHERE session_pk = $1 AND seq >= $2 AND status = 'answered' ORDER BY seq",
            session_pk, from_seq,
        )
        return [q.message(row) for row in rows]

    async def added_since_answer(self, session_pk: int, within: int) -> list[Message]:
        rows = await self._fetch(
            "WITH low AS (SELECT last_seq - $2 AS seq FROM chat_sessions WHERE pk = $1)"
            f" SELECT {q.MESSAGE_COLUMNS} FROM messages WHERE session_pk = $1"
            " AND seq > (SELECT seq FROM low) AND status = 'answered' AND seq > coalesce(("
            "  SELECT seq FROM messages WHERE session_pk = $1 AND seq > (SELECT seq FROM low)"
            "  AND status = 'answered' AND role = 'assistant' AND ai_session IS NOT NULL"
            "  ORDER BY seq DESC LIMIT 1), 0) ORDER BY seq",
            session_pk, within,
        )
        return [q.message(row) for row in rows]

    # -- messages ---------------------------------------------------------------

    async def list_messages(
        self, session_pk: int, limit: int, after_seq: int | None
    ) -> list[Message]:
        rows = await self._fetch(
            f"SELECT {q.MESSAGE_COLUMNS} FROM messages"
            " WHERE session_pk = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            session_pk, after_seq or 0, limit,
        )
        return [q.message(row) for row in rows]

    async def get_message(self, session_pk: int, message_pk: int) -> Message | None:
        row = await self._fetchrow(
            f"SELECT {q.MESSAGE_COLUMNS} FROM messages WHERE session_pk = $1 AND pk = $2",
            session_pk, message_pk,
        )
        return None if row is None else q.message(row)

    async def get_message_by_id(self, session_pk: int, message_id: str) -> Message | None:
        row = await self._fetchrow(
            f"SELECT {q.MESSAGE_COLUMNS} FROM messages WHERE session_pk = $1 AND id = $2",
            session_pk, message_id,
        )
        return None if row is None else q.message(row)

    async def answer_to(self, session_pk: int, user_seq: int) -> Message | None:
        row = await self._fetchrow(
            f"SELECT {q.MESSAGE_COLUMNS} FROM messages"
            " WHERE session_pk = $1 AND seq = $2 AND role = 'assistant'",
            session_pk, user_seq + 1,
        )
        return None if row is None else q.message(row)

    async def history(self, session_pk: int, from_seq: int = 0) -> list[HistoryTurn]:
        """The answered turns whose first message is at ``from_seq`` or later, oldest first."""
        rows = await self._fetch(
            "SELECT seq, role, content, prompt_tokens, cached_tokens, completion_tokens"
            " FROM messages WHERE session_pk = $1 AND seq >= $2 AND status = 'answered'"
            " ORDER BY seq",
            session_pk, from_seq,
        )
        return group_turns(
            (seq, role, content, q.usage(prompt, cached, completion))
            for seq, role, content, prompt, cached, completion in rows
        )

    # -- turns ----------------------------------------------------------------------

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
        """Store the user message as pending (or take a failed one up again).

        A new question alone is one statement; with context before it, its
        response, or a failed question taken up again, one transaction.
        """
        if retry_message_pk is not None or context or response is not None:
            return await self._begin_in_transaction(
                session_pk, content, retry_message_pk, idempotency, context, response
            )
        message_id = time_ordered_id()
        args: list[Any] = [
            session_pk, message_id, "user", content, "pending", None, None, None, None, None,
            self._held(session_pk),
        ]
        if idempotency is None:
            sql = q.STORE_MESSAGE.format(guard="")
        else:
            sql = q.STORE_MESSAGE.format(guard=q.KEY_FREE) + q.RECORD_IDEMPOTENCY
            args += [
                idempotency.api_key_id, idempotency.key, idempotency.fingerprint,
                idempotency.created_at,
            ]
        row = await self._fetchrow(sql + q.STORED, *args)
        if row is None:
            await self._not_stored(session_pk, idempotency)
        assert row is not None
        pk, seq, created_at = row
        return Message(pk, message_id, seq, "user", content, "pending", created_at)

    async def _begin_in_transaction(
        self,
        session_pk: int,
        content: str,
        retry_message_pk: int | None,
        idempotency: IdempotencyStart | None,
        context: Sequence[ContextMessage],
        response: ResponseRow | None,
    ) -> Message:
        """``begin_turn`` as one transaction holding the session row.

        The context messages (answered) come first, then the question: a new
        one, or a failed one taken up again (``retry_message_pk``). The
        idempotency record and the response the question asks are written in
        the same transaction, so none of it is stored without the rest.
        """
        drafts = [_draft(item.role, item.content, "answered") for item in context]
        if retry_message_pk is None:
            drafts.append(_draft("user", content, "pending"))
        ticket = self._held(session_pk)
        async with self._transaction() as connection:
            held = await connection.fetchrow(
                "SELECT last_seq, turn_ticket FROM chat_sessions WHERE pk = $1 FOR UPDATE",
                session_pk,
            )
            if held is None:
                raise SessionGone(f"chat session {session_pk} is gone")
            if ticket is not None and held[1] != ticket:
                raise StorageUnavailable("this bridge lost its lease on the session")
            last_seq = int(held[0])
            stored: list[Message] = []
            if drafts:
                rows = await connection.fetch(
                    q.STORE_MESSAGES, session_pk, len(drafts), None, *q.message_arrays(drafts)
                )
                stored = _stored(drafts, rows)
                last_seq += len(drafts)
            if retry_message_pk is None:
                question = stored[-1]
            else:
                question = await self._retake(connection, session_pk, retry_message_pk, last_seq)
            if idempotency is not None:
                # Taken only if no other request holds the key: a concurrent
                # insert of the same key is waited for, then seen.
                recorded = await connection.fetchval(
                    "INSERT INTO idempotency_keys (api_key_id, key, fingerprint, session_pk,"
                    " user_message_pk, state, created_at)"
                    " VALUES ($1, $2, $3, $4, $5, 'in_progress', to_timestamp($6))"
                    " ON CONFLICT (api_key_id, key) DO UPDATE SET state = 'in_progress',"
                    " user_message_pk = excluded.user_message_pk"
                    " WHERE idempotency_keys.state = 'failed' RETURNING true",
                    idempotency.api_key_id, idempotency.key, idempotency.fingerprint,
                    session_pk, question.pk, idempotency.created_at,
                )
                if recorded is None:
                    raise IdempotencyInProgress(
                        "the request with this Idempotency-Key was already made"
                    )
            if response is not None:
                await connection.execute(
                    "INSERT INTO responses (id, api_key_id, session_pk, question_pk, created_at,"
                    " model, output_message_id, body, continued, incomplete)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                    response.id, response.api_key_id, response.session_pk, question.pk,
                    response.created_at, response.model, response.output_message_id,
                    response.body, response.continued, response.incomplete,
                )
        return question

    @staticmethod
    async def _retake(
        connection: PoolConnectionProxy[asyncpg.Record],
        session_pk: int,
        message_pk: int,
        last_seq: int,
    ) -> Message:
        # A retried question keeps its row; it moves to the end of the
        # conversation when other messages came after it, so that its answer
        # is stored right after it (a question and its answer are consecutive).
        row = await connection.fetchrow(
            "UPDATE messages SET status = 'pending', error_code = NULL,"
            " seq = CASE WHEN seq = $3 THEN seq ELSE $3 + 1 END"
            f" WHERE pk = $1 AND session_pk = $2 RETURNING {q.MESSAGE_COLUMNS}",
            message_pk, session_pk, last_seq,
        )
        if row is None:
            raise SessionGone(f"chat session {session_pk} is gone")
        message = q.message(row)
        await connection.execute(
            "UPDATE chat_sessions SET last_seq = GREATEST(last_seq, $2), updated_at = now()"
            " WHERE pk = $1",
            session_pk, message.seq,
        )
        return message

    async def _not_stored(self, session_pk: int, idempotency: IdempotencyStart | None) -> None:
        """Raise why a message was not stored (its statement stored nothing)."""
        row = await self._fetchrow(
            "SELECT turn_ticket FROM chat_sessions WHERE pk = $1", session_pk
        )
        if row is None:
            raise SessionGone(f"chat session {session_pk} is gone")
        ticket = self._held(session_pk)
        if ticket is not None and row[0] != ticket:
            raise StorageUnavailable("this bridge lost its lease on the session")
        if idempotency is not None:
            raise IdempotencyInProgress("the request with this Idempotency-Key was already made")
        raise SessionGone(f"chat session {session_pk} took no message")

    async def set_ai_session(self, session_pk: int, ai_session_id: str) -> None:
        # Only while this store's lease (if it holds one) is still the session's.
        await self._execute(
            "UPDATE chat_sessions SET ai_session_id = $2"
            " WHERE pk = $1 AND ($3::bigint IS NULL OR turn_ticket = $3)",
            session_pk, ai_session_id, self._held(session_pk),
        )

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
        """Store the answer; the same statement marks its question answered.

        ``truncated``: the same statement marks the question's response incomplete.
        """
        message_id = time_ordered_id()
        args: list[Any] = [
            session_pk, message_id, "assistant", reply, "answered", kind,
            None if usage is None else usage.prompt_tokens,
            None if usage is None else usage.cached_tokens,
            None if usage is None else usage.completion_tokens,
            piece_ends,
            self._held(session_pk),
        ]
        sql = q.STORE_MESSAGE.format(guard="") + q.ANSWER_QUESTION
        if idempotency is not None:
            sql += q.IDEMPOTENCY_SUCCEEDED
            args += [idempotency.api_key_id, idempotency.key]
        if truncated:
            args.append(user_message_pk)
            sql += q.RESPONSE_INCOMPLETE.format(question=len(args))
        row = await self._fetchrow(sql + q.STORED, *args)
        if row is None:
            await self._not_stored(session_pk, None)
        assert row is not None
        pk, seq, created_at = row
        return Message(
            pk, message_id, seq, "assistant", reply, "answered", created_at, kind, usage,
            None, piece_ends,
        )

    async def fail_turn(
        self,
        session_pk: int,
        user_message_pk: int,
        idempotency: IdempotencyStart | None = None,
        error_code: str | None = None,
        context_count: int = 0,
    ) -> None:
        """Fail the pending question and the ``context_count`` messages just before it."""
        sql = (
            "WITH failed AS (UPDATE messages SET status = 'failed', error_code = $2"
            " WHERE pk = $1 AND status = 'pending' RETURNING session_pk, seq)"
        )
        args: list[Any] = [user_message_pk, error_code]
        if context_count:
            # The context the question brought goes with it.
            args.append(context_count)
            sql += (
                ", context AS (UPDATE messages AS m SET status = 'failed' FROM failed"
                " WHERE m.session_pk = failed.session_pk"
                " AND m.seq >= failed.seq - $3::integer AND m.seq < failed.seq)"
            )
        if idempotency is None:
            sql += " SELECT count(*) FROM failed"
        else:
            args += [idempotency.api_key_id, idempotency.key]
            sql += (
                " UPDATE idempotency_keys SET state = 'failed'"
                f" WHERE api_key_id = ${len(args) - 1} AND key = ${len(args)}"
            )
        await self._execute(sql, *args)

    # -- responses of the OpenAI face ------------------------------------------------------

    async def get_response(self, api_key_id: int, response_id: str) -> ResponseRow | None:
        """The response with its question and answer as they are now: one statement."""
        row = await self._fetchrow(
            q.SELECT_RESPONSE + " WHERE r.id = $1 AND r.api_key_id = $2", response_id, api_key_id
        )
        return None if row is None else q.response(row)

    async def response_for_question(self, question_pk: int) -> ResponseRow | None:
        row = await self._fetchrow(
            q.SELECT_RESPONSE + " WHERE r.question_pk = $1 ORDER BY r.pk LIMIT 1", question_pk
        )
        return None if row is None else q.response(row)

    async def delete_response(self, api_key_id: int, response_id: str) -> bool:
        rows = await self._fetch(
            "DELETE FROM responses WHERE id = $1 AND api_key_id = $2 RETURNING pk",
            response_id, api_key_id,
        )
        return bool(rows)

    async def claim_continuation(self, response_pk: int) -> bool:
        rows = await self._fetch(
            "UPDATE responses SET continued = true WHERE pk = $1 AND NOT continued RETURNING pk",
            response_pk,
        )
        return bool(rows)

    async def release_continuation(self, response_pk: int) -> None:
        await self._execute("UPDATE responses SET continued = false WHERE pk = $1", response_pk)

    # -- idempotency and crash recovery --------------------------------------------------

    async def get_idempotency(self, api_key_id: int, key: str) -> IdempotencyRecord | None:
        row = await self._fetchrow(
            "SELECT fingerprint, state, user_message_pk, ai_session FROM idempotency_keys"
            " WHERE api_key_id = $1 AND key = $2",
            api_key_id, key,
        )
        return None if row is None else IdempotencyRecord(*row)

    async def purge_idempotency(self, older_than: float) -> int:
        status = await self._execute(
            "DELETE FROM idempotency_keys WHERE created_at < to_timestamp($1)"
            " AND state <> 'in_progress'",
            older_than,
        )
        results = await self._execute(
            "DELETE FROM idempotent_results WHERE created_at < to_timestamp($1)", older_than
        )
        return int(status.rsplit(" ", 1)[-1]) + int(results.rsplit(" ", 1)[-1])

    async def get_result(self, api_key_id: int, key: str) -> tuple[str, str] | None:
        row = await self._fetchrow(
            "SELECT fingerprint, body FROM idempotent_results WHERE api_key_id = $1 AND key = $2",
            api_key_id, key,
        )
        return None if row is None else (row[0], row[1])

    async def put_result(self, api_key_id: int, key: str, fingerprint: str, body: str) -> bool:
        row = await self._fetchrow(
            "INSERT INTO idempotent_results (api_key_id, key, fingerprint, body)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING key",
            api_key_id, key, fingerprint, body,
        )
        return row is not None

    async def fail_pending_turns(self) -> int:
        """Fail the questions no turn will answer any more; return how many.

        Those of sessions held by a bridge that is no longer alive, or by this
        one (at shutdown, past the grace), and those left pending by a turn
        whose failure could not be written. Never another live bridge's: a
        bridge starting does not cut off the turns running on the others.
        """
        swept = await self.coordination.sweep(mine=True)
        # A pending question is always its session's last message. Once per
        # start and stop, so a pass over the sessions is affordable.
        row = await self._fetchrow(
            "WITH failed AS (UPDATE messages SET status = 'failed' WHERE status = 'pending'"
            " AND (session_pk, seq) IN (SELECT pk, last_seq FROM chat_sessions"
            "                            WHERE turn_owner IS NULL) RETURNING pk),"
            " abandoned AS (UPDATE idempotency_keys SET state = 'failed' FROM failed"
            " WHERE user_message_pk = failed.pk AND state = 'in_progress')"
            " SELECT count(*) FROM failed"
        )
        assert row is not None
        return swept + int(row[0])

