"""create_app: the routes, the middlewares and the lifetime of every resource."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import TypedDict

import aiohttp
from aiohttp import web

from .config import Settings
from .conversation import Conversations
from .errors import StorageUnavailable
from .metrics import Metrics
from .readiness import ReadinessProbe, probing
from .responses.conversations import ConversationService
from .responses.replays import Replays
from .responses.service import Responses
from .store import features, open_store
from .upstream.connect import connect as connect_ai_server
from .web import api, openapi, ops, page
from .web.appkeys import (
    AI_SERVER,
    CONVERSATION_SERVICE,
    CONVERSATIONS,
    METRICS,
    READINESS,
    REPLAYS,
    RESPONSES,
    SETTINGS,
    STORE,
)
from .web.auth import auth_middleware
from .web.openai import routes as openai_routes
from .web.openai.routes import openai_errors
from .web.problems import problem_middleware
from .web.request_metrics import metrics_middleware

log = logging.getLogger(__name__)


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
    app[AI_SERVER] = connect_ai_server(http, settings, app[METRICS])
    yield
    await http.close()


async def conversations(app: web.Application) -> AsyncIterator[None]:
    service = Conversations(app[STORE], app[AI_SERVER], app[SETTINGS], app[METRICS])
    # Read when scraped, so a turn pays nothing to keep them current.
    app[METRICS].locked_sessions.set_function(lambda: len(service.locks))
    app[METRICS].inflight.set_function(lambda: service.inflight)
    app[CONVERSATIONS] = service
    settings = app[SETTINGS]
    # The OpenAI face: the same conversations, as responses and conversations.
    model = settings.upstream_model or "sessionbridge"
    app[RESPONSES] = Responses(
        app[STORE], service, model, settings.session_max_tokens_default,
        count_response=app[METRICS].count_response,
    )
    app[CONVERSATION_SERVICE] = ConversationService(
        app[STORE], service, settings.session_max_tokens_default
    )
    app[REPLAYS] = Replays(app[STORE])
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


def slot_saving_allowed(settings: Settings) -> Settings:
    """The settings with llama.cpp slot saving off where the database is shared.

    Slot files are bookkeeping of one bridge (which slot holds which
    conversation, which file is whose): bridges sharing a database may share
    one llama.cpp server, and would restore each other's slots over a
    conversation's cache. So slot saving is off there, with a warning.
    """
    if settings.slot_save != "on" or not features(settings.db).shared_between_processes:
        return settings
    log.warning(
        "event=slot_save_disabled reason=shared_database"
        " detail=llama.cpp slot files are kept per bridge; several bridges share this database"
    )
    return dataclasses.replace(settings, slot_save="off")


# How the app's server must run its handlers (``serve`` and the tests' servers):
# a client that goes away does not cancel its handler, because a turn may run
# in the handler's own task and is not the request's to stop (api.py).
class RunnerOptions(TypedDict):
    handler_cancellation: bool


RUNNER_OPTIONS: RunnerOptions = {"handler_cancellation": False}


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        client_max_size=settings.max_body,
        # The OpenAI face's errors are OpenAI's error object, its token refusals too.
        middlewares=[metrics_middleware, problem_middleware, openai_errors, auth_middleware],
    )
    app[SETTINGS] = slot_saving_allowed(settings)
    app[METRICS] = Metrics()
    app.cleanup_ctx.extend([database, ai_server, conversations, readiness, idempotency_purge])
    app.add_routes(api.routes)
    app.add_routes(openai_routes.routes)
    app.add_routes(ops.routes)
    app.add_routes(openapi.routes)
    app.add_routes(page.routes)
    return app
