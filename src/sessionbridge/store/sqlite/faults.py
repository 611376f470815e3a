"""SQLite's storage faults, mapped to StorageUnavailable in one place.

A full disk, a write lock held past the busy timeout or an I/O error is not the
client's fault and not a bug: it is 503 ``storage_unavailable`` with
``Retry-After``, logged as one line. Every other sqlite3 error (a constraint,
a programming error) is left as it is: the store turns the ones it expects
into its own errors, and anything else is a bug worth its traceback.

    reported_fault()   the StorageUnavailable a driver's error means, logged
    storage_faults()   a context manager: a fault raised inside it leaves as
                       StorageUnavailable, ``from`` the driver's error
    MappedReader       an aiosqlite connection whose reads are mapped so
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import aiosqlite

from ...errors import StorageUnavailable

log = logging.getLogger(__name__)

# SQLite's primary result codes (the low byte of the extended code) that say
# "the database cannot do this now", with a word for the client.
_FAULTS = {
    5: "the database is locked",  # SQLITE_BUSY: another writer held it past the busy timeout
    6: "the database is locked",  # SQLITE_LOCKED
    7: "the database is out of memory",  # SQLITE_NOMEM
    8: "the database is read-only",  # SQLITE_READONLY
    10: "the database had an I/O error",  # SQLITE_IOERR
    11: "the database file is damaged",  # SQLITE_CORRUPT
    13: "the disk is full",  # SQLITE_FULL
    14: "the database file cannot be opened",  # SQLITE_CANTOPEN
    15: "the database is locked",  # SQLITE_PROTOCOL
    26: "the database file is damaged",  # SQLITE_NOTADB
}


def storage_error(exc: BaseException) -> StorageUnavailable | None:
    """The StorageUnavailable that ``exc`` means, or None when it is no storage fault."""
    if not isinstance(exc, sqlite3.DatabaseError) or isinstance(exc, sqlite3.IntegrityError):
        return None
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return None
    detail = _FAULTS.get(code & 0xFF)
    if detail is None:
        return None
    return StorageUnavailable(f"{detail}; try again shortly")


def reported_fault(exc: sqlite3.Error, operation: str) -> StorageUnavailable | None:
    """The StorageUnavailable ``exc`` means, logged as one line; None when it is no fault."""
    error = storage_error(exc)
    if error is not None:
        log.warning(
            "event=storage_unavailable operation=%s error=%s detail=%r",
            operation, getattr(exc, "sqlite_errorname", type(exc).__name__), str(exc),
        )
    return error


@contextmanager
def storage_faults(operation: str) -> Iterator[None]:
    """Turn a storage fault raised inside into StorageUnavailable, logged as one line."""
    try:
        yield
    except sqlite3.Error as exc:
        error = reported_fault(exc, operation)
        if error is None:
            raise
        raise error from exc


class MappedReader:
    """The reads of an aiosqlite connection, each under ``storage_faults``."""

    def __init__(self, connection: aiosqlite.Connection) -> None:
        self._connection = connection

    async def execute_fetchall(
        self, sql: str, parameters: Iterable[Any] | None = None
    ) -> Iterable[sqlite3.Row]:
        with storage_faults("read"):
            return await self._connection.execute_fetchall(sql, parameters)

    @asynccontextmanager
    async def execute(
        self, sql: str, parameters: Iterable[Any] | None = None
    ) -> AsyncIterator[aiosqlite.Cursor]:
        # The caller iterates the cursor inside its ``async with``: an error
        # while it does is thrown in here at the yield, and mapped as well.
        with storage_faults("read"):
            async with self._connection.execute(sql, parameters) as cursor:
                yield cursor

    async def close(self) -> None:
        await self._connection.close()
