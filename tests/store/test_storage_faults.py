"""Storage faults a client can meet: a full disk, a write lock held past the busy timeout.

Each is 503 ``storage_unavailable`` with Retry-After, logged as one line without
a traceback; /readyz is 503 while the database cannot take a write; the bridge
recovers by itself; no acknowledged reply is lost and no question stays pending.
The full disk is a small tmpfs (mounting needs root); the lock is a second
sqlite3 connection in ``BEGIN IMMEDIATE``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pytest_aiohttp import AiohttpClient

from sessionbridge.app import create_app
from sessionbridge.config import Settings
from sessionbridge.store.sqlite import store as sqlite_store
from sessionbridge.web.appkeys import SETTINGS
from tests.conftest import Api, MakeApi, problem, readyz_becomes
from tests.doubles import ServerGate


class Disk:
    """A tmpfs of a few MiB that the test fills and empties."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._filler = root / "filler"

    def fill(self) -> None:
        chunk = b"\0" * 65536
        fd = os.open(self._filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            for size in (65536, 4096, 1):  # down to the last byte
                try:
                    while os.write(fd, chunk[:size]):
                        pass
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
        finally:
            os.close(fd)
        stats = os.statvfs(self.root)
        assert stats.f_bavail == 0, "the tmpfs still has room"

    def empty(self) -> None:
        self._filler.unlink()


@pytest.fixture
def disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Disk]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs as a full disk needs root")
    root = tmp_path / "disk"
    root.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(root)],
        capture_output=True, text=True, timeout=30,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    # A background checkpoint lets SQLite reuse the WAL's space, so whether a
    # write needs new space on the full disk would depend on timing: without
    # it the WAL only grows, and every write meets the full disk.
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_POLL", 3600.0)
    try:
        yield Disk(root)
    finally:
        subprocess.run(["umount", "-l", str(root)], capture_output=True, timeout=30)


def pending_questions(db: Path) -> list[tuple[int, str]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return list(conn.execute(
            "SELECT seq, content FROM messages WHERE status = 'pending' ORDER BY seq"
        ))


def assert_one_line_each(caplog: pytest.LogCaptureFixture) -> None:
    faults = [r for r in caplog.records if "event=storage_unavailable" in r.getMessage()]
    assert faults, "the fault was not logged"
    for record in faults:
        assert record.exc_info is None and "\n" not in record.getMessage()
    assert not [r for r in caplog.records if r.exc_info and r.name.startswith("sessionbridge")]


async def storage_problem(response: Any) -> None:
    await problem(response, 503, "storage_unavailable")
    assert int(response.headers["Retry-After"]) > 0


async def test_a_full_disk_is_503_storage_unavailable_and_the_bridge_recovers(
    make_api: MakeApi, disk: Disk, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    db = disk.root / "bridge.db"
    api = await make_api(db=str(db), ready_interval=0.1)
    session_id = await api.new_session()
    acknowledged = [(await api.say(session_id, "before the disk filled"))["reply"]]

    disk.fill()

    await storage_problem(await api.request("POST", "/v1/sessions", json={"scenario": "s"}))
    await storage_problem(await api.send(session_id, "while the disk is full"))
    body = await readyz_becomes(api, 503)
    assert "disk is full" in body["detail"]

    disk.empty()

    await readyz_becomes(api, 200)
    acknowledged.append((await api.say(session_id, "after the disk emptied"))["reply"])
    messages = await api.messages(session_id)
    stored = {m["id"]: m["content"] for m in messages if m["role"] == "assistant"}
    assert {r["id"]: r["content"] for r in acknowledged} == stored
    assert [m["status"] for m in messages if m["role"] == "user"] == ["answered", "answered"]
    assert_one_line_each(caplog)


async def test_a_question_whose_failure_could_not_be_stored_is_failed_by_the_next_turn(
    make_api: MakeApi, disk: Disk, ai_gate: ServerGate
) -> None:
    db = disk.root / "bridge.db"
    api = await make_api(db=str(db))
    session_id = await api.new_session()
    await api.say(session_id, "one")
    ai_gate.hold()
    turn = asyncio.create_task(api.send(session_id, "answered while the disk fills"))
    await ai_gate.wait_held()  # the question is stored; the AI server is answering

    disk.fill()
    ai_gate.release()
    await storage_problem(await turn)
    # Neither the answer nor the question's failure could be written.
    assert pending_questions(db) == [(3, "answered while the disk fills")]

    disk.empty()
    await api.say(session_id, "the next turn")

    assert pending_questions(db) == []
    statuses = [(m["content"], m["status"]) for m in await api.messages(session_id)
                if m["role"] == "user"]
    assert statuses == [
        ("one", "answered"),
        ("answered while the disk fills", "failed"),
        ("the next turn", "answered"),
    ]


async def test_every_pending_question_is_failed_at_the_next_start(
    make_api: MakeApi, aiohttp_client: AiohttpClient, settings: Settings, tmp_path: Path
) -> None:
    db = tmp_path / "restart.db"
    first = await make_api(db=str(db))
    session_id = await first.new_session()
    for content in ("one", "two", "three"):
        await first.say(session_id, content)
    await first.client.close()
    # As an older bridge left it: a question pending that is not the last message.
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE messages SET status = 'pending' WHERE content IN ('one', 'two')")

    client = await aiohttp_client(create_app(dataclasses.replace(settings, db=str(db))))
    again = Api(client, first.token)

    assert pending_questions(db) == []
    statuses = [m["status"] for m in await again.messages(session_id) if m["role"] == "user"]
    assert statuses == ["failed", "failed", "answered"]


async def test_a_write_lock_held_past_the_busy_timeout_is_503_then_recovers(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    session_id = await api.new_session()
    holder = sqlite3.connect(api.app[SETTINGS].db, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        response = await api.send(session_id, "while another process writes")
        waited = time.monotonic() - started

        await storage_problem(response)
        # Kept: waiting out the busy timeout (5 s) before giving up is the rule
        # tested, and nothing but the clock shows a wait inside SQLite.
        assert waited >= 4.0
    finally:
        holder.execute("ROLLBACK")
        holder.close()

    reply = await api.say(session_id, "once the lock is gone")

    assert reply["ai_session"] == "created"
    assert [m["status"] for m in await api.messages(session_id) if m["role"] == "user"] == [
        "answered"
    ]
    assert_one_line_each(caplog)
