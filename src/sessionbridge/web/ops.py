"""Routes for operators, outside /v1 and without a token: liveness, readiness, metrics."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..errors import NotReady
from .appkeys import METRICS, READINESS
from .jsonhttp import json_response

routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    # The latest background probe (readiness.py): never waits for the database
    # or the AI server, so it answers at once whatever state they are in.
    latest = request.app[READINESS].latest
    if not latest.ready:
        raise NotReady(latest.reason)
    body: dict[str, Any] = {
        "status": "ready",
        "database": latest.database,
        "upstream": latest.upstream,
        "checked_seconds_ago": round(time.monotonic() - latest.checked_at, 3),
    }
    if latest.replicas:
        # Several AI servers: ready while one takes turns; each one's state.
        body["replicas"] = [
            {"url": r.url, "state": r.state, "detail": r.detail, "running": r.running}
            for r in latest.replicas
        ]
    return json_response(body)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response
