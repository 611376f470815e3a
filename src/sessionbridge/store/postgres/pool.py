"""The PostgreSQL pool and the one place its driver's errors become the bridge's.

Every driver or network error passes through ``storage_errors``: the server
down, unreachable, restarting or out of connections is ``StorageUnavailable``
(503 with Retry-After); the pool replaces broken connections by itself, so the
store recovers when the server returns.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from ...errors import StorageUnavailable

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
def storage_errors() -> Iterator[None]:
    """The one place driver errors become the bridge's."""
    try:
        yield
    except _UNAVAILABLE as exc:
        log.warning("event=storage_unavailable error=%s", type(exc).__name__)
        raise StorageUnavailable(f"the database is unavailable: {type(exc).__name__}") from exc


async def create_pool(dsn: str, size: int = POOL_SIZE) -> asyncpg.Pool:
    with storage_errors():
        return await asyncpg.create_pool(
            dsn,
            min_size=1,
            max_size=size,
            timeout=CONNECT_TIMEOUT,
            command_timeout=COMMAND_TIMEOUT,
        )


class PoolQueries:
    """Statements through the pool, their errors mapped."""

    _pool: asyncpg.Pool

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        with storage_errors():
            return list(await self._pool.fetch(sql, *args))

    async def _fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        with storage_errors():
            return await self._pool.fetchrow(sql, *args)

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        with storage_errors():
            return await self._pool.fetchval(sql, *args)

    async def _execute(self, sql: str, *args: Any) -> str:
        with storage_errors():
            return str(await self._pool.execute(sql, *args))

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[PoolConnectionProxy[asyncpg.Record]]:
        with storage_errors():
            async with self._pool.acquire() as connection, connection.transaction():
                yield connection
