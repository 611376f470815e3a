"""Routes for operators, outside /v1 and without a token: liveness, readiness, metrics."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .appkeys import AI_SERVER, CONVERSATIONS, METRICS, SETTINGS, STORE
from .errors import NotReady
from .jsoncodec import json_response

routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    try:
        await asyncio.wait_for(request.app[STORE].ping(), settings.health_timeout)
    except Exception as exc:
        raise NotReady(f"the database does not answer: {type(exc).__name__}") from exc
    ai_server = request.app[AI_SERVER]
    report = await ai_server.health(settings.health_timeout)
    if report.healthy:
        return json_response({"status": "ready", "database": "ok", "upstream": "healthy"})
    # The AI server answers one request at a time and its /health is silent
    # while it generates: silence alone, while its calls succeed, is "busy".
    last_success = ai_server.last_success
    recently_ok = (
        last_success is not None and time.monotonic() - last_success <= settings.ready_grace
    )
    if report.timed_out and (recently_ok or request.app[CONVERSATIONS].inflight > 0):
        return json_response({"status": "ready", "database": "ok", "upstream": "busy"})
    raise NotReady(report.reason)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response
