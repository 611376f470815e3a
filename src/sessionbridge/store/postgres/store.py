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
import logging
import uuid
from typing import Any

import asyncpg

from ...config import Settings
from ...errors import IdempotencyInProgress, StorageUnavailable
from ...records import (
    AISessionKind,
    ApiKey,
    ChatSession,
    HistoryTurn,
    IdempotencyRecord,
    IdempotencyStart,
    Message,
    Usage,
)
from ..base import DuplicateKeyName, Features, SessionGone
from ..ids import time_ordered_id
from ..keycache import KeyCache
from . import queries as q
from .coordination import TURN_LEASE, PostgresCoordination
from .pool import CLOSE_TIMEOUT, POOL_SIZE, PoolQueries, create_pool

log = logging.getLogger(__name__)


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
        self, api_key_id: int, title: str | None, scenario: str, max_tokens: int
    ) -> ChatSession:
        session_id = str(uuid.uuid4())
        row = await self._fetchrow(
            "INSERT INTO chat_sessions (id, api_key_id, title, scenario, max_tokens)"
            f" VALUES ($1, $2, $3, $4, $5) RETURNING pk, {q.ts('created_at')}",
            session_id, api_key_id, title, scenario, max_tokens,
        )
        assert row is not None
        pk, now = row
        return ChatSession(
            pk, session_id, api_key_id, title, scenario, max_tokens, None, 0, now, now
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
        """The answered turns whose question is at ``from_seq`` or later, oldest first."""
        rows = await self._fetch(
            "SELECT q.seq, q.content, a.content, a.prompt_tokens, a.cached_tokens,"
            " a.completion_tokens FROM messages AS q"
            " JOIN messages AS a ON a.session_pk = q.session_pk AND a.seq = q.seq + 1"
            " WHERE q.session_pk = $1 AND q.seq >= $2 AND q.role = 'user'"
            " AND q.status = 'answered' AND a.role = 'assistant' ORDER BY q.seq",
            session_pk, from_seq,
        )
        return [
            HistoryTurn(seq, user, assistant, q.usage(prompt, cached, completion))
            for seq, user, assistant, prompt, cached, completion in rows
        ]

    # -- turns ----------------------------------------------------------------------

    async def begin_turn(
        self,
        session_pk: int,
        content: str,
        *,
        retry_message_pk: int | None = None,
        idempotency: IdempotencyStart | None = None,
    ) -> Message:
        """Store the user message as pending (or take a failed one up again)."""
        if retry_message_pk is not None:
            return await self._retake(session_pk, retry_message_pk, idempotency)
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

    async def _retake(
        self, session_pk: int, message_pk: int, idempotency: IdempotencyStart | None
    ) -> Message:
        # A retried question keeps its row; it moves to the end of the
        # conversation when other messages came after it, so that its answer
        # is stored right after it (a question and its answer are consecutive).
        async with self._transaction() as connection:
            held = await connection.fetchrow(
                "SELECT last_seq, turn_ticket FROM chat_sessions WHERE pk = $1 FOR UPDATE",
                session_pk,
            )
            last_seq = None if held is None else held[0]
            ticket = self._held(session_pk)
            if held is not None and ticket is not None and held[1] != ticket:
                raise StorageUnavailable("this bridge lost its lease on the session")
            if idempotency is not None:
                state = await connection.fetchval(
                    "SELECT state FROM idempotency_keys WHERE api_key_id = $1 AND key = $2"
                    " FOR UPDATE",
                    idempotency.api_key_id, idempotency.key,
                )
                if state is not None and state != "failed":
                    raise IdempotencyInProgress(
                        "the request with this Idempotency-Key was already made"
                    )
            row = None
            if last_seq is not None:
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
            if idempotency is not None:
                await connection.execute(
                    "INSERT INTO idempotency_keys (api_key_id, key, fingerprint, session_pk,"
                    " user_message_pk, state, created_at)"
                    " VALUES ($1, $2, $3, $4, $5, 'in_progress', to_timestamp($6))"
                    " ON CONFLICT (api_key_id, key) DO UPDATE SET state = 'in_progress',"
                    " user_message_pk = excluded.user_message_pk",
                    idempotency.api_key_id, idempotency.key, idempotency.fingerprint,
                    session_pk, message.pk, idempotency.created_at,
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
    ) -> Message:
        """Store the answer; the same statement marks its question answered."""
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
    ) -> None:
        if idempotency is None:
            await self._execute(
                "UPDATE messages SET status = 'failed', error_code = $2"
                " WHERE pk = $1 AND status = 'pending'",
                user_message_pk, error_code,
            )
            return
        await self._execute(
            "WITH failed AS (UPDATE messages SET status = 'failed', error_code = $2"
            " WHERE pk = $1 AND status = 'pending')"
            " UPDATE idempotency_keys SET state = 'failed' WHERE api_key_id = $3 AND key = $4",
            user_message_pk, error_code, idempotency.api_key_id, idempotency.key,
        )

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
        return int(status.rsplit(" ", 1)[-1])

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

