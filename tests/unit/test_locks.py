"""The per-session lock registry."""

from __future__ import annotations

import asyncio

import pytest

from sessionbridge.conversation.locks import SessionLocks
from sessionbridge.errors import SessionBusy
from tests.doubles import Gate, wait_until


async def test_waiters_are_served_in_arrival_order() -> None:
    locks = SessionLocks(max_waiting=10)
    order: list[int] = []
    inside = Gate()
    inside.hold()

    async def turn(n: int) -> None:
        async with locks.hold("s"):
            order.append(n)
            await inside.pass_through()

    tasks = [asyncio.create_task(turn(0))]
    await inside.wait_entered()
    for n in range(1, 6):
        tasks.append(asyncio.create_task(turn(n)))
        await wait_until(lambda: locks.waiting("s") == len(tasks) - 1)  # queued first
    inside.release()
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
            await asyncio.wait_for(both_inside.wait(), 10)  # only against a hang

    await asyncio.gather(turn("a"), turn("b"))


async def test_too_many_waiters_raise_session_busy() -> None:
    locks = SessionLocks(max_waiting=1)
    release = asyncio.Event()

    async def holder() -> None:
        async with locks.hold("s"):
            await release.wait()

    first = asyncio.create_task(holder())
    second = asyncio.create_task(holder())
    await wait_until(lambda: locks.waiting("s") == 1)

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
    await wait_until(lambda: locks.waiting("s") == 2)
    tasks[1].cancel()  # a waiter gives up
    await wait_until(lambda: locks.waiting("s") == 1)
    release.set()
    await asyncio.gather(*tasks, return_exceptions=True)

    assert len(locks) == 0
