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
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from ..errors import IdempotencyInProgress, StorageUnavailable
from ..records import (
    AISessionKind,
    ApiKey,
    ChatSession,
    HistoryTurn,
    IdempotencyRecord,
    IdempotencyStart,
    Message,
    Usage,
)
from ..turn_events import ENDINGS, TurnEvent, TurnEvents
from .base import DuplicateKeyName, SessionGone
from .ids import time_ordered_id
from .keycache import KeyCache

log = logging.getLogger(__name__)

POOL_SIZE = 10
CONNECT_TIMEOUT = 10.0
# A statement that takes longer than this is abandoned as the server being
# unavailable rather than left to hold a turn forever.
COMMAND_TIMEOUT = 30.0
CLOSE_TIMEOUT = 10.0
# How long a turn holds its session after its bridge stopped saying it is alive
# (SESSIONBRIDGE_TURN_LEASE); renewed every third of it.
TURN_LEASE = 30.0
# A turn waiting for a session looks again this often even when no
# notification came (one lost with the listener's connection, a dead owner).
LEASE_POLL = 0.5
# A follower of a turn on another bridge asks for its events again this often
# while none come (the running bridge may have missed the first request).
RING_AGAIN = 1.0

# Notification channels: a session given up (payload: its pk); a turn someone
# wants to follow (payload: its question's pk). Followers read relayed events
# as they poll for the turn's end (turn_events.POLL_INTERVAL).
FREED = "sessionbridge_freed"
WATCH = "sessionbridge_watch"

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
# $3 role, $4 content, $5 status, $6 ai_session, $7-$9 usage, $10 piece_ends,
# $11 the ticket of the lease this store holds on the session (NULL: none),
# which must still be the session's: a bridge cut off from the database past
# its lease has lost the session to another and must not write into it.
# No row from `stored` means the session is gone, the lease lost, or {guard}.
_STORE_MESSAGE = """
WITH advanced AS (
    UPDATE chat_sessions
       SET last_seq = last_seq + 1, message_count = message_count + 1, updated_at = now()
     WHERE pk = $1 AND ($11::bigint IS NULL OR turn_ticket = $11){guard}
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

# A new idempotent request stores its question only while no other request
# holds the key (two bridges starting the same key at once): $12 api key id, $13 key.
_KEY_FREE = """
       AND NOT EXISTS (SELECT 1 FROM idempotency_keys
                        WHERE api_key_id = $12::bigint AND key = $13::text AND state <> 'failed')"""

# $12 api key id, $13 key, $14 fingerprint, $15 unix time.
_RECORD_IDEMPOTENCY = """, recorded AS (
    INSERT INTO idempotency_keys (api_key_id, key, fingerprint, session_pk, user_message_pk,
                                  state, created_at)
    SELECT $12::bigint, $13::text, $14::text, $1, pk, 'in_progress', to_timestamp($15)
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

# $12 api key id, $13 key; the AI session kind is $6.
_IDEMPOTENCY_SUCCEEDED = """, settled AS (
    UPDATE idempotency_keys SET state = 'succeeded', ai_session = $6::text
      FROM stored
     WHERE api_key_id = $12::bigint AND key = $13::text
)"""


class PostgresStore:
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
        self._dsn = dsn
        self._lease_seconds = turn_lease
        # This bridge among the others on the database (see the bridges table).
        self.bridge_id = uuid.uuid4().hex
        # The sessions whose lease this store holds, with their turn's ticket.
        self._held: dict[int, int] = {}
        # Leases whose release could not be written (the database down): retried.
        self._unreleased: dict[int, int] = {}
        # Turns waiting here for a session to be given up, by session pk.
        self._free: dict[int, asyncio.Event] = {}
        # Turns running here that another bridge may follow, and the relays running.
        self._offered: dict[int, TurnEvents] = {}
        self._relays: dict[int, asyncio.Task[None]] = {}
        self._rung: dict[int, float] = {}
        self._listener: asyncpg.Connection | None = None
        self._heartbeat: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        dsn: str,
        key_cache_seconds: float = 0.0,
        pool_size: int = POOL_SIZE,
        turn_lease: float = TURN_LEASE,
    ) -> PostgresStore:
        """Open a pool on a migrated database (see schema.apply_postgres_migrations).

        The store then counts as a bridge on the database: it says it is
        alive every third of ``turn_lease`` and listens for sessions given up
        and for turns other bridges want to follow.
        """
        with _storage_errors():
            pool = await asyncpg.create_pool(
                dsn,
                min_size=1,
                max_size=pool_size,
                timeout=CONNECT_TIMEOUT,
                command_timeout=COMMAND_TIMEOUT,
            )
        store = cls(pool, key_cache_seconds, dsn=dsn, turn_lease=turn_lease)
        try:
            await store._say_alive()
            await store._listen()
        except BaseException:
            await store.close()
            raise
        store._heartbeat = asyncio.create_task(store._beat_forever(), name="bridge-heartbeat")
        return store

    async def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        for relay in list(self._relays.values()):
            relay.cancel()
        if self._relays:
            await asyncio.gather(*self._relays.values(), return_exceptions=True)
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._listener.close(), CLOSE_TIMEOUT)
            self._listener = None
        # Gone at once rather than when the lease runs out: what it held is free.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                self._pool.execute("DELETE FROM bridges WHERE id = $1", self.bridge_id),
                CLOSE_TIMEOUT,
            )
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

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        with _storage_errors():
            return await self._pool.fetchval(sql, *args)

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
            self._held.get(session_pk),
        ]
        if idempotency is None:
            sql = _STORE_MESSAGE.format(guard="")
        else:
            sql = _STORE_MESSAGE.format(guard=_KEY_FREE) + _RECORD_IDEMPOTENCY
            args += [
                idempotency.api_key_id, idempotency.key, idempotency.fingerprint,
                idempotency.created_at,
            ]
        row = await self._fetchrow(sql + _STORED, *args)
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
            ticket = self._held.get(session_pk)
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

    async def _not_stored(self, session_pk: int, idempotency: IdempotencyStart | None) -> None:
        """Raise why a message was not stored (its statement stored nothing)."""
        row = await self._fetchrow(
            "SELECT turn_ticket FROM chat_sessions WHERE pk = $1", session_pk
        )
        if row is None:
            raise SessionGone(f"chat session {session_pk} is gone")
        ticket = self._held.get(session_pk)
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
            session_pk, ai_session_id, self._held.get(session_pk),
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
            self._held.get(session_pk),
        ]
        sql = _STORE_MESSAGE.format(guard="") + _ANSWER_QUESTION
        if idempotency is not None:
            sql += _IDEMPOTENCY_SUCCEEDED
            args += [idempotency.api_key_id, idempotency.key]
        row = await self._fetchrow(sql + _STORED, *args)
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
        swept = await self._sweep(mine=True)
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

    # -- several bridges: liveness, session leases, relayed events --------------------------
    #
    # Why leases rather than advisory locks held by the turn's connection: a
    # lock lives as long as its connection, so every running turn would pin a
    # connection of the pool (waiting ones too) for as long as the AI server
    # takes, and a turn would lose its lock, unseen, whenever that connection
    # broke (a server restart) while the next turn went ahead. A lease is a
    # row: turns hold no connection between statements, a dropped connection
    # changes nothing, and every write of a turn checks that its lease is
    # still the session's, so a bridge cut off past its lease cannot write
    # into a session another bridge has taken.

    async def _say_alive(self) -> None:
        await self._execute(
            "INSERT INTO bridges (id, alive_until) VALUES ($1, now() + make_interval(secs => $2))"
            " ON CONFLICT (id) DO UPDATE SET alive_until = excluded.alive_until",
            self.bridge_id, self._lease_seconds,
        )

    async def _listen(self) -> None:
        if not self._dsn:
            return
        with _storage_errors():
            listener = await asyncpg.connect(self._dsn, timeout=CONNECT_TIMEOUT)
        try:
            await listener.add_listener(FREED, self._on_freed)
            await listener.add_listener(WATCH, self._on_watch)
        except BaseException:
            await listener.close()
            raise
        self._listener = listener
        # Notifications sent while nobody listened are lost: wake every waiter.
        for event in self._free.values():
            event.set()

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(self._lease_seconds / 3)
            try:
                await self._beat()
            except StorageUnavailable:
                pass  # logged by the store; the next beat tries again
            except Exception:
                log.exception("event=heartbeat_failed")

    async def _beat(self) -> None:
        await self._say_alive()
        for session_pk, ticket in list(self._unreleased.items()):
            await self._release(session_pk, ticket)
        await self._sweep(mine=False)
        if self._listener is None or self._listener.is_closed():
            self._listener = None
            await self._listen()

    async def _sweep(self, *, mine: bool) -> int:
        """Free the sessions of dead bridges (and this one's, if ``mine``); fail their questions."""
        row = await self._fetchrow(
            "WITH freed AS ("
            "  UPDATE chat_sessions AS s SET turn_owner = NULL, turn_ticket = NULL"
            "   WHERE s.turn_owner IS NOT NULL AND (($2 AND s.turn_owner = $1) OR NOT EXISTS ("
            "         SELECT 1 FROM bridges AS b"
            "          WHERE b.id = s.turn_owner AND b.alive_until > now()))"
            "  RETURNING s.pk, s.last_seq"
            "), failed AS ("
            "  UPDATE messages AS m SET status = 'failed' FROM freed"
            "   WHERE m.session_pk = freed.pk AND m.seq = freed.last_seq AND m.status = 'pending'"
            "  RETURNING m.pk"
            "), abandoned AS ("
            "  UPDATE idempotency_keys SET state = 'failed' FROM failed"
            "   WHERE user_message_pk = failed.pk AND state = 'in_progress'"
            "), dropped AS ("
            "  DELETE FROM turn_tickets AS t WHERE ($2 AND t.owner = $1) OR NOT EXISTS ("
            "         SELECT 1 FROM bridges AS b WHERE b.id = t.owner AND b.alive_until > now())"
            "), forgotten AS ("
            "  DELETE FROM bridges WHERE alive_until < now() - interval '1 day'"
            "), relayed AS ("
            "  DELETE FROM turn_relay AS r USING messages AS m"
            "   WHERE m.pk = r.question_pk AND m.status <> 'pending'"
            "), rung AS ("
            f"  SELECT pg_notify('{FREED}', pk::text) FROM freed"
            ") SELECT (SELECT count(*) FROM failed), (SELECT count(*) FROM rung)",
            self.bridge_id, mine,
        )
        assert row is not None
        if row[0]:
            log.warning("event=dead_turns_failed count=%d", row[0])
        return int(row[0])

    def _on_freed(self, _connection: object, _pid: int, _channel: str, payload: object) -> None:
        with contextlib.suppress(ValueError):
            event = self._free.get(int(str(payload)))
            if event is not None:
                event.set()

    @contextlib.asynccontextmanager
    async def turn_lease(self, session_pk: int) -> AsyncIterator[_Lease]:
        ticket = await self._fetchval(
            "INSERT INTO turn_tickets (session_pk, owner) VALUES ($1, $2) RETURNING ticket",
            session_pk, self.bridge_id,
        )
        lease = _Lease(self, session_pk, int(ticket))
        try:
            yield lease
        finally:
            # Shielded: a turn cut off by shutdown still gives its session up.
            await asyncio.shield(self._release(session_pk, lease.ticket))

    async def _take(self, session_pk: int, ticket: int) -> tuple[bool, ChatSession | None]:
        """One try for the session: (taken, its row now); (True, None) when it is gone.

        Free means: nobody holds it, or a bridge that is no longer alive, or
        this bridge (a turn whose release is not written yet: this bridge's
        own lock is held by the caller, so no turn of this session runs
        here); and no live ticket of another bridge is older. Taking it fails
        the question a dead turn left pending, in the same statement.
        """
        row = await self._fetchrow(
            "WITH taken AS ("
            "  UPDATE chat_sessions AS s SET turn_owner = $2, turn_ticket = $3"
            "   WHERE s.pk = $1"
            "     AND (s.turn_owner IS NULL OR s.turn_owner = $2 OR NOT EXISTS ("
            "          SELECT 1 FROM bridges AS b"
            "           WHERE b.id = s.turn_owner AND b.alive_until > now()))"
            "     AND NOT EXISTS ("
            "          SELECT 1 FROM turn_tickets AS t JOIN bridges AS b ON b.id = t.owner"
            "           WHERE t.session_pk = $1 AND t.ticket < $3 AND t.owner <> $2"
            "             AND b.alive_until > now())"
            f"  RETURNING {_SESSION_COLUMNS}, last_seq"
            "), stale AS ("
            "  UPDATE messages AS m SET status = 'failed' FROM taken"
            "   WHERE m.session_pk = taken.pk AND m.seq = taken.last_seq AND m.status = 'pending'"
            "  RETURNING m.pk"
            "), abandoned AS ("
            "  UPDATE idempotency_keys SET state = 'failed' FROM stale"
            "   WHERE user_message_pk = stale.pk AND state = 'in_progress'"
            "), used AS ("
            "  DELETE FROM turn_tickets WHERE ticket = $3 AND EXISTS (SELECT 1 FROM taken)"
            f") SELECT * FROM taken",
            session_pk, self.bridge_id, ticket,
        )
        if row is not None:
            self._held[session_pk] = ticket
            return True, ChatSession(*list(row)[:-1])
        exists = await self._fetchval("SELECT 1 FROM chat_sessions WHERE pk = $1", session_pk)
        return exists is None, None


    async def _release(self, session_pk: int, ticket: int) -> None:
        if self._held.get(session_pk) == ticket:
            del self._held[session_pk]
        try:
            await self._execute(
                "WITH released AS ("
                "  UPDATE chat_sessions SET turn_owner = NULL, turn_ticket = NULL"
                "   WHERE pk = $1 AND turn_owner = $2 AND turn_ticket = $3"
                "), dropped AS (DELETE FROM turn_tickets WHERE ticket = $3)"
                f" SELECT pg_notify('{FREED}', $1::text)",
                session_pk, self.bridge_id, ticket,
            )
        except StorageUnavailable:
            # Held by a live bridge until written: the heartbeat tries again,
            # and this bridge's next turn of the session may take it meanwhile.
            self._unreleased[session_pk] = ticket
            return
        if self._unreleased.get(session_pk) == ticket:
            del self._unreleased[session_pk]

    # -- following a turn that runs on another bridge ------------------------------------

    def relay_turn(self, question_pk: int, events: TurnEvents) -> None:
        self._offered[question_pk] = events

    def end_relay(self, question_pk: int) -> None:
        self._offered.pop(question_pk, None)

    def _on_watch(self, _connection: object, _pid: int, _channel: str, payload: object) -> None:
        try:
            question_pk = int(str(payload))
        except ValueError:
            return
        events = self._offered.get(question_pk)
        if events is None or question_pk in self._relays:
            return
        task = asyncio.create_task(self._relay(question_pk, events), name=f"relay-{question_pk}")
        self._relays[question_pk] = task
        task.add_done_callback(lambda _: self._relays.pop(question_pk, None))

    async def _relay(self, question_pk: int, events: TurnEvents) -> None:
        """Write the turn's events for followers elsewhere, at the relay's own pace.

        The relay is one more reader of the turn's log: the turn never waits
        for it. Whatever has come since the last write goes in the next one.
        """
        written = 0
        try:
            while True:
                batch = events.since(written)
                if batch:
                    await self._write_relayed(question_pk, written, batch)
                    written += len(batch)
                    if batch[-1].name in ENDINGS:
                        return
                elif not await events.wait_beyond(written, 3600.0):
                    return
        except StorageUnavailable:
            pass  # the follower falls back on the stored answer
        except Exception:
            log.exception("event=relay_failed question=%d", question_pk)

    async def _write_relayed(self, question_pk: int, written: int, batch: list[TurnEvent]) -> None:
        await self._execute(
            "INSERT INTO turn_relay (question_pk, n, event, data, delta_id)"
            " SELECT $1, $2 + position, event, data, delta_id"
            "   FROM unnest($3::text[], $4::text[], $5::integer[])"
            "        WITH ORDINALITY AS e(event, data, delta_id, position)"
            " ON CONFLICT DO NOTHING",
            question_pk, written,
            [event.name for event in batch],
            [json.dumps(event.data, ensure_ascii=False) for event in batch],
            [event.id for event in batch],
        )

    async def relayed_events(self, question_pk: int, after: int) -> list[TurnEvent]:
        rows = await self._fetch(
            "SELECT event, data, delta_id FROM turn_relay WHERE question_pk = $1 AND n > $2"
            " ORDER BY n",
            question_pk, after,
        )
        if rows:
            self._rung.pop(question_pk, None)
            return [TurnEvent(name, json.loads(data), delta_id) for name, data, delta_id in rows]
        # Nothing yet: ask whichever bridge runs the turn to relay it (again,
        # now and then, should it have missed the first request).
        now = time.monotonic()
        if now - self._rung.get(question_pk, 0.0) >= RING_AGAIN:
            if len(self._rung) > 1024:
                self._rung.clear()
            self._rung[question_pk] = now
            await self._execute(f"SELECT pg_notify('{WATCH}', $1::text)", str(question_pk))
        return []


class _Lease:
    """A turn's place in its session's line, and then its hold on the session."""

    def __init__(self, store: PostgresStore, session_pk: int, ticket: int) -> None:
        self._store = store
        self._session_pk = session_pk
        self.ticket = ticket

    async def take(self) -> ChatSession | None:
        # Listening before each try, so a release that lands between a failed
        # try and the wait still wakes this turn at once.
        freed = asyncio.Event()
        waiting = self._store._free
        waiting[self._session_pk] = freed
        try:
            while True:
                freed.clear()
                taken, session = await self._store._take(self._session_pk, self.ticket)
                if taken:
                    return session
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(freed.wait(), LEASE_POLL)
        finally:
            if waiting.get(self._session_pk) is freed:
                del waiting[self._session_pk]
