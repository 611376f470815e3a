"""SQLite (the default): one bridge per database file.

    store.py         the Store: aiosqlite readers, one group-committing writer
    group_commit.py  that writer: many turns' writes, one commit (on the event loop
                     when a commit needs no fsync, else on a thread of its own)
    faults.py        the one place sqlite3's storage faults become the bridge's
"""

from __future__ import annotations

from .store import SqliteStore

__all__ = ["SqliteStore"]
