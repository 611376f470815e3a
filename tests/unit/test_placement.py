"""Where a conversation goes among replicas (upstream/placement.py): pure, stable, bounded.

The spread measured here is the one docs/ai-servers.md quotes: 1000
conversation ids over 3 replicas.
"""

from __future__ import annotations

import collections
import random
import uuid

from hypothesis import given
from hypothesis import strategies as st

from sessionbridge.upstream.placement import (
    LOAD_FACTOR,
    LOAD_FLOOR,
    load_bound,
    place,
    preference,
    weight,
)
from sessionbridge.upstream.replica_state import PREFIX, Held

REPLICAS = ["http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.3:8000"]


def session_ids(count: int, seed: int = 2026) -> list[str]:
    """Conversation ids as the bridge makes them (random UUIDs), the same every run."""
    rng = random.Random(seed)
    return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(count)]


def first_choices(keys: list[str], replicas: list[str]) -> collections.Counter[str]:
    return collections.Counter(preference(key, replicas)[0] for key in keys)


# -- a pure function, the same in every process and every release ---------------------------


def test_the_weight_is_the_same_in_every_process_and_release() -> None:
    # Bridges sharing a database must agree, and an upgrade must not move
    # every conversation: the weight is BLAKE2b, never Python's salted hash().
    assert weight("conversation-1", "http://a:1") == 10639221037318840841
    assert preference("conversation-1", ["http://a:1", "http://b:2", "http://c:3"]) == [
        "http://c:3", "http://a:1", "http://b:2"
    ]


def test_the_preference_does_not_depend_on_the_order_replicas_are_listed_in() -> None:
    for key in session_ids(50):
        assert preference(key, REPLICAS) == preference(key, list(reversed(REPLICAS)))
        assert sorted(preference(key, REPLICAS)) == sorted(REPLICAS)


def test_a_replica_going_moves_only_its_own_conversations_and_they_come_back() -> None:
    keys = session_ids(1000)
    with_all = {key: preference(key, REPLICAS)[0] for key in keys}
    without_third = {key: preference(key, REPLICAS[:2])[0] for key in keys}

    moved = [key for key in keys if with_all[key] != without_third[key]]
    assert moved and all(with_all[key] == REPLICAS[2] for key in moved)
    assert len(moved) == first_choices(keys, REPLICAS)[REPLICAS[2]]
    # Each goes to its second choice, so the other two share them.
    assert all(without_third[key] == preference(key, REPLICAS)[1] for key in moved)


def test_a_replica_added_takes_only_conversations_that_come_to_it() -> None:
    keys = session_ids(1000)
    fourth = "http://10.0.0.4:8000"
    before = {key: preference(key, REPLICAS)[0] for key in keys}
    after = {key: preference(key, [*REPLICAS, fourth])[0] for key in keys}

    assert {after[key] for key in keys if after[key] != before[key]} == {fourth}


# -- the spread ---------------------------------------------------------------------------


def test_1000_conversations_spread_over_3_replicas_within_ten_percent_of_a_fair_share() -> None:
    counts = first_choices(session_ids(1000), REPLICAS)

    fair = 1000 / 3
    assert sorted(counts.values()) == [327, 334, 339]  # what docs/ai-servers.md quotes
    assert all(0.9 * fair <= count <= 1.1 * fair for count in counts.values())


def test_1000_conversations_placed_one_by_one_stay_within_the_load_bound() -> None:
    running: collections.Counter[str] = collections.Counter()
    for key in session_ids(1000):
        bound = load_bound(sum(running.values()), len(REPLICAS))
        chosen = place(key, REPLICAS, running)[0]
        assert running[chosen] < bound
        running[chosen] += 1

    assert max(running.values()) <= load_bound(999, 3) == 417


def test_conversations_that_all_prefer_one_replica_are_held_to_the_bound_there() -> None:
    keys = [k for k in session_ids(1000) if preference(k, REPLICAS)[0] == REPLICAS[0]][:60]
    running: collections.Counter[str] = collections.Counter()
    for key in keys:
        running[place(key, REPLICAS, running)[0]] += 1

    assert running[REPLICAS[0]] == load_bound(59, 3) == 25  # ceil(1.25 * 60 / 3)
    assert sum(running.values()) == 60


