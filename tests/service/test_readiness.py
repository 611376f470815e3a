"""/healthz, /readyz and /metrics.

/readyz reports the latest background probe (``app[READINESS].latest``); the
tests wait for the probe's outcome they need rather than for probe intervals,
and make the AI server's /health silent by holding it (or, on a serial server,
by holding a /chat it is busy with).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from sessionbridge.config import Settings
from sessionbridge.reference.seed_server import DevServerState, create_devserver_app
from sessionbridge.web.appkeys import READINESS
from tests.conftest import Api, MakeApi, ReferenceAI, readyz, readyz_becomes
from tests.doubles import ServerGate, wait_until

PROBE_EVERY = 0.1


@pytest.fixture
def health_gate() -> ServerGate:
    return ServerGate("/health")


@pytest.fixture
async def ai_server(
    aiohttp_server: AiohttpServer,
    ai_state: DevServerState,
    ai_gate: ServerGate,
    health_gate: ServerGate,
) -> AsyncIterator[TestServer]:
    """Conftest's reference AI server, whose /health can be held as well."""
    app = health_gate.install(ai_gate.install(create_devserver_app(ai_state)))
    yield await aiohttp_server(app)
    health_gate.release_all()
    ai_gate.release_all()


async def probes_done(api: Api, count: int) -> None:
    """Return once ``count`` more background probes have ended (each began after the last)."""
    for _ in range(count):
        await next_probe_done(api)


async def next_probe_done(api: Api) -> None:
    probe = api.app[READINESS]
    seen = probe.latest.checked_at
    await wait_until(lambda: probe.latest.checked_at > seen)


async def test_healthz_answers_without_a_token(api: Api) -> None:
    response = await api.client.get("/healthz")

    assert response.status == 200


async def test_ready_when_database_and_ai_server_are_healthy(api: Api) -> None:
    status, body = await readyz(api)

    assert status == 200
    assert (body["database"], body["upstream"]) == ("ok", "healthy")


async def test_not_ready_while_the_ai_server_says_so_and_ready_again_after(
    make_flavored_api: MakeApi, reference_ai: ReferenceAI
) -> None:
    api = await make_flavored_api(ready_interval=PROBE_EVERY)
    reference_ai.set_ready(False)

    body = await readyz_becomes(api, 503)
    assert ("unhealthy" if reference_ai.seed else "not ready") in body["detail"]

    reference_ai.set_ready(True)
    assert (await readyz_becomes(api, 200))["upstream"] == "healthy"


async def test_not_ready_at_the_next_probe_when_the_ai_server_is_down(
    make_api: MakeApi, ai_server: TestServer
) -> None:
    api = await make_api(ready_interval=PROBE_EVERY)
    await ai_server.close()
    # The first probe to end may have begun before the close; the next one began after.
    await probes_done(api, 2)

    # Refused is not ready from the first probe that sees it: no grace.
    status, body = await readyz(api)
    assert status == 503
    assert "cannot be reached" in body["detail"]


async def test_answers_at_once_while_the_ai_servers_health_is_silent(
    make_api: MakeApi, health_gate: ServerGate
) -> None:
    # The probe waits the whole health timeout for a silent /health; /readyz
    # must not (it used to wait for the probe).
    api = await make_api(health_timeout=0.5, ready_interval=PROBE_EVERY)
    session_id = await api.new_session()
    await api.say(session_id, "warm up")
    health_gate.hold()
    await health_gate.wait_held()  # a probe waits for the silent /health now

    status, body = await readyz(api)

    assert status == 200
    assert health_gate.waiting >= 1  # answered while that probe was still waiting
    assert body["upstream"] == "healthy"  # the probe before it
    # Once the probe gives up: silence after a recent success is "busy", still ready.
    await wait_until(lambda: api.app[READINESS].latest.upstream == "busy")
    status, body = await readyz(api)
    assert (status, body["upstream"]) == (200, "busy")


async def test_stays_ready_while_a_serial_ai_server_is_busy_generating(
    make_api: MakeApi, ai_state: DevServerState, ai_gate: ServerGate
) -> None:
    api = await make_api(health_timeout=0.2, ready_interval=PROBE_EVERY)
    ai_state.serial = True
    session_id = await api.new_session()
    await api.say(session_id, "warm up")
    ai_gate.hold()  # a long generation: the serial server's /health is silent meanwhile
    turn = asyncio.create_task(api.send(session_id, "a long generation"))
    await ai_gate.wait_entered(2)

    # A probe has met the silent /health.
    await wait_until(lambda: api.app[READINESS].latest.upstream == "busy")
    status, body = await readyz(api)

    assert status == 200
    assert body["upstream"] == "busy"
    ai_gate.release()
    assert (await turn).status == 200


async def test_silent_ai_server_without_recent_success_is_not_ready(
    make_api: MakeApi, ai_state: DevServerState, ai_server: TestServer, ai_gate: ServerGate
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
        ai_gate.hold()
        stuck = asyncio.create_task(
            other.post(ai_server.make_url("/chat"), json={"message": "x", "max_tokens": 20},
                       headers={**auth, "Cookie": cookie})
        )

        body = await readyz_becomes(api, 503)

        assert "did not answer in time" in body["detail"]
        ai_gate.release()
        assert (await stuck).status == 200


async def test_a_turn_in_flight_counts_as_busy_not_down(
    make_api: MakeApi, ai_state: DevServerState, ai_gate: ServerGate
) -> None:
    api = await make_api(health_timeout=0.2, ready_grace=0, ready_interval=PROBE_EVERY)
    ai_state.serial = True
    ai_gate.hold()
    session_id = await api.new_session()
    stuck = asyncio.create_task(api.send(session_id, "never answered"))
    await ai_gate.wait_entered()
    # A probe has met the silent /health while the turn is in flight.
    await wait_until(lambda: api.app[READINESS].latest.upstream == "busy")

    status, body = await readyz(api)

    assert status == 200
    assert body["upstream"] == "busy"
    ai_gate.release()
    assert (await stuck).status == 200


async def test_not_ready_while_another_process_holds_the_write_lock(
    make_api: MakeApi, settings: Settings
) -> None:
    api = await make_api(health_timeout=0.5, ready_interval=PROBE_EVERY)
    holder = sqlite3.connect(settings.db, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")

        body = await readyz_becomes(api, 503)
        assert "database" in body["detail"]

        holder.execute("ROLLBACK")
        assert (await readyz_becomes(api, 200))["database"] == "ok"
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
