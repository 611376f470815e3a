"""End-to-end turns: the bridge on a real socket, the reference AI server on another."""

from __future__ import annotations

import asyncio
import time

from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpClient

from sessionbridge.app import create_app
from sessionbridge.web.appkeys import CONVERSATIONS, STORE
from sessionbridge.config import Settings
from sessionbridge.tokens import hash_token
from sessionbridge.reference.seed_server import DevServerState

from .conftest import Api, MakeApi


async def test_five_message_conversation_costs_one_scenario(
    api: Api, ai_state: DevServerState
) -> None:
    session_id = await api.new_session("You are a ship's cook.")
    kinds = [(await api.say(session_id, f"message {n}"))["ai_session"] for n in range(1, 6)]

    assert kinds == ["created", "reused", "reused", "reused", "reused"]
    assert ai_state.calls["scenario"] == 1
    assert ai_state.calls["chat"] == 5
    assert len(ai_state.sessions) == 1


async def test_replies_come_from_one_growing_context(api: Api) -> None:
    session_id = await api.new_session("You are a ship's cook.")
    replies = [(await api.say(session_id, f"m{n}"))["reply"]["content"] for n in range(3)]

    assert [r.split(":")[0] for r in replies] == ["turn 1", "turn 2", "turn 3"]
    assert "scenario starts \"You are a ship's cook.\"" in replies[2]


async def test_messages_are_stored_with_consecutive_seq(api: Api) -> None:
    session_id = await api.new_session()
    first = await api.say(session_id, "hello")
    await api.say(session_id, "again")

    messages = await api.messages(session_id)
    assert [(m["seq"], m["role"], m["status"]) for m in messages] == [
        (1, "user", "answered"),
        (2, "assistant", "answered"),
        (3, "user", "answered"),
        (4, "assistant", "answered"),
    ]
    assert messages[0]["id"] == first["user_message"]["id"]
    assert messages[1]["content"] == first["reply"]["content"]


async def test_concurrent_first_messages_create_one_ai_session(
    api: Api, ai_state: DevServerState
) -> None:
    ai_state.delay = 0.05
    session_id = await api.new_session()

    responses = await asyncio.gather(*(api.send(session_id, f"q{n}") for n in range(4)))

    assert [r.status for r in responses] == [200] * 4
    kinds = sorted([(await r.json())["ai_session"] for r in responses])
    assert kinds == ["created", "reused", "reused", "reused"]
    assert ai_state.calls["scenario"] == 1


async def test_messages_of_one_session_are_answered_in_arrival_order(
    api: Api, ai_state: DevServerState
) -> None:
    ai_state.delay = 0.02
    session_id = await api.new_session()
    tasks = []
    for n in range(5):
        tasks.append(asyncio.create_task(api.send(session_id, f"q{n}")))
        await asyncio.sleep(0.005)  # arrival order is the order of the sends
    await asyncio.gather(*tasks)

    users = [m["content"] for m in await api.messages(session_id) if m["role"] == "user"]
    assert users == [f"q{n}" for n in range(5)]
    history = next(iter(ai_state.sessions.values())).history
    assert [question for question, _ in history] == users


async def test_parallel_sessions_do_not_wait_for_each_other(
    make_api: MakeApi, ai_state: DevServerState
) -> None:
    api = await make_api(max_inflight=64)
    ai_state.delay = 0.3
    session_ids = [await api.new_session(f"scenario {n}") for n in range(30)]

    started = time.monotonic()
    bodies = await asyncio.gather(*(api.say(sid, f"question for {sid}") for sid in session_ids))
    elapsed = time.monotonic() - started

    # One scenario + one chat take 0.3 s; thirty sessions in series would take 9 s.
    assert elapsed < 2.0, elapsed
    for sid, body in zip(session_ids, bodies, strict=True):
        assert f"you said 'question for {sid}'" in body["reply"]["content"]
        assert "I hold 0 earlier turns" in body["reply"]["content"]
    assert ai_state.calls["scenario"] == 30


async def test_lock_registry_is_empty_when_traffic_stops(
    api: Api, ai_state: DevServerState
) -> None:
    ai_state.delay = 0.01
    session_ids = [await api.new_session() for _ in range(5)]
    await asyncio.gather(*(api.say(sid, f"m{n}") for n in range(3) for sid in session_ids))

    assert len(api.app[CONVERSATIONS].locks) == 0
    assert api.app[CONVERSATIONS].inflight == 0


