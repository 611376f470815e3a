"""The later generation of the AI server: the bridge names the session, a lost one is a 500."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpClient

from sessionbridge.app import create_app
from sessionbridge.config import Settings
from sessionbridge.reference.seed_server import DevServerState

from .conftest import Api


@pytest.fixture
def ai_state() -> DevServerState:
    return DevServerState(flavor="init-session", max_tokens_range=(50, 1000))


async def test_conversation_creates_one_session_with_init_session(
    api: Api, ai_state: DevServerState
) -> None:
    session_id = await api.new_session("You are terse.")
    kinds = [(await api.say(session_id, f"m{n}"))["ai_session"] for n in range(4)]

    assert kinds == ["created", "reused", "reused", "reused"]
    assert ai_state.calls["init-session"] == 1
    assert ai_state.calls["scenario"] == 0
    (session,) = ai_state.sessions.values()
    assert session.scenario == "You are terse."


async def test_lost_session_reported_as_500_is_recovered(
    api: Api, ai_state: DevServerState
) -> None:
    session_id = await api.new_session("You are terse.")
    await api.say(session_id, "remember me")
    ai_state.forget_sessions()

    body = await api.say(session_id, "still there?")

    assert body["ai_session"] == "recovered"
    assert ai_state.calls["init-session"] == 2
    (session,) = ai_state.sessions.values()
    assert "User: remember me" in session.scenario


async def test_other_500s_are_upstream_error_not_recovery(
    api: Api, ai_state: DevServerState
) -> None:
    session_id = await api.new_session()
    await api.say(session_id, "first")
    ai_state.fail_next = [500]

    response = await api.send(session_id, "second")

    assert response.status == 502
    assert (await response.json())["code"] == "upstream_error"
    assert ai_state.calls["init-session"] == 1


async def test_bridge_restart_reuses_the_session(
    aiohttp_client: AiohttpClient, settings: Settings, api: Api, ai_state: DevServerState
) -> None:
    session_id = await api.new_session()
    await api.say(session_id, "before")
    await api.client.close()

    restarted = Api(await aiohttp_client(create_app(settings)), api.token)

    assert (await restarted.say(session_id, "after"))["ai_session"] == "reused"
    assert ai_state.calls["init-session"] == 1


@pytest.mark.parametrize(("max_tokens", "status"), [(49, 422), (50, 201), (1000, 201), (1001, 422)])
async def test_max_tokens_follow_the_configured_range(
    api: Api, max_tokens: int, status: int
) -> None:
    response = await api.request(
        "POST", "/v1/sessions", json={"scenario": "s", "max_tokens": max_tokens}
    )

    assert response.status == status


async def test_every_accepted_max_tokens_is_accepted_upstream(api: Api) -> None:
    session_id = await api.new_session(max_tokens=1000)

    response = await api.send(session_id, "long answer please")
    assert response.status == 200
    response = await api.request(
        "POST", f"/v1/sessions/{session_id}/messages", json={"content": "x", "max_tokens": 50}
    )
    assert response.status == 200


async def test_default_max_tokens_lies_inside_the_range(api: Api, ai_server: TestServer) -> None:
    response = await api.request("POST", "/v1/sessions", json={"scenario": "s"})

    assert 50 <= (await response.json())["max_tokens"] <= 1000
