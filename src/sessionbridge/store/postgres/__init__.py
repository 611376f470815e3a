"""PostgreSQL (``postgresql://…``, the ``postgres`` extra): several bridges on one database.

    store.py         the Store: one statement per write where it can be
    queries.py       its columns and the fragments of its one-statement writes
    pool.py          the pool, and the one place driver errors become the bridge's
    coordination.py  liveness, session leases and relayed events among bridges
"""

from __future__ import annotations

from .coordination import PostgresCoordination
from .store import PostgresStore

__all__ = ["PostgresCoordination", "PostgresStore"]
