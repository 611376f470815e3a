"""The bridge on PostgreSQL: SESSIONBRIDGE_DB=postgresql://... end to end, its
migrations (several bridges starting at once), and the server going away and
coming back under a running bridge."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

from sessionbridge.config import ConfigError
from sessionbridge.errors import StorageUnavailable
from sessionbridge.reference.seed_server import DevServerState
from sessionbridge.store import database
from sessionbridge.store.postgres import PostgresStore
from sessionbridge.store.schema import (
    _PG_MIGRATION_LOCK,
    apply_postgres_migrations,
    migrations_dir,
    rollback_postgres_migrations,
)
from tests.conftest import MakeApi, problem, readyz_becomes
from tests.doubles import wait_until
from tests.postgres import LocalServer

# Readiness of a bridge whose PostgreSQL server stops and starts again.
PG_RESTART_TIMEOUT = 15.0
# Another session whose last statement tried for the migration lock (and so found it taken).
TRIED_THE_MIGRATION_LOCK = (
    "SELECT count(*) FROM pg_stat_activity"
    " WHERE pid <> pg_backend_pid() AND query LIKE 'SELECT pg_try_advisory_lock%%'"
)
SCHEMA_TABLES = {
    "api_keys", "chat_sessions", "messages", "idempotency_keys",
    "bridges", "turn_tickets", "turn_relay", "responses",
}


def query(dsn: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as connection:
        return connection.execute(sql, params).fetchall()  # type: ignore[arg-type]


def execute(dsn: str, sql: str, *params: Any) -> None:
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(sql, params)  # type: ignore[arg-type]


def tables(dsn: str) -> set[str]:
    rows = query(dsn, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {name for (name,) in rows if not name.startswith(("yoyo", "_yoyo"))}


def postgres_migrations() -> int:
    return sum(
        1 for path in migrations_dir("postgresql").glob("*.sql")
        if not path.name.endswith(".rollback.sql")
    )


# -- the bridge ---------------------------------------------------------------------------------
#
# The database fixture comes first in each signature: fixtures are torn down
# in reverse order, so the bridge (made through make_api) closes its pool
# before its database is dropped.


async def test_a_whole_conversation_through_the_bridge_is_stored_in_postgresql(
    postgres_dsn: str, make_api: MakeApi, ai_state: DevServerState, tmp_path: Path
) -> None:
    api = await make_api(db=postgres_dsn)  # an empty database: the bridge migrates it

    session_id = await api.new_session("You are a patient tutor.")
    first = await api.say(session_id, "What is a verb?")
    second = await api.say(session_id, "And a noun?")
    messages = await api.messages(session_id)

    assert (first["ai_session"], second["ai_session"]) == ("created", "reused")
    assert ai_state.calls["scenario"] == 1 and ai_state.calls["chat"] == 2
    assert [(m["seq"], m["role"], m["status"]) for m in messages] == [
        (1, "user", "answered"), (2, "assistant", "answered"),
        (3, "user", "answered"), (4, "assistant", "answered"),
    ]
    assert messages[3]["content"] == second["reply"]["content"]
    # The rows are in PostgreSQL, and no SQLite file was made instead.
    rows = query(
        postgres_dsn,
        "SELECT m.seq, m.role, m.content FROM messages AS m"
        " JOIN chat_sessions AS s ON s.pk = m.session_pk WHERE s.id = %s ORDER BY m.seq",
        session_id,
    )
    assert [content for _, _, content in rows] == [m["content"] for m in messages]
    [(message_count, ai_session_id)] = query(
        postgres_dsn, "SELECT message_count, ai_session_id FROM chat_sessions WHERE id = %s",
        session_id,
    )
    assert message_count == 4 and ai_session_id is not None
    assert not list(tmp_path.glob("*.db"))


async def test_an_idempotent_retry_replays_from_postgresql(
    migrated_postgres_dsn: str, make_api: MakeApi, ai_state: DevServerState
) -> None:
    api = await make_api(db=migrated_postgres_dsn)
    session_id = await api.new_session()
    headers = {"Idempotency-Key": "k-1"}

    first = await api.send(session_id, "hello", headers=headers)
    again = await api.send(session_id, "hello", headers=headers)

    assert first.status == again.status == 200
    assert await again.json() == await first.json()
    assert ai_state.calls["chat"] == 1


async def test_postgresql_stopped_under_a_running_bridge_is_503_then_the_bridge_recovers(
    own_postgres: LocalServer, make_api: MakeApi
) -> None:
    api = await make_api(db=own_postgres.dsn)
    session_id = await api.new_session()
    await api.say(session_id, "before")

    own_postgres.pause("immediate")  # as if the server crashed
    try:
        response = await api.send(session_id, "while down")
        body = await problem(response, 503, "storage_unavailable")
        assert int(response.headers["Retry-After"]) > 0
        assert "password" not in str(body)
        await readyz_becomes(api, 503, timeout=PG_RESTART_TIMEOUT)
    finally:
        own_postgres.resume()

    reply = await api.say(session_id, "after")
    assert reply["user_message"]["content"] == "after"
    await readyz_becomes(api, 200, timeout=PG_RESTART_TIMEOUT)


# -- the store alone ----------------------------------------------------------------------------


async def test_the_store_maps_an_unreachable_server_to_storage_unavailable(
    own_postgres: LocalServer,
) -> None:
    apply_postgres_migrations(own_postgres.dsn)
    store = await PostgresStore.open(own_postgres.dsn)
    try:
        key = await store.create_key("k", b"h")
        own_postgres.pause()
        with pytest.raises(StorageUnavailable):
            await store.ping()
        with pytest.raises(StorageUnavailable):
            await store.create_session(key.id, None, "s", 10)
        own_postgres.resume()

        # The pool replaces its broken connections by itself.
        session = await store.create_session(key.id, None, "s", 10)
        assert (await store.get_session(key.id, session.id)) == session
    finally:
        await store.close()


def test_a_password_in_the_database_url_is_not_shown() -> None:
    shown = str(database("postgresql://bridge:s3cret@db.example:5432/sb"))

    assert "s3cret" not in shown
    assert shown == "postgresql://bridge:***@db.example:5432/sb"
    assert str(database("sqlite:///var/sb.db")) == "var/sb.db"
    assert database("sqlite:////abs/sb.db").target == "/abs/sb.db"
    assert database("postgres://h/db").kind == "postgresql"
    with pytest.raises(ConfigError):
        database("mysql://h/db")


# -- migrations ---------------------------------------------------------------------------------


def test_migrations_apply_roll_back_and_apply_again(postgres_dsn: str) -> None:
    count = postgres_migrations()

    assert apply_postgres_migrations(postgres_dsn) == count >= 1
    assert tables(postgres_dsn) == SCHEMA_TABLES
    assert apply_postgres_migrations(postgres_dsn) == 0
    assert rollback_postgres_migrations(postgres_dsn) == count
    assert tables(postgres_dsn) == set()
    assert apply_postgres_migrations(postgres_dsn) == count
    assert tables(postgres_dsn) == SCHEMA_TABLES


def test_every_postgresql_migration_has_a_rollback() -> None:
    for migration in migrations_dir("postgresql").glob("*.sql"):
        if not migration.name.endswith(".rollback.sql"):
            assert migration.with_suffix("").with_suffix(".rollback.sql").exists(), migration


def test_two_bridges_migrating_at_once_both_succeed_and_apply_each_migration_once(
    postgres_dsn: str,
) -> None:
    command = [sys.executable, "-m", "sessionbridge", "migrate", "--db", postgres_dsn]
    runs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=60) for run in runs]

    assert [run.returncode for run in runs] == [0, 0], outputs
    applied = sorted(int(out.split()[1]) for out, _ in outputs)  # "applied N migration(s) ..."
    assert applied == [0, postgres_migrations()]
    ids = [row[0] for row in query(postgres_dsn, "SELECT migration_id FROM _yoyo_migration")]
    assert len(ids) == len(set(ids)) == postgres_migrations()
    assert tables(postgres_dsn) == SCHEMA_TABLES
    assert query(postgres_dsn, "SELECT count(*) FROM yoyo_lock") == [(0,)]


async def test_a_migrator_waits_while_another_holds_the_migration_lock(postgres_dsn: str) -> None:
    done = threading.Event()
    with psycopg.connect(postgres_dsn, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (_PG_MIGRATION_LOCK,))
        migrator = threading.Thread(
            target=lambda: (apply_postgres_migrations(postgres_dsn), done.set())
        )
        migrator.start()
        # The server shows the migrator's session trying for the lock the holder has.
        await wait_until(lambda: query(postgres_dsn, TRIED_THE_MIGRATION_LOCK) == [(1,)])
        assert not done.is_set()
        assert tables(postgres_dsn) == set()
    # The holder's connection is closed, as by a killed process: the lock goes with it.
    migrator.join(timeout=30)
    assert done.is_set()
    assert tables(postgres_dsn) == SCHEMA_TABLES


def test_a_lock_row_left_by_a_killed_migrator_is_broken(migrated_postgres_dsn: str) -> None:
    execute(
        migrated_postgres_dsn,
        "INSERT INTO yoyo_lock (locked, ctime, pid) VALUES (1, now(), 999999999)",
    )

    assert apply_postgres_migrations(migrated_postgres_dsn) == 0
    assert query(migrated_postgres_dsn, "SELECT count(*) FROM yoyo_lock") == [(0,)]
