"""The bridge's error family as OpenAI's error object: status, type, param and code of each."""

from __future__ import annotations

import logging

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpClient

from sessionbridge.errors import (
    BridgeError,
    ContextLengthExceeded,
    FieldError,
    IdempotencyInProgress,
    IdempotencyMismatch,
    InvalidField,
    InvalidJSON,
    NotFound,
    Overloaded,
    SessionBusy,
    StorageUnavailable,
    TooLarge,
    Unauthorized,
    Unsupported,
    UpstreamEmptyReply,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from sessionbridge.web.openai.errors import error_body, error_middleware, error_response

CASES: list[tuple[BridgeError, int, str, str | None]] = [
    # (error, status, type, param)
    (InvalidJSON("the body is not valid JSON"), 400, "invalid_request_error", None),
    (
        InvalidField(
            [FieldError("input[1].content", "must be a string"), FieldError("top_p", "x")]
        ),
        400,
        "invalid_request_error",
        "input[1].content",
    ),
    (Unsupported("tools are not supported", param="tools"), 400, "invalid_request_error", "tools"),
    (ContextLengthExceeded("does not fit"), 400, "invalid_request_error", "input"),
    (Unauthorized("missing or invalid API key"), 401, "invalid_request_error", None),
    (NotFound("no such response"), 404, "invalid_request_error", None),
    (IdempotencyInProgress("being answered"), 409, "invalid_request_error", None),
    (TooLarge("too large"), 413, "invalid_request_error", None),
    (IdempotencyMismatch("another body"), 422, "invalid_request_error", None),
    (SessionBusy("busy"), 429, "rate_limit_error", None),
    (UpstreamError("failed"), 502, "server_error", None),
    (UpstreamEmptyReply("empty"), 502, "server_error", None),
    (UpstreamUnavailable("unreachable"), 503, "service_unavailable_error", None),
    (Overloaded("at the limit"), 503, "service_unavailable_error", None),
    (StorageUnavailable("disk full"), 503, "service_unavailable_error", None),
    (UpstreamTimeout("too slow"), 504, "server_error", None),
]


@pytest.mark.parametrize(
    ("error", "status", "kind", "param"), CASES, ids=[type(c[0]).__name__ for c in CASES]
)
def test_each_error_has_openai_s_shape(
    error: BridgeError, status: int, kind: str, param: str | None
) -> None:
    response = error_response(error)

    assert response.status == status
    assert error_body(error) == {
        "error": {"message": error.detail, "type": kind, "param": param, "code": error.code}
    }
    if error.retry_after is not None:
        assert response.headers["Retry-After"] == str(error.retry_after)
    else:
        assert "Retry-After" not in response.headers


def test_a_missing_key_is_challenged_as_on_the_sessions_api() -> None:
    response = error_response(Unauthorized("missing or invalid API key"))

    assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_an_unexpected_exception_is_an_openai_server_error_without_a_traceback(
    aiohttp_client: AiohttpClient, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("secret internals")

    app = web.Application(middlewares=[error_middleware])
    app.router.add_get("/v1/responses", broken)
    client = await aiohttp_client(app)

    with caplog.at_level(logging.ERROR):
        response = await client.get("/v1/responses")
    body = await response.json()

    assert response.status == 500
    assert body["error"]["type"] == "server_error"
    assert "secret" not in str(body)
    assert "event=unhandled_error" in caplog.text


async def test_an_oversized_body_is_openai_s_too_large(aiohttp_client: AiohttpClient) -> None:
    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read())

    app = web.Application(middlewares=[error_middleware], client_max_size=16)
    app.router.add_post("/v1/responses", echo)
    client = await aiohttp_client(app)

    response = await client.post("/v1/responses", data=b"x" * 64)

    assert response.status == 413
    assert (await response.json())["error"]["code"] == "too_large"
