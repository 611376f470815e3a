"""When a replica is out and when it is back (upstream/replica_health.py), on the test's clock."""

from __future__ import annotations

from typing import Any

import pytest

from sessionbridge.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from sessionbridge.upstream import replica_health
from sessionbridge.upstream.base import HealthReport
from sessionbridge.upstream.http import ServerBusy, ServerFailed
from sessionbridge.upstream.replica_health import Replica, is_replica_fault

HEALTHY = HealthReport(True, "healthy")
REFUSED = HealthReport(False, "the AI server cannot be reached: ClientConnectorError")
SILENT = HealthReport(False, "the AI server's /health did not answer in time", True)
GRACE = 300.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Adapter:
    last_success: float | None = None


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(replica_health.time, "monotonic", clock)
    return clock


def replica() -> Replica:
    adapter: Any = Adapter()
    return Replica("abcd0123", "http://10.0.0.1:8000", adapter)


def test_the_replicas_own_failures_are_told_from_the_requests() -> None:
    for fault in (
        UpstreamUnavailable("refused"), UpstreamTimeout("slow"), ServerFailed("/chat answered 500"),
        ServerBusy("busy", retry_after=3),
    ):
        assert is_replica_fault(fault)
    # A 4xx, a bad answer, an empty reply: another replica would do the same.
    assert not is_replica_fault(UpstreamError("/chat answered 422"))


def test_a_failed_turn_takes_it_out_until_a_probe_started_later_passes(clock: Clock) -> None:
    one = replica()
    one.probed(HEALTHY, clock.now, GRACE)
    probe_started = clock.now
    clock.now += 0.5
    one.failed(UpstreamUnavailable("/chat: ClientConnectorError"))
    assert one.state == "out" and not one.usable

    one.probed(HEALTHY, probe_started, GRACE)  # began before the failure: says nothing of it
    assert one.state == "out"
    one.probed(REFUSED, clock.now, GRACE)
    assert one.state == "out"
    one.probed(HEALTHY, clock.now, GRACE)
    assert one.state == "healthy" and one.usable


def test_a_busy_answer_keeps_it_out_until_its_retry_after(clock: Clock) -> None:
    one = replica()
    one.failed(ServerBusy("the AI server is busy or loading (503)", retry_after=3))

    clock.now += 2
    one.probed(HEALTHY, clock.now, GRACE)
    assert one.state == "out"
    clock.now += 1
    one.probed(HEALTHY, clock.now, GRACE)
    assert one.state == "healthy"


def test_a_seed_protocol_busy_answer_keeps_it_out_until_its_retry_after_too(
    clock: Clock,
) -> None:
    one = replica()
    one.failed(ServerFailed("/chat answered 503", busy_for=2))

    clock.now += 1
    one.probed(HEALTHY, clock.now, GRACE)
    assert one.state == "out"
    clock.now += 1
    one.probed(HEALTHY, clock.now, GRACE)
    assert one.state == "healthy"


def test_a_silent_health_check_is_busy_while_it_runs_turns_or_answered_lately(
    clock: Clock,
) -> None:
    one = replica()
    one.probed(SILENT, clock.now, GRACE)
    assert one.state == "out"  # silent, and nothing says it works

    one.running = 1
    one.probed(SILENT, clock.now, GRACE)
    assert one.state == "busy" and one.usable

    one.running = 0
    one.adapter.last_success = clock.now - 10
    one.probed(SILENT, clock.now, GRACE)
    assert one.state == "busy"
    clock.now += GRACE
    one.probed(SILENT, clock.now, GRACE)
    assert one.state == "out"


def test_a_replica_that_failed_a_turn_is_not_busy_but_out(clock: Clock) -> None:
    one = replica()
    one.running = 1
    one.failed(UpstreamTimeout("/chat did not answer in time"))
    clock.now += 1
    one.probed(SILENT, clock.now, GRACE)
    assert one.state == "out"
