"""Storage: the interface, one package per database, and a registry by URL scheme (docs/storage.md).

    base.py          the Store interface, the features a backend declares, its errors
    coordination.py  how bridges sharing a database agree on turns (a no-op for one)
    registry.py      the backend a ``db`` setting names, imported only when chosen
    schema.py        the yoyo migrations of each database (migrations/<database>/)
    sqlite/          SQLite: aiosqlite reads, one group-committing writer thread
    postgres/        PostgreSQL: asyncpg, a pool, leases among bridges (the ``postgres`` extra)
    ids.py           ids of stored rows (time-ordered UUIDs)
    keycache.py      live API keys recently read

Importing this package loads no database driver and no migration tool.
"""

from __future__ import annotations

from .base import DuplicateKeyName, Features, SessionGone, Store
from .coordination import Coordination, LocalCoordination, TurnLease
from .registry import Database, MissingDriver, database, features, migrate, open_store

__all__ = [
    "Coordination",
    "Database",
    "DuplicateKeyName",
    "Features",
    "LocalCoordination",
    "MissingDriver",
    "SessionGone",
    "Store",
    "TurnLease",
    "database",
    "features",
    "migrate",
    "open_store",
]