async def test_ai_server_restart_is_recovered_with_the_transcript(
    api: Api, ai_state: DevServerState
) -> None:
    session_id = await api.new_session("You are a gardener.")
    await api.say(session_id, "What grows in shade?")
    await api.say(session_id, "And in sun?")
    ai_state.forget_sessions()  # the AI server restarted

    recovered = await api.say(session_id, "Thanks!")
    following = await api.say(session_id, "One more")

    assert recovered["ai_session"] == "recovered"
    assert following["ai_session"] == "reused"
    assert ai_state.calls["scenario"] == 2  # one to start, one to recover
    (session,) = ai_state.sessions.values()
    assert session.scenario.startswith("You are a gardener.")
    assert "User: What grows in shade?" in session.scenario
    assert "User: And in sun?" in session.scenario
    assert "Assistant: turn 2: you said 'And in sun?'" in session.scenario


async def test_recovery_transcript_keeps_newest_turns_within_budget(
    make_api: MakeApi, ai_state: DevServerState
) -> None:
    api = await make_api(recovery_budget=150)
    session_id = await api.new_session("Scenario.")
    for n in range(5):
        await api.say(session_id, f"question {n}")
    ai_state.forget_sessions()

    await api.say(session_id, "after restart")

    (session,) = ai_state.sessions.values()
    transcript = session.scenario.split("\n", 1)[1]
    assert "question 4" in transcript
    assert "question 0" not in transcript
    assert len(transcript) < 150 + 200  # budget counts message text, not labels


async def test_failed_turns_are_left_out_of_recovery(api: Api, ai_state: DevServerState) -> None:
    session_id = await api.new_session()
    await api.say(session_id, "kept question")
    ai_state.fail_next = [503]
    assert (await api.send(session_id, "failed question")).status == 502
    ai_state.forget_sessions()

    await api.say(session_id, "after restart")

    (session,) = ai_state.sessions.values()
    assert "kept question" in session.scenario
    assert "failed question" not in session.scenario


async def test_bridge_restart_reuses_the_stored_ai_session(
    aiohttp_client: AiohttpClient, settings: Settings, api: Api, ai_state: DevServerState
) -> None:
    session_id = await api.new_session()
    await api.say(session_id, "before restart")
    await api.client.close()  # the first bridge stops; the database stays

    client = await aiohttp_client(create_app(settings))
    restarted = Api(client, api.token)
    body = await restarted.say(session_id, "after restart")

    assert body["ai_session"] == "reused"
    assert "turn 2" in body["reply"]["content"]
    assert ai_state.calls["scenario"] == 1


async def test_cookies_of_one_conversation_never_reach_another(
    api: Api, ai_state: DevServerState
) -> None:
    first, second = await api.new_session("first"), await api.new_session("second")
    await api.say(first, "to first")
    body = await api.say(second, "to second")

    assert "I hold 0 earlier turns" in body["reply"]["content"]
    assert "scenario starts 'second'" in body["reply"]["content"]
    assert ai_state.calls["scenario"] == 2


async def test_empty_replies_are_retried_then_answered(
    make_api: MakeApi, ai_state: DevServerState
) -> None:
    api = await make_api(empty_reply_retries=2)
    session_id = await api.new_session()
    ai_state.empty_replies = 2

    body = await api.say(session_id, "hello?")

    assert body["reply"]["content"].startswith("turn 1")
    assert ai_state.calls["chat"] == 3


async def test_persistent_empty_replies_give_502_and_store_no_answer(
    make_api: MakeApi, ai_state: DevServerState
) -> None:
    api = await make_api(empty_reply_retries=1)
    session_id = await api.new_session()
    ai_state.empty_replies = 5

    response = await api.send(session_id, "hello?")

    assert response.status == 502
    assert response.content_type == "application/problem+json"
    assert (await response.json())["code"] == "upstream_empty_reply"
    assert ai_state.calls["chat"] == 2
    messages = await api.messages(session_id)
    assert [(m["role"], m["status"]) for m in messages] == [("user", "failed")]


