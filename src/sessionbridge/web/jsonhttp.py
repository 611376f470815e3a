"""JSON over HTTP: a JSON answer written with the bridge's codec (orjson)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from ..jsoncodec import dumps

JSON_CONTENT_TYPE = "application/json"


def json_response(
    data: Any,
    *,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
    content_type: str = JSON_CONTENT_TYPE,
) -> web.Response:
    return web.Response(
        body=dumps(data),
        status=status,
        headers=headers,
        content_type=content_type,
        charset="utf-8",
    )
