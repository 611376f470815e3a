"""Several OpenAI-compatible AI servers behind one bridge (docs/ai-servers.md#several-ai-servers).

Real sockets: the bridge in this process in front of reference
OpenAI-compatible servers (llama.cpp's persona, a simulated prompt cache per
slot), each on a port of its own. What each replica was sent, and what its
cache held, is read from its own state.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pytest_aiohttp import AiohttpClient

from sessionbridge.app import create_app
from sessionbridge.config import Settings, TokenRange
from sessionbridge.reference.openai_cache import tokenize
from sessionbridge.reference.openai_server import (
    OpenAIReferenceState,
    create_openai_reference_app,
)
from sessionbridge.upstream.connect import replica_id
from sessionbridge.upstream.placement import preference
from tests.conftest import Api, issue_token
from tests.doubles import FIRST_PIECE_WRITES, ServerGate, wait_until
from tests.replicas import ReplicaServer
from tests.sse import Stream, joined, read_events

STREAM = {"Accept": "text/event-stream"}


class Model:
    """An OpenAI-compatible reference replica and its state."""

    def __init__(self, slots: Path) -> None:
        self.state = OpenAIReferenceState(slot_save_path=str(slots))
        # Holds the writes of its streamed answers when a test says so.
        self.gate = ServerGate("/v1/chat/completions")
        self.server = ReplicaServer(
            lambda: self.gate.install(create_openai_reference_app(self.state)), "/v1"
        )

    @property
    def url(self) -> str:
        return self.server.url

    def chats(self) -> list[dict[str, Any]]:
        return [r for r in self.state.requests if "messages" in r]


@pytest.fixture
def slots(tmp_path: Path) -> Path:
    folder = tmp_path / "slots"  # one folder for both, as on one host
    folder.mkdir()
    return folder


@pytest.fixture
async def models(slots: Path) -> AsyncIterator[list[Model]]:
    replicas = [Model(slots) for _ in range(2)]
    for replica in replicas:
        await replica.server.start()
    yield replicas
    for replica in replicas:
        await replica.server.stop()


async def bridge(
    aiohttp_client: AiohttpClient, tmp_path: Path, models: list[Model], **changes: Any
) -> Api:
    settings = Settings(**{
        "db": str(tmp_path / "bridge.db"),
        "upstream_url": ",".join(model.url for model in models),
        "upstream_flavor": "openai",
        "upstream_max_tokens": TokenRange(1, 500),
        "default_max_tokens": 20,
        "upstream_timeout": 5.0,
        "health_timeout": 0.5,
        "ready_interval": 0.05,
        **changes,
    })
    client = await aiohttp_client(create_app(settings))
    return Api(client, await issue_token(client.app, "test"))


async def conversation_on(api: Api, models: list[Model], target: Model) -> str:
    urls = [model.url for model in models]
    while True:
        session_id = await api.new_session("You are terse.")
        if preference(session_id, urls)[0] == target.url:
            return session_id


async def until_up(api: Api, model: Model, up: bool = True) -> None:
    async def check() -> bool:
        text = await (await api.client.get("/metrics")).text()
        line = f'sessionbridge_replica_healthy{{replica="{model.url}"}} {1.0 if up else 0.0}'
        return line in text

    await wait_until(check, message=f"{model.url} {'up' if up else 'out'}")


async def stream(api: Api, session_id: str, content: str) -> Stream:
    response = await api.send(session_id, content, headers=STREAM)
    return await read_events(response)


async def test_a_conversation_goes_to_the_next_replica_with_its_history_and_comes_back(
    aiohttp_client: AiohttpClient, tmp_path: Path, models: list[Model]
) -> None:
    api = await bridge(aiohttp_client, tmp_path, models)
    home, other = models
    session_id = await conversation_on(api, models, home)
    for turn in (1, 2, 3):
        await api.say(session_id, f"message {turn}")
    assert len(home.chats()) == 3 and other.chats() == []

    await home.server.stop()
    moved = await api.say(session_id, "message 4")

    # The whole history went to the other replica, whose cache had none of it.
    assert moved["ai_session"] == "recovered", moved
    (sent,) = other.chats()
    assert [m["content"] for m in sent["messages"][1::2]] == [
        "message 1", "message 2", "message 3", "message 4"
    ]
    assert moved["reply"]["usage"]["cached_tokens"] < moved["reply"]["usage"]["prompt_tokens"] / 2

    await home.server.start()
    await until_up(api, home)
    back = await api.say(session_id, "message 5")

    # Back on its first choice, sent the turn answered elsewhere too; its cache
    # still held the conversation's beginning.
    last = home.chats()[-1]
    assert [m["content"] for m in last["messages"][1::2]][-2:] == ["message 4", "message 5"]
    assert back["reply"]["usage"]["cached_tokens"] > 0
    assert len(other.chats()) == 1


async def streamed_until_cut_off(
    api: Api, home: Model, session_id: str, content: str
) -> tuple[Stream, Stream]:
    """A streamed turn whose replica dies once the client has two pieces of its reply:
    those two pieces, and the whole stream."""
    home.gate.hold_writes_after(FIRST_PIECE_WRITES + 1)  # two pieces, then held
    response = await api.send(session_id, content, headers=STREAM)
    seen = await read_events(response, stop_after_deltas=2)
    home.state.break_after_pieces = 2
    home.gate.writes.release()
    return seen, joined(seen, await read_events(response))


async def test_a_streamed_turn_whose_replica_times_out_is_answered_by_the_next_without_error(
    aiohttp_client: AiohttpClient, tmp_path: Path, models: list[Model]
) -> None:
    api = await bridge(aiohttp_client, tmp_path, models, upstream_timeout=1.0)
    home, other = models
    session_id = await conversation_on(api, models, home)
    await api.say(session_id, "message 1")
    home.state.hang = True

    events = await stream(api, session_id, "message 2")

    assert events.names[0] == "turn.started" and events.names[-1] == "turn.completed", events.names
    assert "turn.failed" not in events.names
    assert events.events[-1].data["ai_session"] == "recovered"
    assert events.text == events.events[-1].data["reply"]["content"]
    assert len(other.chats()) == 1
    home.state.hang = False


async def test_a_busy_replica_is_passed_over_and_the_turn_answered_by_the_next(
    aiohttp_client: AiohttpClient, tmp_path: Path, models: list[Model]
) -> None:
    api = await bridge(aiohttp_client, tmp_path, models)
    home, other = models
    session_id = await conversation_on(api, models, home)
    await api.say(session_id, "message 1")
    home.state.fail_next = [503]

    body = await api.say(session_id, "message 2")

    assert body["ai_session"] == "recovered", body
    metrics = await (await api.client.get("/metrics")).text()
    assert re.search(
        r'sessionbridge_replica_failovers_total\{reason="upstream_unavailable",replica="'
        + re.escape(home.url) + r'"\} 1\.0', metrics
    ), metrics
    # The prompt tokens of each replica's turns, by where they came from.
    for model in models:
        computed = f'{{replica="{model.url}",source="computed"}}'
        assert f"sessionbridge_replica_prompt_tokens_total{computed}" in metrics
    assert len(other.chats()) == 1


async def test_a_reply_cut_off_after_a_client_had_part_of_it_is_finished_by_the_next(
    aiohttp_client: AiohttpClient, tmp_path: Path, models: list[Model]
) -> None:
    api = await bridge(aiohttp_client, tmp_path, models)
    home, other = models
    session_id = await conversation_on(api, models, home)
    await api.say(session_id, "message 1")
    seen, events = await streamed_until_cut_off(api, home, session_id, "message 2")

    assert events.names[-1] == "turn.completed", events.names
    reply = events.events[-1].data["reply"]["content"]
    # One reply, as one server would have given it: the next replica went
    # on from the pieces the client had (sent as the reply's start).
    # (default_max_tokens 20: the reference reply's first 20 tokens)
    assert reply == "".join(tokenize("Reply 2: I see 2 earlier messages; you said: message 2")[:20])
    assert events.text == reply
    assert reply.startswith(seen.text) and len(seen.deltas) == 2
    (asked,) = other.chats()
    start = asked["messages"][-1]
    assert start["role"] == "assistant" and start["content"].startswith(seen.text)
    assert reply.startswith(start["content"]) and len(start["content"]) < len(reply)
    await until_up(api, home, up=False)
    home.state.break_after_pieces = None


async def test_a_reply_begun_elsewhere_fails_where_the_next_server_cannot_go_on_with_it(
    aiohttp_client: AiohttpClient, tmp_path: Path, models: list[Model]
) -> None:
    # vLLM answers a last assistant message as a finished one: not asked.
    for model in models:
        model.state.kind = "vllm"
    api = await bridge(aiohttp_client, tmp_path, models)
    home, other = models
    session_id = await conversation_on(api, models, home)
    _, events = await streamed_until_cut_off(api, home, session_id, "message 1")

    assert events.names[-1] == "turn.failed", events.names
    assert events.events[-1].data["code"] == "upstream_error"
    assert other.chats() == []
    home.state.break_after_pieces = None


async def test_a_reply_cut_off_before_any_client_saw_it_is_answered_afresh_by_the_next(
    aiohttp_client: AiohttpClient, tmp_path: Path, models: list[Model]
) -> None:
    # Nobody follows the turn: the pieces the dying replica sent reached only
    # the bridge, which takes them back and asks the next replica.
    api = await bridge(aiohttp_client, tmp_path, models)
    home, other = models
    session_id = await conversation_on(api, models, home)
    await api.say(session_id, "message 1")
    home.state.break_after_pieces = 2

    body = await api.say(session_id, "message 2")

    assert body["ai_session"] == "recovered", body
    assert len(other.chats()) == 1
    reply = body["reply"]["content"]
    # The stored answer and its replayed events are the next replica's reply
    # alone, without the cut-off pieces in front.
    message = await api.request("GET", f"/v1/sessions/{session_id}/messages")
    stored = [m for m in (await message.json())["messages"] if m["role"] == "assistant"]
    assert stored[-1]["content"] == reply
    replay = await read_events(await api.request(
        "GET", f"/v1/sessions/{session_id}/messages/{body['user_message']['id']}/events",
        headers=STREAM,
    ))
    assert replay.text == reply
    assert replay.names[-1] == "turn.completed"
    await until_up(api, home, up=False)
    home.state.break_after_pieces = None


async def test_slot_files_are_kept_per_replica(
    aiohttp_client: AiohttpClient, tmp_path: Path, models: list[Model], slots: Path
) -> None:
    api = await bridge(aiohttp_client, tmp_path, models, slot_save="on", slot_dir=str(slots))
    home, other = models
    session_id = await conversation_on(api, models, home)
    await api.say(session_id, "message 1")
    assert sorted(p.name for p in slots.iterdir()) == [
        f"sessionbridge-{session_id}.{replica_id(home.url)}.slot"
    ]

    await home.server.stop()
    await api.say(session_id, "message 2")
    assert sorted(p.name for p in slots.iterdir()) == sorted([
        f"sessionbridge-{session_id}.{replica_id(home.url)}.slot",
        f"sessionbridge-{session_id}.{replica_id(other.url)}.slot",
    ])

    response = await api.request("DELETE", f"/v1/sessions/{session_id}")
    assert response.status == 204
    assert list(slots.iterdir()) == []
