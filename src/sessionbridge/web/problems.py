"""Errors as problem+json (RFC 9457): the one place the sessions API builds an error body.

Domain code raises the error family of ``errors.py``; this middleware turns
those errors, and aiohttp's own HTTP errors, into problem objects. An
unexpected exception becomes a plain 500 problem and a log line, never a
traceback to the client.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ..errors import BridgeError, InvalidJSON, MethodNotAllowed, NotFound, TooLarge
from .jsonhttp import json_response

log = logging.getLogger(__name__)

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "https://sessionbridge.dev/problems/"


def problem_body(error: BridgeError) -> dict[str, Any]:
    """The problem object of ``error``."""
    return problem_from(error.describe())


def problem_from(description: dict[str, Any]) -> dict[str, Any]:
    """A problem object from an error's description (a stored or relayed ``turn.failed``)."""
    return {"type": PROBLEM_TYPE_BASE + str(description.get("code")), **description}


def problem_response(error: BridgeError) -> web.Response:
    return json_response(
        problem_body(error),
        status=error.status,
        headers=error.headers(),
        content_type=PROBLEM_CONTENT_TYPE,
    )


def from_http_exception(exc: web.HTTPException) -> BridgeError:
    if exc.status == 404:
        return NotFound("no such resource")
    if exc.status == 405:
        allowed = sorted(getattr(exc, "allowed_methods", ()))
        return MethodNotAllowed(f"allowed: {', '.join(allowed)}")
    if exc.status == 413:
        return TooLarge("request body exceeds the configured limit")
    if exc.status == 400:
        return InvalidJSON(exc.reason)
    error = BridgeError(exc.reason)
    error.status, error.code, error.title = exc.status, "http_error", exc.reason
    return error


def errors_answered_by(render: Callable[[BridgeError], web.Response]) -> Middleware:
    """A middleware that answers every error of the routes it wraps with ``render``'s body.

    The error family as it is; aiohttp's own HTTP errors mapped into it; an
    unexpected exception as a plain 500 and a log line, never a traceback.
    """

    @web.middleware
    async def answer_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except BridgeError as error:
            return render(error)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = render(from_http_exception(exc))
            if exc.status == 405:
                response.headers["Allow"] = exc.headers.get("Allow", "")
            return response
        except Exception:
            # Never a traceback to the client; the log keeps it for the operator.
            log.exception("event=unhandled_error method=%s path=%s", request.method, request.path)
            return render(BridgeError("the bridge failed unexpectedly"))

    return answer_errors


problem_middleware = errors_answered_by(problem_response)
