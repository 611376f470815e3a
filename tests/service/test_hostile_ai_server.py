"""A hostile AI server, over real sockets: nothing it answers may become a 500 or unbounded memory.

Each server here is a small aiohttp app that breaks one rule of the protocol
on purpose; the bridge must answer the documented code, store nothing from
it, and leave the question ``failed``.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from sessionbridge.config import Settings, TokenRange
from sessionbridge.reference.openai_server import (
    OpenAIReferenceState,
    create_openai_reference_app,
)
from tests.conftest import Api, MakeApi, problem

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def scenario_ok(request: web.Request) -> web.Response:
    response = web.json_response({"message": "Scenario set!"})
    response.headers["Set-Cookie"] = "session_id=abc123; Path=/"
    return response


async def healthy(request: web.Request) -> web.Response:
    return web.json_response({"status": "healthy"})


@pytest.fixture
def hostile(aiohttp_server: AiohttpServer) -> Callable[..., Awaitable[TestServer]]:
    async def start(chat: Handler, scenario: Handler = scenario_ok,
                    health: Handler = healthy) -> TestServer:
        app = web.Application()
        app.router.add_post("/scenario", scenario)
        app.router.add_post("/chat", chat)
        app.router.add_get("/health", health)
        return await aiohttp_server(app)

    return start


async def bridge_for(make_api: MakeApi, server: TestServer, **changes: Any) -> Api:
    return await make_api(upstream_url=str(server.make_url("")).rstrip("/"), **changes)


async def failed_turn(api: Api, status: int, code: str) -> None:
    session_id = await api.new_session()
    await problem(await api.send(session_id, "hello"), status, code)
    messages = await api.messages(session_id)
    assert [(m["role"], m["status"]) for m in messages] == [("user", "failed")]


async def endless(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    await response.write(b'{"response": "')
    chunk = b"x" * 65536
    try:
        for _ in range(400 * 16):  # 400 MiB, unless the reader gives up first
            await response.write(chunk)
    except (ConnectionResetError, ConnectionError):
        pass
    return response


async def test_an_endless_reply_is_refused_while_read_with_bounded_memory(
    make_api: MakeApi, hostile: Callable[..., Awaitable[TestServer]]
) -> None:
    server = await hostile(endless)
    api = await bridge_for(make_api, server, max_reply_bytes=256 * 1024)
    session_id = await api.new_session()

    tracemalloc.start()
    try:
        response = await api.send(session_id, "hello")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    await problem(response, 502, "upstream_error")
    # The whole process (bridge, test client and the hostile server's
    # buffers) stays within a few times the limit, not the 400 MiB sent.
    assert peak < 16 * 1024 * 1024, peak
    (question,) = await api.messages(session_id)
    assert question["status"] == "failed"


async def test_a_reply_over_the_declared_limit_is_refused(
    make_api: MakeApi, hostile: Callable[..., Awaitable[TestServer]]
) -> None:
    async def big(request: web.Request) -> web.Response:
        return web.json_response({"response": "y" * (2 * 1024 * 1024)})

    api = await bridge_for(make_api, await hostile(big), max_reply_bytes=1024 * 1024)
    await failed_turn(api, 502, "upstream_error")


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_redirects_are_never_followed(
    make_api: MakeApi, hostile: Callable[..., Awaitable[TestServer]],
    aiohttp_server: AiohttpServer, status: int,
) -> None:
    elsewhere_calls: list[str] = []

    async def elsewhere(request: web.Request) -> web.Response:
        elsewhere_calls.append(request.method)
        return web.json_response({"response": "an answer from somewhere else"})

    other = web.Application()
    other.router.add_route("*", "/chat", elsewhere)
    target = await aiohttp_server(other)

    async def redirecting(request: web.Request) -> web.Response:
        response = web.Response(status=status)
        response.headers["Location"] = str(target.make_url("/chat"))
        return response

    api = await bridge_for(make_api, await hostile(redirecting))
    await failed_turn(api, 502, "upstream_error")
    assert elsewhere_calls == []


async def test_a_lone_surrogate_in_a_reply_is_upstream_error(
    make_api: MakeApi, hostile: Callable[..., Awaitable[TestServer]]
) -> None:
    async def surrogate(request: web.Request) -> web.Response:
        return web.Response(
            body=b'{"response": "a \\ud800 b"}', content_type="application/json"
        )

    api = await bridge_for(make_api, await hostile(surrogate))
    await failed_turn(api, 502, "upstream_error")


async def test_a_quoted_session_cookie_is_never_sent_back(
    make_api: MakeApi, hostile: Callable[..., Awaitable[TestServer]]
) -> None:
    cookies_seen: list[str] = []

    async def sneaky_scenario(request: web.Request) -> web.Response:
        response = web.json_response({"message": "Scenario set!"})
        response.headers["Set-Cookie"] = 'session_id="abc; admin=1"; Path=/'
        return response

    async def chat(request: web.Request) -> web.Response:
        cookies_seen.append(request.headers.get("Cookie", ""))
        return web.json_response({"response": "hi"})

    api = await bridge_for(make_api, await hostile(chat, scenario=sneaky_scenario))
    session_id = await api.new_session()
    await problem(await api.send(session_id, "hello"), 502, "upstream_error")
    assert cookies_seen == []


async def test_an_endless_health_answer_is_not_ready(
    make_api: MakeApi, hostile: Callable[..., Awaitable[TestServer]]
) -> None:
    api = await bridge_for(
        make_api, await hostile(endless, health=endless), ready_interval=0.05
    )
    for _ in range(40):
        response = await api.client.get("/readyz")
        if response.status == 503:
            break
    await problem(response, 503, "not_ready")


@pytest.fixture
def openai_state() -> OpenAIReferenceState:
    return OpenAIReferenceState()


async def test_an_openai_reply_over_the_limit_is_refused_while_streamed(
    make_api: MakeApi, aiohttp_server: AiohttpServer, tmp_path: Path,
    openai_state: OpenAIReferenceState,
) -> None:
    server = await aiohttp_server(create_openai_reference_app(openai_state))
    api = await make_api(
        db=str(tmp_path / "o.db"), upstream_url=str(server.make_url("/v1")),
        upstream_flavor="openai", upstream_max_tokens=TokenRange(1, 500),
        max_reply_bytes=4096,
    )
    openai_state.reply_text = "word " * 4000
    await failed_turn(api, 502, "upstream_error")

    openai_state.reply_text = "a \ud800 b"
    await failed_turn(api, 502, "upstream_error")


def test_the_reply_limit_is_a_setting() -> None:
    assert Settings().max_reply_bytes == 256 * 1024
