"""The group-commit writer: batching, isolation of a failing write, durability order."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sessionbridge.store.sqlite.group_commit import GroupCommitWriter
from tests.doubles import wait_until

# FULL waits for the disk at each commit: batches go to the writer thread.
# NORMAL does not: they are committed on the event loop.
SYNCHRONOUS = {"thread": "FULL", "loop": "NORMAL"}
# Turns of the event loop until a write nothing joined is committed and its writer goes on.
LONE_WRITE_TURNS = 2


@pytest.fixture(params=sorted(SYNCHRONOUS))
async def writer(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[GroupCommitWriter]:
    path = str(tmp_path / "w.db")
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE t (n INTEGER PRIMARY KEY)")
    opened = await GroupCommitWriter.open(
        path,
        ["PRAGMA journal_mode=WAL", f"PRAGMA synchronous={SYNCHRONOUS[request.param]}",
         "PRAGMA busy_timeout=5000"],
    )
    assert opened.on_loop == (request.param == "loop")
    yield opened
    await opened.close()


def insert(n: int) -> object:
    return lambda db: db.execute("INSERT INTO t (n) VALUES (?) RETURNING n", (n,)).fetchone()[0]


def count(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("SELECT count(*) FROM t").fetchone()[0])


async def test_concurrent_writes_all_commit(writer: GroupCommitWriter, tmp_path: Path) -> None:
    results = await asyncio.gather(*(writer.run(insert(n)) for n in range(1, 101)))

    assert results == list(range(1, 101))
    assert count(tmp_path / "w.db") == 100  # visible to another connection: committed


async def test_a_failing_write_fails_alone(writer: GroupCommitWriter, tmp_path: Path) -> None:
    await writer.run(insert(7))

    outcomes = await asyncio.gather(
        writer.run(insert(1)),
        writer.run(insert(7)),  # duplicate key
        writer.run(insert(2)),
        return_exceptions=True,
    )

    assert outcomes[0] == 1 and outcomes[2] == 2
    assert isinstance(outcomes[1], sqlite3.IntegrityError)
    assert count(tmp_path / "w.db") == 3


async def test_close_commits_what_is_pending(tmp_path: Path) -> None:
    path = str(tmp_path / "c.db")
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE t (n INTEGER PRIMARY KEY)")
    writer = await GroupCommitWriter.open(path, [])
    pending = [asyncio.create_task(writer.run(insert(n))) for n in range(5)]
    # Tasks start in the order they were created: every write is handed over first.
    await asyncio.create_task(writer.close())

    assert [task.result() for task in pending] == list(range(5))
    assert count(tmp_path / "c.db") == 5


@pytest.mark.parametrize("turns_in_flight", [0, 2])
async def test_a_write_waits_for_a_lock_another_connection_holds(
    writer: GroupCommitWriter, tmp_path: Path, turns_in_flight: int
) -> None:
    # Alone (committed in its caller) or in company (gathered), alike.
    writer.watch_turns(lambda: turns_in_flight)
    holder = sqlite3.connect(tmp_path / "w.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    # Neither path gives up at once: the loop hands the batch to the thread,
    # which waits for the lock up to the busy timeout.
    write = asyncio.create_task(writer.run(insert(1)))

    def with_the_thread() -> bool:  # handed over, taken off the queue: waiting for the lock
        return writer._in_flight and not writer._pending and writer._batches.empty()

    await wait_until(with_the_thread)
    assert not write.done()
    holder.execute("ROLLBACK")
    holder.close()

    assert await write == 1
    assert await writer.run(insert(2)) == 2  # and the loop commits again
    assert count(tmp_path / "w.db") == 2


async def test_a_write_of_many_rows_is_committed(
    writer: GroupCommitWriter, tmp_path: Path
) -> None:
    def many(db: sqlite3.Connection) -> int:
        db.executemany("INSERT INTO t (n) VALUES (?)", [(n,) for n in range(1000)])
        return 1000

    results = await asyncio.gather(writer.run(insert(5000)), writer.run(many, quick=False))

    assert results == [5000, 1000]
    assert count(tmp_path / "w.db") == 1001


async def turns_to_commit(writer: GroupCommitWriter) -> int:
    """Turns of the loop, after the one that asks a write, until it is committed and its writer
    goes on (nothing timed)."""
    write = asyncio.create_task(writer.run(insert(1)))
    await asyncio.sleep(0)  # one turn of the loop: the write is asked
    turns = 0
    while not write.done():
        await asyncio.sleep(0)
        turns += 1
    assert write.result() == 1
    return turns


async def test_a_write_alone_is_committed_at_the_first_look(
    writer: GroupCommitWriter, tmp_path: Path
) -> None:
    if not writer.on_loop:
        pytest.skip("the thread commits every batch it is handed")

    # One turn to commit it (no other write joined), one for its task to go on.
    assert await turns_to_commit(writer) <= LONE_WRITE_TURNS
    assert count(tmp_path / "w.db") == 1


async def test_a_write_with_no_other_turn_in_flight_is_committed_in_its_caller(
    writer: GroupCommitWriter, tmp_path: Path
) -> None:
    if not writer.on_loop:
        pytest.skip("the thread commits every batch it is handed")
    writer.watch_turns(lambda: 1)  # the writer's own turn only

    assert await turns_to_commit(writer) == 0  # done in the turn that asked it
    assert count(tmp_path / "w.db") == 1


async def test_writes_of_turns_in_flight_together_are_committed_together(
    writer: GroupCommitWriter, tmp_path: Path
) -> None:
    if not writer.on_loop:
        pytest.skip("the thread takes the first write before the second is asked")
    writer.watch_turns(lambda: 2)
    before = writer.batches

    results = await asyncio.gather(writer.run(insert(1)), writer.run(insert(2)))

    assert results == [1, 2] and writer.batches == before + 1
    assert count(tmp_path / "w.db") == 2

