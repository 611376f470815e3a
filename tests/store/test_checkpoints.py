"""The background WAL checkpoints: by commits or by time, and never when nothing was written.

The checkpointer's clock and its polls are a manual clock: each ``tick()`` is
one poll, done when it returns, and time passes only by ``advance()``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from sessionbridge.store.schema import apply_migrations
from sessionbridge.store.sqlite import SqliteStore
from sessionbridge.store.sqlite import store as store_module
from tests.doubles import ManualClock

SCENARIO = "A scenario long enough to fill a page or two of the database. " * 60

OpenStore = Callable[..., Awaitable[SqliteStore]]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    path = tmp_path / "c.db"
    apply_migrations(str(path))
    return path


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(stepped=True)


@pytest.fixture
async def open_store(
    monkeypatch: pytest.MonkeyPatch, db_path: Path, clock: ManualClock
) -> AsyncIterator[OpenStore]:
    """Opens the store once, under a checkpoint policy (set first: the task reads it at once)."""
    opened: list[SqliteStore] = []

    async def open_with(*, interval: float, batches: int) -> SqliteStore:
        monkeypatch.setattr(store_module, "CHECKPOINT_INTERVAL", interval)
        monkeypatch.setattr(store_module, "CHECKPOINT_BATCHES", batches)
        clock.install(monkeypatch, store_module)
        opened.append(await SqliteStore.open(str(db_path)))
        await clock.wait_sleeping()  # the checkpointer waits for its first poll
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
    open_store: OpenStore, db_path: Path, clock: ManualClock
) -> None:
    store = await open_store(interval=3600, batches=5)
    calls = count_checkpoints(store)
    size_before = db_path.stat().st_size

    await write_sessions(store, 20)
    await clock.tick()

    assert calls, "no checkpoint although far more than 5 batches were committed"
    # The checkpoint copied the committed pages from the WAL into the database file.
    assert db_path.stat().st_size > size_before


async def test_few_commits_wait_for_the_interval(
    open_store: OpenStore, clock: ManualClock
) -> None:
    store = await open_store(interval=1.0, batches=10_000)
    calls = count_checkpoints(store)

    await write_sessions(store, 3)
    clock.advance(0.9)
    await clock.tick()
    assert calls == []  # neither enough batches nor the interval yet
    clock.advance(0.1)
    await clock.tick()
    assert len(calls) == 1  # the interval passed: one checkpoint
    clock.advance(5.0)
    for _ in range(3):
        await clock.tick()
    assert len(calls) == 1  # then idle again: nothing was committed since


async def test_an_idle_store_never_checkpoints(open_store: OpenStore, clock: ManualClock) -> None:
    store = await open_store(interval=0.02, batches=1)
    calls = count_checkpoints(store)

    for _ in range(5):
        clock.advance(1.0)
        await clock.tick()

    assert calls == []
    assert clock.sleeps == [store_module.CHECKPOINT_POLL] * 6
