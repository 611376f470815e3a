"""The later generation of the AI server: the bridge names the session, a lost one is a 500.

What it shares with the first generation and with OpenAI-compatible servers
(a conversation made once and reused, recovery after a restart, a 5xx that is
no recovery, a bridge restart) is tested once for every flavour in
test_conversation.py.
"""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestServer

from sessionbridge.reference.seed_server import DevServerState
from tests.conftest import Api


@pytest.fixture
def ai_state() -> DevServerState:
    return DevServerState(flavor="init-session", max_tokens_range=(50, 1000))


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
