"""Which conversation each llama.cpp slot holds, as far as this bridge knows.

Used only with slot saving on: a conversation is pinned to a slot while it
holds it, and its saved slot file is restored when it comes back to one.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass


@dataclass(eq=False)
class Slot:
    index: int
    lock: asyncio.Lock
    resident: str | None = None
    used: float = 0.0


class SlotTable:
    def __init__(self, total: int) -> None:
        self._slots = [Slot(i, asyncio.Lock()) for i in range(total)]

    def choose(self, session_id: str) -> Slot:
        """The slot holding this conversation, else the least recently used free one."""
        for slot in self._slots:
            if slot.resident == session_id:
                return slot
        free = [s for s in self._slots if not s.lock.locked()] or self._slots
        return min(free, key=lambda s: s.used)

    def place(self, slot: Slot, session_id: str | None) -> None:
        slot.resident = session_id
        slot.used = time.monotonic()

    def evict(self, session_id: str) -> None:
        for slot in self._slots:
            if slot.resident == session_id:
                slot.resident = None

    def forget_all(self) -> None:
        for slot in self._slots:
            slot.resident = None
