"""Prometheus instruments, kept in a registry of the app's own (no global state)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from .records import Usage

# Client requests take milliseconds without the AI server and up to minutes with it.
_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120
)


class Metrics:
    def __init__(self) -> None:
        # The *_created series double the output and say nothing a scraper
        # needs; the switch is the library's own, process-wide.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        self.ai_sessions = Counter(
            "sessionbridge_ai_sessions",
            "Answered turns, by how they got their AI session.",
            ["kind"],
            registry=self.registry,
        )
        for kind in ("created", "reused", "recovered"):
            self.ai_sessions.labels(kind)
        self.turns = Counter(
            "sessionbridge_turns",
            "Finished turns by outcome (answered or an error code).",
            ["outcome"],
            registry=self.registry,
        )
        self.responses = Counter(
            "sessionbridge_responses",
            "Ended responses of the OpenAI face, by status.",
            ["status"],
            registry=self.registry,
        )
        for status in ("completed", "incomplete", "failed", "cancelled"):
            self.responses.labels(status)
        self.requests = Histogram(
            "sessionbridge_request_duration_seconds",
            "Client requests by route, method and status.",
            ["method", "route", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.upstream_calls = Histogram(
            "sessionbridge_upstream_duration_seconds",
            "AI-server calls by endpoint and outcome.",
            ["endpoint", "outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.empty_replies = Counter(
            "sessionbridge_upstream_empty_replies",
            "Empty or blank replies from the AI server.",
            registry=self.registry,
        )
        self.inflight = Gauge(
            "sessionbridge_turns_in_flight",
            "Turns currently calling the AI server.",
            registry=self.registry,
        )
        self.locked_sessions = Gauge(
            "sessionbridge_locked_sessions",
            "Sessions with a turn running or waiting.",
            registry=self.registry,
        )

        self.prompt_tokens = Counter(
            "sessionbridge_prompt_tokens",
            "Prompt tokens of answered turns, by whether the AI server's cache held them.",
            ["source"],
            registry=self.registry,
        )
        for source in ("cached", "computed"):
            self.prompt_tokens.labels(source)
        self.slot_actions = Counter(
            "sessionbridge_slot_actions",
            "llama.cpp slot files saved and restored, by outcome.",
            ["action", "outcome"],
            registry=self.registry,
        )

        # Several AI servers (upstream/replicas.py): the same counts by replica.
        self.replica_turns = Counter(
            "sessionbridge_replica_turns",
            "Exchanges with each replica of the AI server, by outcome"
            " (answered, empty_reply or an error code).",
            ["replica", "outcome"],
            registry=self.registry,
        )
        self.replica_prompt_tokens = Counter(
            "sessionbridge_replica_prompt_tokens",
            "Prompt tokens of answered turns by replica, by whether its cache held them.",
            ["replica", "source"],
            registry=self.registry,
        )
        self.failovers = Counter(
            "sessionbridge_replica_failovers",
            "Turns asked again on the next replica after this one failed them, by reason.",
            ["replica", "reason"],
            registry=self.registry,
        )
        self.replica_healthy = Gauge(
            "sessionbridge_replica_healthy",
            "1 while the replica takes turns (healthy or busy), 0 while it is out.",
            ["replica"],
            registry=self.registry,
        )

        # labels() takes a lock and builds a key on every call; the hot
        # children are looked up once and kept here.
        self._children: dict[tuple[str, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (str(id(metric)), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_upstream(self, endpoint: str, outcome: str, seconds: float) -> None:
        self._child(self.upstream_calls, endpoint, outcome).observe(seconds)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self._child(self.requests, method, route, str(status)).observe(seconds)

    def count_turn(self, outcome: str) -> None:
        self._child(self.turns, outcome).inc()

    def count_prompt_tokens(self, usage: Usage) -> None:
        self._child(self.prompt_tokens, "cached").inc(usage.cached_tokens)
        self._child(self.prompt_tokens, "computed").inc(
            max(usage.prompt_tokens - usage.cached_tokens, 0)
        )

    def count_replica_turn(self, replica: str, outcome: str) -> None:
        self._child(self.replica_turns, replica, outcome).inc()

    def count_replica_prompt_tokens(self, replica: str, usage: Usage) -> None:
        self._child(self.replica_prompt_tokens, replica, "cached").inc(usage.cached_tokens)
        self._child(self.replica_prompt_tokens, replica, "computed").inc(
            max(usage.prompt_tokens - usage.cached_tokens, 0)
        )

    def count_failover(self, replica: str, reason: str) -> None:
        self._child(self.failovers, replica, reason).inc()

    def set_replica_healthy(self, replica: str, healthy: bool) -> None:
        self._child(self.replica_healthy, replica).set(1 if healthy else 0)

    def count_slot_action(self, action: str, outcome: str) -> None:
        self._child(self.slot_actions, action, outcome).inc()

    def count_response(self, status: str) -> None:
        self.responses.labels(status).inc()

    def count_empty_reply(self) -> None:
        self.empty_replies.inc()

    def count_ai_session(self, kind: str) -> None:
        self._child(self.ai_sessions, kind).inc()
