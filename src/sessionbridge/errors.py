"""The error family of the bridge: every error a client may see, free of any transport.

    BridgeError                    every error a client may see; carries status and code
    ├── InvalidJSON                400 invalid_json
    ├── InvalidField               422 invalid_field (with per-field errors)
    ├── IdempotencyMismatch        422 idempotency_mismatch
    ├── Unauthorized               401 unauthorized
    ├── NotFound                   404 not_found
    ├── MethodNotAllowed           405 method_not_allowed
    ├── NotReady                   503 not_ready (/readyz only)
    ├── Cancelled                  the turn was cancelled (a response's status, never an answer)
    ├── Unsupported                400 unsupported (OpenAI face): a field or item type
    │                              the bridge does not serve (tools, images ...)
    ├── ContextLengthExceeded      400 context_length_exceeded (OpenAI face): with
    │                              truncation "disabled", a context that cannot fit
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

Domain code raises these. This module imports nothing from below (no HTTP
library, no database driver): lower layers map their own errors into this
family where they are caught (``upstream/http.py``, the stores), and the web
faces turn them into their bodies (``web/problems.py`` for problem+json).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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

    def describe(self) -> dict[str, Any]:
        """What a client is told: title, status, detail, code and any extra fields.

        The data of a ``turn.failed`` event, and the members of a problem+json
        body (which adds its ``type``).
        """
        body: dict[str, Any] = {
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
        }
        body.update(self.extra())
        return body

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


class Unsupported(BridgeError):
    status, code, title = 400, "unsupported", "Not supported by this server"

    # ``param`` is a keyword so that ``error_from_code`` (which builds an error
    # from a stored code and message alone) can build this one too.
    def __init__(self, detail: str, *, param: str | None = None) -> None:
        super().__init__(detail)
        self.param = param


class ContextLengthExceeded(BridgeError):
    status, code, title = 400, "context_length_exceeded", "The context does not fit"

    def __init__(self, detail: str, *, param: str | None = "input") -> None:
        super().__init__(detail)
        self.param = param


class Cancelled(BridgeError):
    # A client cancelled the turn (the OpenAI face): its response is "cancelled".
    status, code, title = 409, "cancelled", "Cancelled"


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


def error_from_code(code: str | None, detail: str) -> BridgeError:
    """An error of the class that has ``code`` (a stored turn's failure, told again)."""
    pending: list[type[BridgeError]] = [BridgeError]
    while pending:
        cls = pending.pop()
        if cls.code == code and cls is not SessionLost:
            return cls(detail) if cls is not InvalidField else InvalidField([])
        pending.extend(cls.__subclasses__())
    return UpstreamError(detail)
