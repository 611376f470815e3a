"""Readiness, probed in the background so that /readyz answers at once.

A probe asks the database whether it can take a write and the AI server for
its /health, both at once, every ``ready_interval`` seconds; /readyz only
reports the latest outcome. A readiness probe that waited for a silent AI
server (it does not answer /health while it generates) would itself time out.

The busy rule of docs/ai-servers.md is applied to each outcome: a /health that
does not answer in time while an AI-server call succeeded recently, or while a
turn is in flight, still counts as ready ("busy"); a refused connection or an
unhealthy answer is not ready from that probe on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from .config import Settings
from .errors import StorageUnavailable
from .store import Store
from .upstream import AIServer, HealthReport, ReplicaHealth

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Readiness:
    """One probe's outcome: ``database`` is "ok" or why not, ``upstream`` "healthy",
    "busy" or why not."""

    ready: bool
    database: str
    upstream: str
    checked_at: float  # monotonic
    # Several AI servers: each replica's state (empty for one AI server).
    replicas: tuple[ReplicaHealth, ...] = ()

    @property
    def reason(self) -> str:
        """Why not ready, for the 503's detail."""
        reasons = []
        if self.database != "ok":
            reasons.append(self.database)
        if self.upstream not in ("healthy", "busy"):
            reasons.append(self.upstream)
        return "; ".join(reasons) or "ready"


NOT_PROBED = Readiness(False, "not probed yet", "not probed yet", 0.0)


class ReadinessProbe:
    """Keeps the latest Readiness; ``run()`` refreshes it until cancelled."""

    def __init__(
        self,
        store: Store,
        ai_server: AIServer,
        settings: Settings,
        turns_in_flight: Callable[[], int],
    ) -> None:
        self._store = store
        self._ai = ai_server
        self._settings = settings
        self._turns_in_flight = turns_in_flight
        self.latest = NOT_PROBED

    async def probe(self) -> Readiness:
        """Probe both now; keep and return the outcome."""
        database, report = await asyncio.gather(
            self._database(), self._ai.health(self._settings.health_timeout)
        )
        upstream = self._upstream(report)
        outcome = Readiness(
            database == "ok" and upstream in ("healthy", "busy"),
            database,
            upstream,
            time.monotonic(),
            report.replicas,
        )
        previous, self.latest = self.latest, outcome
        if (previous.ready, previous.reason) != (outcome.ready, outcome.reason):
            log.info(
                "event=readiness_changed ready=%s database=%r upstream=%r",
                outcome.ready, outcome.database, outcome.upstream,
            )
        return outcome

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._settings.ready_interval)
            try:
                await self.probe()
            except Exception as exc:  # never let the probe die: /readyz would freeze
                log.warning("event=readiness_probe_failed error=%s", type(exc).__name__)

    async def _database(self) -> str:
        try:
            await asyncio.wait_for(self._store.ping(), self._settings.health_timeout)
        except StorageUnavailable as exc:
            return f"the database cannot take a write: {exc.detail}"
        except TimeoutError:
            return "the database did not answer in time"
        except Exception as exc:
            return f"the database does not answer: {type(exc).__name__}"
        return "ok"

    def _upstream(self, report: HealthReport) -> str:
        if report.healthy:
            return "healthy"
        # The AI server answers one request at a time and its /health is silent
        # while it generates: silence alone, while its calls succeed, is "busy".
        last_success = self._ai.last_success
        recently_ok = last_success is not None and (
            time.monotonic() - last_success <= self._settings.ready_grace
        )
        if report.timed_out and (recently_ok or self._turns_in_flight() > 0):
            return "busy"
        return report.reason


@contextlib.asynccontextmanager
async def probing(probe: ReadinessProbe) -> AsyncIterator[ReadinessProbe]:
    """Probe once (so /readyz tells the truth from the first request), then in the background."""
    await probe.probe()
    task = asyncio.create_task(probe.run(), name="readiness-probe")
    try:
        yield probe
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
