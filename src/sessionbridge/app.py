"""create_app: the routes, the middlewares and the lifetime of every resource."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

from . import upstream
from .appkeys import AI_SERVER, CONVERSATIONS, METRICS, READINESS, SETTINGS, STORE
from .auth import auth_middleware
from .config import Settings
from .conversation import Conversations
from .errors import StorageUnavailable, problem_middleware
from .metrics import Metrics
from .readiness import ReadinessProbe, probing
from .store import for_database, open_store
from .web import api, openapi, ops, page

log = logging.getLogger(__name__)


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.monotonic()
    response = await handler(request)
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    request.app[METRICS].observe_request(
        request.method, route, response.status, time.monotonic() - started
    )
    return response


async def database(app: web.Application) -> AsyncIterator[None]:
    # Migrates first (SQLite or PostgreSQL, by SESSIONBRIDGE_DB), closes at the end.
    async with open_store(app[SETTINGS]) as store:
        cut_off = await store.fail_pending_turns()
        if cut_off:
            log.warning(
                "event=pending_turns_failed count=%d reason=previous_run_ended_mid_turn", cut_off
            )
        app[STORE] = store
        yield
        # Turns cancelled by shutdown record their own failure; this catches any
        # whose write had not started when the handlers were cancelled.
        # A full disk now is logged by the store; the next start fails them.
        with contextlib.suppress(StorageUnavailable):
            await store.fail_pending_turns()


async def ai_server(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    http = aiohttp.ClientSession(
        # No cookie jar: the AI session cookie is set by hand per request, so
        # one conversation's AI session can never leak into another's.
        cookie_jar=aiohttp.DummyCookieJar(),
        connector=aiohttp.TCPConnector(limit=settings.max_inflight + 8),
        timeout=aiohttp.ClientTimeout(total=settings.upstream_timeout),
    )
    app[AI_SERVER] = upstream.connect(http, settings, app[METRICS])
    yield
    await http.close()


async def conversations(app: web.Application) -> AsyncIterator[None]:
    service = Conversations(app[STORE], app[AI_SERVER], app[SETTINGS], app[METRICS])
    # Read when scraped, so a turn pays nothing to keep them current.
    app[METRICS].locked_sessions.set_function(lambda: len(service.locks))
    app[METRICS].inflight.set_function(lambda: service.inflight)
    app[CONVERSATIONS] = service
    yield
    # Turns still running past the shutdown grace are cut off and record it.
    await service.stop()


async def readiness(app: web.Application) -> AsyncIterator[None]:
    service = app[CONVERSATIONS]
    probe = ReadinessProbe(app[STORE], app[AI_SERVER], app[SETTINGS], lambda: service.inflight)
    async with probing(probe):
        app[READINESS] = probe
        yield


async def idempotency_purge(app: web.Application) -> AsyncIterator[None]:
    async def purge_forever() -> None:
        ttl = app[SETTINGS].idempotency_ttl
        while True:
            try:
                purged = await app[STORE].purge_idempotency(time.time() - ttl)
                if purged:
                    log.info("event=idempotency_purged count=%d", purged)
            except StorageUnavailable:
                pass  # logged by the store as one line; the next round tries again
            except Exception:
                log.exception("event=idempotency_purge_failed")
            await asyncio.sleep(min(ttl / 10, 600))

    task = asyncio.create_task(purge_forever(), name="idempotency-purge")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        client_max_size=settings.max_body,
        middlewares=[metrics_middleware, problem_middleware, auth_middleware],
    )
    app[SETTINGS] = for_database(settings)
    app[METRICS] = Metrics()
    app.cleanup_ctx.extend([database, ai_server, conversations, readiness, idempotency_purge])
    app.add_routes(api.routes)
    app.add_routes(ops.routes)
    app.add_routes(openapi.routes)
    app.add_routes(page.routes)
    return app
