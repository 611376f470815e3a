"""Idempotency-Key on POST /v1/sessions/{id}/messages (docs/api.md).

A retry with the same key and body replays the first outcome without a new
/chat; another body is 422 idempotency_mismatch; a retry while the first is
still answered is 409 idempotency_in_progress; failed attempts are tried again
on the same question. The AI server is the double: its record of calls proves
what was (not) asked, and holding it keeps a first request running.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import ClientResponse
from pytest_aiohttp import AiohttpClient

from sessionbridge.app import create_app
from sessionbridge.config import Settings
from sessionbridge.errors import UpstreamError
from tests.conftest import Api, answering_with, issue_token, problem
from tests.doubles import FakeAIServer, FakeTurn


@pytest.fixture
async def api(fake_api: Api) -> Api:
    """The bridge in front of the AI server double."""
    return fake_api


def fail_next(fake: FakeAIServer, count: int = 1) -> None:
    """The next ``count`` exchanges fail as an AI server's 5xx does (502 upstream_error)."""
    answer = fake.handler
    failures = [UpstreamError("/chat answered 500") for _ in range(count)]

    def handler(turn: FakeTurn) -> Any:
        if failures:
            raise failures.pop()
        return answer(turn)

    fake.handler = handler


def created(fake: FakeAIServer) -> int:
    """How many AI sessions the exchanges created (those that carried no state)."""
    return sum(call.state is None for call in fake.calls)


def keyed(key: str) -> dict[str, str]:
    return {"Idempotency-Key": key}


async def ok(response: ClientResponse) -> dict[str, Any]:
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def test_same_key_and_body_replays_the_first_answer_without_a_new_chat(
    api: Api, fake: FakeAIServer
) -> None:
    session_id = await api.new_session()
    first = await ok(await api.send(session_id, "hello", headers=keyed("k-1")))
    calls = list(fake.calls)

    second = await ok(await api.send(session_id, "hello", headers=keyed("k-1")))

    assert second == first
    assert fake.calls == calls and len(calls) == 1
    assert created(fake) == 1
    messages = await api.messages(session_id)
    assert [m["id"] for m in messages] == [first["user_message"]["id"], first["reply"]["id"]]
    session = await ok(await api.request("GET", f"/v1/sessions/{session_id}"))
    assert session["message_count"] == 2


async def test_replay_matches_the_body_by_meaning_not_by_bytes(
    api: Api, fake: FakeAIServer
) -> None:
    session_id = await api.new_session()
    path = f"/v1/sessions/{session_id}/messages"
    first = await ok(
        await api.request("POST", path, data=b'{"content":"hi","max_tokens":50}',
                          headers=keyed("k-1"))
    )

    reordered = await api.request(
        "POST", path, data=b'{ "max_tokens" : 50,\n  "content" : "hi" }', headers=keyed("k-1")
    )

    assert await ok(reordered) == first
    assert len(fake.calls) == 1


async def test_requests_without_a_key_are_not_deduplicated(
    api: Api, fake: FakeAIServer
) -> None:
    session_id = await api.new_session()

    first = await api.say(session_id, "hello")
    second = await api.say(session_id, "hello")

    assert first["user_message"]["id"] != second["user_message"]["id"]
    assert len(fake.calls) == 2
    assert len(await api.messages(session_id)) == 4


async def test_different_keys_with_the_same_body_are_separate_turns(
    api: Api, fake: FakeAIServer
) -> None:
    session_id = await api.new_session()

    first = await ok(await api.send(session_id, "hello", headers=keyed("k-1")))
    second = await ok(await api.send(session_id, "hello", headers=keyed("k-2")))

    assert first["user_message"]["id"] != second["user_message"]["id"]
    assert len(fake.calls) == 2


async def test_same_key_with_another_content_is_422_mismatch(
    api: Api, fake: FakeAIServer
) -> None:
    session_id = await api.new_session()
    await ok(await api.send(session_id, "hello", headers=keyed("k-1")))

    response = await api.send(session_id, "goodbye", headers=keyed("k-1"))

    await problem(response, 422, "idempotency_mismatch")
    assert len(fake.calls) == 1
    assert (await api.messages(session_id))[0]["content"] == "hello"
    assert len(await api.messages(session_id)) == 2


async def test_same_key_with_another_max_tokens_is_422_mismatch(
    api: Api, fake: FakeAIServer
) -> None:
    session_id = await api.new_session()
    path = f"/v1/sessions/{session_id}/messages"
    await ok(await api.request("POST", path, json={"content": "hi", "max_tokens": 50},
                               headers=keyed("k-1")))

    response = await api.request(
        "POST", path, json={"content": "hi", "max_tokens": 60}, headers=keyed("k-1")
    )

    await problem(response, 422, "idempotency_mismatch")
    assert len(fake.calls) == 1


async def test_same_key_on_another_session_is_422_mismatch(
    api: Api, fake: FakeAIServer
) -> None:
    first_session = await api.new_session("first")
    second_session = await api.new_session("second")
    await ok(await api.send(first_session, "hello", headers=keyed("k-1")))

    response = await api.send(second_session, "hello", headers=keyed("k-1"))

    await problem(response, 422, "idempotency_mismatch")
    assert len(fake.calls) == 1
    assert await api.messages(second_session) == []


