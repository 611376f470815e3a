"""The store for a ``db`` setting, chosen by its URL scheme and imported only when chosen.

    a path, or sqlite:///path     SQLite (the default; in the base install)
    postgresql://… (postgres://…)  PostgreSQL (the ``postgres`` extra)

A backend's driver is imported only when its scheme is used, so the base
install never needs PostgreSQL's; when a chosen backend's driver is missing,
:class:`MissingDriver` says in one line which extra to install.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, Protocol
from urllib.parse import urlsplit, urlunsplit

from ..config import ConfigError, Settings
from .base import Features, Store

log = logging.getLogger(__name__)

_POSTGRES_SCHEMES = ("postgresql://", "postgres://")
_SQLITE_SCHEME = "sqlite:///"


class MissingDriver(RuntimeError):
    """The database chosen needs a driver that is not installed (an optional extra)."""


@dataclass(frozen=True)
class Backend:
    """One kind of database: where its store lives and what installing it takes."""

    module: str  # imported when this backend is chosen
    store_class: str  # its Store, by name in that module
    drivers: tuple[str, ...]  # the modules it needs beyond the base install
    extra: str | None  # the package extra that installs them


BACKENDS: dict[str, Backend] = {
    "sqlite": Backend("sessionbridge.store.sqlite", "SqliteStore", ("aiosqlite",), None),
    "postgresql": Backend(
        "sessionbridge.store.postgres", "PostgresStore", ("asyncpg", "psycopg"), "postgres"
    ),
}


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


class StoreClass(Protocol):
    """What the registry needs of a backend's Store class."""

    features: Features

    @classmethod
    async def from_settings(cls, target: str, settings: Settings) -> Store: ...


def store_class(kind: str) -> StoreClass:
    """The backend's Store class, or MissingDriver naming the extra that installs it."""
    backend = BACKENDS[kind]
    for driver in backend.drivers:
        try:
            importlib.import_module(driver)
        except ImportError:
            install = (
                f"pip install 'sessionbridge[{backend.extra}]'" if backend.extra
                else "pip install sessionbridge"
            )
            raise MissingDriver(
                f"db: {kind} needs the {driver} package, which is not installed: {install}"
            ) from None
    cls: StoreClass = getattr(importlib.import_module(backend.module), backend.store_class)
    return cls


def features(db: str) -> Features:
    """What the database ``db`` names can do, as its backend declares it."""
    return store_class(database(db).kind).features


def migrate(db: str) -> int:
    """Apply the pending migrations of the database ``db`` names (synchronous, like yoyo)."""
    target = database(db)
    store_class(target.kind)
    # yoyo is imported with the migrations, not with the store package.
    from . import schema

    if target.kind == "postgresql":
        return schema.apply_postgres_migrations(target.target)
    return schema.apply_migrations(target.target)


@contextlib.asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[Store]:
    """Migrate the database ``settings.db`` names, open its store, close it at the end."""
    target = database(settings.db)
    opener = store_class(target.kind)
    # yoyo is synchronous: keep it off the event loop.
    await asyncio.to_thread(migrate, settings.db)
    store = await opener.from_settings(target.target, settings)
    try:
        yield store
    finally:
        await store.close()


