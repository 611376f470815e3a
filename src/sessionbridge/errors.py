"""The error family of the bridge and the middleware that turns errors into problem+json.

    BridgeError                    every error a client may see; carries status and code
    ├── InvalidJSON                400 invalid_json
    ├── InvalidField               422 invalid_field (with per-field errors)
    ├── IdempotencyMismatch        422 idempotency_mismatch
    ├── Unauthorized               401 unauthorized
    ├── NotFound                   404 not_found
    ├── MethodNotAllowed           405 method_not_allowed
    ├── NotReady                   503 not_ready (/readyz only)
    ├── IdempotencyInProgress      409 idempotency_in_progress   (Retry-After)
    ├── TooLarge                   413 too_large
    ├── SessionBusy                429 session_busy              (Retry-After)
    ├── Overloaded                 503 overloaded                (Retry-After)
    ├── StorageUnavailable         503 storage_unavailable       (Retry-After): the
    │                              database cannot take the write now (disk full,
    │                              locked past the busy timeout, I/O error)
    └── UpstreamFailure            a failed AI-server call
        ├── UpstreamError          502 upstream_error
        ├── UpstreamEmptyReply     502 upstream_empty_reply
        ├── UpstreamUnavailable    503 upstream_unavailable      (Retry-After)
        ├── UpstreamTimeout        504 upstream_timeout
        └── SessionLost            the AI server forgot the session; the
                                   conversation recovers, a client sees it only
                                   as upstream_error if recovery itself loses it

Domain code raises these; only ``problem_middleware`` builds error bodies.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from .jsoncodec import json_response

log = logging.getLogger(__name__)

PROBLEM_CONTENT_TYPE = "application/problem+json"


@dataclass(frozen=True)
class FieldError:
    field: str
    message: str


class BridgeError(Exception):
    status: int = 500
    code: str = "internal_error"
    title: str = "Internal error"
    retry_after: int | None = None

    def __init__(self, detail: str, *, retry_after: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if retry_after is not None:
            self.retry_after = retry_after

    def extra(self) -> dict[str, Any]:
        return {}

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(self.retry_after)}


class InvalidJSON(BridgeError):
    status, code, title = 400, "invalid_json", "Body is not a JSON object"


class InvalidField(BridgeError):
    status, code, title = 422, "invalid_field", "Invalid field"

    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__("; ".join(f"{e.field}: {e.message}" for e in errors))
        self.errors = errors

    def extra(self) -> dict[str, Any]:
        return {"errors": [{"field": e.field, "message": e.message} for e in self.errors]}


class IdempotencyMismatch(BridgeError):
    status, code, title = 422, "idempotency_mismatch", "Idempotency-Key reused with another body"


class Unauthorized(BridgeError):
    status, code, title = 401, "unauthorized", "Missing or invalid API key"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="sessionbridge"'}


class NotFound(BridgeError):
    status, code, title = 404, "not_found", "Not found"


class MethodNotAllowed(BridgeError):
    status, code, title = 405, "method_not_allowed", "Method not allowed"


class IdempotencyInProgress(BridgeError):
    status, code, title = 409, "idempotency_in_progress", "Request with this key is in progress"
    retry_after = 1


class TooLarge(BridgeError):
    status, code, title = 413, "too_large", "Request body too large"


class SessionBusy(BridgeError):
    status, code, title = 429, "session_busy", "Too many messages waiting on this session"
    retry_after = 2


class NotReady(BridgeError):
    status, code, title = 503, "not_ready", "Not ready"
    retry_after = 5


class Overloaded(BridgeError):
    status, code, title = 503, "overloaded", "The bridge is at its in-flight limit"
    retry_after = 1


class StorageUnavailable(BridgeError):
    # Raised by the store package only, from the driver's error (``raise ... from``).
    status, code, title = 503, "storage_unavailable", "The database cannot take the write now"
    retry_after = 5


class UpstreamFailure(BridgeError):
    """A failed AI-server call."""


class UpstreamError(UpstreamFailure):
    status, code, title = 502, "upstream_error", "The AI server failed"


class UpstreamEmptyReply(UpstreamFailure):
    status, code, title = 502, "upstream_empty_reply", "The AI server answered an empty reply"


class UpstreamUnavailable(UpstreamFailure):
    status, code, title = 503, "upstream_unavailable", "The AI server cannot be reached"
    retry_after = 5


class UpstreamTimeout(UpstreamFailure):
    status, code, title = 504, "upstream_timeout", "The AI server did not answer in time"


class SessionLost(UpstreamFailure):
    # Reaches a client only when a freshly created AI session is lost at once.
    status, code, title = 502, "upstream_error", "The AI server lost the session"


def problem_body(error: BridgeError) -> dict[str, Any]:
    """The RFC 9457 problem object of ``error`` (also the data of a ``turn.failed`` event)."""
    body: dict[str, Any] = {
        "type": f"https://sessionbridge.dev/problems/{error.code}",
        "title": error.title,
        "status": error.status,
        "detail": error.detail,
        "code": error.code,
    }
    body.update(error.extra())
    return body


def problem_response(error: BridgeError) -> web.Response:
    body = problem_body(error)
    return json_response(
        body, status=error.status, headers=error.headers(), content_type=PROBLEM_CONTENT_TYPE
    )


def _from_http_exception(exc: web.HTTPException) -> BridgeError:
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


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except BridgeError as error:
        return problem_response(error)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = problem_response(_from_http_exception(exc))
        if exc.status == 405:
            response.headers["Allow"] = exc.headers.get("Allow", "")
        return response
    except Exception:
        # Never a traceback to the client; the log keeps it for the operator.
        log.exception("event=unhandled_error method=%s path=%s", request.method, request.path)
        return problem_response(BridgeError("the bridge failed unexpectedly"))


def error_from_code(code: str | None, detail: str) -> BridgeError:
    """An error of the class that has ``code`` (a stored turn's failure, told again)."""
    pending: list[type[BridgeError]] = [BridgeError]
    while pending:
        cls = pending.pop()
        if cls.code == code and cls is not SessionLost:
            return cls(detail) if cls is not InvalidField else InvalidField([])
        pending.extend(cls.__subclasses__())
    return UpstreamError(detail)
