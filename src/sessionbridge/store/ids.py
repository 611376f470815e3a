"""Ids of stored rows, the same in every store."""

from __future__ import annotations

import random
import time

_ids = random.Random()  # seeded from os.urandom


def time_ordered_id() -> str:
    """A random UUID whose first 48 bits are the time in milliseconds (the UUIDv7 layout).

    New rows then land at the right edge of the id index instead of on a
    random page of it: one page written per commit rather than one per row.
    A message id names a row, it grants nothing (every read is checked
    against the API key), so its 74 random bits come from a generator seeded
    once from the system, not from a system call per id (13 µs each here,
    two per turn).
    """
    value = (time.time_ns() // 1_000_000) << 80 | _ids.getrandbits(80)
    value = value & ~(0xF << 76) | (0x7 << 76)  # version 7
    value = value & ~(0x3 << 62) | (0x2 << 62)  # RFC 4122 variant
    digits = f"{value:032x}"
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"
