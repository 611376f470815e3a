"""The SQLite write path: one connection on its own thread, committing concurrent writes together.

Every write is a small function of a ``sqlite3.Connection``. Writes that arrive
while a commit is under way are applied together in the next transaction and
committed once (a failing write makes the batch fall back to one transaction
per write, so it fails alone): under load a turn's two writes cost a share of a commit
instead of a commit each, and one thread hop per batch instead of one per
statement. A write's future resolves only after its transaction committed, so
nothing is reported stored before it is.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
WriteOp = Callable[[sqlite3.Connection], Any]
_Outcome = tuple[bool, Any]  # (succeeded, result or exception)

# A batch is bounded so one commit never holds a huge transaction.
MAX_BATCH = 256


class GroupCommitWriter:
    def __init__(self, connection: sqlite3.Connection, executor: ThreadPoolExecutor) -> None:
        self._connection = connection
        self._executor = executor
        self._pending: list[tuple[WriteOp, asyncio.Future[Any]]] = []
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task = asyncio.create_task(self._commit_forever(), name="sqlite-group-commit")

    @classmethod
    async def open(cls, path: str, pragmas: list[str]) -> GroupCommitWriter:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-writer")

        def connect() -> sqlite3.Connection:
            # isolation_level=None: the writer begins and commits explicitly.
            connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            for pragma in pragmas:
                connection.execute(pragma)
            return connection

        loop = asyncio.get_running_loop()
        try:
            connection = await loop.run_in_executor(executor, connect)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(connection, executor)

    async def run(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Apply ``op`` in the next transaction; return its result once committed."""
        if self._closing:
            raise RuntimeError("the database writer is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((op, future))
        self._wakeup.set()
        return await future

    async def close(self) -> None:
        """Commit what is pending, then close the connection and its thread."""
        self._closing = True
        self._wakeup.set()
        await self._task
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._connection.close)
        self._executor.shutdown(wait=True)

    async def _commit_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closing:
                    return
                await self._wakeup.wait()
                self._wakeup.clear()
                continue
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            ops = [op for op, _ in batch]
            try:
                outcomes = await loop.run_in_executor(self._executor, self._apply, ops)
            except Exception as exc:  # the thread itself failed: no write may hang
                log.error("event=writer_failed error=%s", type(exc).__name__)
                outcomes = [(False, exc)] * len(ops)
            for (_, future), (succeeded, value) in zip(batch, outcomes, strict=True):
                if future.done():  # its waiter was cancelled; the write stands
                    continue
                if succeeded:
                    future.set_result(value)
                else:
                    future.set_exception(value)

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
            if isinstance(exc, sqlite3.OperationalError):  # I/O error, disk full, locked
                log.error("event=write_failed error=%s", exc)
            return (False, exc)
        return (True, value)