async def test_keys_are_scoped_to_the_api_key(api: Api, fake: FakeAIServer) -> None:
    mine = await api.new_session()
    other = Api(api.client, await issue_token(api.app, "other"))
    theirs = await other.new_session()
    my_answer = await ok(await api.send(mine, "hello", headers=keyed("shared")))

    their_answer = await ok(await other.send(theirs, "hello", headers=keyed("shared")))

    assert their_answer["user_message"]["id"] != my_answer["user_message"]["id"]
    assert their_answer["ai_session"] == "created"
    assert len(fake.calls) == 2
    assert len(await other.messages(theirs)) == 2
    # Each key replays its own outcome, not the other's.
    assert await ok(await api.send(mine, "hello", headers=keyed("shared"))) == my_answer
    assert await ok(await other.send(theirs, "hello", headers=keyed("shared"))) == their_answer
    assert len(fake.calls) == 2


async def test_another_api_key_cannot_replay_a_session_it_does_not_own(
    api: Api, fake: FakeAIServer
) -> None:
    session_id = await api.new_session()
    await ok(await api.send(session_id, "hello", headers=keyed("k-1")))
    other = Api(api.client, await issue_token(api.app, "other"))

    response = await other.send(session_id, "hello", headers=keyed("k-1"))

    await problem(response, 404, "not_found")
    assert len(fake.calls) == 1


async def test_duplicate_while_first_is_running_is_409_with_retry_after(
    api: Api, fake: FakeAIServer
) -> None:
    session_id = await api.new_session()
    fake.hold()
    first = asyncio.create_task(api.send(session_id, "hello", headers=keyed("k-1")))
    await fake.wait_entered()  # the first is being answered

    duplicate = await api.send(session_id, "hello", headers=keyed("k-1"))

    await problem(duplicate, 409, "idempotency_in_progress")
    assert int(duplicate.headers["Retry-After"]) >= 1
    assert not first.done()
    fake.release()
    answer = await ok(await first)
    assert len(fake.calls) == 1
    # Once the first is done, the same retry replays it.
    assert await ok(await api.send(session_id, "hello", headers=keyed("k-1"))) == answer
    assert len(fake.calls) == 1
    assert len(await api.messages(session_id)) == 2


async def test_other_body_while_first_is_running_is_422_mismatch(
    api: Api, fake: FakeAIServer
) -> None:
    session_id = await api.new_session()
    fake.hold()
    first = asyncio.create_task(api.send(session_id, "hello", headers=keyed("k-1")))
    await fake.wait_entered()  # the first is being answered

    other_body = await api.send(session_id, "goodbye", headers=keyed("k-1"))

    await problem(other_body, 422, "idempotency_mismatch")
    assert not first.done()
    fake.release()
    await ok(await first)
    assert len(fake.calls) == 1


async def test_retry_after_a_failure_tries_again_on_the_same_question(
    api: Api, fake: FakeAIServer
) -> None:
    session_id = await api.new_session()
    fail_next(fake)
    failed = await api.send(session_id, "hello", headers=keyed("k-1"))
    await problem(failed, 502, "upstream_error")
    (failed_question,) = await api.messages(session_id)
    assert failed_question["status"] == "failed"

    retried = await ok(await api.send(session_id, "hello", headers=keyed("k-1")))

    assert len(fake.calls) == 2
    assert created(fake) == 1  # the AI session created the first time is reused
    assert retried["user_message"]["id"] == failed_question["id"]
    assert retried["user_message"]["status"] == "answered"
    messages = await api.messages(session_id)
    assert [(m["role"], m["status"]) for m in messages] == [
        ("user", "answered"),
        ("assistant", "answered"),
    ]
    assert [m["seq"] for m in messages] == [1, 2]
    assert messages == [retried["user_message"], retried["reply"]]
    session = await ok(await api.request("GET", f"/v1/sessions/{session_id}"))
    assert session["message_count"] == 2


async def test_successful_retry_after_a_failure_is_then_replayed(
    api: Api, fake: FakeAIServer
) -> None:
    session_id = await api.new_session()
    fail_next(fake)
    await problem(await api.send(session_id, "hello", headers=keyed("k-1")), 502, "upstream_error")
    retried = await ok(await api.send(session_id, "hello", headers=keyed("k-1")))

    replayed = await ok(await api.send(session_id, "hello", headers=keyed("k-1")))

    assert replayed == retried
    assert len(fake.calls) == 2


async def test_retry_after_a_failure_with_turns_in_between_keeps_question_and_answer_adjacent(
    api: Api, fake: FakeAIServer
) -> None:
    session_id = await api.new_session()
    fail_next(fake)
    await problem(await api.send(session_id, "first", headers=keyed("k-1")), 502, "upstream_error")
    await api.say(session_id, "second")

    retried = await ok(await api.send(session_id, "first", headers=keyed("k-1")))

    assert retried["reply"]["seq"] == retried["user_message"]["seq"] + 1
    messages = await api.messages(session_id)
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", "second"),
        ("assistant", "answer to 'second'"),
        ("user", "first"),
        ("assistant", "answer to 'first'"),
    ]
    assert all(m["status"] == "answered" for m in messages)
    seqs = [m["seq"] for m in messages]
    assert seqs == sorted(seqs) and len(set(seqs)) == 4


async def test_outcome_survives_a_restart_of_the_bridge(
    api: Api, aiohttp_client: AiohttpClient, fake_settings: Settings, fake: FakeAIServer
) -> None:
    session_id = await api.new_session()
    first = await ok(await api.send(session_id, "hello", headers=keyed("k-1")))
    await api.client.close()  # the first bridge stops: its database is closed

    restarted = Api(
        await aiohttp_client(answering_with(create_app(fake_settings), fake)), api.token
    )
    replayed = await ok(await restarted.send(session_id, "hello", headers=keyed("k-1")))

    assert replayed == first
    assert len(fake.calls) == 1
    assert len(await restarted.messages(session_id)) == 2

