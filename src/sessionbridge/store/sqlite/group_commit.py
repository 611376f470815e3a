"""The SQLite write path: one connection, committing concurrent writes together.

Every write is a small function of a ``sqlite3.Connection``. Writes that arrive
together are applied in one transaction and committed once (a failing write
makes the batch fall back to one transaction per write, so it fails alone):
under load a turn's two writes cost a share of a commit instead of a commit
each. A write's future resolves only after its transaction committed, so
nothing is reported stored before it is. A storage fault (disk full, locked
past the busy timeout, I/O error) reaches the writer as StorageUnavailable.

Where a batch is committed depends on what a commit costs:

- **On the event loop** when a commit writes to the WAL without waiting for
  the disk (WAL mode, ``synchronous`` NORMAL or OFF: an append to a file the
  kernel caches, some tens of microseconds). The writes asked while a batch
  gathers (a few turns of the loop, as long as it grows) are committed
  together, in a callback. A hop to a thread and back cost several times the
  commit itself (a wake-up of the thread, a wake-up of the loop, and the GIL
  passed back and forth around every SQLite call), in CPU and in latency.
- **In the caller**, where the loop would commit it, when no other turn is in
  flight (``watch_turns``) and no batch is gathering: nothing would join the
  write, so it is committed at once, without the turns of the loop a batch
  waits (one client: two writes a turn, each a loop turn and a wake-up sooner).
- **On the writer thread** when a commit waits for the disk (``synchronous``
  FULL or EXTRA: an fsync), and for any batch the loop could not commit
  at once: the write lock held by another process (the loop never waits for
  it; the thread waits up to the busy timeout), a failing write (the thread
  applies each write alone), or a write that may touch many rows (``quick=False``).
  One queue put to the thread and one ``call_soon_threadsafe`` back per batch.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from .faults import reported_fault

log = logging.getLogger(__name__)

T = TypeVar("T")
WriteOp = Callable[[sqlite3.Connection], Any]
_Outcome = tuple[bool, Any]  # (succeeded, result or exception)
# A write, its waiter, and whether it is quick enough to be committed on the loop.
_Batch = list[tuple[WriteOp, "asyncio.Future[Any]", bool]]

# A batch is bounded so one commit never holds a huge transaction.
MAX_BATCH = 256
# Turns of the event loop a batch may wait for more writes (while it grows).
GATHER_LOOKS = 4


def commits_without_waiting(journal_mode: str, synchronous: int) -> bool:
    """Whether a commit returns without an fsync: WAL with ``synchronous`` OFF (0) or NORMAL (1)."""
    return journal_mode.lower() == "wal" and synchronous <= 1


class GroupCommitWriter:
    """At most one batch is being committed at a time; the next one gathers meanwhile."""

    def __init__(
        self, connection: sqlite3.Connection, *, on_loop: bool = False, busy_ms: int = 0
    ) -> None:
        self._connection = connection
        self._loop = asyncio.get_running_loop()
        self._pending: _Batch = []
        # A batch is on the thread, or a commit on the loop is scheduled.
        self._in_flight = False
        # The batch gathering on the loop: its size at the last look, and the looks.
        self._gathered, self._looks = -1, 0
        # Commit on the loop (the connection's busy timeout is then 0, and the
        # thread sets ``busy_ms`` around its own batches).
        self._on_loop = on_loop
        self._busy_ms = busy_ms
        # The turns in flight, when known (watch_turns); None: every write gathers.
        self._turns_in_flight: Callable[[], int] | None = None
        self.batches = 0  # batches committed (or failed) so far; read by the checkpointer
        self._closing = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._batches: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._serve, name="sqlite-writer", daemon=True
        )
        self._thread.start()

    @classmethod
    async def open(cls, path: str, pragmas: list[str]) -> GroupCommitWriter:
        def connect() -> tuple[sqlite3.Connection, bool, int]:
            # isolation_level=None: the writer begins and commits explicitly.
            connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            try:
                for pragma in pragmas:
                    connection.execute(pragma)
                journal_mode = connection.execute("PRAGMA journal_mode").fetchone()[0]
                synchronous = connection.execute("PRAGMA synchronous").fetchone()[0]
                busy_ms = connection.execute("PRAGMA busy_timeout").fetchone()[0]
                on_loop = commits_without_waiting(str(journal_mode), int(synchronous))
                if on_loop:
                    # The loop never waits for the lock: a batch it cannot
                    # begin at once goes to the thread, which waits busy_ms.
                    connection.execute("PRAGMA busy_timeout=0")
            except BaseException:
                connection.close()
                raise
            return connection, on_loop, int(busy_ms)

        connection, on_loop, busy_ms = await asyncio.to_thread(connect)
        return cls(connection, on_loop=on_loop, busy_ms=busy_ms)

    @property
    def on_loop(self) -> bool:
        """Whether batches are committed on the event loop (else on the writer thread)."""
        return self._on_loop

    async def run(self, op: Callable[[sqlite3.Connection], T], *, quick: bool = True) -> T:
        """Apply ``op`` in the next transaction; return its result once committed.

        ``quick=False``: the write may touch many rows, so its batch is
        committed on the writer thread, never on the event loop.
        """
        if self._closing:
            raise RuntimeError("the database writer is closed")
        if quick and self._on_loop and not self._in_flight and self._alone():
            # No other turn is in flight: no write is coming to join this one,
            # and a turn of the loop spent waiting for one is only latency.
            # Not committed (the lock held elsewhere, a failing write): as any batch, below.
            outcomes = self._apply_here([op])
            if outcomes is not None:
                self.batches += 1
                result: T = outcomes[0][1]
                return result
        future: asyncio.Future[T] = self._loop.create_future()
        self._pending.append((op, future, quick))
        if not self._in_flight:
            self._next()
        try:
            return await future
        except sqlite3.Error as exc:  # (a try, not faults.storage_faults: two writes a turn)
            error = reported_fault(exc, "write")
            if error is None:
                raise
            raise error from exc

    def watch_turns(self, in_flight: Callable[[], int]) -> None:
        """Read ``in_flight()``, the turns in flight, before gathering a write into a batch.

        With at most one (the writer's own), a write asked while no batch is
        gathering is committed in its caller, without a turn of the loop.
        """
        self._turns_in_flight = in_flight

    def _alone(self) -> bool:
        in_flight = self._turns_in_flight
        return in_flight is not None and in_flight() <= 1

    async def close(self) -> None:
        """Commit what is pending, then close the connection and stop the thread."""
        self._closing = True
        await self._idle.wait()
        self._batches.put(None)
        await asyncio.to_thread(self._thread.join)

    def _next(self) -> None:
        """Start the next batch, if any: a commit on the loop soon, or a hand-off to the thread."""
        if not self._pending:
            self._idle.set()
            return
        self._in_flight = True
        self._idle.clear()
        if self._on_loop:
            self._gathered, self._looks = len(self._pending), 0
            self._loop.call_soon(self._gather)
        else:
            self._send(self._take())

    def _gather(self) -> None:
        """On the event loop: wait turns of the loop while the batch grows, then commit it.

        The writes asked meanwhile join the batch: those of the callbacks
        already due, then those of the tasks that the next turn's I/O wakes.
        Under load that is several times fewer commits. A batch that did not
        grow by the first look (one client: no other write was asked by the
        callbacks due with it) is committed then, a turn of the loop sooner.
        """
        size = len(self._pending)
        if size != self._gathered and self._looks < GATHER_LOOKS and size < MAX_BATCH:
            self._gathered, self._looks = size, self._looks + 1
            self._loop.call_soon(self._gather)
            return
        self._commit_here()

    def _take(self) -> _Batch:
        batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
        return batch

    def _send(self, batch: _Batch) -> None:
        self._batches.put(batch)

    def _commit_here(self) -> None:
        """On the event loop: commit the batch now, or hand it to the thread."""
        batch = self._take()
        ops = [op for op, _, quick in batch if quick]
        outcomes = self._apply_here(ops) if len(ops) == len(batch) else None
        if outcomes is None:
            self._send(batch)
            return
        self._resolve(batch, outcomes)

    def _apply_here(self, ops: list[WriteOp]) -> list[_Outcome] | None:
        """The batch in one transaction, never waiting for the lock; None when it did not commit.

        Nothing is kept of a batch that did not commit: the thread applies it
        again (a write is a pure function of the database, safe to apply
        again), waiting for the lock, and each write alone if one fails.
        """
        try:
            values = self._transaction(ops)
        except Exception:
            # The lock held elsewhere, a failing write, or a fault: the thread's
            # attempt waits for the lock, or fails the write alone and reports it.
            return None
        return [(True, value) for value in values]

    def _transaction(self, ops: list[WriteOp]) -> list[Any]:
        """``ops`` in one transaction, committed; rolled back when any of them raises."""
        connection = self._connection
        connection.execute("BEGIN IMMEDIATE")
        try:
            values = [op(connection) for op in ops]
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        return values

    def _resolve(self, batch: _Batch, outcomes: list[_Outcome]) -> None:
        """On the event loop: settle a batch's writers, start the next batch."""
        for (_, future, _), (succeeded, value) in zip(batch, outcomes, strict=True):
            if future.done():  # its waiter was cancelled; the write stands
                continue
            if succeeded:
                future.set_result(value)
            else:
                future.set_exception(value)
        self._in_flight = False
        self.batches += 1
        self._next()

    def _serve(self) -> None:
        """The writer thread: apply batches until told to stop, then close the connection."""
        while (batch := self._batches.get()) is not None:
            ops = [op for op, _, _ in batch]
            try:
                if self._on_loop:
                    self._connection.execute(f"PRAGMA busy_timeout={self._busy_ms}")
                try:
                    outcomes = self._apply(ops)
                finally:
                    if self._on_loop:
                        self._connection.execute("PRAGMA busy_timeout=0")
            except BaseException as exc:  # never leave a batch's writers waiting
                log.error("event=writer_failed error=%s", type(exc).__name__)
                outcomes = [(False, exc)] * len(ops)
            try:
                self._loop.call_soon_threadsafe(self._resolve, batch, outcomes)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                break
        self._connection.close()

    def _apply(self, ops: list[WriteOp]) -> list[_Outcome]:
        """Runs on the writer thread: the whole batch in one transaction.

        Writes rarely fail, so the batch is tried as one transaction first; if
        any write raises, it is rolled back and every write is applied again in
        a transaction of its own, so that one failure fails only its own write.
        (A write is a pure function of the database, safe to apply again.)
        """
        if len(ops) > 1:
            try:
                return [(True, value) for value in self._transaction(ops)]
            except Exception:
                pass  # each write alone, below
        return [self._apply_one(op) for op in ops]

    def _apply_one(self, op: WriteOp) -> _Outcome:
        try:
            [value] = self._transaction([op])
        except Exception as exc:
            # A storage fault is logged once, as its writer gets it (run()).
            return (False, exc)
        return (True, value)
