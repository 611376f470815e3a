"""Several bridges on one PostgreSQL database: liveness, session leases, relayed events.

Why leases rather than advisory locks held by the turn's connection: a lock
lives as long as its connection, so every running turn would pin a
connection of the pool (waiting ones too) for as long as the AI server
takes, and a turn would lose its lock, unseen, whenever that connection
broke (a server restart) while the next turn went ahead. A lease is a row:
turns hold no connection between statements, a dropped connection changes
nothing, and every write of a turn checks that its lease is still the
session's (``ticket_held``), so a bridge cut off past its lease cannot write
into a session another bridge has taken.

A turn takes an arrival ticket on arrival and its session's lease when its
turn comes; waiters are woken by ``NOTIFY`` when a session is given up. A
turn running here offers its events; a bridge that follows it asks (``NOTIFY``)
and reads them from the relay table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

import asyncpg

from ...errors import StorageUnavailable
from ...records import ChatSession
from ...turn_events import ENDINGS, TurnEvent, TurnEvents
from .pool import CLOSE_TIMEOUT, CONNECT_TIMEOUT, PoolQueries, storage_errors
from .queries import SESSION_COLUMNS

log = logging.getLogger(__name__)

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
# A client asked to cancel a turn (payload: its question's pk), wherever it runs.
CANCEL = "sessionbridge_cancel"


class PostgresCoordination(PoolQueries):
    """This bridge among the others on the database."""

    def __init__(
        self, pool: asyncpg.Pool, *, dsn: str = "", turn_lease: float = TURN_LEASE
    ) -> None:
        self._pool = pool
        self._dsn = dsn
        self._lease_seconds = turn_lease
        # This bridge among the others on the database (see the bridges table).
        self.bridge_id = uuid.uuid4().hex
        # The sessions whose lease this bridge holds, with their turn's ticket.
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
        # Cuts off a turn running here, by its question's pk (the conversation rules').
        self._cancel_here: Callable[[int], bool] = lambda question_pk: False

    async def start(self) -> None:
        """Count as a bridge on the database: say it is alive, listen, keep saying it."""
        await self._say_alive()
        await self._listen()
        self._heartbeat = asyncio.create_task(self._beat_forever(), name="bridge-heartbeat")

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

    def ticket_held(self, session_pk: int) -> int | None:
        """The ticket of the lease this bridge holds on the session, if any (writes check it)."""
        return self._held.get(session_pk)

    async def _say_alive(self) -> None:
        await self._execute(
            "INSERT INTO bridges (id, alive_until) VALUES ($1, now() + make_interval(secs => $2))"
            " ON CONFLICT (id) DO UPDATE SET alive_until = excluded.alive_until",
            self.bridge_id, self._lease_seconds,
        )

    async def _listen(self) -> None:
        if not self._dsn:
            return
        with storage_errors():
            listener = await asyncpg.connect(self._dsn, timeout=CONNECT_TIMEOUT)
        try:
            await listener.add_listener(FREED, self._on_freed)
            await listener.add_listener(WATCH, self._on_watch)
            await listener.add_listener(CANCEL, self._on_cancel)
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
        await self.sweep(mine=False)
        if self._listener is None or self._listener.is_closed():
            self._listener = None
            await self._listen()

    async def sweep(self, *, mine: bool) -> int:
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
            f"  RETURNING {SESSION_COLUMNS}, last_seq"
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

    # -- cancelling a turn that runs on another bridge -------------------------------------

    def on_cancel(self, cancel_here: Callable[[int], bool]) -> None:
        self._cancel_here = cancel_here

    async def request_cancel(self, question_pk: int) -> None:
        await self._execute(f"SELECT pg_notify('{CANCEL}', $1::text)", str(question_pk))

    def _on_cancel(self, _connection: object, _pid: int, _channel: str, payload: object) -> None:
        with contextlib.suppress(ValueError):
            self._cancel_here(int(str(payload)))

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

    def __init__(self, store: PostgresCoordination, session_pk: int, ticket: int) -> None:
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
