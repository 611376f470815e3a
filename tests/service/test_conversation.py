"""End-to-end turns: the bridge on a real socket, the reference AI server on another.

What the seed adapter does (one AI session per conversation, recovery with the
transcript, the AI server's failures) is tested against the reference AI
server; the rules that hold for any AI server (arrival order, the queue and
in-flight limits, deleting during a turn) against the AI server double.
"""

from __future__ import annotations

import asyncio

from pytest_aiohttp import AiohttpClient

from sessionbridge.app import create_app
from sessionbridge.config import Settings
from sessionbridge.reference.seed_server import DevServerState
from sessionbridge.tokens import hash_token
from sessionbridge.web.appkeys import CONVERSATIONS, STORE
from tests.conftest import Api, MakeApi, ReferenceAI, problem, readyz_becomes
from tests.doubles import FakeAIServer, ServerGate, wait_until

# -- the same rules for every flavour of AI server -------------------------------------------


async def test_a_conversation_creates_its_ai_context_once_and_reuses_it(
    make_flavored_api: MakeApi, reference_ai: ReferenceAI
) -> None:
    api = await make_flavored_api()
    session_id = await api.new_session("You are terse.")
    turns = [await api.say(session_id, f"message {n}") for n in range(1, 6)]

    assert [turn["ai_session"] for turn in turns] == ["created"] + ["reused"] * 4
    assert turns[1]["reply"]["ai_session"] == "reused"
    assert reference_ai.state.calls["chat"] == 5
    if isinstance(reference_ai.state, DevServerState):
        # One AI session, made by this generation's own call, holds the scenario.
        assert reference_ai.created == 1
        other = "scenario" if reference_ai.flavor == "init-session" else "init-session"
        assert reference_ai.state.calls[other] == 0
        (session,) = reference_ai.state.sessions.values()
        assert session.scenario == "You are terse."
    else:
        # The second prompt begins with the whole first prompt and its reply: cached.
        usage = turns[1]["reply"]["usage"]
        assert usage["cached_tokens"] >= turns[0]["reply"]["usage"]["prompt_tokens"]
        assert usage["prompt_tokens"] > usage["cached_tokens"]


async def test_an_ai_server_restart_is_recovered_with_the_transcript(
    make_flavored_api: MakeApi, reference_ai: ReferenceAI
) -> None:
    api = await make_flavored_api()
    session_id = await api.new_session("You are a gardener.")
    await api.say(session_id, "What grows in shade?")
    second = await api.say(session_id, "And in sun?")
    reference_ai.restart()

    recovered = await api.say(session_id, "Thanks!")
    following = await api.say(session_id, "One more")

    assert recovered["ai_session"] == "recovered"
    assert following["ai_session"] == "reused"
    if isinstance(reference_ai.state, DevServerState):
        # A new AI session whose scenario carries the transcript.
        assert reference_ai.created == 2  # one to start, one to recover
        (session,) = reference_ai.state.sessions.values()
        assert session.scenario.startswith("You are a gardener.")
        assert "User: What grows in shade?" in session.scenario
        assert "User: And in sun?" in session.scenario
        assert f"Assistant: {second['reply']['content']}" in session.scenario
    else:
        # The whole history is sent again, and little of it is cached.
        usage = recovered["reply"]["usage"]
        assert usage["cached_tokens"] < usage["prompt_tokens"] / 2


async def test_an_ai_server_5xx_is_upstream_error_and_not_a_recovery(
    make_flavored_api: MakeApi, reference_ai: ReferenceAI
) -> None:
    api = await make_flavored_api()
    session_id = await api.new_session()
    await api.say(session_id, "first")
    reference_ai.state.fail_next = [500]

    response = await api.send(session_id, "second")

    await problem(response, 502, "upstream_error")
    if reference_ai.seed:
        assert reference_ai.created == 1
    statuses = [(m["role"], m["status"]) for m in await api.messages(session_id)]
    assert statuses[-1] == ("user", "failed")
    # The session goes on normally afterwards.
    assert (await api.say(session_id, "third"))["ai_session"] == "reused"


async def test_a_bridge_restart_reuses_the_stored_ai_context(
    aiohttp_client: AiohttpClient,
    flavored_settings: Settings,
    make_flavored_api: MakeApi,
    reference_ai: ReferenceAI,
) -> None:
    api = await make_flavored_api()
    session_id = await api.new_session()
    await api.say(session_id, "before restart")
    await api.client.close()  # the first bridge stops; the database stays

    client = await aiohttp_client(create_app(flavored_settings))
    restarted = Api(client, api.token)
    body = await restarted.say(session_id, "after restart")

    assert body["ai_session"] == "reused"
    if reference_ai.seed:
        assert "turn 2" in body["reply"]["content"]
        assert reference_ai.created == 1


