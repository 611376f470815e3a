"""The OpenAPI 3.1 document of the client API, served at ``GET /openapi.json``.

The document is a static file shipped beside this module (package data), written
by hand to describe the API exactly as ``api.py`` and ``errors.py`` implement it;
``tests/test_openapi.py`` checks it against the router and fuzzes the live bridge
with it. Like the operator routes it sits outside ``/v1`` and needs no token.
"""

from __future__ import annotations

import functools
from importlib import resources

from aiohttp import web

DOCUMENT_NAME = "openapi.json"

routes = web.RouteTableDef()


@functools.cache
def document_bytes() -> bytes:
    """The document as shipped, read once: it cannot change while the process runs."""
    return resources.files(__package__).joinpath(DOCUMENT_NAME).read_bytes()


@routes.get("/openapi.json")
async def openapi_document(request: web.Request) -> web.Response:
    return web.Response(body=document_bytes(), content_type="application/json", charset="utf-8")
