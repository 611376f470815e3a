"""Idempotency-Key for the OpenAI face's requests that are not turns (conversations, items).

A retry with the same key and the same request gets the first answer again,
kept as it was sent; another request with that key is 422
``idempotency_mismatch``. Retries that arrive while the first is still being
answered here wait for it. Two bridges answering the same key at once both do
the work, the one that keeps its answer first wins, and the other undoes its
own and answers the winner's.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import IdempotencyMismatch
from ..records import ApiKey
from ..store.base import Store

Answer = dict[str, Any]
# Does the work: its answer, and how to undo the work if another was first.
Work = Callable[[], Awaitable[tuple[Answer, Callable[[], Awaitable[None]]]]]


class Replays:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._running: weakref.WeakValueDictionary[tuple[int, str], asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )

    async def once(
        self, key: ApiKey, idempotency_key: str | None, fingerprint: str, work: Work
    ) -> Answer:
        if idempotency_key is None:
            answer, _ = await work()
            return answer
        slot = (key.id, idempotency_key)
        lock = self._running.get(slot)
        if lock is None:
            lock = self._running[slot] = asyncio.Lock()
        async with lock:
            kept = await self._kept(key, idempotency_key, fingerprint)
            if kept is not None:
                return kept
            answer, undo = await work()
            if await self._store.put_result(
                key.id, idempotency_key, fingerprint, json.dumps(answer, ensure_ascii=False)
            ):
                return answer
            await undo()
            kept = await self._kept(key, idempotency_key, fingerprint)
            assert kept is not None  # put_result found one
            return kept

    async def _kept(self, key: ApiKey, idempotency_key: str, fingerprint: str) -> Answer | None:
        found = await self._store.get_result(key.id, idempotency_key)
        if found is None:
            return None
        if found[0] != fingerprint:
            raise IdempotencyMismatch("this Idempotency-Key was used with another request")
        answer: Answer = json.loads(found[1])
        return answer