async def test_empty_replies_are_retried_then_answered(
    make_flavored_api: MakeApi, reference_ai: ReferenceAI
) -> None:
    api = await make_flavored_api(empty_reply_retries=2)
    session_id = await api.new_session()
    reference_ai.state.empty_replies = 2

    body = await api.say(session_id, "hello?")

    assert body["reply"]["content"].strip()
    assert reference_ai.state.calls["chat"] == 3
    if reference_ai.seed:
        assert body["reply"]["content"].startswith("turn 1")  # the empty ones left no turn


async def test_persistent_empty_replies_give_502_and_store_no_answer(
    make_flavored_api: MakeApi, reference_ai: ReferenceAI
) -> None:
    api = await make_flavored_api(empty_reply_retries=1)
    session_id = await api.new_session()
    reference_ai.state.empty_replies = 5

    response = await api.send(session_id, "hello?")

    await problem(response, 502, "upstream_empty_reply")
    assert reference_ai.state.calls["chat"] == 2
    messages = await api.messages(session_id)
    assert [(m["role"], m["status"]) for m in messages] == [("user", "failed")]


async def test_a_silent_ai_server_is_504_and_the_session_answers_afterwards(
    make_flavored_api: MakeApi, reference_ai: ReferenceAI
) -> None:
    api = await make_flavored_api(upstream_timeout=0.3)
    session_id = await api.new_session()
    await api.say(session_id, "first")
    reference_ai.gate.hold()  # the AI server takes the next question and says nothing

    response = await api.send(session_id, "second")

    await problem(response, 504, "upstream_timeout")
    reference_ai.gate.release()
    assert (await api.say(session_id, "third"))["ai_session"] == "reused"


async def test_a_stopped_ai_server_is_503_with_retry_after_and_not_ready(
    make_flavored_api: MakeApi, reference_ai: ReferenceAI
) -> None:
    api = await make_flavored_api(ready_interval=0.1)
    session_id = await api.new_session()
    await reference_ai.server.close()

    response = await api.send(session_id, "anyone there?")

    await problem(response, 503, "upstream_unavailable")
    assert response.headers["Retry-After"].isdigit()
    messages = await api.messages(session_id)
    if reference_ai.seed:
        assert [(m["role"], m["status"]) for m in messages] == [("user", "failed")]
    else:
        # An OpenAI-compatible server is first asked its context size, to check
        # that the message fits: refused before anything is stored.
        assert messages == []
    await readyz_becomes(api, 503)


# -- the seed protocol ------------------------------------------------------------------------


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
    api: Api, ai_state: DevServerState, ai_gate: ServerGate
) -> None:
    session_id = await api.new_session()
    ai_gate.hold()
    sends = [asyncio.create_task(api.send(session_id, f"q{n}")) for n in range(4)]
    # One is inside the AI server (its AI session created), three wait their turn.
    await ai_gate.wait_entered()
    await wait_until(lambda: api.app[CONVERSATIONS].locks.waiting(session_id) == 3)
    ai_gate.release()
    responses = await asyncio.gather(*sends)

    assert [r.status for r in responses] == [200] * 4
    kinds = sorted([(await r.json())["ai_session"] for r in responses])
    assert kinds == ["created", "reused", "reused", "reused"]
    assert ai_state.calls["scenario"] == 1


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


async def test_a_session_lost_right_after_creation_is_not_recovered_again(
    api: Api, ai_state: DevServerState
) -> None:
    session_id = await api.new_session()
    ai_state.fail_next = [404]  # "Session not found" from the session just created

    await problem(await api.send(session_id, "hello"), 502, "upstream_error")
    assert ai_state.calls["scenario"] == 1


async def test_recovery_happens_once_per_turn(api: Api, ai_state: DevServerState) -> None:
    session_id = await api.new_session()
    await api.say(session_id, "first")
    ai_state.fail_next = [404, 404]  # lost, and lost again right after the recovery

    await problem(await api.send(session_id, "second"), 502, "upstream_error")
    assert ai_state.calls["scenario"] == 2  # the original and one recovery, never a loop


async def test_cookies_of_one_conversation_never_reach_another(
    api: Api, ai_state: DevServerState
) -> None:
    first, second = await api.new_session("first"), await api.new_session("second")
    await api.say(first, "to first")
    body = await api.say(second, "to second")

    assert "I hold 0 earlier turns" in body["reply"]["content"]
    assert "scenario starts 'second'" in body["reply"]["content"]
    assert ai_state.calls["scenario"] == 2


async def test_bad_ai_server_credentials_are_upstream_error(
    make_api: MakeApi, ai_state: DevServerState
) -> None:
    api = await make_api(upstream_password="wrong")
    session_id = await api.new_session()

    response = await api.send(session_id, "hello")

    assert response.status == 502
    assert (await response.json())["code"] == "upstream_error"


async def test_ai_session_id_is_stored_and_never_shown(api: Api) -> None:
    session_id = await api.new_session()
    body = await api.say(session_id, "hi")
    key = await api.app[STORE].key_for_token_hash(hash_token(api.token))
    assert key is not None
    stored = await api.app[STORE].get_session(key.id, session_id)

    assert stored is not None and stored.ai_session_id
    listing = await (await api.request("GET", "/v1/sessions")).text()
    assert stored.ai_session_id not in str(body) and stored.ai_session_id not in listing


