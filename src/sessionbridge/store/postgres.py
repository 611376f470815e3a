"""The PostgreSQL store (asyncpg, one connection pool).

Every method is one statement where it can be, so one round trip: a message
and its session's counters are written by one statement whose data-modifying
WITH clauses update the session row (advancing ``last_seq``), insert the
message at that seq and, for an answer, mark its question answered. SQLite
does the same with triggers (migration 0002); here the store's statements do
it, so the schema has no logic of its own to keep in step. Updating the
session row first also takes its row lock, which orders concurrent writers to
one session, whichever bridge they run in.

Each statement commits on its own (autocommit), and PostgreSQL acknowledges a
commit only once its WAL is flushed (``synchronous_commit=on``, the server's
default): an acknowledged answer survives the bridge and the server.
``db_synchronous`` is SQLite's setting and does not apply here.

Every driver or network error passes through ``_storage_errors``: the server
down, unreachable, restarting or out of connections is ``StorageUnavailable``
(503 with Retry-After); the pool replaces broken connections by itself, so the
store recovers when the server returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from ..errors import StorageUnavailable
from ..records import (
    AISessionKind,
    ApiKey,
    ChatSession,
    HistoryTurn,
    IdempotencyRecord,
    IdempotencyStart,
    Message,
    TranscriptTurn,
    Usage,
)
from .base import DuplicateKeyName, SessionGone
from .keycache import KeyCache
from .sqlite import time_ordered_id

log = logging.getLogger(__name__)

POOL_SIZE = 10
CONNECT_TIMEOUT = 10.0
# A statement that takes longer than this is abandoned as the server being
# unavailable rather than left to hold a turn forever.
COMMAND_TIMEOUT = 30.0
CLOSE_TIMEOUT = 10.0

# The errors that mean "the database cannot be reached or cannot serve now",
# not "this request is wrong": the server down or restarting, the network,
# too many connections, a disk full, a failover to a read-only standby.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable; TimeoutError too
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,  # "connection is closed", "pool is closing"
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, cannot connect now
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk full
    asyncpg.exceptions.ReadOnlySQLTransactionError,
)


@contextlib.contextmanager
def _storage_errors() -> Iterator[None]:
    """The one place driver errors become the bridge's."""
    try:
        yield
    except _UNAVAILABLE as exc:
        log.warning("event=storage_unavailable error=%s", type(exc).__name__)
        raise StorageUnavailable(f"the database is unavailable: {type(exc).__name__}") from exc


def _ts(column: str) -> str:
    """A timestamptz column as the bridge's RFC 3339 text (UTC, milliseconds)."""
    return f"""to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')"""


_KEY_COLUMNS = f"id, name, {_ts('created_at')}, {_ts('revoked_at')}"
_SESSION_COLUMNS = (
    "pk, id, api_key_id, title, scenario, max_tokens, ai_session_id, message_count,"
    f" {_ts('created_at')}, {_ts('updated_at')}"
)
_MESSAGE_COLUMNS = (
    f"pk, id, seq, role, content, status, {_ts('created_at')}, ai_session,"
    " prompt_tokens, cached_tokens, completion_tokens, error_code, piece_ends"
)


def _usage(prompt: int | None, cached: int | None, completion: int | None) -> Usage | None:
    if prompt is None or completion is None:
        return None
    return Usage(prompt, cached or 0, completion)


def _message(row: asyncpg.Record) -> Message:
    pk, id_, seq, role, content, status, created_at, kind, prompt, cached, completion, \
        error_code, piece_ends = row
    return Message(
        pk, id_, seq, role, content, status, created_at, kind,
        _usage(prompt, cached, completion), error_code, piece_ends,
    )


# The session's next message, in one statement: $1 session pk, $2 message id,
# $3 role, $4 content, $5 status, $6 ai_session, $7-$9 usage, $10 piece_ends.
# No row from `stored` means the session is gone.
_STORE_MESSAGE = """
WITH advanced AS (
    UPDATE chat_sessions
       SET last_seq = last_seq + 1, message_count = message_count + 1, updated_at = now()
     WHERE pk = $1
 RETURNING pk, last_seq, updated_at
), stored AS (
    INSERT INTO messages (id, session_pk, seq, role, content, status, created_at, ai_session,
                          prompt_tokens, cached_tokens, completion_tokens, piece_ends)
    SELECT $2::text, pk, last_seq, $3::text, $4::text, $5::text, updated_at, $6::text,
           $7::integer, $8::integer, $9::integer, $10::text
      FROM advanced
 RETURNING pk, seq, created_at
)"""
_STORED = f" SELECT pk, seq, {_ts('created_at')} FROM stored"