async def test_ai_server_5xx_is_upstream_error_and_not_a_recovery(
    api: Api, ai_state: DevServerState
) -> None:
    session_id = await api.new_session()
    await api.say(session_id, "first")
    ai_state.fail_next = [500]

    response = await api.send(session_id, "second")

    assert response.status == 502
    assert (await response.json())["code"] == "upstream_error"
    assert ai_state.calls["scenario"] == 1
    statuses = [(m["role"], m["status"]) for m in await api.messages(session_id)]
    assert statuses[-1] == ("user", "failed")
    # The session goes on normally afterwards.
    assert (await api.say(session_id, "third"))["ai_session"] == "reused"


async def test_ai_server_timeout_is_504_and_the_session_answers_afterwards(
    make_api: MakeApi, ai_state: DevServerState
) -> None:
    api = await make_api(upstream_timeout=0.3)
    session_id = await api.new_session()
    await api.say(session_id, "first")
    ai_state.hang = True

    started = time.monotonic()
    response = await api.send(session_id, "second")
    elapsed = time.monotonic() - started

    assert response.status == 504
    assert (await response.json())["code"] == "upstream_timeout"
    assert elapsed < 1.5
    ai_state.hang = False
    assert (await api.say(session_id, "third"))["ai_session"] == "reused"


async def test_stopped_ai_server_is_503_with_retry_after(
    api: Api, ai_server: TestServer
) -> None:
    session_id = await api.new_session()
    await ai_server.close()

    response = await api.send(session_id, "anyone there?")

    assert response.status == 503
    assert response.headers["Retry-After"].isdigit()
    assert (await response.json())["code"] == "upstream_unavailable"
    messages = await api.messages(session_id)
    assert [(m["role"], m["status"]) for m in messages] == [("user", "failed")]


async def test_bad_ai_server_credentials_are_upstream_error(
    make_api: MakeApi, ai_state: DevServerState
) -> None:
    api = await make_api(upstream_password="wrong")
    session_id = await api.new_session()

    response = await api.send(session_id, "hello")

    assert response.status == 502
    assert (await response.json())["code"] == "upstream_error"


async def test_a_flood_on_one_session_gets_429_session_busy(
    make_api: MakeApi, ai_state: DevServerState
) -> None:
    api = await make_api(session_queue=2)
    ai_state.delay = 0.2
    session_id = await api.new_session()

    responses = await asyncio.gather(*(api.send(session_id, f"m{n}") for n in range(6)))

    statuses = sorted(r.status for r in responses)
    assert statuses == [200, 200, 200, 429, 429, 429]
    busy = next(r for r in responses if r.status == 429)
    assert busy.headers["Retry-After"].isdigit()
    assert (await busy.json())["code"] == "session_busy"


async def test_over_the_inflight_limit_is_503_overloaded_at_once(
    make_api: MakeApi, ai_state: DevServerState
) -> None:
    api = await make_api(max_inflight=2)
    ai_state.delay = 0.5
    sessions = [await api.new_session() for _ in range(3)]
    running = [asyncio.create_task(api.send(sid, "slow")) for sid in sessions[:2]]
    await asyncio.sleep(0.1)

    started = time.monotonic()
    response = await api.send(sessions[2], "one too many")
    elapsed = time.monotonic() - started

    assert response.status == 503
    assert (await response.json())["code"] == "overloaded"
    assert "Retry-After" in response.headers
    assert elapsed < 0.3
    assert [r.status for r in await asyncio.gather(*running)] == [200, 200]
    # Nothing was stored for the refused message.
    assert await api.messages(sessions[2]) == []


async def test_ai_session_id_is_stored_and_never_shown(api: Api) -> None:
    session_id = await api.new_session()
    body = await api.say(session_id, "hi")
    key = await api.app[STORE].key_for_token_hash(hash_token(api.token))
    assert key is not None
    stored = await api.app[STORE].get_session(key.id, session_id)

    assert stored is not None and stored.ai_session_id
    listing = await (await api.request("GET", "/v1/sessions")).text()
    assert stored.ai_session_id not in str(body) and stored.ai_session_id not in listing


async def test_deleting_a_session_during_its_turn_gives_404_not_500(
    api: Api, ai_state: DevServerState
) -> None:
    session_id = await api.new_session()
    await api.say(session_id, "first")
    ai_state.delay = 0.3
    turn = asyncio.create_task(api.send(session_id, "second"))
    await asyncio.sleep(0.1)

    deleted = await api.request("DELETE", f"/v1/sessions/{session_id}")
    response = await turn

    assert deleted.status == 204
    assert response.status == 404
    assert (await response.json())["code"] == "not_found"
    assert len(api.app[CONVERSATIONS].locks) == 0