def test_below_the_bound_a_conversation_goes_to_its_first_choice() -> None:
    key = session_ids(1)[0]
    first = preference(key, REPLICAS)[0]

    assert place(key, REPLICAS, {first: LOAD_FLOOR - 1})[0] == first
    # At the floor, with nothing running elsewhere, the next choice answers.
    assert place(key, REPLICAS, {first: LOAD_FLOOR})[0] == preference(key, REPLICAS)[1]
    # Without a bound (factor 0) the first choice always answers.
    assert place(key, REPLICAS, {first: 1000}, factor=0)[0] == first


def test_with_room_in_the_caches_no_replica_takes_more_conversations_than_its_slots() -> None:
    # Eight conversations, two replicas of four slots: hashing alone would put
    # five or more on one of them in most draws, and one would lose its cache.
    two = REPLICAS[:2]
    slots = {replica: 4 for replica in two}
    for draw in range(50):
        held: collections.Counter[str] = collections.Counter()
        for key in session_ids(8, seed=draw):
            held[place(key, two, held, capacity=slots)[0]] += 1
        assert held == {two[0]: 4, two[1]: 4}, (draw, held)


def test_a_conversation_stays_where_it_is_held_while_its_first_choice_is_full() -> None:
    key = session_ids(1)[0]
    first, second, third = preference(key, REPLICAS)
    slots = {replica: 4 for replica in REPLICAS}
    full = {first: 4, second: 2, third: 0}

    # Held by its second choice (sent there when the first was full): it stays,
    # though the third has more room; a new conversation would go there too.
    assert place(key, REPLICAS, full, holding={second}, capacity=slots)[0] == second
    assert place(key, REPLICAS, full, capacity=slots)[0] == second
    # Its first choice has room again: it goes back.
    assert place(key, REPLICAS, {**full, first: 2}, holding={second}, capacity=slots)[0] == first
    # Every cache is full: the fair bound alone applies, and its first choice may take it.
    everywhere = {first: 4, second: 4, third: 4}
    assert place(key, REPLICAS, everywhere, holding={second}, capacity=slots)[0] == first


@given(
    running=st.lists(st.integers(min_value=0, max_value=500), min_size=1, max_size=8),
    key=st.text(max_size=40),
    factor=st.sampled_from([1.0, LOAD_FACTOR, 2.0]),
)
def test_some_replica_is_always_below_the_bound(
    running: list[int], key: str, factor: float
) -> None:
    replicas = [f"http://10.0.1.{i}:8000" for i in range(len(running))]
    counts = dict(zip(replicas, running, strict=True))
    order = place(key, replicas, counts, factor)

    assert sorted(order) == sorted(replicas)
    assert counts[order[0]] < load_bound(sum(running), len(replicas), factor)


# -- the state kept per conversation ----------------------------------------------------------


def test_the_state_names_the_replicas_that_hold_every_answered_turn() -> None:
    held = Held.parse(None)
    assert held.empty and held.carried() is None

    held.entries["aaaa0001"] = "ai-session-on-a"
    held.entries["bbbb0002"] = "ai-session-on-b"  # recovered on b, its turn then failed
    again = Held.parse(held.encode())
    assert again.entries == held.entries and held.encode().startswith(PREFIX)

    assert again.answered_on("bbbb0002", "ai-session-on-b")  # only b holds every turn now
    assert again.entries == {"bbbb0002": "ai-session-on-b"}
    assert not again.answered_on("bbbb0002", "ai-session-on-b")  # the steady state writes nothing


def test_a_state_from_one_ai_server_is_held_by_no_replica_but_carried() -> None:
    held = Held.parse("from=12")
    assert not held.empty and held.entries == {} and held.carried() == "from=12"

    unreadable = Held.parse(PREFIX + "{not json")
    assert not unreadable.empty and unreadable.entries == {}


def test_the_state_keeps_the_home_a_conversation_was_placed_on() -> None:
    held = Held.parse(None)
    held.settle("aaaa0001")
    held.settle("bbbb0002")  # placed once: a failover does not move its home
    assert held.home == "aaaa0001"
    # The first answer stores the home, even where the entries are as they were.
    held.entries["aaaa0001"] = "ai-session-on-a"
    assert held.answered_on("aaaa0001", "ai-session-on-a")
    again = Held.parse(held.encode())
    assert again.home == "aaaa0001" and again.entries == {"aaaa0001": "ai-session-on-a"}
    again.settle("bbbb0002")
    assert not again.answered_on("aaaa0001", "ai-session-on-a")  # nothing new to store
    assert Held.parse(PREFIX + '{"held": {}, "home": 7}').home is None