# $11 api key id, $12 key, $13 fingerprint, $14 unix time.
_RECORD_IDEMPOTENCY = """, recorded AS (
    INSERT INTO idempotency_keys (api_key_id, key, fingerprint, session_pk, user_message_pk,
                                  state, created_at)
    SELECT $11::bigint, $12::text, $13::text, $1, pk, 'in_progress', to_timestamp($14)
      FROM stored
        ON CONFLICT (api_key_id, key)
        DO UPDATE SET state = 'in_progress', user_message_pk = excluded.user_message_pk
)"""

# An answer is stored right after its question: storing it answers the question.
_ANSWER_QUESTION = """, answered AS (
    UPDATE messages SET status = 'answered'
      FROM stored
     WHERE messages.session_pk = $1 AND messages.seq = stored.seq - 1
       AND messages.role = 'user'
)"""

# $11 api key id, $12 key; the AI session kind is $6.
_IDEMPOTENCY_SUCCEEDED = """, settled AS (
    UPDATE idempotency_keys SET state = 'succeeded', ai_session = $6::text
      FROM stored
     WHERE api_key_id = $11::bigint AND key = $12::text
)"""


class PostgresStore:
    def __init__(self, pool: asyncpg.Pool, key_cache_seconds: float = 0.0) -> None:
        self._pool = pool
        self._keys = KeyCache(key_cache_seconds)

    @classmethod
    async def open(
        cls, dsn: str, key_cache_seconds: float = 0.0, pool_size: int = POOL_SIZE
    ) -> PostgresStore:
        """Open a pool on a migrated database (see schema.apply_postgres_migrations)."""
        with _storage_errors():
            pool = await asyncpg.create_pool(
                dsn,
                min_size=1,
                max_size=pool_size,
                timeout=CONNECT_TIMEOUT,
                command_timeout=COMMAND_TIMEOUT,
            )
        return cls(pool, key_cache_seconds)

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self._pool.close(), CLOSE_TIMEOUT)
        except TimeoutError:
            # A connection still busy (the server hung): do not wait for it.
            self._pool.terminate()

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        with _storage_errors():
            return list(await self._pool.fetch(sql, *args))

    async def _fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        with _storage_errors():
            return await self._pool.fetchrow(sql, *args)

    async def _execute(self, sql: str, *args: Any) -> str:
        with _storage_errors():
            return str(await self._pool.execute(sql, *args))

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[PoolConnectionProxy[asyncpg.Record]]:
        with _storage_errors():
            async with self._pool.acquire() as connection, connection.transaction():
                yield connection

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
                f" RETURNING id, {_ts('created_at')}",
                name, token_hash,
            )
        except asyncpg.UniqueViolationError as exc:
            raise DuplicateKeyName(name) from exc
        assert row is not None
        return ApiKey(row[0], name, row[1])

    async def list_keys(self) -> list[ApiKey]:
        rows = await self._fetch(f"SELECT {_KEY_COLUMNS} FROM api_keys ORDER BY id")
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
            f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE token_hash = $1 AND revoked_at IS NULL",
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
            f" VALUES ($1, $2, $3, $4, $5) RETURNING pk, {_ts('created_at')}",
            session_id, api_key_id, title, scenario, max_tokens,
        )
        assert row is not None
        pk, now = row
        return ChatSession(
            pk, session_id, api_key_id, title, scenario, max_tokens, None, 0, now, now
        )

    async def get_session(self, api_key_id: int, session_id: str) -> ChatSession | None:
        row = await self._fetchrow(
            f"SELECT {_SESSION_COLUMNS} FROM chat_sessions WHERE id = $1 AND api_key_id = $2",
            session_id, api_key_id,
        )
        return None if row is None else ChatSession(*row)

    async def list_sessions(
        self, api_key_id: int, limit: int, before_pk: int | None
    ) -> list[ChatSession]:
        rows = await self._fetch(
            f"SELECT {_SESSION_COLUMNS} FROM chat_sessions"
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
            f"SELECT {_MESSAGE_COLUMNS} FROM messages"
            " WHERE session_pk = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            session_pk, after_seq or 0, limit,
        )
        return [_message(row) for row in rows]

    async def get_message(self, session_pk: int, message_pk: int) -> Message | None:
        row = await self._fetchrow(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE session_pk = $1 AND pk = $2",
            session_pk, message_pk,
        )
        return None if row is None else _message(row)

    async def get_message_by_id(self, session_pk: int, message_id: str) -> Message | None:
        row = await self._fetchrow(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE session_pk = $1 AND id = $2",
            session_pk, message_id,
        )
        return None if row is None else _message(row)

    async def answer_to(self, session_pk: int, user_seq: int) -> Message | None:
        row = await self._fetchrow(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages"
            " WHERE session_pk = $1 AND seq = $2 AND role = 'assistant'",
            session_pk, user_seq + 1,
        )
        return None if row is None else _message(row)

    async def recent_turns(self, session_pk: int, budget_chars: int) -> list[TranscriptTurn]:
        """The most recent answered turns, oldest first, whose text fits the budget.

        Turns are taken newest first until the next one would not fit, so the
        newest context always survives; the running total is summed by the
        server, so only the turns that fit cross the network.
        """
        if budget_chars <= 0:
            return []
        rows = await self._fetch(
            "SELECT user_text, assistant_text FROM ("
            "  SELECT q.content AS user_text, a.content AS assistant_text, a.seq,"
            "         sum(length(q.content) + length(a.content)) OVER (ORDER BY a.seq DESC) AS used"
            "    FROM messages AS a"
            "    JOIN messages AS q ON q.session_pk = a.session_pk AND q.seq = a.seq - 1"
            "   WHERE a.session_pk = $1 AND a.role = 'assistant' AND q.role = 'user'"
            "     AND q.status = 'answered'"
            ") AS turns WHERE used <= $2 ORDER BY seq",
            session_pk, budget_chars,
        )
        return [TranscriptTurn(user_text, assistant_text) for user_text, assistant_text in rows]

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
            HistoryTurn(seq, user, assistant, _usage(prompt, cached, completion))
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
        ]
        sql = _STORE_MESSAGE
        if idempotency is not None:
            sql += _RECORD_IDEMPOTENCY
            args += [
                idempotency.api_key_id, idempotency.key, idempotency.fingerprint,
                idempotency.created_at,
            ]
        row = await self._fetchrow(sql + _STORED, *args)
        if row is None:
            raise SessionGone(f"chat session {session_pk} is gone")
        pk, seq, created_at = row
        return Message(pk, message_id, seq, "user", content, "pending", created_at)

    async def _retake(
        self, session_pk: int, message_pk: int, idempotency: IdempotencyStart | None
    ) -> Message:
        # A retried question keeps its row; it moves to the end of the
        # conversation when other messages came after it, so that its answer
        # is stored right after it (a question and its answer are consecutive).
        async with self._transaction() as connection:
            last_seq = await connection.fetchval(
                "SELECT last_seq FROM chat_sessions WHERE pk = $1 FOR UPDATE", session_pk
            )
            row = None
            if last_seq is not None:
                row = await connection.fetchrow(
                    "UPDATE messages SET status = 'pending', error_code = NULL,"
                    " seq = CASE WHEN seq = $3 THEN seq ELSE $3 + 1 END"
                    f" WHERE pk = $1 AND session_pk = $2 RETURNING {_MESSAGE_COLUMNS}",
                    message_pk, session_pk, last_seq,
                )
            if row is None:
                raise SessionGone(f"chat session {session_pk} is gone")
            message = _message(row)
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

    async def set_ai_session(self, session_pk: int, ai_session_id: str) -> None:
        await self._execute(
            "UPDATE chat_sessions SET ai_session_id = $2 WHERE pk = $1", session_pk, ai_session_id
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
        ]
        sql = _STORE_MESSAGE + _ANSWER_QUESTION
        if idempotency is not None:
            sql += _IDEMPOTENCY_SUCCEEDED
            args += [idempotency.api_key_id, idempotency.key]
        row = await self._fetchrow(sql + _STORED, *args)
        if row is None:
            raise SessionGone(f"chat session {session_pk} is gone")
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
        """Mark turns cut off by a crash or shutdown as failed; return how many."""
        # A pending question is always its session's last message.
        row = await self._fetchrow(
            "WITH failed AS (UPDATE messages SET status = 'failed' WHERE status = 'pending'"
            " AND (session_pk, seq) IN (SELECT pk, last_seq FROM chat_sessions) RETURNING 1),"
            " abandoned AS (UPDATE idempotency_keys SET state = 'failed'"
            " WHERE state = 'in_progress')"
            " SELECT count(*) FROM failed"
        )
        assert row is not None
        return int(row[0])
