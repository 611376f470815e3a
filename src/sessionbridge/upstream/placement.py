"""Where a conversation goes among replicas of one AI server: rendezvous hashing, a load bound.

Rendezvous (highest-random-weight) hashing: each replica gets a weight for a
key, a hash of the two, and the key's replicas in order of weight are its
preference. The first healthy one answers. So where a conversation goes
depends on its key and the set of healthy replicas only, and bridges
sharing a database agree without talking; a replica that goes or comes back
moves only the keys whose first choice it is.

The load bound keeps one replica from holding far more than its share of the
conversations when the keys that happen to be in use crowd onto it: a
replica already holding ``load_bound(held, healthy)`` conversations takes no
other, and the key goes to its next choice; where the replicas say how many
conversations they keep cached at once (llama.cpp's slots) and there is
room for every conversation somewhere, no replica takes more than that. A
conversation a replica already holds stays there while every earlier choice
is full, since moving it would throw its cache away. Every function here is
pure.
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Collection, Mapping, Sequence

# A replica may hold this many times its fair share of the conversations ...
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


def load_bound(held: int, replicas: int, factor: float = LOAD_FACTOR) -> int:
    """How many conversations a replica may hold when one more among ``held`` is placed.

    ``ceil(factor * (held + 1) / replicas)``, at least ``LOAD_FLOOR``. As
    ``factor`` > 1, some replica is always below it. ``factor`` 0: no bound.
    """
    if factor <= 0 or replicas <= 0:
        return sys.maxsize
    return max(LOAD_FLOOR, math.ceil(factor * (held + 1) / replicas))


def place(
    key: str,
    replicas: Sequence[str],
    held: Mapping[str, int],
    factor: float = LOAD_FACTOR,
    *,
    holding: Collection[str] = (),
    capacity: Mapping[str, int | None] | None = None,
) -> list[str]:
    """The replicas to try for one turn of ``key``, in order.

    ``held``: how many conversations each replica holds; ``holding``: the
    replicas that hold this one (its cache is there); ``capacity``: how many
    conversations each keeps cached at once, where known. The key's
    preference, except that the first replica with room for it goes first:
    one that holds it, or holds fewer than the bound (with room everywhere,
    that is the first choice itself).
    """
    order = preference(key, replicas)
    if not order or factor <= 0:
        return order
    total = sum(held.get(r, 0) for r in order)
    bound = load_bound(total, len(order), factor)
    caps = [capacity.get(r) for r in order] if capacity else []
    # Room for every conversation in the replicas' caches: keep each within its own.
    within_caches = bool(caps) and all(caps) and total < sum(c or 0 for c in caps)
    for index, replica in enumerate(order):
        limit = min(bound, caps[index] or bound) if within_caches else bound
        if replica in holding or held.get(replica, 0) < limit:
            return [replica, *order[:index], *order[index + 1 :]]
    return order
