"""Bearer-token authentication of the /v1 routes."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from ..errors import Unauthorized
from ..tokens import hash_token
from .appkeys import API_KEY, STORE

PROTECTED_PREFIX = "/v1"


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    path = request.path
    if path != PROTECTED_PREFIX and not path.startswith(PROTECTED_PREFIX + "/"):
        return await handler(request)
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("send Authorization: Bearer <token>")
    key = await request.app[STORE].key_for_token_hash(hash_token(token))
    if key is None:
        raise Unauthorized("unknown or revoked token")
    request[API_KEY] = key
    return await handler(request)
