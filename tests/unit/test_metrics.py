"""The bridge's counters and histograms read at /metrics as the library's own would."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from sessionbridge.metrics import Counters, Histograms

BUCKETS = (0.001, 0.0025, 0.01, 1, 2.5, 120)
label_values = st.sampled_from(["a", "b", 'quote"d', "back\\slash", "new\nline", ""])
# Bounds themselves, either side of them, and past the last one.
seconds = st.one_of(
    st.sampled_from([0.0, *BUCKETS, 0.00099999, 0.0010001, 119.9999, 120.0001]),
    st.floats(min_value=0, max_value=1e6, allow_nan=False),
)


@given(st.lists(st.tuples(label_values, label_values, seconds), max_size=30))
def test_a_histogram_reads_as_the_librarys_own(observations: list[tuple[str, str, float]]) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    mine = Histograms("h_seconds", "Help.", ["x", "y"], BUCKETS, ours)
    library = Histogram("h_seconds", "Help.", ["x", "y"], buckets=BUCKETS, registry=theirs)
    for x, y, value in observations:
        mine.observe((x, y), value)
        library.labels(x, y).observe(value)
    assert generate_latest(ours) == without_created(generate_latest(theirs))


@given(st.lists(st.tuples(label_values, st.integers(min_value=0, max_value=10**6)), max_size=30))
def test_a_counter_reads_as_the_librarys_own(increments: list[tuple[str, int]]) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    mine = Counters("c", "Help.", ["x"], ours, initial=[("a",)])
    library = Counter("c", "Help.", ["x"], registry=theirs)
    library.labels("a")
    for x, amount in increments:
        mine.inc((x,), amount)
        library.labels(x).inc(amount)
    assert generate_latest(ours) == without_created(generate_latest(theirs))


def test_a_counter_refuses_to_go_down() -> None:
    counters = Counters("c", "Help.", [], CollectorRegistry(), initial=[()])
    with pytest.raises(ValueError, match="only goes up"):
        counters.inc((), -1)


def without_created(text: bytes) -> bytes:
    # The bridge switches the library's *_created series off process-wide;
    # a test must not, so they are left out of the library's text here.
    return b"".join(
        line for line in text.splitlines(keepends=True) if b"_created" not in line
    )
