"""Prometheus instruments, kept in a registry of the app's own (no global state).

The counters and histograms are plain numbers that the registry reads when
/metrics is asked (a custom collector: the library's own way to expose
values kept elsewhere). The library's own Counter and Histogram take a lock
and look their labels up on every count, which was a few percent of a turn's
CPU (measured by taking the metrics out: ``make bench``'s parts part); the
bridge counts only on its event loop, so a dict of numbers does. The gauges
stay the library's: they are read, not counted, per turn.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, Gauge, disable_created_metrics
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .records import Usage

# Client requests take milliseconds without the AI server and up to minutes with it.
_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120
)

Labels = tuple[str, ...]


class _Family(Collector):
    """A metric family the registry reads at each scrape: its name, help and label names."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str],
        registry: CollectorRegistry,
    ) -> None:
        self._name, self._documentation, self._labelnames = name, documentation, labelnames
        registry.register(self)

    def describe(self) -> Iterable[Metric]:
        # The registry reads the names once, at registration, to refuse duplicates.
        return self.collect()


class Counters(_Family):
    """A counter with labels: a number per label set, counted on the event loop."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str],
        registry: CollectorRegistry, initial: Iterable[Labels] = (),
    ) -> None:
        self._values: dict[Labels, float] = {labels: 0.0 for labels in initial}
        super().__init__(name, documentation, labelnames, registry)

    def inc(self, labels: Labels = (), amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError(f"{self._name}: a counter only goes up ({amount})")
        values = self._values
        values[labels] = values.get(labels, 0.0) + amount

    def collect(self) -> list[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for labels, value in list(self._values.items()):
            family.add_metric(labels, value)
        return [family]


class Histograms(_Family):
    """A histogram with labels: per label set, a count per bucket and the sum."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str],
        buckets: Sequence[float], registry: CollectorRegistry,
    ) -> None:
        self._bounds = tuple(float(bound) for bound in buckets)
        # The bounds as the library writes them ("1.0", "+Inf").
        self._le = [floatToGoString(bound) for bound in (*self._bounds, float("inf"))]  # type: ignore[no-untyped-call]
        # Per label set: the observations that fell in each bucket (the last
        # one +Inf), then their sum.
        self._series: dict[Labels, list[float]] = {}
        super().__init__(name, documentation, labelnames, registry)

    def observe(self, labels: Labels, value: float) -> None:
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = [0.0] * (len(self._bounds) + 2)
        # The first bucket whose bound is at least the value, as the library counts.
        series[bisect_left(self._bounds, value)] += 1
        series[-1] += value

    def collect(self) -> list[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for labels, series in list(self._series.items()):
            total, buckets = 0.0, []
            for le, count in zip(self._le, series, strict=False):
                total += count
                buckets.append((le, total))
            family.add_metric(labels, buckets, series[-1])
        return [family]


class Metrics:
    def __init__(self) -> None:
        # The *_created series double the output and say nothing a scraper
        # needs; the switch is the library's own, process-wide.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.ai_sessions = Counters(
            "sessionbridge_ai_sessions",
            "Answered turns, by how they got their AI session.",
            ["kind"], registry, initial=[("created",), ("reused",), ("recovered",)],
        )
        self.turns = Counters(
            "sessionbridge_turns",
            "Finished turns by outcome (answered or an error code).",
            ["outcome"], registry,
        )
        self.responses = Counters(
            "sessionbridge_responses",
            "Ended responses of the OpenAI face, by status.",
            ["status"], registry,
            initial=[("completed",), ("incomplete",), ("failed",), ("cancelled",)],
        )
        self.requests = Histograms(
            "sessionbridge_request_duration_seconds",
            "Client requests by route, method and status.",
            ["method", "route", "status"], _LATENCY_BUCKETS, registry,
        )
        self.upstream_calls = Histograms(
            "sessionbridge_upstream_duration_seconds",
            "AI-server calls by endpoint and outcome.",
            ["endpoint", "outcome"], _LATENCY_BUCKETS, registry,
        )
        self.empty_replies = Counters(
            "sessionbridge_upstream_empty_replies",
            "Empty or blank replies from the AI server.",
            [], registry, initial=[()],
        )
        self.inflight = Gauge(
            "sessionbridge_turns_in_flight",
            "Turns currently calling the AI server.",
            registry=registry,
        )
        self.locked_sessions = Gauge(
            "sessionbridge_locked_sessions",
            "Sessions with a turn running or waiting.",
            registry=registry,
        )

        self.prompt_tokens = Counters(
            "sessionbridge_prompt_tokens",
            "Prompt tokens of answered turns, by whether the AI server's cache held them.",
            ["source"], registry, initial=[("cached",), ("computed",)],
        )
        self.slot_actions = Counters(
            "sessionbridge_slot_actions",
            "llama.cpp slot files saved and restored, by outcome.",
            ["action", "outcome"], registry,
        )

        # Several AI servers (upstream/replicas.py): the same counts by replica.
        self.replica_turns = Counters(
            "sessionbridge_replica_turns",
            "Exchanges with each replica of the AI server, by outcome"
            " (answered, empty_reply or an error code).",
            ["replica", "outcome"], registry,
        )
        self.replica_prompt_tokens = Counters(
            "sessionbridge_replica_prompt_tokens",
            "Prompt tokens of answered turns by replica, by whether its cache held them.",
            ["replica", "source"], registry,
        )
        self.failovers = Counters(
            "sessionbridge_replica_failovers",
            "Turns asked again on the next replica after this one failed them, by reason.",
            ["replica", "reason"], registry,
        )
        self.replica_healthy = Gauge(
            "sessionbridge_replica_healthy",
            "1 while the replica takes turns (healthy or busy), 0 while it is out.",
            ["replica"],
            registry=registry,
        )

    def observe_upstream(self, endpoint: str, outcome: str, seconds: float) -> None:
        self.upstream_calls.observe((endpoint, outcome), seconds)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.observe((method, route, str(status)), seconds)

    def count_turn(self, outcome: str) -> None:
        self.turns.inc((outcome,))

    def count_prompt_tokens(self, usage: Usage) -> None:
        self.prompt_tokens.inc(("cached",), usage.cached_tokens)
        self.prompt_tokens.inc(("computed",), max(usage.prompt_tokens - usage.cached_tokens, 0))

    def count_replica_turn(self, replica: str, outcome: str) -> None:
        self.replica_turns.inc((replica, outcome))

    def count_replica_prompt_tokens(self, replica: str, usage: Usage) -> None:
        self.replica_prompt_tokens.inc((replica, "cached"), usage.cached_tokens)
        self.replica_prompt_tokens.inc(
            (replica, "computed"), max(usage.prompt_tokens - usage.cached_tokens, 0)
        )

    def count_failover(self, replica: str, reason: str) -> None:
        self.failovers.inc((replica, reason))

    def set_replica_healthy(self, replica: str, healthy: bool) -> None:
        self.replica_healthy.labels(replica).set(1 if healthy else 0)

    def count_slot_action(self, action: str, outcome: str) -> None:
        self.slot_actions.inc((action, outcome))

    def count_response(self, status: str) -> None:
        self.responses.inc((status,))

    def count_empty_reply(self) -> None:
        self.empty_replies.inc()

    def count_ai_session(self, kind: str) -> None:
        self.ai_sessions.inc((kind,))
