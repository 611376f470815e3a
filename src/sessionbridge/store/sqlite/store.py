"""The SQLite store (aiosqlite reads, a group-committing writer).

SQLite runs in WAL mode. Writes go through one connection that commits
concurrent writes together (group_commit.py: on the event loop when a commit
needs no fsync, on a thread of its own when it does); reads go through
an aiosqlite connection that never waits for the writer. A turn's question is
committed before the AI server is called and its answer before the client is
answered; with ``synchronous=NORMAL`` in WAL mode a commit survives a crash of
the process, ``FULL`` also survives power loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import aiosqlite

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
    utc_now,
)
from ..base import DuplicateKeyName, Features, SessionGone
from ..coordination import LocalCoordination
from ..history import group_turns
from ..ids import time_ordered_id
from ..keycache import KeyCache
from .faults import MappedReader, reported_fault
from .group_commit import GroupCommitWriter

log = logging.getLogger(__name__)


_SESSION_COLUMNS = (
    "pk, id, api_key_id, title, scenario, max_tokens, ai_session_id,"
    " message_count, created_at, updated_at, kind, metadata"
)
_RESPONSE_COLUMNS = (
    "pk, id, api_key_id, session_pk, created_at, model, output_message_id, body,"
    " continued, incomplete"
)
_MESSAGE_COLUMNS = (
    "pk, id, seq, role, content, status, created_at, ai_session,"
    " prompt_tokens, cached_tokens, completion_tokens, error_code, piece_ends"
)


def _session(row: sqlite3.Row | tuple[Any, ...]) -> ChatSession:
    return ChatSession(*row)


def _usage(prompt: int | None, cached: int | None, completion: int | None) -> Usage | None:
    if prompt is None or completion is None:
        return None
    return Usage(prompt, cached or 0, completion)


def _message(row: sqlite3.Row | tuple[Any, ...]) -> Message:
    pk, id_, seq, role, content, status, created_at, kind, prompt, cached, completion, \
        error_code, piece_ends = row
    return Message(
        pk, id_, seq, role, content, status, created_at, kind,
        _usage(prompt, cached, completion), error_code, piece_ends,
    )






def _pragmas(synchronous: str) -> list[str]:
    return [
        "PRAGMA journal_mode=WAL",
        f"PRAGMA synchronous={synchronous}",
        "PRAGMA foreign_keys=ON",
        # Another process (a `keys` command) may hold the write lock briefly.
        "PRAGMA busy_timeout=5000",
    ]


# SQLite checkpoints the WAL inside a commit once it reaches a size, and with
# synchronous=NORMAL that means an fsync of the database file: a stall of
# ~10 ms for the turn whose commit it lands in. A connection of its own
# checkpoints in the background instead; the writer keeps a high threshold
# only as a safety net should the background checkpoints fall behind (a
# checkpoint the writer then runs would stall the event loop too, where
# batches are committed on it).
#
# A checkpoint's fsync still slows the commits that overlap it, the more so
# the more WAL was written since the last one, and one client's unbatched
# turns write several times more WAL per turn than concurrent, batched ones.
# So the checkpointer goes by commits as well as by time: after
# CHECKPOINT_BATCHES committed batches or CHECKPOINT_INTERVAL seconds,
# whichever comes first, and not at all when nothing was committed.
CHECKPOINT_INTERVAL = 1.0
CHECKPOINT_BATCHES = 400
CHECKPOINT_POLL = 0.25
# Below this much free space where the database lives, /readyz says the disk
# is full: a few dozen turns' WAL frames, and an operator's emergency anyway.
MIN_FREE_BYTES = 1024 * 1024


def _nothing(db: sqlite3.Connection) -> None:
    return None


def _free_bytes(path: str) -> int:
    """Bytes an unprivileged writer may still use on the database's filesystem."""
    try:
        stats = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except OSError as exc:
        raise StorageUnavailable(f"the database's folder cannot be read: {exc}") from exc
    return stats.f_bavail * stats.f_frsize
WRITER_AUTOCHECKPOINT_PAGES = 20_000


