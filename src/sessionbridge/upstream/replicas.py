"""Several AI servers of one model behind the AIServer interface: affinity, failover, the way back.

``SESSIONBRIDGE_UPSTREAM_URL`` may name several replicas of one AI server
(one model, one flavor, one set of credentials); this pool speaks to each
through an adapter of its own (``connect.py``) and answers as one AI server,
so the conversation rules know nothing of replicas (docs/ai-servers.md).

- **Affinity.** A turn goes where ``placement.place`` says for its
  ``affinity_key`` among the replicas that take turns: a conversation stays
  on one replica while that replica is healthy, and goes back to it when it
  returns. The load is the conversations each replica holds
  (``residency.py``): a replica at its bound, or with its cache slots full
  while another has room, takes no new one.
- **One AI session per replica** (``replica_state.py``): a replica that holds
  every answered turn reuses its AI session; any other recovers the
  conversation there (the seed protocol: a new AI session with the
  transcript; OpenAI-compatible: the whole history, ``recovered``).
- **Failover.** A replica that fails a turn (``replica_health.py``) is out
  until its health probe passes again; the turn is asked once more on the
  next replica if no client has seen any of its reply (a reply streamed to
  nobody is taken back, ``TurnContext.withdraw_reply``), so the client sees
  no error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Protocol

from ..errors import UpstreamUnavailable
from ..records import ChatSession, Usage
from .base import DeltaSink, HealthReport, Reply, TurnContext
from .placement import LOAD_FACTOR, place, preference
from .replica_health import CannotContinue, Replica, is_replica_fault
from .replica_state import Held, ReplicaTurn
from .residency import Residency

log = logging.getLogger(__name__)


class ReplicaMetrics(Protocol):
    """What the pool counts, by replica (labelled with its URL)."""

    def count_replica_turn(self, replica: str, outcome: str) -> None: ...
    def count_replica_prompt_tokens(self, replica: str, usage: Usage) -> None: ...
    def count_failover(self, replica: str, reason: str) -> None: ...
    def set_replica_healthy(self, replica: str, healthy: bool) -> None: ...


class ReplicaPool:
    """Replicas of one AI server, answering as one."""

    def __init__(
        self,
        replicas: Sequence[Replica],
        metrics: ReplicaMetrics,
        *,
        load_factor: float = LOAD_FACTOR,
        ready_grace: float = 300.0,
    ) -> None:
        if len({r.url for r in replicas}) != len(replicas) or len(replicas) < 2:
            raise ValueError("a pool needs at least two replicas with distinct URLs")
        self.replicas = list(replicas)
        self._by_url = {r.url: r for r in self.replicas}
        self._metrics = metrics
        self._load_factor = load_factor
        self._ready_grace = ready_grace
        self.last_success: float | None = None
        self._residency = Residency()
        for replica in self.replicas:
            replica.on_change = self._changed
            metrics.set_replica_healthy(replica.url, replica.usable)

    def _changed(self, replica: Replica) -> None:
        self._metrics.set_replica_healthy(replica.url, replica.usable)

    # -- where a turn goes -----------------------------------------------------------

    def order(self, key: str, held: Held | None = None) -> list[Replica]:
        """The replicas to ask for ``key``, in order: those taking turns, placed.

        ``held``: the conversation's state, naming the replicas that hold it.
        With none taking turns, the key's first choice of all is asked anyway
        (as one AI server would be): it may be back before its probe says so.
        """
        usable = [r for r in self.replicas if r.usable]
        if not usable:
            return [self._by_url[preference(key, list(self._by_url))[0]]]
        if held is not None and held.home is not None:
            home = next((r for r in usable if r.id == held.home), None)
            if home is not None:
                # At home: the rest in the key's order, should home fail this turn.
                rest = preference(key, [r.url for r in usable if r is not home])
                return [home, *(self._by_url[url] for url in rest)]
        holding = {r.url for r in usable if held is not None and r.id in held.entries}
        if holding and held is not None and held.home is not None:
            # Its home is out and another replica holds it (answered there
            # since): it stays there until home is back, whichever bridge asks.
            order = preference(key, [r.url for r in usable])
            first = next(url for url in order if url in holding)
            return [self._by_url[first], *(self._by_url[url] for url in order if url != first)]
        where = self._residency.where(key)
        if where is not None:
            holding.add(where)
        order = place(
            key, [r.url for r in usable], self._residency.counts(), self._load_factor,
            holding=holding, capacity={r.url: r.adapter.cache_slots for r in usable},
        )
        return [self._by_url[url] for url in order]

    # -- the AIServer interface ------------------------------------------------------

    async def exchange(self, turn: TurnContext, on_delta: DeltaSink | None) -> Reply:
        held = Held.parse(turn.state)
        passed: list[str] = []  # the pieces of the reply passed on

        async def sink(piece: str) -> None:
            passed.append(piece)
            if on_delta is not None:
                await on_delta(piece)

        first = self.order(turn.affinity_key, held)[0]
        held.settle(first.id)
        self._residency.sent(turn.affinity_key, first.url)
        try:
            return await self._turn_on(first, turn, held, sink)
        except Exception as exc:
            if not is_replica_fault(exc):
                raise
            first.failed(exc)
            # Asked once more. A client may have part of the reply: the next
            # replica goes on from there, where it can; otherwise it answers afresh.
            start = ""
            if passed and not turn.withdraw_reply():
                start = "".join(passed)
            passed.clear()
            after = [
                r for r in self.order(turn.affinity_key, held) if r is not first and r.usable
            ]
            if not after:
                raise
            code = getattr(exc, "code", type(exc).__name__)
            self._metrics.count_failover(first.url, code)
            log.warning(
                "event=failover session=%s from=%s to=%s reason=%s",
                turn.session.id, first.url, after[0].url, code,
            )
            self._residency.sent(turn.affinity_key, after[0].url)
            try:
                return await self._turn_on(after[0], turn, held, sink, start)
            except CannotContinue:
                raise exc from None
            except Exception as again:
                if is_replica_fault(again):
                    after[0].failed(again)
                raise

    async def _turn_on(
        self, replica: Replica, turn: TurnContext, held: Held, on_delta: DeltaSink,
        start: str = "",
    ) -> Reply:
        own = held.entries.get(replica.id)
        context = ReplicaTurn(turn, held, replica.id, own if own is not None else held.carried())
        replica.running += 1
        try:
            if start:
                # A client has the start of the reply, begun by another replica.
                reply = await replica.adapter.continue_reply(context, start, on_delta)
            elif own is not None or held.empty:
                reply = await replica.adapter.exchange(context, on_delta)
            else:
                # Not held here, or stale: recovered with the whole history, never reused.
                reply = await replica.adapter.recover(context, on_delta)
        except Exception as exc:
            if not isinstance(exc, CannotContinue):
                self._metrics.count_replica_turn(replica.url, getattr(exc, "code", "error"))
            raise
        finally:
            replica.running -= 1
        self.last_success = time.monotonic()
        if not reply.text.strip():
            self._metrics.count_replica_turn(replica.url, "empty_reply")
            return reply  # not an answered turn: the conversation asks again
        self._metrics.count_replica_turn(replica.url, "answered")
        if reply.usage is not None:
            self._metrics.count_replica_prompt_tokens(replica.url, reply.usage)
        await context.answered()
        return reply

    async def check_fits(self, session: ChatSession, content: str, max_tokens: int) -> None:
        # Any replica can tell (one model): the conversation's own first, then the others.
        order = self.order(session.id)
        for index, replica in enumerate(order):
            try:
                await replica.adapter.check_fits(session, content, max_tokens)
                return
            except Exception as exc:
                if not is_replica_fault(exc):
                    raise
                replica.failed(exc)
                if index == len(order) - 1:
                    raise
        raise UpstreamUnavailable("no AI server replica takes turns")

    async def forget(self, session: ChatSession) -> None:
        for replica in self.replicas:
            try:
                await replica.adapter.forget(session)
            except Exception as exc:  # one replica's files must not keep the others'
                log.warning(
                    "event=forget_failed session=%s replica=%s error=%s",
                    session.id, replica.url, type(exc).__name__,
                )

    async def health(self, timeout: float) -> HealthReport:
        started = time.monotonic()
        reports = await asyncio.gather(*(r.adapter.health(timeout) for r in self.replicas))
        for replica, report in zip(self.replicas, reports, strict=True):
            replica.probed(report, started, self._ready_grace)
        successes = [r.adapter.last_success for r in self.replicas]
        known = [s for s in (*successes, self.last_success) if s is not None]
        self.last_success = max(known) if known else None
        listed = tuple(r.describe() for r in self.replicas)
        states = [r.state for r in self.replicas]
        if "healthy" in states or "unknown" in states:
            return HealthReport(True, "healthy", replicas=listed)
        if "busy" in states:
            return HealthReport(
                False, "every AI server replica that takes turns is busy", True, listed
            )
        reasons = "; ".join(f"{r.url}: {r.detail}" for r in self.replicas)
        return HealthReport(False, f"no AI server replica is healthy ({reasons})", replicas=listed)
