"""The background WAL checkpoints: by commits or by time, and never when nothing was written."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from sessionbridge.store.schema import apply_migrations
from sessionbridge.store.sqlite import store as store_module
from sessionbridge.store.sqlite import SqliteStore

SCENARIO = "A scenario long enough to fill a page or two of the database. " * 60

OpenStore = Callable[..., Awaitable[SqliteStore]]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    path = tmp_path / "c.db"
    apply_migrations(str(path))
    return path


@pytest.fixture
async def open_store(
    monkeypatch: pytest.MonkeyPatch, db_path: Path
) -> AsyncIterator[OpenStore]:
    """Opens the store once, under a checkpoint policy (set first: the task reads it at once)."""
    opened: list[SqliteStore] = []

    async def open_with(*, interval: float, batches: int) -> SqliteStore:
        monkeypatch.setattr(store_module, "CHECKPOINT_INTERVAL", interval)
        monkeypatch.setattr(store_module, "CHECKPOINT_BATCHES", batches)
        monkeypatch.setattr(store_module, "CHECKPOINT_POLL", 0.01)
        opened.append(await SqliteStore.open(str(db_path)))
        return opened[0]

    yield open_with
    for store in opened:
        await store.close()


def count_checkpoints(store: SqliteStore) -> list[str]:
    """Record the checkpointer's statements (it runs nothing else)."""
    calls: list[str] = []
    checkpointer = store._checkpointer
    execute = checkpointer.execute

    def recording(sql: str, *args: Any) -> Any:
        calls.append(sql)
        return execute(sql, *args)

    checkpointer.execute = recording  # type: ignore[method-assign]
    return calls


async def write_sessions(store: SqliteStore, count: int) -> None:
    key = await store.create_key("k", b"hash")
    for _ in range(count):  # one after another: one committed batch each
        await store.create_session(key.id, None, SCENARIO, 100)


async def test_enough_commits_checkpoint_before_the_interval(
    open_store: OpenStore, db_path: Path
) -> None:
    store = await open_store(interval=3600, batches=5)
    calls = count_checkpoints(store)
    size_before = db_path.stat().st_size

    await write_sessions(store, 20)
    for _ in range(200):
        if calls and db_path.stat().st_size > size_before:
            break
        await asyncio.sleep(0.01)

    assert calls, "no checkpoint although far more than 5 batches were committed"
    # The checkpoint copied the committed pages from the WAL into the database file.
    assert db_path.stat().st_size > size_before


async def test_few_commits_wait_for_the_interval(open_store: OpenStore) -> None:
    store = await open_store(interval=1.0, batches=10_000)
    calls = count_checkpoints(store)

    await write_sessions(store, 3)
    await asyncio.sleep(0.1)
    assert calls == []  # neither enough batches nor the interval yet
    await asyncio.sleep(1.2)
    assert len(calls) == 1  # the interval passed: one checkpoint, then idle again


async def test_an_idle_store_never_checkpoints(open_store: OpenStore) -> None:
    store = await open_store(interval=0.02, batches=1)
    calls = count_checkpoints(store)

    await asyncio.sleep(0.3)

    assert calls == []