def _open_here(path: str) -> sqlite3.Connection:
    """The connection read on the event loop: reads only, and never waiting for a lock."""
    here = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        here.execute("PRAGMA query_only=1")
        here.execute("PRAGMA busy_timeout=0")
    except BaseException:
        here.close()
        raise
    return here


async def _open_reader(path: str, synchronous: str) -> aiosqlite.Connection:
    reader = await aiosqlite.connect(path, isolation_level=None)
    try:
        for pragma in _pragmas(synchronous):
            await reader.execute(pragma)
    except BaseException:
        await reader.close()
        raise
    return reader


class SqliteStore:
    # One bridge per SQLite file: its own session locks are the only ones.
    features = Features(shared_between_processes=False)
    coordination = LocalCoordination()

    def __init__(
        self,
        writer: GroupCommitWriter,
        reader: aiosqlite.Connection,
        checkpointer: aiosqlite.Connection,
        key_cache_seconds: float = 0.0,
        path: str = "",
        here: sqlite3.Connection | None = None,
    ) -> None:
        self._writer = writer
        # A connection read on the event loop itself, for reads of a row or a
        # few by an index on the hot path (_read_here); None: all by the reader.
        self._here = here
        # Reads and writes alike turn storage faults into StorageUnavailable
        # (faults.py), so no sqlite3 error of that kind leaves the store.
        self._reader = MappedReader(reader)
        self._checkpointer = checkpointer
        self._path = path
        # Every request needs its key; a read through the reader thread costs
        # the event loop a wake-up and a turn of the GIL, the largest single
        # cost of a turn under load (keycache.py says what is trusted how long).
        self._keys = KeyCache(key_cache_seconds)
        # Sessions whose last turn could not write its failure (a full disk).
        self._unsettled: set[int] = set()
        self._checkpoints = asyncio.create_task(self._checkpoint_forever(), name="wal-checkpoint")

    @classmethod
    async def from_settings(cls, target: str, settings: Settings) -> SqliteStore:
        return await cls.open(
            target, settings.db_synchronous, key_cache_seconds=settings.key_cache_seconds
        )

    @classmethod
    async def open(
        cls, path: str, synchronous: str = "NORMAL", key_cache_seconds: float = 0.0
    ) -> SqliteStore:
        """Open a migrated database (see schema.apply_migrations)."""
        pragmas = [
            *_pragmas(synchronous),
            f"PRAGMA wal_autocheckpoint={WRITER_AUTOCHECKPOINT_PAGES}",
        ]
        writer = await GroupCommitWriter.open(path, pragmas)
        readers: list[aiosqlite.Connection] = []
        try:
            for _ in range(2):
                readers.append(await _open_reader(path, synchronous))
            here = await asyncio.to_thread(_open_here, path)
        except BaseException:
            for reader in readers:
                await reader.close()
            await writer.close()
            raise
        return cls(writer, readers[0], readers[1], key_cache_seconds, path, here)

    def watch_turns(self, in_flight: Callable[[], int]) -> None:
        self._writer.watch_turns(in_flight)

    async def close(self) -> None:
        self._checkpoints.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._checkpoints
        await self._reader.close()
        if self._here is not None:
            self._here.close()
        await self._writer.close()
        try:
            # Leave a short WAL behind: the next start reads less.
            await self._checkpointer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:  # a full disk: the WAL stays, nothing is lost
            log.warning("event=checkpoint_failed error=%s", exc)
        await self._checkpointer.close()

    async def _checkpoint_forever(self) -> None:
        checkpointed = self._writer.batches
        last = time.monotonic()
        while True:
            await asyncio.sleep(CHECKPOINT_POLL)
            batches = self._writer.batches
            if batches == checkpointed:
                continue  # nothing committed: nothing to copy
            if batches - checkpointed < CHECKPOINT_BATCHES and (
                time.monotonic() - last < CHECKPOINT_INTERVAL
            ):
                continue
            checkpointed, last = batches, time.monotonic()
            try:
                # PASSIVE never waits for readers or the writer.
                await self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error as exc:
                log.warning("event=checkpoint_failed error=%s", exc)

    async def ping(self) -> None:
        """Return if the database can take a write now, else raise StorageUnavailable.

        A read; an empty write transaction, which takes the write lock (waiting
        at most the busy timeout, as a turn would); and the free space where the
        database lives. SQLite reuses the WAL's space after a checkpoint, so a
        full disk fails only the writes that must grow a file, and a write that
        happens to succeed proves little: the free space tells it first.
        """
        await self._reader.execute_fetchall("SELECT 1")
        await self._writer.run(_nothing)
        if not self._path:
            return
        free = await asyncio.to_thread(_free_bytes, self._path)
        if free < MIN_FREE_BYTES:
            log.warning("event=storage_unavailable operation=ping free_bytes=%d", free)
            raise StorageUnavailable(f"the disk is full ({free} bytes free); try again shortly")

    async def _write(
        self, sql: str, params: tuple[Any, ...], *, quick: bool = True
    ) -> list[tuple[Any, ...]]:
        """One statement in the next group commit; its rows (for RETURNING).

        ``quick=False``: it may touch many rows (group_commit.py).
        """
        return await self._writer.run(
            lambda db: db.execute(sql, params).fetchall(), quick=quick
        )

    async def _read_here(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        """A read of a row or a few by an index, on the event loop; else by the reader thread.

        A WAL reader takes no lock another connection holds, and such a read
        takes microseconds, a few times less than the hop to the reader's
        thread and back. Should SQLite still answer busy (the WAL's index
        being rebuilt), the read goes to the reader, which waits for it.
        """
        here = self._here
        if here is not None:
            try:
                return here.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
                if code not in (5, 6):  # SQLITE_BUSY, SQLITE_LOCKED: the reader waits
                    error = reported_fault(exc, "read")
                    if error is None:
                        raise
                    raise error from exc
        return list(await self._reader.execute_fetchall(sql, params))

    async def _fetchone(self, sql: str, params: tuple[Any, ...]) -> sqlite3.Row | None:
        rows = await self._reader.execute_fetchall(sql, params)
        return next(iter(rows), None)

    # -- API keys ---------------------------------------------------------

    async def create_key(self, name: str, token_hash: bytes) -> ApiKey:
        created_at = utc_now()
        try:
            rows = await self._write(
                "INSERT INTO api_keys (name, token_hash, created_at) VALUES (?, ?, ?) RETURNING id",
                (name, token_hash, created_at),
            )
        except sqlite3.IntegrityError as exc:
            raise DuplicateKeyName(name) from exc
        return ApiKey(rows[0][0], name, created_at)

    async def list_keys(self) -> list[ApiKey]:
        rows = await self._reader.execute_fetchall(
            "SELECT id, name, created_at, revoked_at FROM api_keys ORDER BY id"
        )
        return [ApiKey(*row) for row in rows]

    async def revoke_key(self, name: str) -> bool:
        rows = await self._write(
            "UPDATE api_keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL RETURNING id",
            (utc_now(), name),
        )
        self._keys.clear()
        return bool(rows)

    async def key_for_token_hash(self, token_hash: bytes) -> ApiKey | None:
        cached = self._keys.get(token_hash)
        if cached is not None:
            return cached
        # On the loop: when a cached key expires, every request in flight
        # misses at once (32 reads a second at 32 connections, each a hop to
        # the reader's thread and back before).
        rows = await self._read_here(
            "SELECT id, name, created_at, revoked_at FROM api_keys"
            " WHERE token_hash = ? AND revoked_at IS NULL",
            (token_hash,),
        )
        key = ApiKey(*rows[0]) if rows else None
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
        session_id = session_id or str(uuid.uuid4())
        now = utc_now()
        drafts = [self._draft(item.role, item.content, "answered") for item in items]

        def write(db: sqlite3.Connection) -> int:
            pk = db.execute(
                "INSERT INTO chat_sessions (id, api_key_id, title, scenario, max_tokens,"
                " created_at, updated_at, kind, metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " RETURNING pk",
                (session_id, api_key_id, title, scenario, max_tokens, now, now, kind, metadata),
            ).fetchone()[0]
            for draft in drafts:
                self._insert_message(db, pk, draft)
            return int(pk)

        pk = await self._writer.run(write)
        # Each item's insert stamps the session (a trigger): it was updated by the last.
        updated = drafts[-1].created_at if drafts else now
        return ChatSession(
            pk, session_id, api_key_id, title, scenario, max_tokens, None, len(drafts), now,
            updated, kind, metadata,
        )

    async def get_session(self, api_key_id: int, session_id: str) -> ChatSession | None:
        rows = await self._read_here(
            f"SELECT {_SESSION_COLUMNS} FROM chat_sessions WHERE id = ? AND api_key_id = ?",
            (session_id, api_key_id),
        )
        return _session(rows[0]) if rows else None

    async def list_sessions(
        self, api_key_id: int, limit: int, before_pk: int | None
    ) -> list[ChatSession]:
        rows = await self._reader.execute_fetchall(
            f"SELECT {_SESSION_COLUMNS} FROM chat_sessions"
            " WHERE api_key_id = ? AND pk < ? ORDER BY pk DESC LIMIT ?",
            (api_key_id, before_pk if before_pk is not None else 2**63 - 1, limit),
        )
        return [_session(row) for row in rows]

    async def delete_session(self, api_key_id: int, session_id: str) -> bool:
        rows = await self._write(
            "DELETE FROM chat_sessions WHERE id = ? AND api_key_id = ? RETURNING pk",
            (session_id, api_key_id),
            quick=False,  # its messages go with it
        )
        return bool(rows)

    async def set_metadata(self, session_pk: int, metadata: str) -> None:
        await self._write(
            "UPDATE chat_sessions SET metadata = ?, updated_at = ? WHERE pk = ?",
            (metadata, utc_now(), session_pk),
        )

    async def set_scenario(self, session_pk: int, scenario: str) -> None:
        await self._write(
            "UPDATE chat_sessions SET scenario = ?, ai_session_id = NULL WHERE pk = ?",
            (scenario, session_pk),
        )

    async def fork_session(
        self, source: ChatSession, upto_seq: int, scenario: str, max_tokens: int
    ) -> ChatSession:
        session_id = str(uuid.uuid4())
        now = utc_now()

        def write(db: sqlite3.Connection) -> int:
            rows = db.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE session_pk = ? AND seq <= ?"
                " AND status = 'answered' ORDER BY seq",
                (source.pk, upto_seq),
            ).fetchall()
            pk = db.execute(
                "INSERT INTO chat_sessions (id, api_key_id, title, scenario, max_tokens,"
                " created_at, updated_at, kind) VALUES (?, ?, NULL, ?, ?, ?, ?, 'chain')"
                " RETURNING pk",
                (session_id, source.api_key_id, scenario, max_tokens, now, now),
            ).fetchone()[0]
            for row in rows:
                copy = _message(row)
                # A copy is a new row with the same text, role and usage.
                self._insert_message(db, pk, self._draft(
                    copy.role, copy.content, "answered", copy.ai_session, copy.usage,
                    copy.piece_ends,
                ))
            return int(pk)

        pk = await self._writer.run(write, quick=False)  # a copy of a whole history
        session = await self._fetchone(
            f"SELECT {_SESSION_COLUMNS} FROM chat_sessions WHERE pk = ?", (pk,)
        )
        assert session is not None
        return _session(session)

    async def add_items(
        self, session_pk: int, items: Sequence[ContextMessage]
    ) -> list[Message]:
        drafts = [self._draft(item.role, item.content, "answered") for item in items]

        def write(db: sqlite3.Connection) -> list[Message]:
            return [self._insert_message(db, session_pk, draft) for draft in drafts]

        return await self._writer.run(write)

    async def delete_message(self, session_pk: int, message_id: str) -> bool:
        def write(db: sqlite3.Connection) -> bool:
            gone = db.execute(
                "DELETE FROM messages WHERE session_pk = ? AND id = ? RETURNING pk",
                (session_pk, message_id),
            ).fetchone()
            if gone is None:
                return False
            db.execute(
                "UPDATE chat_sessions SET message_count = message_count - 1 WHERE pk = ?",
                (session_pk,),
            )
            return True

        return await self._writer.run(write)

    async def answered_since(self, session_pk: int, from_seq: int) -> list[Message]:
        rows = await self._reader.execute_fetchall(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE session_pk = ? AND seq >= ?"
            " AND status = 'answered' ORDER BY seq",
            (session_pk, from_seq),
        )
        return [_message(row) for row in rows]

    async def added_since_answer(self, session_pk: int, within: int) -> list[Message]:
        # The last answer is found by the index, newest first: most often it is
        # the session's last message, and nothing is read after it.
        rows = await self._read_here(
            f"WITH low(seq) AS (SELECT last_seq - ? FROM chat_sessions WHERE pk = ?)"
            f" SELECT {_MESSAGE_COLUMNS} FROM messages WHERE session_pk = ?"
            " AND seq > (SELECT seq FROM low) AND status = 'answered' AND seq > coalesce(("
            "  SELECT seq FROM messages WHERE session_pk = ? AND seq > (SELECT seq FROM low)"
            "  AND status = 'answered' AND role = 'assistant' AND ai_session IS NOT NULL"
            "  ORDER BY seq DESC LIMIT 1), 0) ORDER BY seq",
            (within, session_pk, session_pk, session_pk),
        )
        return [_message(row) for row in rows]

    # -- messages ---------------------------------------------------------------

    async def list_messages(
        self, session_pk: int, limit: int, after_seq: int | None
    ) -> list[Message]:
        rows = await self._reader.execute_fetchall(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages"
            " WHERE session_pk = ? AND seq > ? ORDER BY seq LIMIT ?",
            (session_pk, after_seq or 0, limit),
        )
        return [_message(row) for row in rows]

    async def get_message(self, session_pk: int, message_pk: int) -> Message | None:
        row = await self._fetchone(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE session_pk = ? AND pk = ?",
            (session_pk, message_pk),
        )
        return None if row is None else _message(row)

    async def get_message_by_id(self, session_pk: int, message_id: str) -> Message | None:
        row = await self._fetchone(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE session_pk = ? AND id = ?",
            (session_pk, message_id),
        )
        return None if row is None else _message(row)

    async def answer_to(self, session_pk: int, user_seq: int) -> Message | None:
        row = await self._fetchone(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages"
            " WHERE session_pk = ? AND seq = ? AND role = 'assistant'",
            (session_pk, user_seq + 1),
        )
        return None if row is None else _message(row)

    async def history(self, session_pk: int, from_seq: int = 0) -> list[HistoryTurn]:
        """The answered turns whose first message is at ``from_seq`` or later, oldest first."""
        rows = await self._reader.execute_fetchall(
            "SELECT seq, role, content, prompt_tokens, cached_tokens, completion_tokens"
            " FROM messages WHERE session_pk = ? AND seq >= ? AND status = 'answered'"
            " ORDER BY seq",
            (session_pk, from_seq),
        )
        return group_turns(
            (seq, role, content, _usage(prompt, cached, completion))
            for seq, role, content, prompt, cached, completion in rows
        )

    # -- turns ----------------------------------------------------------------------
    #
    # A question and its answer are one statement each: triggers (migration
    # 0002) advance the session's counters and mark the question answered.

    _INSERT_MESSAGE = (
        "INSERT INTO messages (id, session_pk, seq, role, content, status, created_at,"
        " ai_session, prompt_tokens, cached_tokens, completion_tokens, piece_ends)"
        " SELECT ?, pk, last_seq + 1, ?, ?, ?, ?, ?, ?, ?, ?, ? FROM chat_sessions WHERE pk = ?"
        " RETURNING pk, seq"
    )

    @classmethod
    def _insert_message(cls, db: sqlite3.Connection, session_pk: int, draft: Message) -> Message:
        """Store ``draft`` (its pk and seq are placeholders) as the session's next message."""
        usage = draft.usage
        row = db.execute(
            cls._INSERT_MESSAGE,
            (
                draft.id, draft.role, draft.content, draft.status, draft.created_at,
                draft.ai_session,
                None if usage is None else usage.prompt_tokens,
                None if usage is None else usage.cached_tokens,
                None if usage is None else usage.completion_tokens,
                draft.piece_ends,
                session_pk,
            ),
        ).fetchone()
        if row is None:
            raise SessionGone(f"chat session {session_pk} is gone")
        pk, seq = row
        return Message(
            pk, draft.id, seq, draft.role, draft.content, draft.status, draft.created_at,
            draft.ai_session, draft.usage, None, draft.piece_ends,
        )

    @staticmethod
    def _draft(
        role: Role,
        content: str,
        status: MessageStatus,
        kind: AISessionKind | None = None,
        usage: Usage | None = None,
        piece_ends: str | None = None,
    ) -> Message:
        # Made before the write: the write itself only runs SQL.
        return Message(
            0, time_ordered_id(), 0, role, content, status, utc_now(), kind, usage,
            None, piece_ends,
        )

    @staticmethod
    def _record_idempotency(
        db: sqlite3.Connection, session_pk: int, message_pk: int, idempotency: IdempotencyStart
    ) -> None:
        db.execute(
            "INSERT INTO idempotency_keys (api_key_id, key, fingerprint, session_pk,"
            " user_message_pk, state, created_at) VALUES (?, ?, ?, ?, ?, 'in_progress', ?)"
            " ON CONFLICT (api_key_id, key) DO UPDATE SET state = 'in_progress',"
            " user_message_pk = excluded.user_message_pk",
            (
                idempotency.api_key_id,
                idempotency.key,
                idempotency.fingerprint,
                session_pk,
                message_pk,
                idempotency.created_at,
            ),
        )

    @staticmethod
    def _check_key_free(db: sqlite3.Connection, idempotency: IdempotencyStart) -> None:
        # The same key started twice at once (the bridge turns the second away
        # before it queues, but a store must not rely on that): the second is
        # refused rather than asking the AI server again.
        row = db.execute(
            "SELECT state FROM idempotency_keys WHERE api_key_id = ? AND key = ?",
            (idempotency.api_key_id, idempotency.key),
        ).fetchone()
        if row is not None and row[0] != "failed":
            raise IdempotencyInProgress("the request with this Idempotency-Key was already made")

    @staticmethod
    def _retake_message(db: sqlite3.Connection, session_pk: int, message_pk: int) -> Message:
        # A retried question keeps its row; it moves to the end of the
        # conversation when other messages came after it, so that its answer
        # is stored right after it (a question and its answer are consecutive).
        row = db.execute(
            "UPDATE messages SET status = 'pending', error_code = NULL, seq = CASE"
            " WHEN seq = (SELECT last_seq FROM chat_sessions WHERE pk = ?) THEN seq"
            " ELSE (SELECT last_seq + 1 FROM chat_sessions WHERE pk = ?) END"
            f" WHERE pk = ? AND session_pk = ? RETURNING {_MESSAGE_COLUMNS}",
            (session_pk, session_pk, message_pk, session_pk),
        ).fetchone()
        if row is None:
            raise SessionGone(f"chat session {session_pk} is gone")
        message = _message(row)
        db.execute(
            "UPDATE chat_sessions SET last_seq = max(last_seq, ?), updated_at = ? WHERE pk = ?",
            (message.seq, utc_now(), session_pk),
        )
        return message

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
        """Store the user message as pending (or take a failed one up again)."""

        draft = self._draft("user", content, "pending")
        before = [self._draft(item.role, item.content, "answered") for item in context]

        # Only a session whose last turn could not record its failure needs
        # the look for a leftover pending question: not every turn's write.
        stale = session_pk in self._unsettled

        def write(db: sqlite3.Connection) -> Message:
            if stale:
                self._fail_stale_question(db, session_pk)
            if idempotency is not None:
                self._check_key_free(db, idempotency)
            for item in before:
                self._insert_message(db, session_pk, item)
            if retry_message_pk is None:
                message = self._insert_message(db, session_pk, draft)
            else:
                message = self._retake_message(db, session_pk, retry_message_pk)
            if idempotency is not None:
                self._record_idempotency(db, session_pk, message.pk, idempotency)
            if response is not None:
                self._insert_response(db, response, message.pk)
            return message

        message = await self._writer.run(write)
        self._unsettled.discard(session_pk)
        return message

    @staticmethod
    def _fail_stale_question(db: sqlite3.Connection, session_pk: int) -> None:
        # A turn whose fail_turn could not be written (a full disk) leaves its
        # question pending. Under the session's lock no turn of this session
        # runs, so a pending question now is such a leftover; it is always the
        # session's last message (nothing is stored after a failed turn), so
        # the lookup is one index probe. Its Idempotency-Key is freed with it.
        stale = db.execute(
            "UPDATE messages SET status = 'failed' WHERE session_pk = ? AND status = 'pending'"
            " AND seq = (SELECT last_seq FROM chat_sessions WHERE pk = ?) RETURNING pk",
            (session_pk, session_pk),
        ).fetchone()
        if stale is not None:
            db.execute(
                "UPDATE idempotency_keys SET state = 'failed'"
                " WHERE user_message_pk = ? AND state = 'in_progress'",
                (stale[0],),
            )

    async def set_ai_session(self, session_pk: int, ai_session_id: str) -> None:
        await self._write(
            "UPDATE chat_sessions SET ai_session_id = ? WHERE pk = ?", (ai_session_id, session_pk)
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
        """Store the answer; the insert marks its question answered in the same commit."""

        draft = self._draft("assistant", reply, "answered", kind, usage, piece_ends)

        def write(db: sqlite3.Connection) -> Message:
            answer = self._insert_message(db, session_pk, draft)
            if truncated:
                db.execute(
                    "UPDATE responses SET incomplete = 1 WHERE question_pk = ?",
                    (user_message_pk,),
                )
            if idempotency is not None:
                db.execute(
                    "UPDATE idempotency_keys SET state = 'succeeded', ai_session = ?"
                    " WHERE api_key_id = ? AND key = ?",
                    (kind, idempotency.api_key_id, idempotency.key),
                )
            return answer

        return await self._writer.run(write)

    async def fail_turn(
        self,
        session_pk: int,
        user_message_pk: int,
        idempotency: IdempotencyStart | None = None,
        error_code: str | None = None,
        context_count: int = 0,
    ) -> None:
        def write(db: sqlite3.Connection) -> None:
            failed = db.execute(
                "UPDATE messages SET status = 'failed', error_code = ?"
                " WHERE pk = ? AND status = 'pending' RETURNING seq",
                (error_code, user_message_pk),
            ).fetchone()
            if failed is not None and context_count:
                # The context the question brought goes with it.
                db.execute(
                    "UPDATE messages SET status = 'failed' WHERE session_pk = ?"
                    " AND seq >= ? AND seq < ?",
                    (session_pk, failed[0] - context_count, failed[0]),
                )
            if idempotency is not None:
                db.execute(
                    "UPDATE idempotency_keys SET state = 'failed' WHERE api_key_id = ? AND key = ?",
                    (idempotency.api_key_id, idempotency.key),
                )

        try:
            await self._writer.run(write)
        except StorageUnavailable:
            # The question stays pending: the session's next turn fails it first.
            self._unsettled.add(session_pk)
            raise

    # -- responses of the OpenAI face ------------------------------------------------------

    @staticmethod
    def _insert_response(db: sqlite3.Connection, row: ResponseRow, question_pk: int) -> None:
        db.execute(
            "INSERT INTO responses (id, api_key_id, session_pk, question_pk, created_at, model,"
            " output_message_id, body, continued, incomplete)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (row.id, row.api_key_id, row.session_pk, question_pk, row.created_at, row.model,
             row.output_message_id, row.body, row.continued, row.incomplete),
        )

    async def _response(self, where: str, params: tuple[Any, ...]) -> ResponseRow | None:
        found = await self._fetchone(
            f"SELECT {_RESPONSE_COLUMNS}, question_pk FROM responses WHERE {where}", params
        )
        if found is None:
            return None
        *columns, question_pk = tuple(found)
        pk, id_, key_id, session_pk, created_at, model, output_id, body, continued, cut = columns
        question = answer = None
        if question_pk is not None and session_pk is not None:
            question = await self.get_message(session_pk, question_pk)
            if question is not None and question.status == "answered":
                answer = await self.answer_to(session_pk, question.seq)
        return ResponseRow(
            pk, id_, key_id, session_pk, created_at, model, output_id, body,
            bool(continued), bool(cut), question, answer,
        )

    async def get_response(self, api_key_id: int, response_id: str) -> ResponseRow | None:
        return await self._response("id = ? AND api_key_id = ?", (response_id, api_key_id))

    async def response_for_question(self, question_pk: int) -> ResponseRow | None:
        return await self._response("question_pk = ?", (question_pk,))

    async def delete_response(self, api_key_id: int, response_id: str) -> bool:
        rows = await self._write(
            "DELETE FROM responses WHERE id = ? AND api_key_id = ? RETURNING pk",
            (response_id, api_key_id),
        )
        return bool(rows)

    async def claim_continuation(self, response_pk: int) -> bool:
        rows = await self._write(
            "UPDATE responses SET continued = 1 WHERE pk = ? AND continued = 0 RETURNING pk",
            (response_pk,),
        )
        return bool(rows)

    async def release_continuation(self, response_pk: int) -> None:
        await self._write("UPDATE responses SET continued = 0 WHERE pk = ?", (response_pk,))

    # -- idempotency and crash recovery --------------------------------------------------

    async def get_idempotency(self, api_key_id: int, key: str) -> IdempotencyRecord | None:
        row = await self._fetchone(
            "SELECT fingerprint, state, user_message_pk, ai_session FROM idempotency_keys"
            " WHERE api_key_id = ? AND key = ?",
            (api_key_id, key),
        )
        return None if row is None else IdempotencyRecord(*row)

    async def purge_idempotency(self, older_than: float) -> int:
        def write(db: sqlite3.Connection) -> int:
            turns = db.execute(
                "DELETE FROM idempotency_keys WHERE created_at < ? AND state != 'in_progress'",
                (older_than,),
            ).rowcount
            results = db.execute(
                "DELETE FROM idempotent_results WHERE created_at < ?", (older_than,)
            ).rowcount
            return int(turns + results)

        return await self._writer.run(write, quick=False)

    async def get_result(self, api_key_id: int, key: str) -> tuple[str, str] | None:
        row = await self._fetchone(
            "SELECT fingerprint, body FROM idempotent_results WHERE api_key_id = ? AND key = ?",
            (api_key_id, key),
        )
        return None if row is None else (row[0], row[1])

    async def put_result(self, api_key_id: int, key: str, fingerprint: str, body: str) -> bool:
        rows = await self._write(
            "INSERT INTO idempotent_results (api_key_id, key, fingerprint, body, created_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING key",
            (api_key_id, key, fingerprint, body, time.time()),
        )
        return bool(rows)

    async def fail_pending_turns(self) -> int:
        """Mark turns cut off by a crash or shutdown as failed; return how many."""
        def write(db: sqlite3.Connection) -> int:
            # Every pending one, wherever it stands: a question whose failure
            # could not be written (a full disk) may have had turns after it.
            # Once per start, so a scan of the table is affordable.
            failed = db.execute("UPDATE messages SET status = 'failed' WHERE status = 'pending'")
            db.execute("UPDATE idempotency_keys SET state = 'failed' WHERE state = 'in_progress'")
            return failed.rowcount

        return await self._writer.run(write, quick=False)  # a scan of the table
