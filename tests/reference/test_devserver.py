"""Tests for the reference AI server (the development and test double)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import pytest
from aiohttp import ClientResponse, DummyCookieJar, encode_basic_auth, web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from sessionbridge.reference import seed_server as reference_sessions
from sessionbridge.reference.seed_server import (
    DEVSERVER_STATE,
    DevServerState,
    DevSession,
    create_devserver_app,
    main,
    reply_for,
)
from tests.doubles import ManualClock, ServerGate

DevClient = TestClient[web.Request, web.Application]

PIRATE = "You are a pirate who answers in rhymes, always and forever."


@pytest.fixture
def state() -> DevServerState:
    return DevServerState()


@pytest.fixture
def chat_gate() -> ServerGate:
    """Holds /chat inside the server (as a long generation would)."""
    return ServerGate("/chat")


@pytest.fixture
def health_arrivals() -> ServerGate:
    """Sees each /health as it arrives, before a serial server queues it."""
    return ServerGate("/health")


@pytest.fixture
async def client(
    aiohttp_client: AiohttpClient,
    state: DevServerState,
    chat_gate: ServerGate,
    health_arrivals: ServerGate,
) -> AsyncIterator[DevClient]:
    app = create_devserver_app(state)
    health_arrivals.install(chat_gate.install(app), outermost=True)
    # No cookie jar: every test sends the session cookie by hand, as the
    # bridge must, so nothing leaks from one request into the next.
    yield await aiohttp_client(app, cookie_jar=DummyCookieJar())
    chat_gate.release_all()


def headers(
    session_id: str | None = None, *, user: str = "dev", password: str = "dev"
) -> dict[str, str]:
    # aiohttp 3.14 deprecates BasicAuth, so the Authorization header is built by hand.
    result = {"Authorization": encode_basic_auth(user, password)}
    if session_id is not None:
        result["Cookie"] = f"session_id={session_id}"
    return result


async def set_scenario(
    client: DevClient, scenario: str = PIRATE, session_id: str | None = None
) -> str:
    resp = await client.post("/scenario", json={"scenario": scenario}, headers=headers(session_id))
    assert resp.status == 200, await resp.text()
    return resp.cookies["session_id"].value


async def init_session(client: DevClient, session_id: str, system_prompt: str) -> ClientResponse:
    return await client.post(
        "/init-session",
        json={"session_id": session_id, "system_prompt": system_prompt},
        headers=headers(),
    )


async def chat(
    client: DevClient, session_id: str | None, message: str, max_tokens: object = 100
) -> ClientResponse:
    return await client.post(
        "/chat", json={"message": message, "max_tokens": max_tokens}, headers=headers(session_id)
    )


def test_state_is_reachable_through_its_app_key() -> None:
    state = DevServerState()
    assert create_devserver_app(state)[DEVSERVER_STATE] is state
    assert isinstance(create_devserver_app()[DEVSERVER_STATE], DevServerState)


def test_state_rejects_unknown_flavor() -> None:
    with pytest.raises(ValueError):
        DevServerState(flavor="gpt")


def test_reply_for_is_deterministic_and_shows_context() -> None:
    session = DevSession(scenario=PIRATE, history=[("hi", "ahoy")])
    expected = (
        f"turn 2: you said 'where to?'; I hold 1 earlier turns; scenario starts {PIRATE[:40]!r}"
    )
    assert reply_for(session, "where to?") == expected
    assert reply_for(session, "where to?") == expected
    assert session.history == [("hi", "ahoy")]


@pytest.mark.parametrize(
    ("path", "auth_headers"),
    [
        ("/scenario", {}),
        ("/scenario", headers(password="wrong")),
        ("/chat", headers(user="someone")),
        ("/chat", {}),
        ("/chat", {"Authorization": "Basic not-base64!"}),
        ("/chat", {"Authorization": "Bearer dev"}),
    ],
)
async def test_requests_without_valid_credentials_get_401(
    client: DevClient, path: str, auth_headers: dict[str, str]
) -> None:
    resp = await client.post(path, json={"scenario": "x"}, headers=auth_headers)
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"] == "Basic"
    assert await resp.json() == {"detail": "Invalid credentials"}


async def test_auth_is_checked_before_the_body(client: DevClient) -> None:
    resp = await client.post("/chat", data=b"not json", headers=headers(password="nope"))
    assert resp.status == 401


async def test_health_needs_no_credentials(client: DevClient, state: DevServerState) -> None:
    await set_scenario(client)
    resp = await client.get("/health")
    assert resp.status == 200
    assert await resp.json() == {"status": "healthy", "sessions": 1, "flavor": "scenario"}


async def test_unhealthy_server_answers_503(client: DevClient, state: DevServerState) -> None:
    state.healthy = False
    resp = await client.get("/health")
    assert resp.status == 503
    assert await resp.json() == {"status": "unhealthy"}


async def test_scenario_sets_session_cookie(client: DevClient, state: DevServerState) -> None:
    resp = await client.post("/scenario", json={"scenario": PIRATE}, headers=headers())
    assert resp.status == 200
    assert await resp.json() == {"message": "Scenario set!"}
    session_id = resp.cookies["session_id"].value
    assert re.fullmatch(r"[0-9a-f]{32}", session_id)
    assert state.sessions == {session_id: DevSession(scenario=PIRATE)}


async def test_each_scenario_without_cookie_creates_a_new_session(client: DevClient) -> None:
    assert await set_scenario(client) != await set_scenario(client)


async def test_second_scenario_with_that_cookie_resets_history(
    client: DevClient, state: DevServerState
) -> None:
    session_id = await set_scenario(client)
    for text in ("one", "two"):
        assert (await chat(client, session_id, text)).status == 200
    assert len(state.sessions[session_id].history) == 2

    assert await set_scenario(client, "A new story.", session_id=session_id) == session_id

    assert state.sessions[session_id] == DevSession(scenario="A new story.")
    resp = await chat(client, session_id, "three")
    body = await resp.json()
    assert body["response"].startswith("turn 1: you said 'three'; I hold 0 earlier turns")
    assert body["response"].endswith("scenario starts 'A new story.'")


async def test_scenario_with_unknown_cookie_creates_a_new_session(
    client: DevClient, state: DevServerState
) -> None:
    session_id = await set_scenario(client, session_id="f" * 32)
    assert session_id != "f" * 32
    assert list(state.sessions) == [session_id]


@pytest.mark.parametrize(
    ("data", "loc", "kind"),
    [
        (b"", ["body"], "missing"),
        (b"{not json", ["body", 1], "json_invalid"),
        (b'["scenario"]', ["body"], "model_attributes_type"),
        (b"{}", ["body", "scenario"], "missing"),
        (b'{"scenario": 7}', ["body", "scenario"], "string_type"),
    ],
)
async def test_invalid_scenario_body_is_422(
    client: DevClient, state: DevServerState, data: bytes, loc: list[object], kind: str
) -> None:
    resp = await client.post(
        "/scenario", data=data, headers={**headers(), "Content-Type": "application/json"}
    )
    assert resp.status == 422
    (issue,) = (await resp.json())["detail"]
    assert issue["loc"] == loc
    assert issue["type"] == kind
    assert isinstance(issue["msg"], str)
    assert state.sessions == {}


async def test_a_body_not_declared_as_json_is_422(
    client: DevClient, state: DevServerState
) -> None:
    resp = await client.post(
        "/scenario",
        data=b'{"scenario": "valid JSON, sent as text"}',
        headers={**headers(), "Content-Type": "text/plain"},
    )
    assert resp.status == 422
    (issue,) = (await resp.json())["detail"]
    assert issue["type"] == "model_attributes_type"
    assert state.sessions == {}


async def test_replies_count_turns_and_show_scenario(client: DevClient) -> None:
    session_id = await set_scenario(client)
    replies = []
    for text in ("hello", "how are you?", "bye"):
        resp = await chat(client, session_id, text)
        assert resp.status == 200
        replies.append((await resp.json())["response"])
    start = repr(PIRATE[:40])
    assert replies == [
        f"turn 1: you said 'hello'; I hold 0 earlier turns; scenario starts {start}",
        f"turn 2: you said 'how are you?'; I hold 1 earlier turns; scenario starts {start}",
        f"turn 3: you said 'bye'; I hold 2 earlier turns; scenario starts {start}",
    ]


async def test_chat_appends_turns_and_sets_no_cookie(
    client: DevClient, state: DevServerState
) -> None:
    session_id = await set_scenario(client)
    resp = await chat(client, session_id, "hello")
    reply = (await resp.json())["response"]
    assert "Set-Cookie" not in resp.headers
    assert state.sessions[session_id].history == [("hello", reply)]


async def test_chat_without_cookie_is_400(client: DevClient) -> None:
    resp = await chat(client, None, "hello")
    assert resp.status == 400
    assert await resp.json() == {"detail": "Missing session ID"}


async def test_chat_with_unknown_session_is_404(client: DevClient) -> None:
    resp = await chat(client, "0" * 32, "hello")
    assert resp.status == 404
    assert await resp.json() == {"detail": "Session not found"}


@pytest.mark.parametrize("max_tokens", [9, 501, "100", True, 10.5, None])
async def test_max_tokens_outside_range_or_not_int_is_422(
    client: DevClient, state: DevServerState, max_tokens: object
) -> None:
    session_id = await set_scenario(client)
    resp = await chat(client, session_id, "hello", max_tokens=max_tokens)
    assert resp.status == 422
    (issue,) = (await resp.json())["detail"]
    assert issue["loc"] == ["body", "max_tokens"]
    assert state.sessions[session_id].history == []


async def test_missing_max_tokens_is_422(client: DevClient) -> None:
    resp = await client.post("/chat", json={"message": "hi"}, headers=headers("x"))
    assert resp.status == 422
    assert (await resp.json())["detail"][0]["type"] == "missing"


async def test_body_is_validated_before_the_cookie(client: DevClient) -> None:
    resp = await chat(client, None, "hello", max_tokens=5000)
    assert resp.status == 422


@pytest.mark.parametrize("max_tokens", [10, 500])
async def test_max_tokens_range_is_inclusive(client: DevClient, max_tokens: int) -> None:
    session_id = await set_scenario(client)
    assert (await chat(client, session_id, "hello", max_tokens=max_tokens)).status == 200


async def test_empty_replies_answer_empty_and_are_not_remembered(
    client: DevClient, state: DevServerState
) -> None:
    session_id = await set_scenario(client)
    state.empty_replies = 2
    for _ in range(2):
        resp = await chat(client, session_id, "hello")
        assert resp.status == 200
        assert await resp.json() == {"response": ""}
    assert state.empty_replies == 0
    assert state.sessions[session_id].history == []
    resp = await chat(client, session_id, "hello")
    assert (await resp.json())["response"].startswith("turn 1:")


async def test_fail_next_answers_injected_statuses_in_order(
    client: DevClient, state: DevServerState
) -> None:
    session_id = await set_scenario(client)
    state.fail_next = [500, 503]
    statuses = []
    for _ in range(3):
        resp = await chat(client, session_id, "hello")
        statuses.append(resp.status)
        if resp.status != 200:
            assert await resp.json() == {"detail": "Injected failure"}
    assert statuses == [500, 503, 200]
    assert state.fail_next == []
    assert len(state.sessions[session_id].history) == 1


async def test_unknown_session_is_reported_before_injected_faults(
    client: DevClient, state: DevServerState
) -> None:
    state.fail_next = [503]
    resp = await chat(client, "0" * 32, "hello")
    assert resp.status == 404
    assert state.fail_next == [503]


async def test_forget_sessions_makes_known_ids_404(
    client: DevClient, state: DevServerState
) -> None:
    session_id = await set_scenario(client)
    assert (await chat(client, session_id, "hello")).status == 200

    state.forget_sessions()

    resp = await chat(client, session_id, "hello again")
    assert resp.status == 404
    assert await resp.json() == {"detail": "Session not found"}
    assert state.calls["chat"] == 2
    assert state.calls["scenario"] == 1


async def test_hang_never_answers(client: DevClient, state: DevServerState) -> None:
    session_id = await set_scenario(client)
    state.hang = True
    # Kept: "never answers" is shown by a client giving up after a while.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(chat(client, session_id, "hello"), timeout=0.1)
    assert state.sessions[session_id].history == []

    state.hang = False
    assert (await chat(client, session_id, "hello")).status == 200


async def test_serial_mode_makes_health_wait_while_chat_generates(
    client: DevClient, state: DevServerState, chat_gate: ServerGate, health_arrivals: ServerGate
) -> None:
    session_id = await set_scenario(client)
    state.serial = True
    chat_gate.hold()  # the /chat "generates" until released
    chat_task = asyncio.create_task(chat(client, session_id, "hello"))
    await chat_gate.wait_held()

    health_task = asyncio.create_task(client.get("/health"))
    await health_arrivals.wait_entered()
    # It arrived, and its handler has not run: it waits behind the /chat.
    assert state.calls["health"] == 0
    assert not health_task.done()

    chat_gate.release()
    assert (await chat_task).status == 200
    assert (await health_task).status == 200
    assert (await client.get("/health")).status == 200


async def test_parallel_mode_answers_health_and_other_sessions_while_chat_generates(
    client: DevClient, state: DevServerState, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = ManualClock(stepped=True)  # the server's generation time, stepped by the test
    clock.install(monkeypatch, reference_sessions)
    first, second = await set_scenario(client), await set_scenario(client)
    state.delay = 0.2
    chats = asyncio.gather(chat(client, first, "a"), chat(client, second, "b"))
    await clock.wait_sleeping(2)  # two generations side by side

    health = await client.get("/health")
    assert health.status == 200

    clock.wake_all()
    assert [resp.status for resp in await chats] == [200, 200]
    assert clock.sleeps == [0.2, 0.2]  # each /chat took the configured generation time


@pytest.fixture
def init_state() -> DevServerState:
    return DevServerState(flavor="init-session", max_tokens_range=(50, 1000))


@pytest.fixture
async def init_client(aiohttp_client: AiohttpClient, init_state: DevServerState) -> DevClient:
    return await aiohttp_client(create_devserver_app(init_state), cookie_jar=DummyCookieJar())


async def test_init_session_creates_session_without_cookie(
    init_client: DevClient, init_state: DevServerState
) -> None:
    resp = await init_session(init_client, "abc123", "Be brief.")
    assert resp.status == 200
    assert await resp.json() == {"message": "Session initialized", "session_id": "abc123"}
    assert "Set-Cookie" not in resp.headers
    assert init_state.sessions == {"abc123": DevSession(scenario="Be brief.")}

    reply = await chat(init_client, "abc123", "hello", max_tokens=1000)
    assert reply.status == 200
    assert (await reply.json())["response"].endswith("scenario starts 'Be brief.'")


async def test_init_session_on_existing_id_resets_history(
    init_client: DevClient, init_state: DevServerState
) -> None:
    await init_session(init_client, "abc123", "Be brief.")
    assert (await chat(init_client, "abc123", "hello")).status == 200

    assert (await init_session(init_client, "abc123", "Be verbose.")).status == 200

    assert init_state.sessions["abc123"] == DevSession(scenario="Be verbose.")


@pytest.mark.parametrize(
    "body",
    [
        {"session_id": "abc"},
        {"session_id": 5, "system_prompt": "x"},
        {"session_id": "", "system_prompt": "x"},
    ],
)
async def test_invalid_init_session_body_is_422(
    init_client: DevClient, init_state: DevServerState, body: dict[str, object]
) -> None:
    resp = await init_client.post("/init-session", json=body, headers=headers())
    assert resp.status == 422
    assert isinstance((await resp.json())["detail"], list)
    assert init_state.sessions == {}


async def test_init_session_flavor_wraps_unknown_session_in_500(init_client: DevClient) -> None:
    resp = await chat(init_client, "nope", "hello")
    assert resp.status == 500
    assert await resp.json() == {"detail": "Chat request failed: 404: Session not found"}


async def test_init_session_flavor_wraps_injected_failures_in_500(
    init_client: DevClient, init_state: DevServerState
) -> None:
    await init_session(init_client, "abc123", "Be brief.")
    init_state.fail_next = [503]
    resp = await chat(init_client, "abc123", "hello")
    assert resp.status == 500
    assert await resp.json() == {"detail": "Chat request failed: 503: Injected failure"}


async def test_init_session_flavor_uses_its_max_tokens_range(init_client: DevClient) -> None:
    await init_session(init_client, "abc123", "Be brief.")
    resp = await chat(init_client, "abc123", "hello", max_tokens=20)
    assert resp.status == 422
    (issue,) = (await resp.json())["detail"]
    assert issue["type"] == "greater_than_equal"


async def test_each_flavor_hides_the_other_generations_endpoint(
    client: DevClient, init_client: DevClient
) -> None:
    scenario = await init_client.post("/scenario", json={"scenario": "x"}, headers=headers())
    assert scenario.status == 404
    init = await init_session(client, "abc123", "x")
    assert init.status == 404
    assert await init.json() == {"detail": "Not Found"}


async def test_calls_counter_counts_each_endpoint(client: DevClient, state: DevServerState) -> None:
    session_id = await set_scenario(client)
    await chat(client, session_id, "one")
    await chat(client, session_id, "two")
    await client.post("/chat", json={}, headers=headers(password="wrong"))
    await client.get("/health")
    assert state.calls == {"scenario": 1, "chat": 3, "health": 1}


def test_main_rejects_a_malformed_max_tokens_range(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--max-tokens", "500-10"])
    assert "empty range" in capsys.readouterr().err
