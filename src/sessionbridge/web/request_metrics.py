"""Every request counted and timed by route, for /metrics."""

from __future__ import annotations

import time

from aiohttp import web
from aiohttp.typedefs import Handler

from .appkeys import METRICS


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