# -- rules for any AI server, against the double ----------------------------------------------


async def test_messages_of_one_session_are_answered_in_arrival_order(
    fake_api: Api, fake: FakeAIServer
) -> None:
    api = fake_api
    session_id = await api.new_session()
    fake.hold()
    sends = [asyncio.create_task(api.send(session_id, "q0"))]
    await fake.wait_entered()
    for n in range(1, 5):
        sends.append(asyncio.create_task(api.send(session_id, f"q{n}")))
        # Arrival order is the order of the sends: each is queued before the next.
        await wait_until(lambda: api.app[CONVERSATIONS].locks.waiting(session_id) == len(sends) - 1)
    fake.release()
    await asyncio.gather(*sends)

    users = [m["content"] for m in await api.messages(session_id) if m["role"] == "user"]
    assert users == [f"q{n}" for n in range(5)]
    assert fake.contents() == users


async def test_parallel_sessions_do_not_wait_for_each_other(
    make_fake_api: MakeApi, fake: FakeAIServer
) -> None:
    api = await make_fake_api(max_inflight=64)
    session_ids = [await api.new_session(f"scenario {n}") for n in range(30)]
    fake.hold()

    says = asyncio.gather(*(api.say(sid, f"question for {sid}") for sid in session_ids))
    # Thirty turns of thirty sessions are inside the AI server at once.
    await fake.wait_entered(30)
    fake.release()
    bodies = await says

    for sid, body in zip(session_ids, bodies, strict=True):
        assert body["reply"]["content"] == f"answer to 'question for {sid}'"
        assert body["ai_session"] == "created"
    assert sorted(call.session_id for call in fake.calls) == sorted(session_ids)
    assert all(call.state is None for call in fake.calls)


async def test_lock_registry_is_empty_when_traffic_stops(
    fake_api: Api, fake: FakeAIServer
) -> None:
    api = fake_api
    session_ids = [await api.new_session() for _ in range(5)]
    fake.hold()
    says = asyncio.gather(*(api.say(sid, f"m{n}") for n in range(3) for sid in session_ids))
    await fake.wait_entered(5)  # one turn of each session inside, the rest queued
    assert len(api.app[CONVERSATIONS].locks) == 5
    fake.release()
    await says

    assert len(api.app[CONVERSATIONS].locks) == 0
    assert api.app[CONVERSATIONS].inflight == 0


async def test_a_flood_on_one_session_gets_429_session_busy(
    make_fake_api: MakeApi, fake: FakeAIServer
) -> None:
    api = await make_fake_api(session_queue=2)
    session_id = await api.new_session()
    fake.hold()

    sends = [asyncio.create_task(api.send(session_id, f"m{n}")) for n in range(6)]
    # One inside the AI server and two queued; the other three are refused at once.
    await fake.wait_entered()
    await wait_until(lambda: sum(send.done() for send in sends) == 3)
    refused = [send.result() for send in sends if send.done()]
    assert api.app[CONVERSATIONS].locks.waiting(session_id) == 2
    fake.release()
    responses = await asyncio.gather(*sends)

    assert [r.status for r in refused] == [429, 429, 429]
    assert sorted(r.status for r in responses) == [200, 200, 200, 429, 429, 429]
    busy = refused[0]
    assert busy.headers["Retry-After"].isdigit()
    assert (await busy.json())["code"] == "session_busy"


async def test_over_the_inflight_limit_is_503_overloaded_at_once(
    make_fake_api: MakeApi, fake: FakeAIServer
) -> None:
    api = await make_fake_api(max_inflight=2)
    sessions = [await api.new_session() for _ in range(3)]
    fake.hold()
    running = [asyncio.create_task(api.send(sid, "slow")) for sid in sessions[:2]]
    await fake.wait_entered(2)

    # Answered while both turns are still held inside the AI server: it did not wait.
    response = await api.send(sessions[2], "one too many")

    assert response.status == 503
    assert (await response.json())["code"] == "overloaded"
    assert "Retry-After" in response.headers
    assert fake.waiting == 2
    fake.release()
    assert [r.status for r in await asyncio.gather(*running)] == [200, 200]
    # Nothing was stored for the refused message.
    assert await api.messages(sessions[2]) == []


async def test_deleting_a_session_during_its_turn_gives_404_not_500(
    fake_api: Api, fake: FakeAIServer
) -> None:
    api = fake_api
    session_id = await api.new_session()
    await api.say(session_id, "first")
    fake.hold()
    turn = asyncio.create_task(api.send(session_id, "second"))
    await fake.wait_entered(2)  # the second turn is inside the AI server

    deleted = await api.request("DELETE", f"/v1/sessions/{session_id}")
    fake.release()
    response = await turn

    assert deleted.status == 204
    assert response.status == 404
    assert (await response.json())["code"] == "not_found"
    assert len(api.app[CONVERSATIONS].locks) == 0
    assert fake.forgotten == [session_id]
