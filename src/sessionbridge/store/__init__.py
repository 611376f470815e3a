"""Storage: the interface and one implementation per database.

    base.py          the Store interface and the errors every store raises
    sqlite.py        SQLite: aiosqlite reads, one group-committing writer thread
    group_commit.py  that writer thread
"""

from __future__ import annotations

from .base import DuplicateKeyName, SessionGone, Store
from .sqlite import SqliteStore

__all__ = ["DuplicateKeyName", "SessionGone", "SqliteStore", "Store"]
