"""Applying and rolling back the yoyo migrations in ``migrations/``.

yoyo is synchronous (sqlite3, ``time.sleep`` in its lock), so these functions
run before the event loop starts or through ``asyncio.to_thread``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from yoyo import get_backend, read_migrations
from yoyo.backends import DatabaseBackend
from yoyo.exceptions import LockTimeout

log = logging.getLogger(__name__)


def migrations_dir() -> Path:
    """The folder of SQL migrations: shipped as package data, or the source tree's."""
    try:
        shipped = resources.files("sessionbridge.migrations")
    except ModuleNotFoundError:  # an editable install: the source tree's folder
        shipped = None
    if isinstance(shipped, Path) and any(shipped.glob("*.sql")):
        return shipped
    return Path(__file__).resolve().parents[2] / "migrations"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def _backend(db_path: str) -> Iterator[DatabaseBackend]:
    path = Path(db_path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    backend = get_backend("sqlite:///" + str(path))  # four slashes for an absolute path
    try:
        backend.init_database()  # creates yoyo's own tables on a fresh file
        # A process killed mid-migration leaves its row in yoyo_lock. Only the
        # bridge and its own commands migrate, so a lock whose process is gone
        # is stale and safe to break; a live holder is waited for.
        rows = backend.execute("SELECT pid FROM yoyo_lock").fetchall()
        if rows and not any(_pid_alive(int(row[0])) for row in rows):
            log.warning("event=migration_lock_broken pids=%s", [row[0] for row in rows])
            backend.break_lock()
        yield backend
    finally:
        backend.connection.close()


def apply_migrations(db_path: str) -> int:
    """Apply pending migrations; return how many were applied."""
    migrations = read_migrations(str(migrations_dir()))
    with _backend(db_path) as backend:
        try:
            with backend.lock(timeout=30):
                pending = backend.to_apply(migrations)
                backend.apply_migrations(pending)
        except LockTimeout as exc:
            raise RuntimeError(f"database is being migrated by another process: {exc}") from exc
    if pending:
        log.info("event=migrated db=%s applied=%d", db_path, len(pending))
    return len(pending)


def rollback_migrations(db_path: str) -> int:
    """Roll back every applied migration; return how many were rolled back."""
    migrations = read_migrations(str(migrations_dir()))
    with _backend(db_path) as backend, backend.lock(timeout=30):
        applied = backend.to_rollback(migrations)
        backend.rollback_migrations(applied)
    return len(applied)
