"""/healthz, /readyz and /metrics."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from sessionbridge.config import Settings
from sessionbridge.reference.seed_server import DevServerState

from .conftest import Api, MakeApi


async def test_healthz_answers_without_a_token(api: Api) -> None:
    response = await api.client.get("/healthz")

    assert response.status == 200


# /readyz reports the latest background probe; every answer, in every state,
# must come within this (measured from the client, round trip included).
ANSWER_WITHIN = 0.050
PROBE_EVERY = 0.1


async def readyz(api: Api) -> tuple[int, dict[str, Any]]:
    started = time.monotonic()
    response = await api.client.get("/readyz")
    body: dict[str, Any] = await response.json(content_type=None)
    elapsed = time.monotonic() - started
    assert elapsed < ANSWER_WITHIN, f"/readyz took {elapsed * 1000:.1f} ms: {body}"
    if response.status == 503:
        assert response.content_type == "application/problem+json"
        assert body["code"] == "not_ready"
    return response.status, body


async def readyz_becomes(api: Api, status: int, within: float) -> dict[str, Any]:
    """Poll /readyz until it answers ``status``; every answer is timed."""
    deadline = time.monotonic() + within
    while True:
        got, body = await readyz(api)
        if got == status:
            return body
        assert time.monotonic() < deadline, f"/readyz still {got} after {within} s: {body}"
        await asyncio.sleep(0.02)


async def test_ready_when_database_and_ai_server_are_healthy(api: Api) -> None:
    status, body = await readyz(api)

    assert status == 200
    assert (body["database"], body["upstream"]) == ("ok", "healthy")


async def test_not_ready_when_the_ai_server_is_unhealthy_and_ready_again_after(
    make_api: MakeApi, ai_state: DevServerState
) -> None:
    api = await make_api(ready_interval=PROBE_EVERY)
    ai_state.healthy = False

    body = await readyz_becomes(api, 503, within=1.0)
    assert "unhealthy" in body["detail"]

    ai_state.healthy = True
    assert (await readyz_becomes(api, 200, within=1.0))["upstream"] == "healthy"


async def test_not_ready_at_the_next_probe_when_the_ai_server_is_down(
    make_api: MakeApi, ai_server: TestServer
) -> None:
    api = await make_api(ready_interval=PROBE_EVERY)
    await ai_server.close()

    started = time.monotonic()
    body = await readyz_becomes(api, 503, within=1.0)

    # Refused is not ready from the first probe that sees it: no grace.
    assert time.monotonic() - started < PROBE_EVERY + 0.4
    assert "cannot be reached" in body["detail"]


async def test_answers_at_once_while_the_ai_servers_health_is_silent(
    make_api: MakeApi, ai_state: DevServerState
) -> None:
    # The probe waits the whole health timeout for a silent /health; /readyz
    # must not (it used to wait those 2 s).
    api = await make_api(health_timeout=2.0, ready_interval=PROBE_EVERY)
    ai_state.serial = True
    session_id = await api.new_session()
    await api.say(session_id, "warm up")
    ai_state.hang = True
    stuck = asyncio.create_task(api.send(session_id, "never answered"))
    await asyncio.sleep(0.1)

    answers = []
    started = time.monotonic()
    while time.monotonic() - started < 2.5:  # across a whole silent probe
        answers.append(await readyz(api))
        await asyncio.sleep(0.05)

    assert {status for status, _ in answers} == {200}
    assert answers[-1][1]["upstream"] == "busy"
    stuck.cancel()


async def test_stays_ready_while_a_serial_ai_server_is_busy_generating(
    make_api: MakeApi, ai_state: DevServerState
) -> None:
    api = await make_api(health_timeout=0.2, ready_interval=PROBE_EVERY)
    ai_state.serial = True
    session_id = await api.new_session()
    await api.say(session_id, "warm up")
    ai_state.delay = 1.0
    turn = asyncio.create_task(api.send(session_id, "a long generation"))

    body = await readyz_becomes(api, 200, within=0.1)
    await asyncio.sleep(0.5)  # a probe has met the silent /health by now
    status, body = await readyz(api)

    assert status == 200
    assert body["upstream"] == "busy"
    assert (await turn).status == 200


async def test_silent_ai_server_without_recent_success_is_not_ready(
    make_api: MakeApi, ai_state: DevServerState, ai_server: TestServer
) -> None:
    api = await make_api(health_timeout=0.2, ready_grace=0, ready_interval=PROBE_EVERY)
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

        body = await readyz_becomes(api, 503, within=1.5)

        assert "did not answer in time" in body["detail"]
        stuck.cancel()


async def test_a_turn_in_flight_counts_as_busy_not_down(
    make_api: MakeApi, ai_state: DevServerState
) -> None:
    api = await make_api(health_timeout=0.2, ready_grace=0, ready_interval=PROBE_EVERY)
    ai_state.serial = True
    ai_state.hang = True
    session_id = await api.new_session()
    stuck = asyncio.create_task(api.send(session_id, "never answered"))
    await asyncio.sleep(0.6)  # probes have met the silent /health

    status, body = await readyz(api)

    assert status == 200
    assert body["upstream"] == "busy"
    stuck.cancel()


async def test_not_ready_while_another_process_holds_the_write_lock(
    make_api: MakeApi, settings: Settings
) -> None:
    api = await make_api(health_timeout=0.5, ready_interval=PROBE_EVERY)
    holder = sqlite3.connect(settings.db, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")

        body = await readyz_becomes(api, 503, within=2.0)
        assert "database" in body["detail"]

        holder.execute("ROLLBACK")
        assert (await readyz_becomes(api, 200, within=2.0))["database"] == "ok"
    finally:
        holder.close()


async def test_metrics_count_ai_sessions_by_kind(api: Api, ai_state: DevServerState) -> None:
    session_id = await api.new_session()
    await api.say(session_id, "one")
    await api.say(session_id, "two")
    ai_state.forget_sessions()
    await api.say(session_id, "three")

    text = await (await api.client.get("/metrics")).text()

    assert 'sessionbridge_ai_sessions_total{kind="created"} 1.0' in text
    # One count per answered turn: the third turn was recovered, not also reused.
    assert 'sessionbridge_ai_sessions_total{kind="reused"} 1.0' in text
    assert 'sessionbridge_ai_sessions_total{kind="recovered"} 1.0' in text
    assert "sessionbridge_request_duration_seconds_bucket" in text
    assert 'sessionbridge_upstream_duration_seconds_count{endpoint="chat",outcome="ok"}' in text
