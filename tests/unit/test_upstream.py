"""The AI-server client at the unit level: odd answers a real server rarely gives."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aioresponses import aioresponses
from yarl import URL

from sessionbridge.errors import (
    SessionLost,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from sessionbridge.upstream.sessions import SessionServerClient, is_session_lost

BASE = "http://ai.test"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


def client(http: aiohttp.ClientSession, flavor: str = "scenario") -> SessionServerClient:
    return SessionServerClient(http, BASE, flavor=flavor, user="u", password="p", timeout=2)


def sent(mocked: aioresponses, path: str) -> list[dict[str, Any]]:
    return [call.kwargs for call in mocked.requests[("POST", URL(BASE + path))]]


def json_body(request: dict[str, Any]) -> Any:
    """The JSON document a mocked call sent: encoded bytes, declared as JSON."""
    assert request["headers"]["Content-Type"] == "application/json"
    return json.loads(request["data"])


async def test_create_session_reads_the_id_from_set_cookie(
    http: aiohttp.ClientSession, mock_upstream: aioresponses
) -> None:
    mock_upstream.post(
        BASE + "/scenario",
        payload={"message": "Scenario set!"},
        headers={"Set-Cookie": "session_id=abc123; Path=/"},
    )

    assert await client(http).create_session("be brief") == "abc123"
    (request,) = sent(mock_upstream, "/scenario")
    assert json_body(request) == {"scenario": "be brief"}
    assert "Cookie" not in request["headers"]  # a cookie here would reset a live session
    assert request["headers"]["Authorization"] == aiohttp.encode_basic_auth("u", "p")


async def test_create_session_without_a_cookie_is_upstream_error(
    http: aiohttp.ClientSession, mock_upstream: aioresponses
) -> None:
    mock_upstream.post(BASE + "/scenario", payload={"message": "Scenario set!"})

    with pytest.raises(UpstreamError):
        await client(http).create_session("x")


async def test_init_session_flavor_names_a_fresh_uuid(
    http: aiohttp.ClientSession, mock_upstream: aioresponses
) -> None:
    mock_upstream.post(BASE + "/init-session", payload={"message": "ok", "session_id": "x"})

    ai_session_id = await client(http, "init-session").create_session("system")

    (request,) = sent(mock_upstream, "/init-session")
    assert re.fullmatch(r"[0-9a-f]{32}", ai_session_id)
    assert json_body(request) == {"session_id": ai_session_id, "system_prompt": "system"}


async def test_chat_sends_the_cookie_by_hand(
    http: aiohttp.ClientSession, mock_upstream: aioresponses
) -> None:
    mock_upstream.post(BASE + "/chat", payload={"response": "hi"})

    assert await client(http).chat("abc123", "hello", 42) == "hi"
    (request,) = sent(mock_upstream, "/chat")
    assert request["headers"]["Cookie"] == "session_id=abc123"
    assert json_body(request) == {"message": "hello", "max_tokens": 42}


@pytest.mark.parametrize(
    ("status", "payload"),
    [
        (404, {"detail": "Session not found"}),
        (500, {"detail": "Chat request failed: 404: Session not found"}),
    ],
)
async def test_both_generations_lost_session_forms_raise_session_lost(
    http: aiohttp.ClientSession, mock_upstream: aioresponses, status: int, payload: Any
) -> None:
    mock_upstream.post(BASE + "/chat", status=status, payload=payload)

    with pytest.raises(SessionLost):
        await client(http).chat("gone", "hello", 42)


@pytest.mark.parametrize(
    ("status", "payload"),
    [
        (500, {"detail": "Chat request failed: CUDA out of memory"}),
        (500, "Internal Server Error"),
        (502, {"detail": "Session not found"}),
        (503, {"detail": "loading"}),
        (401, {"detail": "Invalid credentials"}),
        (422, {"detail": [{"loc": ["body", "max_tokens"]}]}),
        (400, {"detail": "Missing session ID"}),
    ],
)
async def test_other_failures_are_upstream_error_not_recovery(
    http: aiohttp.ClientSession, mock_upstream: aioresponses, status: int, payload: Any
) -> None:
    mock_upstream.post(BASE + "/chat", status=status, payload=payload)

    with pytest.raises(UpstreamError):
        await client(http).chat("abc", "hello", 42)


@pytest.mark.parametrize(
    "body", ["not json", "[1, 2]", '{"response": 42}', '{"answer": "x"}', ""]
)
async def test_unusable_answers_are_upstream_error(
    http: aiohttp.ClientSession, mock_upstream: aioresponses, body: str
) -> None:
    mock_upstream.post(BASE + "/chat", body=body)

    with pytest.raises(UpstreamError):
        await client(http).chat("abc", "hello", 42)


async def test_refused_connection_is_unavailable(
    http: aiohttp.ClientSession, mock_upstream: aioresponses
) -> None:
    mock_upstream.post(
        BASE + "/chat",
        exception=aiohttp.ClientConnectionError("refused"),
    )

    with pytest.raises(UpstreamUnavailable):
        await client(http).chat("abc", "hello", 42)


async def test_timeout_is_upstream_timeout(
    http: aiohttp.ClientSession, mock_upstream: aioresponses
) -> None:
    mock_upstream.post(BASE + "/chat", exception=TimeoutError())

    with pytest.raises(UpstreamTimeout):
        await client(http).chat("abc", "hello", 42)


async def test_health_reports_timeouts_apart_from_failures(
    http: aiohttp.ClientSession, mock_upstream: aioresponses
) -> None:
    mock_upstream.get(BASE + "/health", payload={"status": "healthy"})
    mock_upstream.get(BASE + "/health", exception=TimeoutError())
    mock_upstream.get(BASE + "/health", status=503, payload={"status": "unhealthy"})
    mock_upstream.get(BASE + "/health", exception=aiohttp.ClientConnectionError("refused"))

    reports = [await client(http).health(0.5) for _ in range(4)]

    assert [(r.healthy, r.timed_out) for r in reports] == [
        (True, False), (False, True), (False, False), (False, False)
    ]


def test_session_lost_needs_the_detail_on_a_500() -> None:
    assert is_session_lost(404, None)
    assert is_session_lost(500, "Chat request failed: 404: Session not found")
    assert not is_session_lost(500, "Chat request failed: timeout")
    assert not is_session_lost(500, None)
    assert not is_session_lost(503, "Session not found")
