"""Streamed turns (docs/streaming.md) over real sockets, for both AI-server families."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from sessionbridge.config import Settings, TokenRange
from sessionbridge.reference.openai_server import (
    OpenAIReferenceState,
    create_openai_reference_app,
)
from tests.conftest import Api, MakeApi, ReferenceAI, issue_token, problem
from tests.doubles import FIRST_PIECE_WRITES, HANG_TIMEOUT, ServerGate, wait_until
from tests.sse import Stream, joined, read_events

STREAM = {"Accept": "text/event-stream"}


@pytest.fixture
def openai_state() -> OpenAIReferenceState:
    # Pieces of three tokens: a reply comes in several (hold openai_gate.writes to pause it).
    return OpenAIReferenceState(tokens_per_piece=3)


@pytest.fixture
async def openai_server(
    aiohttp_server: AiohttpServer, openai_state: OpenAIReferenceState, openai_gate: ServerGate
) -> AsyncIterator[TestServer]:
    yield await aiohttp_server(openai_gate.install(create_openai_reference_app(openai_state)))
    openai_gate.release_all()




@pytest.fixture
def openai_api_factory(
    make_api: MakeApi, openai_server: TestServer, tmp_path: Path
) -> MakeApi:
    async def make(**changes: Any) -> Api:
        return await make_api(
            db=str(tmp_path / "openai.db"),
            upstream_url=str(openai_server.make_url("/v1")),
            upstream_flavor="openai",
            upstream_max_tokens=TokenRange(1, 500),
            **changes,
        )

    return make


async def streamed(api: Api, session_id: str, content: str, **kwargs: Any) -> Stream:
    headers = {**STREAM, **kwargs.pop("headers", {})}
    response = await api.send(session_id, content, headers=headers, **kwargs)
    return await read_events(response)


def check_complete(stream: Stream, stored: list[dict[str, Any]]) -> None:
    """Events in order, one end event, deltas numbered 1.. and joined equal to the stored reply."""
    assert stream.names[0] == "turn.started"
    assert stream.names[-1] == "turn.completed"
    assert stream.names.count("turn.completed") + stream.names.count("turn.failed") == 1
    assert set(stream.names[1:-1]) == {"reply.delta"}
    assert [d.id for d in stream.deltas] == list(range(1, len(stream.deltas) + 1))
    completed = stream.events[-1].data
    assert stream.text == completed["reply"]["content"] == stored[-1]["content"]
    assert stream.events[0].data["user_message"]["id"] == completed["user_message"]["id"]
    assert stream.events[0].data["user_message"]["status"] == "pending"


async def test_a_streamed_turn_is_complete_for_every_flavour(
    make_flavored_api: MakeApi, reference_ai: ReferenceAI
) -> None:
    api = await make_flavored_api()
    session_id = await api.new_session()

    first = await streamed(api, session_id, "Hello")
    second = await streamed(api, session_id, "Again")

    stored = await api.messages(session_id)
    check_complete(first, stored[:2])
    check_complete(second, stored)
    assert first.events[-1].data["ai_session"] == "created"
    assert second.events[-1].data["ai_session"] == "reused"
    if reference_ai.seed:
        assert len(first.deltas) == len(second.deltas) == 1  # this protocol does not stream
    else:
        assert len(first.deltas) > 1 and len(second.deltas) > 1


async def test_openai_replies_stream_piece_by_piece(
    openai_api_factory: MakeApi, openai_gate: ServerGate
) -> None:
    api = await openai_api_factory()
    session_id = await api.new_session()
    openai_gate.hold_writes_after(FIRST_PIECE_WRITES)

    response = await api.send(session_id, "Tell me something", headers=STREAM)
    first = await read_events(response, stop_after_deltas=1)
    # Pieces arrive as the AI server sends them, not all at the end: the first
    # is here while the server still holds back the rest.
    assert openai_gate.writes.waiting == 1
    openai_gate.writes.release()
    stream = joined(first, await read_events(response))

    check_complete(stream, await api.messages(session_id))
    assert len(stream.deltas) >= 3


async def test_without_the_header_nothing_changes(api: Api) -> None:
    session_id = await api.new_session()

    response = await api.send(session_id, "Hello")

    assert response.status == 200
    assert response.content_type == "application/json"


async def test_a_refusal_before_the_question_is_stored_keeps_its_problem(api: Api) -> None:
    await problem(await api.send("no-such-session", "hi", headers=STREAM), 404, "not_found")
    session_id = await api.new_session()
    response = await api.request(
        "POST", f"/v1/sessions/{session_id}/messages", json={"content": ""}, headers=STREAM
    )
    await problem(response, 422, "invalid_field")
    assert await api.messages(session_id) == []


async def test_a_reader_that_leaves_does_not_stop_the_turn_and_can_resume(
    openai_api_factory: MakeApi, openai_gate: ServerGate
) -> None:
    api = await openai_api_factory()
    session_id = await api.new_session()
    openai_gate.hold_writes_after(FIRST_PIECE_WRITES)
    response = await api.send(session_id, "A long answer please", headers=STREAM)
    partial = await read_events(response, stop_after_deltas=1)
    question_id = partial.events[0].data["user_message"]["id"]
    response.close()  # the client goes away after the first delta

    # The turn is still running (the AI server holds the rest of its reply).
    assert openai_gate.writes.waiting == 1
    resuming = await api.request(
        "GET", f"/v1/sessions/{session_id}/messages/{question_id}/events",
        headers={"Last-Event-ID": "1"},
    )
    openai_gate.writes.release()
    resumed = await read_events(resuming)

    # Exactly what was missed: the deltas after the first, numbered as before.
    assert [d.id for d in resumed.deltas] == list(range(2, len(resumed.deltas) + 2))
    assert resumed.names[0] == "turn.started" and resumed.names[-1] == "turn.completed"
    stored = await api.messages(session_id)
    assert stored[-1]["status"] == "answered"
    assert partial.text + resumed.text == stored[-1]["content"]


async def test_an_ended_turn_replays_its_pieces_from_the_database(
    openai_api_factory: MakeApi,
) -> None:
    api = await openai_api_factory()
    session_id = await api.new_session()
    live = await streamed(api, session_id, "Hello there")
    question_id = live.events[0].data["user_message"]["id"]
    url = f"/v1/sessions/{session_id}/messages/{question_id}/events"

    again = await read_events(await api.request("GET", url))
    after_two = await read_events(await api.request("GET", url, headers={"Last-Event-ID": "2"}))

    assert [(d.id, d.data) for d in again.deltas] == [(d.id, d.data) for d in live.deltas]
    assert [(d.id, d.data) for d in after_two.deltas] == [(d.id, d.data) for d in live.deltas[2:]]
    assert again.events[-1].data == live.events[-1].data
    assert again.events[0].data["user_message"]["status"] == "answered"


async def test_a_blank_reply_is_retried_and_never_streamed(
    openai_api_factory: MakeApi, openai_state: OpenAIReferenceState
) -> None:
    api = await openai_api_factory(empty_reply_retries=2)
    session_id = await api.new_session()
    openai_state.blank_replies = 1
    openai_state.empty_replies = 1

    stream = await streamed(api, session_id, "Hello")

    check_complete(stream, await api.messages(session_id))
    assert stream.deltas[0].data["text"].strip()  # the first delta already holds text
    assert sum(1 for r in openai_state.requests if "messages" in r) == 3


async def test_an_upstream_failure_mid_stream_ends_with_turn_failed(
    openai_api_factory: MakeApi, openai_state: OpenAIReferenceState
) -> None:
    api = await openai_api_factory()
    session_id = await api.new_session()
    openai_state.break_after_pieces = 2

    stream = await streamed(api, session_id, "Hello")

    assert stream.names[-1] == "turn.failed"
    assert stream.events[-1].data["code"] == "upstream_error"
    assert stream.events[-1].data["status"] == 502
    (question,) = await api.messages(session_id)
    assert question["status"] == "failed" and question["error"] == "upstream_error"


async def test_keep_alive_comments_flow_while_the_reply_is_slow(
    openai_api_factory: MakeApi, openai_gate: ServerGate
) -> None:
    api = await openai_api_factory(sse_keepalive=0.05)
    session_id = await api.new_session()
    openai_gate.hold()  # a slow prompt: nothing to send for a while

    response = await api.send(session_id, "Hello", headers=STREAM)
    async with asyncio.timeout(HANG_TIMEOUT):
        while not (line := await response.content.readline()).startswith(b":"):
            assert line, "the stream ended without a keep-alive"
    openai_gate.release()
    stream = await read_events(response)

    assert "keep-alive" in line.decode()
    assert stream.names[-1] == "turn.completed"


async def test_an_idempotent_streaming_retry_follows_the_running_turn(
    openai_api_factory: MakeApi, openai_state: OpenAIReferenceState, openai_gate: ServerGate
) -> None:
    api = await openai_api_factory()
    session_id = await api.new_session()
    headers = {**STREAM, "Idempotency-Key": "k-1"}
    openai_gate.hold()

    first = await api.send(session_id, "Hello", headers=headers)
    await openai_gate.wait_held()  # the first turn runs
    second = await api.send(session_id, "Hello", headers=headers)  # and is followed
    openai_gate.release()
    first_stream, second_stream = await asyncio.gather(read_events(first), read_events(second))
    after = await streamed(api, session_id, "Hello", headers=headers)

    assert first_stream.events[-1].data == second_stream.events[-1].data == after.events[-1].data
    assert first_stream.text == second_stream.text == after.text
    assert sum(1 for r in openai_state.requests if "messages" in r) == 1
    assert len(await api.messages(session_id)) == 2
    # Without the event stream the rules of docs/api.md stay: in progress is 409.
    openai_gate.hold()
    running = await api.send(session_id, "Other", headers={**STREAM, "Idempotency-Key": "k-2"})
    await openai_gate.wait_held()
    await problem(
        await api.send(session_id, "Other", headers={"Idempotency-Key": "k-2"}),
        409, "idempotency_in_progress",
    )
    openai_gate.release()
    assert (await read_events(running)).names[-1] == "turn.completed"


async def test_streamed_turns_of_one_session_are_answered_in_order(
    openai_api_factory: MakeApi,
) -> None:
    api = await openai_api_factory()
    session_id = await api.new_session()

    streams = await asyncio.gather(*(streamed(api, session_id, f"m{n}") for n in range(3)))

    stored = await api.messages(session_id)
    assert [m["content"] for m in stored[0::2]] == ["m0", "m1", "m2"]
    assert [s.events[-1].data["reply"]["content"] for s in streams] == [
        m["content"] for m in stored[1::2]
    ]


async def test_another_keys_events_are_not_found(api: Api) -> None:
    session_id = await api.new_session()
    stream = await streamed(api, session_id, "Hello")
    question_id = stream.events[0].data["user_message"]["id"]
    url = f"/v1/sessions/{session_id}/messages/{question_id}/events"
    other = await issue_token(api.app, "other")

    response = await api.client.get(url, headers={"Authorization": f"Bearer {other}"})

    await problem(response, 404, "not_found")
    await problem(
        await api.request("GET", f"/v1/sessions/{session_id}/messages/nope/events"),
        404, "not_found",
    )
    reply_id = stream.events[-1].data["reply"]["id"]
    await problem(
        await api.request("GET", f"/v1/sessions/{session_id}/messages/{reply_id}/events"),
        404, "not_found",
    )


async def test_a_failed_turns_events_end_with_its_error(
    make_flavored_api: MakeApi, reference_ai: ReferenceAI
) -> None:
    api = await make_flavored_api()
    session_id = await api.new_session()
    reference_ai.state.fail_next.append(500)
    live = await streamed(api, session_id, "Hello")
    question_id = live.events[0].data["user_message"]["id"]

    again = await read_events(
        await api.request("GET", f"/v1/sessions/{session_id}/messages/{question_id}/events")
    )

    assert live.names == again.names == ["turn.started", "turn.failed"]
    assert live.events[-1].data["code"] == again.events[-1].data["code"] == "upstream_error"


async def test_a_bad_last_event_id_is_invalid(api: Api) -> None:
    session_id = await api.new_session()
    stream = await streamed(api, session_id, "Hello")
    question_id = stream.events[0].data["user_message"]["id"]

    response = await api.request(
        "GET", f"/v1/sessions/{session_id}/messages/{question_id}/events",
        headers={"Last-Event-ID": "x1"},
    )

    await problem(response, 422, "invalid_field")


def test_keepalive_is_a_setting() -> None:
    assert Settings().sse_keepalive == 15.0


async def test_stalled_readers_do_not_slow_the_turn(
    openai_api_factory: MakeApi, openai_state: OpenAIReferenceState
) -> None:
    api = await openai_api_factory(max_reply_bytes=2 * 1024 * 1024)
    session_id = await api.new_session()
    # About 1.2 MB in pieces of ~12 KB: more than a reader's socket holds.
    openai_state.reply_text = ("z" * 4000 + " ") * 300
    response = await api.send(session_id, "A big answer", headers=STREAM)
    first = await read_events(response, stop_after_deltas=1)
    question_id = first.events[0].data["user_message"]["id"]
    url = api.client.make_url(f"/v1/sessions/{session_id}/messages/{question_id}/events")

    stalled: list[socket.socket] = []
    for _ in range(8):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (url.host, url.port))
        request = f"GET {url.path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {api.token}\r\n\r\n"
        await asyncio.get_running_loop().sock_sendall(sock, request.encode())
        stalled.append(sock)  # and never read from
    try:
        # The first client leaves too; the turn must end and be stored regardless.
        response.close()

        async def answered() -> bool:
            return bool((await api.messages(session_id))[-1]["role"] == "assistant")

        await wait_until(answered, message="the turn did not end while readers stalled")
    finally:
        for sock in stalled:
            sock.close()

    stored = await api.messages(session_id)
    assert stored[-1]["content"] == openai_state.reply_text
