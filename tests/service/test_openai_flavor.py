"""The bridge in front of an OpenAI-compatible server (docs/ai-servers.md), over real sockets.

The AI server is the reference OpenAI-compatible server (a deterministic
double with a simulated prompt cache per slot) as llama.cpp, vLLM or Ollama
answer; `make test-real` runs the same path against a real llama-server.
What every flavour of AI server shares (a conversation made once and reused,
recovery after a restart, empty replies, silence, a server gone, readiness)
is tested once for each in test_conversation.py and test_readiness.py.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from sessionbridge.config import ConfigError, Settings, TokenRange
from sessionbridge.reference.openai_server import (
    OpenAIReferenceState,
    create_openai_reference_app,
)
from tests.conftest import Api, MakeApi, problem


@pytest.fixture
def openai_state(tmp_path: Path) -> OpenAIReferenceState:
    slots = tmp_path / "slots"
    slots.mkdir()
    return OpenAIReferenceState(slot_save_path=str(slots))


@pytest.fixture
async def openai_server(
    aiohttp_server: AiohttpServer, openai_state: OpenAIReferenceState
) -> TestServer:
    return await aiohttp_server(create_openai_reference_app(openai_state))


@pytest.fixture
def settings(tmp_path: Path, openai_server: TestServer) -> Settings:
    # Overrides conftest's: the same bridge, an OpenAI-compatible AI server.
    return Settings(
        db=str(tmp_path / "bridge.db"),
        upstream_url=str(openai_server.make_url("/v1")),
        upstream_flavor="openai",
        upstream_max_tokens=TokenRange(1, 500),
        default_max_tokens=20,
        upstream_timeout=5.0,
        health_timeout=0.5,
    )


def chat_requests(state: OpenAIReferenceState) -> list[dict[str, Any]]:
    return [r for r in state.requests if "messages" in r]


async def test_history_is_sent_exactly_as_stored(
    api: Api, openai_state: OpenAIReferenceState
) -> None:
    session_id = await api.new_session("  A scenario with  odd spacing.\n")
    await api.say(session_id, "one ")
    await api.say(session_id, " two")
    await api.say(session_id, "three")

    sent = chat_requests(openai_state)
    stored = await api.messages(session_id)
    assert sent[-1]["messages"] == [
        {"role": "system", "content": "  A scenario with  odd spacing.\n"},
        *({"role": m["role"], "content": m["content"]} for m in stored[:-2]),
        {"role": "user", "content": "three"},
    ]
    # Each prompt begins with the previous one, byte for byte.
    for before, after in itertools.pairwise(sent):
        assert after["messages"][: len(before["messages"])] == before["messages"]
    assert all(r["stream"] is True and r["cache_prompt"] is True for r in sent)
    assert all(r["model"] == openai_state.model for r in sent)


async def test_a_failed_turn_is_left_out_of_the_history(
    api: Api, openai_state: OpenAIReferenceState
) -> None:
    session_id = await api.new_session()
    await api.say(session_id, "kept")
    openai_state.fail_next.append(500)
    await problem(await api.send(session_id, "lost"), 502, "upstream_error")

    await api.say(session_id, "next")

    contents = [m["content"] for m in chat_requests(openai_state)[-1]["messages"]]
    assert "lost" not in contents and "kept" in contents


async def test_a_long_conversation_is_trimmed_in_steps(
    make_api: MakeApi, openai_state: OpenAIReferenceState
) -> None:
    api = await make_api(context_tokens=400)
    session_id = await api.new_session("Short scenario.")
    for n in range(14):
        await api.say(session_id, f"message number {n} with a few more words in it")

    sent = chat_requests(openai_state)
    first_user = [r["messages"][1]["content"] for r in sent]
    starts = [first_user[0]] + [b for a, b in itertools.pairwise(first_user) if a != b]
    # Dropped in steps, not a turn at a time: many turns share each start.
    assert 2 <= len(starts) <= 5, starts
    assert all(r["messages"][0]["content"] == "Short scenario." for r in sent)
    assert sent[-1]["messages"][-1]["content"] == "message number 13 with a few more words in it"
    # The turn right after a trim is reused (its shared part is the scenario).
    messages = await api.messages(session_id)
    assert {m.get("ai_session") for m in messages if m["role"] == "assistant"} <= {
        "created", "reused"
    }


async def test_a_message_that_can_never_fit_is_refused_before_it_is_stored(
    make_api: MakeApi, openai_state: OpenAIReferenceState
) -> None:
    api = await make_api(context_tokens=200)
    session_id = await api.new_session("Short scenario.")

    body = await problem(await api.send(session_id, "word " * 400), 422, "invalid_field")

    assert body["errors"][0]["field"] == "content"
    assert await api.messages(session_id) == []
    assert chat_requests(openai_state) == []


async def test_slot_save_restores_a_conversation_after_a_restart(
    make_api: MakeApi, openai_state: OpenAIReferenceState
) -> None:
    assert openai_state.slot_save_path is not None
    api = await make_api(slot_save="on", slot_dir=openai_state.slot_save_path)
    session_id = await api.new_session()
    await api.say(session_id, "one")
    second = await api.say(session_id, "two")
    files = list(Path(openai_state.slot_save_path).iterdir())
    assert [f.name for f in files] == [f"sessionbridge-{session_id}.slot"]

    openai_state.restart()
    third = await api.say(session_id, "three")

    assert third["ai_session"] == "recovered"  # restored from its saved slot
    usage = third["reply"]["usage"]
    previous = second["reply"]["usage"]
    assert usage["cached_tokens"] >= previous["prompt_tokens"]
    metrics = await (await api.client.get("/metrics")).text()
    assert 'sessionbridge_slot_actions_total{action="restore",outcome="ok"} 1.0' in metrics

    fourth = await api.say(session_id, "four")
    assert fourth["ai_session"] == "reused"

    response = await api.request("DELETE", f"/v1/sessions/{session_id}")
    assert response.status == 204
    assert list(Path(openai_state.slot_save_path).iterdir()) == []


async def test_conversations_never_get_each_others_slot(
    make_api: MakeApi, openai_state: OpenAIReferenceState
) -> None:
    assert openai_state.slot_save_path is not None
    openai_state.total_slots = 1
    openai_state.restart()
    api = await make_api(slot_save="on", slot_dir=openai_state.slot_save_path, slot_files=2)
    first = await api.new_session("Conversation A.")
    second = await api.new_session("Conversation B.")
    third = await api.new_session("Conversation C.")
    await api.say(first, "a1")
    await api.say(second, "b1")  # takes the one slot from A

    back = await api.say(first, "a2")  # A comes back: its own file is restored

    assert back["ai_session"] == "recovered"
    assert back["reply"]["usage"]["cached_tokens"] > 0
    assert "Conversation A." in chat_requests(openai_state)[-1]["messages"][0]["content"]
    await api.say(third, "c1")
    # At most slot_files files are kept, the newest.
    names = sorted(p.name for p in Path(openai_state.slot_save_path).iterdir())
    assert len(names) == 2 and f"sessionbridge-{third}.slot" in names


@pytest.mark.parametrize("status", [429, 503])
async def test_a_busy_or_loading_server_is_503_with_retry_after(
    api: Api, openai_state: OpenAIReferenceState, status: int
) -> None:
    session_id = await api.new_session()
    openai_state.fail_next.append(status)

    response = await api.send(session_id, "hello")

    await problem(response, 503, "upstream_unavailable")
    assert response.headers["Retry-After"].isdigit()
    (question,) = await api.messages(session_id)
    assert question["status"] == "failed" and question["error"] == "upstream_unavailable"


async def test_a_blank_reply_is_retried(
    make_api: MakeApi, openai_state: OpenAIReferenceState
) -> None:
    api = await make_api(empty_reply_retries=1)
    session_id = await api.new_session()
    openai_state.blank_replies = 1
    assert (await api.say(session_id, "hello"))["reply"]["content"].strip()


@pytest.mark.parametrize("kind", ["vllm", "ollama"])
async def test_vllm_and_ollama_personas_hold_a_conversation(
    api: Api, openai_state: OpenAIReferenceState, kind: str
) -> None:
    openai_state.kind = kind
    session_id = await api.new_session()

    first = await api.say(session_id, "hello")
    second = await api.say(session_id, "more")

    assert (first["ai_session"], second["ai_session"]) == ("created", "reused")
    assert "cache_prompt" not in chat_requests(openai_state)[-1]  # a llama.cpp field only


async def test_the_context_budget_comes_from_the_server(
    make_api: MakeApi, openai_state: OpenAIReferenceState
) -> None:
    openai_state.slot_ctx = 120
    openai_state.restart()
    api = await make_api()
    session_id = await api.new_session("Short scenario.")

    await problem(await api.send(session_id, "word " * 200), 422, "invalid_field")


async def test_the_api_key_is_sent_as_bearer(
    make_api: MakeApi, openai_state: OpenAIReferenceState, tmp_path: Path
) -> None:
    openai_state.api_key = "sk-test"
    refused = await make_api(db=str(tmp_path / "refused.db"))
    session_id = await refused.new_session()
    await problem(await refused.send(session_id, "hello"), 502, "upstream_error")

    api = await make_api(upstream_api_key="sk-test")
    session_id = await api.new_session()
    assert (await api.say(session_id, "hello"))["ai_session"] == "created"


async def test_prompt_tokens_are_counted_by_source(
    api: Api, openai_state: OpenAIReferenceState
) -> None:
    session_id = await api.new_session()
    first = await api.say(session_id, "one")
    second = await api.say(session_id, "two")

    text = await (await api.client.get("/metrics")).text()

    cached = second["reply"]["usage"]["cached_tokens"]
    computed = sum(
        t["reply"]["usage"]["prompt_tokens"] - t["reply"]["usage"]["cached_tokens"]
        for t in (first, second)
    )
    assert f'sessionbridge_prompt_tokens_total{{source="cached"}} {float(cached)}' in text
    assert f'sessionbridge_prompt_tokens_total{{source="computed"}} {float(computed)}' in text


def test_slot_save_needs_a_folder() -> None:
    with pytest.raises(ConfigError):
        dataclasses.replace(Settings(), slot_save="on")
