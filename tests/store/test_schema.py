"""The yoyo migrations and the storage layer's queries that need no HTTP."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from sessionbridge.store import schema
from sessionbridge.store.schema import (
    MigrationsMissing,
    apply_migrations,
    migrations_dir,
    rollback_migrations,
)
from sessionbridge.store.sqlite import SqliteStore


def tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {name for (name,) in rows if not name.startswith(("_yoyo", "yoyo", "sqlite_"))}


def test_every_migration_has_a_rollback() -> None:
    for migration in migrations_dir().glob("*.sql"):
        if not migration.name.endswith(".rollback.sql"):
            assert migration.with_suffix(".rollback.sql").exists(), migration.name


def test_a_missing_migrations_folder_is_an_error_not_nothing_to_apply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "migrations"
    empty.mkdir()
    (empty / "0001_initial.rollback.sql").write_text("DROP TABLE x;")  # no forward migration
    monkeypatch.setattr(schema, "_SHIPPED", empty)
    monkeypatch.setattr(schema, "_SOURCE_TREE", tmp_path / "absent")

    with pytest.raises(MigrationsMissing, match="no sqlite migrations found"):
        migrations_dir()
    with pytest.raises(MigrationsMissing):
        apply_migrations(str(tmp_path / "m.db"))
    assert not (tmp_path / "m.db").exists()


def test_each_database_names_its_own_migrations_folder() -> None:
    sqlite_folder = migrations_dir("sqlite")

    assert sqlite_folder == migrations_dir()
    assert any(p.name.startswith("0001") for p in sqlite_folder.glob("*.sql"))
    with pytest.raises(ValueError, match="no migrations for database"):
        migrations_dir("oracle")
    # Each database owns a folder of its own, side by side under migrations/.
    assert sqlite_folder.name == "sqlite"
    assert migrations_dir("postgresql") == sqlite_folder.parent / "postgresql"


def test_migrations_apply_roll_back_and_apply_again(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    expected = {"api_keys", "chat_sessions", "messages", "idempotency_keys", "responses"}

    assert apply_migrations(str(path)) >= 1
    assert tables(path) == expected
    assert apply_migrations(str(path)) == 0
    assert rollback_migrations(str(path)) >= 1
    assert tables(path) == set()
    assert apply_migrations(str(path)) >= 1
    assert tables(path) == expected


def test_a_stale_migration_lock_of_a_dead_process_is_broken(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    apply_migrations(str(path))
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO yoyo_lock (locked, ctime, pid) VALUES (1, '2026-01-01', 999999999)")

    assert apply_migrations(str(path)) == 0


async def test_idempotency_outcomes_are_purged_after_their_time(tmp_path: Path) -> None:
    from sessionbridge.records import IdempotencyStart

    path = str(tmp_path / "i.db")
    apply_migrations(path)
    store = await SqliteStore.open(path)
    try:
        key = await store.create_key("k", b"h")
        session = await store.create_session(key.id, None, "s", 100)
        for name, created_at in (("old", 1000.0), ("new", 5000.0)):
            start = IdempotencyStart(key.id, name, "fp", created_at)
            question = await store.begin_turn(session.pk, name, idempotency=start)
            await store.finish_turn(session.pk, question.pk, "a", "created", start)

        assert await store.purge_idempotency(older_than=2000.0) == 1

        assert await store.get_idempotency(key.id, "old") is None
        assert await store.get_idempotency(key.id, "new") is not None
    finally:
        await store.close()


async def test_the_stricter_durability_setting_reaches_the_writer(tmp_path: Path) -> None:
    path = str(tmp_path / "f.db")
    apply_migrations(path)
    for setting, expected in (("NORMAL", 1), ("FULL", 2)):
        store = await SqliteStore.open(path, setting)
        try:
            level = await store._writer.run(
                lambda db: db.execute("PRAGMA synchronous").fetchone()[0]
            )
            mode = await store._writer.run(
                lambda db: db.execute("PRAGMA journal_mode").fetchone()[0]
            )
        finally:
            await store.close()

        assert (level, mode) == (expected, "wal")
