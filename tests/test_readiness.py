"""/healthz, /readyz and /metrics."""

from __future__ import annotations

import asyncio
import time

import aiohttp
from aiohttp.test_utils import TestServer

from sessionbridge.upstream.reference_sessions import DevServerState

from .conftest import Api, MakeApi


async def test_healthz_answers_without_a_token(api: Api) -> None:
    response = await api.client.get("/healthz")

    assert response.status == 200


async def test_ready_when_database_and_ai_server_are_healthy(api: Api) -> None:
    response = await api.client.get("/readyz")

    assert response.status == 200
    assert (await response.json())["upstream"] == "healthy"


async def test_not_ready_when_the_ai_server_is_unhealthy(
    api: Api, ai_state: DevServerState
) -> None:
    ai_state.healthy = False

    response = await api.client.get("/readyz")

    assert response.status == 503
    assert response.content_type == "application/problem+json"
    assert "unhealthy" in (await response.json())["detail"]


async def test_not_ready_at_once_when_the_ai_server_is_down(
    api: Api, ai_server: TestServer
) -> None:
    await ai_server.close()

    started = time.monotonic()
    response = await api.client.get("/readyz")

    assert response.status == 503
    assert time.monotonic() - started < 0.4
    assert "cannot be reached" in (await response.json())["detail"]


async def test_stays_ready_while_a_serial_ai_server_is_busy_generating(
    make_api: MakeApi, ai_state: DevServerState
) -> None:
    api = await make_api(health_timeout=0.2)
    ai_state.serial = True
    session_id = await api.new_session()
    await api.say(session_id, "warm up")
    ai_state.delay = 1.0
    turn = asyncio.create_task(api.send(session_id, "a long generation"))
    await asyncio.sleep(0.1)

    started = time.monotonic()
    response = await api.client.get("/readyz")
    elapsed = time.monotonic() - started

    assert response.status == 200
    assert (await response.json())["upstream"] == "busy"
    assert elapsed < 0.6
    assert (await turn).status == 200


async def test_silent_ai_server_without_recent_success_is_not_ready(
    make_api: MakeApi, ai_state: DevServerState, ai_server: TestServer
) -> None:
    api = await make_api(health_timeout=0.2, ready_grace=0)
    auth = {"Authorization": aiohttp.encode_basic_auth("dev", "dev")}
    # Someone else's request occupies the AI server, so its /health is silent.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as other:
        created = await other.post(
            ai_server.make_url("/scenario"), json={"scenario": "s"}, headers=auth
        )
        cookie = f"session_id={created.cookies['session_id'].value}"
        ai_state.serial = True
        ai_state.hang = True
        stuck = asyncio.create_task(
            other.post(ai_server.make_url("/chat"), json={"message": "x", "max_tokens": 20},
                       headers={**auth, "Cookie": cookie})
        )
        await asyncio.sleep(0.1)

        response = await api.client.get("/readyz")

        assert response.status == 503
        assert "did not answer in time" in (await response.json())["detail"]
        stuck.cancel()


async def test_a_turn_in_flight_counts_as_busy_not_down(
    make_api: MakeApi, ai_state: DevServerState
) -> None:
    api = await make_api(health_timeout=0.2, ready_grace=0)
    ai_state.serial = True
    ai_state.hang = True
    session_id = await api.new_session()
    stuck = asyncio.create_task(api.send(session_id, "never answered"))
    await asyncio.sleep(0.1)

    response = await api.client.get("/readyz")

    assert response.status == 200
    assert (await response.json())["upstream"] == "busy"
    stuck.cancel()


async def test_metrics_count_ai_sessions_by_kind(api: Api, ai_state: DevServerState) -> None:
    session_id = await api.new_session()
    await api.say(session_id, "one")
    await api.say(session_id, "two")
    ai_state.forget_sessions()
    await api.say(session_id, "three")

    text = await (await api.client.get("/metrics")).text()

    assert 'sessionbridge_ai_sessions_total{kind="created"} 1.0' in text
    assert 'sessionbridge_ai_sessions_total{kind="reused"} 2.0' in text
    assert 'sessionbridge_ai_sessions_total{kind="recovered"} 1.0' in text
    assert "sessionbridge_request_duration_seconds_bucket" in text
    assert 'sessionbridge_upstream_duration_seconds_count{endpoint="chat",outcome="ok"}' in text
