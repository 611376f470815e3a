"""Finding, applying and rolling back the yoyo migrations in ``migrations/<database>/``.

yoyo is synchronous (sqlite3, ``time.sleep`` in its lock), so these functions
run before the event loop starts or through ``asyncio.to_thread``.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any

from yoyo import get_backend, read_migrations
from yoyo.backends import DatabaseBackend
from yoyo.exceptions import LockTimeout

log = logging.getLogger(__name__)


class MigrationsMissing(RuntimeError):
    """The folder of migrations is absent or holds none: the bridge must not start on it.

    yoyo applies nothing, silently, from a folder that does not exist, and a
    bridge on an unmigrated database answers every request with an error.
    """


# Each database has its own folder of yoyo SQL files under migrations/.
MIGRATION_FOLDERS = {"sqlite": "sqlite", "postgresql": "postgresql"}

# An installed package carries the folder as package data next to its code
# (pyproject.toml maps the repository's migrations/ there); an editable install
# or a checkout runs from the source tree, whose migrations/ sits at its top.
_SHIPPED = Path(__file__).resolve().parents[1] / "migrations"
_SOURCE_TREE = Path(__file__).resolve().parents[3] / "migrations"


def migrations_dir(database: str = "sqlite") -> Path:
    """The folder of ``database``'s migrations; MigrationsMissing if none is found.

    The folder is located once per call from two fixed places and must hold at
    least one migration, so a broken install fails at start, loudly.
    """
    try:
        folder = MIGRATION_FOLDERS[database]
    except KeyError:
        raise ValueError(f"no migrations for database {database!r}") from None
    searched = [_SHIPPED / folder, _SOURCE_TREE / folder]
    for candidate in searched:
        if any(_is_migration(path) for path in _files(candidate)):
            return candidate.resolve()
    raise MigrationsMissing(
        f"no {database} migrations found (looked in {', '.join(map(str, searched))}):"
        " the package is installed without its migrations/ folder"
    )


def _files(folder: Path) -> list[Path]:
    return sorted(folder.iterdir()) if folder.is_dir() else []


def _is_migration(path: Path) -> bool:
    return path.is_file() and path.suffix == ".sql" and not path.name.endswith(".rollback.sql")


def _read_migrations(database: str = "sqlite") -> Any:
    folder = migrations_dir(database)
    migrations = read_migrations(str(folder))
    if not len(migrations):  # yoyo found none where we found some: never "nothing to apply"
        raise MigrationsMissing(f"yoyo read no migration from {folder}")
    return migrations


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


def _quietly(run: Any, steps: Any) -> None:
    """Apply or roll back ``steps`` without yoyo's tables on stdout.

    yoyo prints the rows of every statement that has a result description;
    SQLite gives one to an ALTER TABLE ... ADD COLUMN with a CHECK (its own
    constraint check), so a fresh database printed an empty table at start.
    """
    with redirect_stdout(io.StringIO()):
        run(steps)


def apply_migrations(db_path: str) -> int:
    """Apply pending migrations; return how many were applied."""
    migrations = _read_migrations()
    with _backend(db_path) as backend:
        try:
            with backend.lock(timeout=30):
                pending = backend.to_apply(migrations)
                _quietly(backend.apply_migrations, pending)
        except LockTimeout as exc:
            raise RuntimeError(f"database is being migrated by another process: {exc}") from exc
    if pending:
        log.info("event=migrated db=%s applied=%d", db_path, len(pending))
    return len(pending)


def rollback_migrations(db_path: str) -> int:
    """Roll back every applied migration; return how many were rolled back."""
    migrations = _read_migrations()
    with _backend(db_path) as backend, backend.lock(timeout=30):
        applied = backend.to_rollback(migrations)
        _quietly(backend.rollback_migrations, applied)
    return len(applied)


# -- PostgreSQL ----------------------------------------------------------------------------
#
# Several bridges may start at once on one PostgreSQL database. yoyo's own
# lock is a row in yoyo_lock, which a killed process leaves behind, and whose
# pid means nothing on another machine. So every migrator first takes a
# session-level advisory lock, which the server drops with the connection,
# however the process ends; while it is held no other bridge migrates, so a
# yoyo_lock row found then is stale and is broken. yoyo's lock is still
# taken, for a `yoyo apply` run by hand, which waits for it.

# Any fixed 64-bit number shared by every bridge; it names the lock.
_PG_MIGRATION_LOCK = 0x5E5510_B81D6E
_PG_LOCK_WAIT = 30.0


def _yoyo_postgres_uri(dsn: str) -> str:
    # The scheme picks yoyo's driver: psycopg 3 rather than psycopg2.
    _, _, rest = dsn.partition("://")
    return "postgresql+psycopg://" + rest


@contextmanager
def _postgres_backend(dsn: str) -> Iterator[DatabaseBackend]:
    backend = get_backend(_yoyo_postgres_uri(dsn))
    try:
        deadline = time.monotonic() + _PG_LOCK_WAIT
        while not backend.connection.execute(
            "SELECT pg_try_advisory_lock(%s)", (_PG_MIGRATION_LOCK,)
        ).fetchone()[0]:
            if time.monotonic() > deadline:
                raise RuntimeError("database is being migrated by another bridge")
            time.sleep(0.1)
        backend.init_database()  # yoyo's own tables, under the lock: no race to create them
        if backend.execute("SELECT pid FROM yoyo_lock").fetchall():
            log.warning("event=migration_lock_broken reason=no_migrator_holds_the_advisory_lock")
            backend.break_lock()
        yield backend
    finally:
        backend.connection.close()  # also releases the advisory lock


def apply_postgres_migrations(dsn: str) -> int:
    """Apply pending PostgreSQL migrations; return how many were applied."""
    migrations = _read_migrations("postgresql")
    with _postgres_backend(dsn) as backend, backend.lock(timeout=_PG_LOCK_WAIT):
        pending = backend.to_apply(migrations)
        _quietly(backend.apply_migrations, pending)
    if pending:
        log.info("event=migrated db=postgresql applied=%d", len(pending))
    return len(pending)


def rollback_postgres_migrations(dsn: str) -> int:
    """Roll back every applied PostgreSQL migration; return how many were rolled back."""
    migrations = _read_migrations("postgresql")
    with _postgres_backend(dsn) as backend, backend.lock(timeout=_PG_LOCK_WAIT):
        applied = backend.to_rollback(migrations)
        _quietly(backend.rollback_migrations, applied)
    return len(applied)
