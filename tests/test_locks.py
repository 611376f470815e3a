"""The per-session lock registry."""

from __future__ import annotations

import asyncio

import pytest

from sessionbridge.errors import SessionBusy
from sessionbridge.conversation.locks import SessionLocks


async def test_waiters_are_served_in_arrival_order() -> None:
    locks = SessionLocks(max_waiting=10)
    order: list[int] = []

    async def turn(n: int) -> None:
        async with locks.hold("s"):
            await asyncio.sleep(0.001)
            order.append(n)

    tasks = []
    for n in range(6):
        tasks.append(asyncio.create_task(turn(n)))
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)

    assert order == list(range(6))


async def test_different_sessions_run_at_once() -> None:
    locks = SessionLocks(max_waiting=0)
    both_inside = asyncio.Event()
    inside = 0

    async def turn(session_id: str) -> None:
        nonlocal inside
        async with locks.hold(session_id):
            inside += 1
            if inside == 2:
                both_inside.set()
            await asyncio.wait_for(both_inside.wait(), 1)

    await asyncio.gather(turn("a"), turn("b"))


async def test_too_many_waiters_raise_session_busy() -> None:
    locks = SessionLocks(max_waiting=1)
    release = asyncio.Event()

    async def holder() -> None:
        async with locks.hold("s"):
            await release.wait()

    first = asyncio.create_task(holder())
    second = asyncio.create_task(holder())
    await asyncio.sleep(0.01)
    assert locks.waiting("s") == 1

    with pytest.raises(SessionBusy):
        async with locks.hold("s"):
            pass
    release.set()
    await asyncio.gather(first, second)


async def test_registry_forgets_idle_sessions_even_after_cancellation() -> None:
    locks = SessionLocks(max_waiting=5)
    release = asyncio.Event()

    async def holder() -> None:
        async with locks.hold("s"):
            await release.wait()

    tasks = [asyncio.create_task(holder()) for _ in range(3)]
    await asyncio.sleep(0.01)
    tasks[1].cancel()  # a waiter gives up
    await asyncio.sleep(0.01)
    release.set()
    await asyncio.gather(*tasks, return_exceptions=True)

    assert len(locks) == 0
