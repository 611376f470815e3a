"""The yoyo migrations and the storage layer's queries that need no HTTP."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sessionbridge.schema import apply_migrations, migrations_dir, rollback_migrations
from sessionbridge.store import SqliteStore


def tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {name for (name,) in rows if not name.startswith(("_yoyo", "yoyo", "sqlite_"))}


def test_every_migration_has_a_rollback() -> None:
    for migration in migrations_dir().glob("*.sql"):
        if not migration.name.endswith(".rollback.sql"):
            assert migration.with_suffix(".rollback.sql").exists(), migration.name


def test_migrations_apply_roll_back_and_apply_again(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    expected = {"api_keys", "chat_sessions", "messages", "idempotency_keys"}

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


async def test_recent_turns_keep_the_newest_within_budget(tmp_path: Path) -> None:
    path = str(tmp_path / "t.db")
    apply_migrations(path)
    store = await SqliteStore.open(path)
    try:
        key = await store.create_key("k", b"h")
        session = await store.create_session(key.id, None, "s", 100)
        for n in range(4):
            question = await store.begin_turn(session.pk, f"q{n}")
            await store.finish_turn(session.pk, question.pk, f"a{n}", "reused")

        turns = await store.recent_turns(session.pk, budget_chars=8)  # two turns of 4 chars

        assert [(t.user, t.assistant) for t in turns] == [("q2", "a2"), ("q3", "a3")]
        assert await store.recent_turns(session.pk, 0) == []
    finally:
        await store.close()


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
