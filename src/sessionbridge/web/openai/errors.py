"""The bridge's errors as OpenAI's error object, on the routes of the OpenAI face.

    {"error": {"message", "type", "param", "code"}}

``code`` is the bridge's own code (``not_found``, ``session_busy``,
``upstream_timeout`` ...), ``message`` its detail, and the status is the
one the sessions API answers with, but for one difference: a body or field
that is not right is 400 (``invalid_request_error``, ``param`` naming the
field), where the sessions API says 422. Retry-After goes out where it does
there. OpenAI's SDKs pick their exception by status alone (400
``BadRequestError``, 401 ``AuthenticationError``, 404 ``NotFoundError``,
409 ``ConflictError``, 422 ``UnprocessableEntityError``, 429
``RateLimitError``, 5xx ``InternalServerError``) and read ``code``,
``param`` and ``type`` from the object.

``type`` follows what OpenAI sends for the status: ``invalid_request_error``
for every 4xx but 429 (OpenAI answers a wrong API key so too),
``rate_limit_error`` for 429, ``service_unavailable_error`` for 503 and
``server_error`` for the other 5xx.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ...errors import BridgeError, ContextLengthExceeded, InvalidField, InvalidJSON, Unsupported
from ..jsonhttp import json_response
from ..problems import errors_answered_by


def error_status(error: BridgeError) -> int:
    """The HTTP status of ``error`` on this face: 400 for a body or field that is not right."""
    if isinstance(error, InvalidField | InvalidJSON):
        return 400
    return error.status


def error_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    if status == 503:
        return "service_unavailable_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_param(error: BridgeError) -> str | None:
    """The request field the error is about, when there is one."""
    if isinstance(error, InvalidField):
        return error.errors[0].field if error.errors else None
    if isinstance(error, Unsupported | ContextLengthExceeded):
        return error.param
    return None


def error_body(error: BridgeError) -> dict[str, Any]:
    """OpenAI's error object for ``error``."""
    return {
        "error": {
            "message": error.detail,
            "type": error_type(error_status(error)),
            "param": error_param(error),
            "code": error.code,
        }
    }


def error_response(error: BridgeError) -> web.Response:
    """The answer for ``error``, with its headers (Retry-After, WWW-Authenticate)."""
    return json_response(error_body(error), status=error_status(error), headers=error.headers())


# Answers every error of the routes it wraps with OpenAI's error object. It
# sits inside (after) the bridge's problem+json middleware, so that it sees
# these routes' errors first.
error_middleware = errors_answered_by(error_response)
