"""Storage: the interface and one implementation per database.

    base.py          the Store interface and the errors every store raises
    sqlite.py        SQLite: aiosqlite reads, one group-committing writer thread
    group_commit.py  that writer thread
    ids.py           ids of stored rows (time-ordered UUIDs)
    postgres.py      PostgreSQL: asyncpg and a connection pool (the ``postgres`` extra)
    keycache.py      live API keys recently read

``SESSIONBRIDGE_DB`` (``--db``) picks the store: ``postgresql://…`` (or
``postgres://…``) is PostgreSQL, a path or ``sqlite:///path`` is SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from ..config import ConfigError, Settings
from ..schema import apply_migrations, apply_postgres_migrations
from .base import DuplicateKeyName, SessionGone, Store
from .sqlite import SqliteStore

__all__ = [
    "Database",
    "DuplicateKeyName",
    "SessionGone",
    "SqliteStore",
    "Store",
    "database",
    "for_database",
    "migrate",
    "open_store",
]

log = logging.getLogger(__name__)

_POSTGRES_SCHEMES = ("postgresql://", "postgres://")
_SQLITE_SCHEME = "sqlite:///"


@dataclass(frozen=True)
class Database:
    """Which database a ``db`` setting names, and where."""

    kind: Literal["sqlite", "postgresql"]
    target: str  # the SQLite file's path, or the PostgreSQL URL

    def __str__(self) -> str:
        """For logs: a PostgreSQL URL without its password."""
        if self.kind == "sqlite":
            return self.target
        parts = urlsplit(self.target)
        if parts.password is None:
            return self.target
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def database(db: str) -> Database:
    if db.startswith(_POSTGRES_SCHEMES):
        return Database("postgresql", db)
    if db.startswith(_SQLITE_SCHEME):
        # sqlite:///relative/path, sqlite:////absolute/path (as yoyo and SQLAlchemy read them)
        return Database("sqlite", db.removeprefix(_SQLITE_SCHEME))
    if "://" in db:
        # Never a file named after another database's URL.
        scheme = db.partition("://")[0]
        raise ConfigError(f"db: {scheme}:// is not a database the bridge can use"
                          " (a path, sqlite:///path or postgresql://...)")
    return Database("sqlite", db)


def for_database(settings: Settings) -> Settings:
    """The settings as the database they name allows them.

    On PostgreSQL several bridges may share one llama.cpp server, and slot
    files are bookkeeping of one bridge (which slot holds which conversation,
    which file is whose): two bridges would restore each other's slots over
    a conversation's cache. So slot saving is off there, with a warning.
    """
    if settings.slot_save == "on" and database(settings.db).kind == "postgresql":
        log.warning(
            "event=slot_save_disabled reason=shared_database"
            " detail=llama.cpp slot files are kept per bridge; several bridges share PostgreSQL"
        )
        return dataclasses.replace(settings, slot_save="off")
    return settings


def migrate(db: str) -> int:
    """Apply the pending migrations of the database ``db`` names (synchronous, like yoyo)."""
    target = database(db)
    if target.kind == "postgresql":
        return apply_postgres_migrations(target.target)
    return apply_migrations(target.target)


@contextlib.asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[Store]:
    """Migrate the database ``settings.db`` names, open its store, close it at the end."""
    target = database(settings.db)
    # yoyo is synchronous: keep it off the event loop.
    await asyncio.to_thread(migrate, settings.db)
    store: Store
    if target.kind == "postgresql":
        # Imported here: asyncpg is an optional extra, not needed for SQLite.
        from .postgres import PostgresStore

        store = await PostgresStore.open(
            target.target,
            key_cache_seconds=settings.key_cache_seconds,
            turn_lease=settings.turn_lease,
        )
    else:
        store = await SqliteStore.open(
            target.target, settings.db_synchronous, key_cache_seconds=settings.key_cache_seconds
        )
    try:
        yield store
    finally:
        await store.close()
