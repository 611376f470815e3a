"""Which replica holds each conversation in use (upstream/residency.py): counted, let go."""

from __future__ import annotations

from sessionbridge.upstream.residency import Residency


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_conversation_is_held_where_its_last_turn_went() -> None:
    residency = Residency(clock=Clock())
    residency.sent("a", "r1")
    residency.sent("b", "r1")
    residency.sent("c", "r2")
    assert residency.counts() == {"r1": 2, "r2": 1}

    residency.sent("a", "r2")  # moved

    assert residency.where("a") == "r2"
    assert residency.counts() == {"r1": 1, "r2": 2}


def test_a_conversation_idle_for_long_holds_no_replica() -> None:
    clock = Clock()
    residency = Residency(idle=900.0, clock=clock)
    residency.sent("a", "r1")
    clock.now += 600
    residency.sent("b", "r1")
    clock.now += 301  # a: 901 s idle, b: 301 s

    assert residency.where("a") is None
    assert residency.where("b") == "r1"
    assert residency.counts() == {"r1": 1}
    residency.sent("b", "r1")  # a turn keeps it in use
    clock.now += 899
    assert residency.counts() == {"r1": 1}


def test_at_most_the_limit_is_remembered_the_least_recently_used_let_go() -> None:
    residency = Residency(limit=3, clock=Clock())
    for key in "abc":
        residency.sent(key, "r1")
    residency.sent("a", "r2")  # a is now the most recent

    residency.sent("d", "r2")

    assert residency.where("b") is None
    assert [residency.where(key) for key in "acd"] == ["r2", "r1", "r2"]
    assert residency.counts() == {"r1": 1, "r2": 2}
