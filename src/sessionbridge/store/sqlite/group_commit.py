"""The SQLite write path: one connection on its own thread, committing concurrent writes together.

Every write is a small function of a ``sqlite3.Connection``. Writes that arrive
while a commit is under way are applied together in the next transaction and
committed once (a failing write makes the batch fall back to one transaction
per write, so it fails alone): under load a turn's two writes cost a share of
a commit instead of a commit each, and one thread hop per batch instead of one
per statement. A write's future resolves only after its transaction committed, so
nothing is reported stored before it is. A storage fault (disk full, locked past
the busy timeout, I/O error) reaches the writer as StorageUnavailable.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from .faults import storage_faults

log = logging.getLogger(__name__)

T = TypeVar("T")
WriteOp = Callable[[sqlite3.Connection], Any]
_Outcome = tuple[bool, Any]  # (succeeded, result or exception)
_Batch = list[tuple[WriteOp, "asyncio.Future[Any]"]]

# A batch is bounded so one commit never holds a huge transaction.
MAX_BATCH = 256


class GroupCommitWriter:
    """At most one batch is on the writer thread at a time; the next one gathers meanwhile.

    The hand-off is one queue put to the thread and one ``call_soon_threadsafe``
    back per batch: every hop between the event loop and a thread costs the
    loop a wake-up and a turn of the GIL, so the hand-off is kept to that.
    """

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection
        self._loop = asyncio.get_running_loop()
        self._pending: _Batch = []
        self._in_flight = False
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
        def connect() -> sqlite3.Connection:
            # isolation_level=None: the writer begins and commits explicitly.
            connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            try:
                for pragma in pragmas:
                    connection.execute(pragma)
            except BaseException:
                connection.close()
                raise
            return connection

        return cls(await asyncio.to_thread(connect))

    async def run(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Apply ``op`` in the next transaction; return its result once committed."""
        if self._closing:
            raise RuntimeError("the database writer is closed")
        future: asyncio.Future[T] = self._loop.create_future()
        self._pending.append((op, future))
        if not self._in_flight:
            self._send_next()
        with storage_faults("write"):
            return await future

    async def close(self) -> None:
        """Commit what is pending, then close the connection and stop the thread."""
        self._closing = True
        await self._idle.wait()
        self._batches.put(None)
        await asyncio.to_thread(self._thread.join)

    def _send_next(self) -> None:
        batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
        self._in_flight = True
        self._idle.clear()
        self._batches.put(batch)

    def _deliver(self, batch: _Batch, outcomes: list[_Outcome]) -> None:
        """On the event loop: resolve a committed batch, send the next one."""
        for (_, future), (succeeded, value) in zip(batch, outcomes, strict=True):
            if future.done():  # its waiter was cancelled; the write stands
                continue
            if succeeded:
                future.set_result(value)
            else:
                future.set_exception(value)
        self._in_flight = False
        self.batches += 1
        if self._pending:
            self._send_next()
        else:
            self._idle.set()

    def _serve(self) -> None:
        """The writer thread: apply batches until told to stop, then close the connection."""
        while (batch := self._batches.get()) is not None:
            ops = [op for op, _ in batch]
            try:
                outcomes = self._apply(ops)
            except BaseException as exc:  # never leave a batch's writers waiting
                log.error("event=writer_failed error=%s", type(exc).__name__)
                outcomes = [(False, exc)] * len(ops)
            try:
                self._loop.call_soon_threadsafe(self._deliver, batch, outcomes)
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
        connection = self._connection
        if len(ops) > 1:
            try:
                connection.execute("BEGIN IMMEDIATE")
                values = [op(connection) for op in ops]
                connection.execute("COMMIT")
                return [(True, value) for value in values]
            except Exception:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
        return [self._apply_one(op) for op in ops]

    def _apply_one(self, op: WriteOp) -> _Outcome:
        connection = self._connection
        try:
            connection.execute("BEGIN IMMEDIATE")
            value = op(connection)
            connection.execute("COMMIT")
        except Exception as exc:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            # A storage fault is logged once, as its writer gets it (run()).
            return (False, exc)
        return (True, value)
