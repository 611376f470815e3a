"""Where a conversation goes among replicas of one AI server: rendezvous hashing, a load bound.

Rendezvous (highest-random-weight) hashing: each replica gets a weight for a
key, a hash of the two, and the key's replicas in order of weight are its
preference. The first healthy one answers. So where a conversation goes
depends on its key and the set of healthy replicas only, and bridges
sharing a database agree without talking; a replica that goes or comes back
moves only the keys whose first choice it is.

The load bound keeps one replica from running far more than its share of
turns when the keys that happen to be running crowd onto it: a replica
already running ``load_bound(running, healthy)`` turns is passed over for
the key's next choice. Every function here is pure.
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Mapping, Sequence

# A replica may run this many times its fair share of the running turns ...
LOAD_FACTOR = 1.25
# ... and always at least this many.
LOAD_FLOOR = 2


def weight(key: str, replica: str) -> int:
    """The key's weight on the replica: 64 bits of BLAKE2b, the same in every process."""
    digest = hashlib.blake2b(
        replica.encode("utf-8") + b"\x00" + key.encode("utf-8"), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big")


def preference(key: str, replicas: Sequence[str]) -> list[str]:
    """The replicas in the key's order of preference (highest weight first)."""
    return sorted(replicas, key=lambda replica: (weight(key, replica), replica), reverse=True)


def load_bound(running: int, replicas: int, factor: float = LOAD_FACTOR) -> int:
    """How many turns a replica may be running when one more among ``running`` is placed.

    ``ceil(factor * (running + 1) / replicas)``, at least ``LOAD_FLOOR``. As
    ``factor`` > 1, some replica is always below it. ``factor`` 0: no bound.
    """
    if factor <= 0 or replicas <= 0:
        return sys.maxsize
    return max(LOAD_FLOOR, math.ceil(factor * (running + 1) / replicas))


def place(
    key: str,
    replicas: Sequence[str],
    running: Mapping[str, int],
    factor: float = LOAD_FACTOR,
) -> list[str]:
    """The replicas to try for one turn of ``key``, in order.

    The key's preference, except that the first replica below the load bound
    goes first (with no bound reached, that is the first choice itself).
    """
    order = preference(key, replicas)
    if not order:
        return order
    bound = load_bound(sum(running.get(r, 0) for r in order), len(order), factor)
    for index, replica in enumerate(order):
        if running.get(replica, 0) < bound:
            return [replica, *order[:index], *order[index + 1 :]]
    return order
