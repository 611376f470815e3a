"""Parts of a turn taken out of a bridge, to measure what each one costs (never for use).

A profile says where a turn's CPU is spent, but its shares are samples, and a
part's cost includes what it makes others do (a turn of the loop it waits,
an allocation the collector later pays for). Taking the part out and
measuring the bridge beside the whole one (``bench/versions.py``,
``name=src~writes``) gives that cost directly. ``bench/launch.py --without
PART[,PART]`` applies these before the bridge starts:

- ``writes``: a turn's two writes (its question, its answer) are not stored;
  the store returns the messages it would have stored, numbered in memory.
  What is left of a write is what the turn does with it.
- ``metrics``: the bridge's Prometheus counters and histograms count nothing.

A bridge without its writes keeps nothing: it answers, and that is all it
is good for.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

PARTS = ("writes", "metrics")


def without_writes() -> None:
    from sessionbridge.store.sqlite.store import SqliteStore

    numbers = itertools.count(1_000_000_000)

    def numbered(message: Any) -> Any:
        number = next(numbers)
        return dataclasses.replace(message, pk=number, seq=number)

    async def begin_turn(self: SqliteStore, session_pk: int, content: str, **_: Any) -> Any:
        return numbered(self._draft("user", content, "pending"))

    async def finish_turn(
        self: SqliteStore, session_pk: int, user_message_pk: int, reply: str, kind: Any,
        idempotency: Any = None, usage: Any = None, piece_ends: str | None = None,
        truncated: bool = False,
    ) -> Any:
        return numbered(self._draft("assistant", reply, "answered", kind, usage, piece_ends))

    SqliteStore.begin_turn = begin_turn  # type: ignore[method-assign]
    SqliteStore.finish_turn = finish_turn  # type: ignore[method-assign]


def without_metrics() -> None:
    from sessionbridge.metrics import Metrics

    def nothing(*args: Any, **kwargs: Any) -> None:
        return None

    for name in dir(Metrics):
        if name.startswith(("observe_", "count_", "set_")):
            setattr(Metrics, name, nothing)


APPLY: dict[str, Callable[[], None]] = {"writes": without_writes, "metrics": without_metrics}


def take_out(parts: str) -> None:
    """Apply ``parts`` (comma-separated names from PARTS) to the bridge about to start."""
    for part in parts.split(","):
        if part not in APPLY:
            raise SystemExit(f"launch.py: --without {part!r}: choose from {', '.join(PARTS)}")
        APPLY[part]()
