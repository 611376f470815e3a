"""Tests for the reference OpenAI-compatible server (a test double), over real sockets."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from sessionbridge.reference import openai_server as reference_openai
from sessionbridge.reference.openai_cache import (
    prompt_pieces,
    render_chat,
    reply_for,
    tokenize,
    valid_slot_filename,
)
from sessionbridge.reference.openai_server import (
    OPENAI_REFERENCE_STATE,
    OpenAIReferenceState,
    create_openai_reference_app,
    main,
)
from tests.doubles import ManualClock, wait_until
from tests.processes import clean_env, free_port

Client = TestClient[web.Request, web.Application]

SCENARIO = "You are a patient tutor."


@pytest.fixture
def state(tmp_path: Path) -> OpenAIReferenceState:
    return OpenAIReferenceState(slot_save_path=str(tmp_path / "slots"))


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> ManualClock:
    """The server's simulated latency, seen (and, when stepped, held) by the test."""
    clock = ManualClock()
    clock.install(monkeypatch, reference_openai)
    return clock


@pytest.fixture
async def client(aiohttp_client: AiohttpClient, state: OpenAIReferenceState) -> Client:
    assert state.slot_save_path is not None
    Path(state.slot_save_path).mkdir()
    return await aiohttp_client(create_openai_reference_app(state))


def conversation(*turns: str) -> list[dict[str, str]]:
    """The scenario, then user/assistant turns alternating, the last one a user's."""
    messages = [{"role": "system", "content": SCENARIO}]
    for index, text in enumerate(turns):
        messages.append({"role": "user" if index % 2 == 0 else "assistant", "content": text})
    return messages


async def chat(client: Client, messages: list[dict[str, str]], **extra: Any) -> ClientResponse:
    body = {"model": OpenAIReferenceState.model, "messages": messages, **extra}
    return await client.post("/v1/chat/completions", json=body)


async def answer(client: Client, messages: list[dict[str, str]], **extra: Any) -> dict[str, Any]:
    response = await chat(client, messages, **extra)
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def stream_chunks(response: ClientResponse) -> list[Any]:
    """Every ``data:`` payload of an SSE answer, ``[DONE]`` kept as a string."""
    assert response.status == 200, await response.text()
    assert response.content_type == "text/event-stream"
    chunks: list[Any] = []
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if not line:
            continue
        assert line.startswith("data: ")
        payload = line.removeprefix("data: ")
        chunks.append(payload if payload == "[DONE]" else json.loads(payload))
    return chunks


async def head_lines(response: ClientResponse, count: int) -> AsyncIterator[bytes]:
    """The first ``count`` lines of an SSE answer that are not blank."""
    while count:
        line = await response.content.readline()
        assert line, "the answer ended early"
        if line.strip():
            count -= 1
            yield line


def content_of(chunks: list[Any]) -> str:
    return "".join(
        choice["delta"].get("content") or ""
        for chunk in chunks
        if chunk != "[DONE]"
        for choice in chunk["choices"]
    )


# -- the pure parts -----------------------------------------------------------


def test_tokenizer_keeps_every_character() -> None:
    text = "Hello,  world!\n<start_of_turn>x"
    assert "".join(tokenize(text)) == text
    assert tokenize("Hi, you") == ["Hi", ",", " ", "you"]
    assert "<start_of_turn>" in tokenize(text)


def test_template_folds_the_system_message_into_the_first_user_turn() -> None:
    rendered = render_chat(conversation(" hi ", "hello "))
    assert rendered == (
        f"<start_of_turn>user\n{SCENARIO}\n\nhi<end_of_turn>\n"
        "<start_of_turn>model\nhello<end_of_turn>\n<start_of_turn>model\n"
    )
    assert prompt_pieces(conversation("hi"))[0] == "<bos>"


def test_reply_says_what_history_it_saw() -> None:
    assert reply_for(conversation("one", "r1", "two", "r2", "three")) == (
        "Reply 3: I see 4 earlier messages; you said: three"
    )
    long_reply = reply_for(conversation("x" * 100))
    assert long_reply.endswith("x" * 57 + "...")


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("c.bin", True),
        (".hidden", True),
        ("../x", False),
        ("a/b", False),
        ("a\\b", False),
        ("a..b", False),
        ("..", False),
        ("x:y", False),
        ("", False),
        ("a" * 256, False),
    ],
)
def test_slot_file_names_are_checked_as_llama_cpp_does(name: str, ok: bool) -> None:
    assert valid_slot_filename(name) is ok


def test_state_is_reachable_and_rejects_an_unknown_kind() -> None:
    state = OpenAIReferenceState()
    assert create_openai_reference_app(state)[OPENAI_REFERENCE_STATE] is state
    with pytest.raises(ValueError):
        OpenAIReferenceState(kind="gpt")


# -- llama.cpp: the endpoints around chat -------------------------------------


async def test_llama_health_props_and_slots(client: Client, state: OpenAIReferenceState) -> None:
    assert await (await client.get("/health")).json() == {"status": "ok"}
    props = await (await client.get("/props")).json()
    assert props["total_slots"] == 4
    assert props["default_generation_settings"]["n_ctx"] == 2048
    slots = await (await client.get("/slots")).json()
    assert [slot["id"] for slot in slots] == [0, 1, 2, 3]
    assert all(slot["n_ctx"] == 2048 and not slot["is_processing"] for slot in slots)
    assert state.calls["health"] == state.calls["props"] == state.calls["slots"] == 1


async def test_loading_answers_503_everywhere(client: Client, state: OpenAIReferenceState) -> None:
    state.loading = True
    for response in (await client.get("/health"), await client.get("/v1/models")):
        assert response.status == 503
        error = (await response.json())["error"]
        assert error == {"code": 503, "message": "Loading model", "type": "unavailable_error"}
    state.loading = False
    assert (await client.get("/v1/models")).status == 200


async def test_llama_tokenize_counts_content(client: Client) -> None:
    response = await client.post("/tokenize", json={"content": "Hello world, hi!"})
    tokens = (await response.json())["tokens"]
    assert len(tokens) == len(tokenize("Hello world, hi!")) == 7
    assert all(isinstance(token, int) for token in tokens)
    assert await (await client.post("/tokenize", json={})).json() == {"tokens": []}
    template = await client.post("/apply-template", json={"messages": conversation("hi")})
    assert (await template.json())["prompt"] == render_chat(conversation("hi"))


async def test_unknown_path_answers_in_llama_cpp_shape(client: Client) -> None:
    response = await client.get("/nope")
    assert response.status == 404
    assert (await response.json())["error"]["type"] == "not_found_error"


# -- chat: replies, usage, the simulated cache ---------------------------------


async def test_llama_reply_reports_timings_and_usage(client: Client) -> None:
    body = await answer(client, conversation("Hello there"))
    assert body["object"] == "chat.completion"
    assert body["model"] == OpenAIReferenceState.model
    (choice,) = body["choices"]
    assert choice["message"] == {
        "role": "assistant",
        "content": "Reply 1: I see 0 earlier messages; you said: Hello there",
    }
    assert choice["finish_reason"] == "stop"
    prompt_len = len(prompt_pieces(conversation("Hello there")))
    timings, usage = body["timings"], body["usage"]
    assert (timings["cache_n"], timings["prompt_n"]) == (0, prompt_len)
    assert (
        timings["predicted_n"]
        == usage["completion_tokens"]
        == len(tokenize(choice["message"]["content"]))
    )
    assert usage["prompt_tokens"] == prompt_len
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
    assert {"prompt_ms", "predicted_ms"} <= timings.keys()


async def test_second_turn_is_served_from_the_slot_cache(
    client: Client, state: OpenAIReferenceState
) -> None:
    first = await answer(client, conversation("one"))
    reply = first["choices"][0]["message"]["content"]
    second_messages = conversation("one", reply, "two")
    second = await answer(client, second_messages)

    first_prompt = len(prompt_pieces(conversation("one")))
    reply_tokens = len(tokenize(reply))
    assert second["timings"]["cache_n"] == first_prompt + reply_tokens
    assert second["usage"]["prompt_tokens"] == len(prompt_pieces(second_messages))
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == first_prompt + reply_tokens
    assert state.tokens["cached"] == first_prompt + reply_tokens


async def test_a_changed_first_line_loses_the_cache(client: Client) -> None:
    first = await answer(client, conversation("one"), id_slot=0)
    reply = first["choices"][0]["message"]["content"]
    messages = conversation("one", reply, "two")
    messages[0]["content"] = "12:00:01 " + SCENARIO
    second = await answer(client, messages, id_slot=0)
    # Only the tokens before the changed text are shared: BOS, the turn marker, "user", "\n".
    assert second["timings"]["cache_n"] == 4


async def test_cache_prompt_false_computes_everything(client: Client) -> None:
    await answer(client, conversation("one"))
    again = await answer(client, conversation("one"), cache_prompt=False)
    assert again["timings"]["cache_n"] == 0


async def test_identical_prompt_recomputes_its_last_token(client: Client) -> None:
    await answer(client, conversation("one"))
    again = await answer(client, conversation("one"))
    assert again["timings"]["prompt_n"] == 1


async def test_id_slot_picks_the_slot(client: Client, state: OpenAIReferenceState) -> None:
    await answer(client, conversation("pinned"), id_slot=2)
    assert [bool(slot.tokens) for slot in state.slots] == [False, False, True, False]
    # An id past the slots lets the server choose, as llama-server does.
    await answer(client, conversation("free"), id_slot=9)
    assert state.requests[-1]["id_slot"] == 9


async def test_without_id_slot_each_conversation_finds_its_own_cache(
    client: Client, state: OpenAIReferenceState
) -> None:
    state.total_slots = 2
    state.restart()

    def talk(word: str, *more: str) -> list[dict[str, str]]:
        # No shared scenario: one would make every prompt similar enough to
        # pull every conversation into the same slot.
        return [
            {"role": "user" if index % 2 == 0 else "assistant", "content": text}
            for index, text in enumerate((word * 30, *more))
        ]

    a1 = await answer(client, talk("alpha "))
    b1 = await answer(client, talk("beta "))
    # b shares too little with a's slot, so it gets the unused one.
    assert [bool(slot.tokens) for slot in state.slots] == [True, True]
    a_reply = a1["choices"][0]["message"]["content"]
    b_reply = b1["choices"][0]["message"]["content"]
    assert (await answer(client, talk("alpha ", a_reply, "more")))["timings"]["cache_n"] > 60
    assert (await answer(client, talk("beta ", b_reply, "more")))["timings"]["cache_n"] > 60
    # An unrelated conversation takes the least recently used slot: a's.
    await answer(client, talk("gamma "))
    a3 = await answer(client, talk("alpha ", a_reply, "more"))
    assert a3["timings"]["cache_n"] <= 4


async def test_max_tokens_cuts_the_reply(client: Client, state: OpenAIReferenceState) -> None:
    body = await answer(client, conversation("Hello there"), max_tokens=4, id_slot=0)
    assert body["choices"][0]["message"]["content"] == "Reply 1:"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 4
    # As measured on llama-server: the last sampled token never enters the cache.
    assert len(state.slots[0].tokens) == len(prompt_pieces(conversation("Hello there"))) + 3


async def test_llama_refuses_a_prompt_larger_than_the_slot(
    client: Client, state: OpenAIReferenceState
) -> None:
    state.slot_ctx = 50
    response = await chat(client, conversation("word " * 40))
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["type"] == "exceed_context_size_error"
    assert error["n_ctx"] == 50
    assert error["n_prompt_tokens"] == len(prompt_pieces(conversation("word " * 40)))


async def test_llama_cuts_a_reply_at_the_slot_end(
    client: Client, state: OpenAIReferenceState
) -> None:
    prompt_len = len(prompt_pieces(conversation("hi")))
    state.slot_ctx = prompt_len + 3
    body = await answer(client, conversation("hi"), max_tokens=100)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3


async def test_llama_ignores_the_model_field(client: Client) -> None:
    response = await client.post(
        "/v1/chat/completions", json={"model": "other", "messages": conversation("hi")}
    )
    assert response.status == 200


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "'messages' is required"),
        ({"messages": "x"}, "Expected 'messages' to be an array"),
        ({"messages": [{"role": "robot", "content": "x"}]}, None),
        ({"messages": [{"role": "user", "content": 7}]}, None),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}, None),
    ],
)
async def test_invalid_chat_bodies_are_400(
    client: Client, body: dict[str, Any], message: str | None
) -> None:
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["type"] == "invalid_request_error"
    if message is not None:
        assert error["message"] == message


async def test_text_parts_are_joined(client: Client) -> None:
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "parts"}]
    body = await answer(client, [{"role": "user", "content": parts}])  # type: ignore[dict-item]
    assert body["choices"][0]["message"]["content"].endswith("you said: Hello parts")


# -- slot files -----------------------------------------------------------------


async def test_slot_save_restart_restore_gives_the_cache_back(
    client: Client, state: OpenAIReferenceState
) -> None:
    first = await answer(client, conversation("remember me"), id_slot=0)
    reply = first["choices"][0]["message"]["content"]
    cached = len(state.slots[0].tokens)
    saved = await client.post("/slots/0?action=save", json={"filename": "conv-a.bin"})
    assert saved.status == 200
    saved_body = await saved.json()
    assert saved_body["id_slot"] == 0 and saved_body["filename"] == "conv-a.bin"
    assert saved_body["n_saved"] == cached
    assert (
        saved_body["n_written"] == (Path(state.slot_save_path or "") / "conv-a.bin").stat().st_size
    )
    assert "save_ms" in saved_body["timings"]

    state.restart()
    assert all(not slot.tokens for slot in state.slots)
    assert state.calls == {}
    assert (Path(state.slot_save_path or "") / "conv-a.bin").exists()

    restored = await client.post("/slots/3?action=restore", json={"filename": "conv-a.bin"})
    restored_body = await restored.json()
    assert restored_body["n_restored"] == cached
    assert restored_body["n_read"] == saved_body["n_written"]
    assert "restore_ms" in restored_body["timings"]
    second = await answer(client, conversation("remember me", reply, "again"), id_slot=3)
    assert second["timings"]["cache_n"] == cached

    erased = await client.post("/slots/3?action=erase")
    assert (await erased.json())["id_slot"] == 3
    assert not state.slots[3].tokens


async def test_slot_actions_refuse_bad_input(client: Client) -> None:
    async def error_of(path: str, body: object) -> tuple[int, str]:
        response = await client.post(path, json=body)
        return response.status, (await response.json())["error"]["message"]

    assert await error_of("/slots/0?action=save", {"filename": "../x"}) == (400, "Invalid filename")
    assert await error_of("/slots/0?action=save", {"filename": "a/b"}) == (400, "Invalid filename")
    assert await error_of("/slots/x?action=save", {"filename": "a"}) == (400, "Invalid slot ID")
    assert await error_of("/slots/0?action=boom", {"filename": "a"}) == (400, "Invalid action")
    status, message = await error_of("/slots/0?action=restore", {"filename": "missing.bin"})
    assert status == 400 and message.startswith("Unable to restore slot")


async def test_restore_refuses_another_models_file(
    client: Client, state: OpenAIReferenceState
) -> None:
    await answer(client, conversation("mine"), id_slot=0)
    assert (await client.post("/slots/0?action=save", json={"filename": "m.bin"})).status == 200
    state.model = "another-model"
    response = await client.post("/slots/1?action=restore", json={"filename": "m.bin"})
    assert response.status == 400
    assert not state.slots[1].tokens


async def test_slot_actions_need_a_save_path(client: Client, state: OpenAIReferenceState) -> None:
    state.slot_save_path = None
    response = await client.post("/slots/0?action=save", json={"filename": "a.bin"})
    assert response.status == 501
    assert (await response.json())["error"]["type"] == "not_supported_error"


async def test_a_busy_slot_is_saved_after_its_request(
    client: Client, state: OpenAIReferenceState, clock: ManualClock
) -> None:
    clock.stepped = True
    state.piece_delay = 0.05
    running = asyncio.create_task(answer(client, conversation("slowly"), id_slot=1))
    await clock.wait_sleeping()  # between two pieces of the answer
    assert state.slots[1].busy
    assert [slot["is_processing"] for slot in await (await client.get("/slots")).json()][1]
    saving = asyncio.create_task(
        client.post("/slots/1?action=save", json={"filename": "s.bin"})
    )
    await wait_until(lambda: state.calls["slot_save"] == 1)  # it waits for the slot
    clock.run_free()
    saved = await (await saving).json()
    reply = (await running)["choices"][0]["message"]["content"]
    assert saved["n_saved"] == len(prompt_pieces(conversation("slowly"))) + len(tokenize(reply))


# -- streaming ------------------------------------------------------------------


async def test_llama_stream_matches_the_real_server(client: Client) -> None:
    plain = await answer(client, conversation("stream me"))
    chunks = await stream_chunks(await chat(client, conversation("stream me"), stream=True))
    assert chunks[-1] == "[DONE]"
    head, *pieces, last, _ = chunks
    assert head["choices"][0]["delta"] == {"role": "assistant", "content": None}
    assert all(piece["choices"][0]["finish_reason"] is None for piece in pieces)
    assert len(pieces) > 2
    assert last["choices"][0] == {"finish_reason": "stop", "index": 0, "delta": {}}
    assert last["timings"]["cache_n"] > 0
    assert "usage" not in last
    assert content_of(chunks) == plain["choices"][0]["message"]["content"]
    assert {chunk["object"] for chunk in chunks[:-1]} == {"chat.completion.chunk"}


async def test_llama_stream_usage_comes_when_asked(client: Client) -> None:
    chunks = await stream_chunks(
        await chat(
            client, conversation("usage"), stream=True, stream_options={"include_usage": True}
        )
    )
    finish, usage, done = chunks[-3:]
    assert finish["choices"][0]["finish_reason"] == "stop" and "timings" not in finish
    assert usage["choices"] == []
    assert usage["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert usage["timings"]["prompt_n"] == usage["usage"]["prompt_tokens"]
    assert done == "[DONE]"


async def test_pieces_arrive_apart(
    client: Client, state: OpenAIReferenceState, clock: ManualClock
) -> None:
    clock.stepped = True
    state.piece_delay = 0.05
    response = await chat(client, conversation("slow"), stream=True)
    lines = [line async for line in head_lines(response, 2)]  # the role chunk, the first piece
    assert all(line.startswith(b"data: ") for line in lines)
    assert json.loads(lines[1].removeprefix(b"data: "))["choices"][0]["delta"]["content"]

    # The first piece is out while the server waits the piece delay before the next.
    await clock.wait_sleeping()
    clock.run_free()
    chunks = await stream_chunks(response)

    # The pieces only: not the finish chunk and [DONE] after them.
    pieces = 1 + len(chunks) - 2
    assert pieces > 2
    assert clock.sleeps == [0.05] * (pieces - 1)


async def test_prompt_delay_follows_computed_tokens(
    client: Client, state: OpenAIReferenceState, clock: ManualClock
) -> None:
    state.prompt_token_delay = 0.01
    first = await answer(client, conversation("timed"))
    assert clock.sleeps == [pytest.approx(first["timings"]["prompt_n"] * 0.01)]
    assert first["timings"]["prompt_ms"] == pytest.approx(first["timings"]["prompt_n"] * 10)
    reply = first["choices"][0]["message"]["content"]
    second = await answer(client, conversation("timed", reply, "again"))
    assert second["timings"]["prompt_n"] < first["timings"]["prompt_n"]
    # A warm prompt waits only for the tokens it computes.
    assert clock.sleeps[1:] == [pytest.approx(second["timings"]["prompt_n"] * 0.01)]
    assert clock.sleeps[1] < clock.sleeps[0]


async def test_break_after_pieces_drops_the_stream(
    client: Client, state: OpenAIReferenceState
) -> None:
    state.break_after_pieces = 2
    response = await chat(client, conversation("break"), stream=True)
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async for raw in response.content:
            received += raw
    assert received.count(b"data: ") == 3  # the role chunk and two pieces
    assert b"[DONE]" not in received
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await chat(client, conversation("break"))


# -- the other personas -----------------------------------------------------------


async def test_vllm_persona(client: Client, state: OpenAIReferenceState) -> None:
    state.kind = "vllm"
    assert (await client.get("/props")).status == 404
    assert await (await client.get("/props")).json() == {"detail": "Not Found"}
    assert (await client.get("/slots")).status == 404
    models = await (await client.get("/v1/models")).json()
    assert models["data"][0]["max_model_len"] == 2048
    assert models["data"][0]["owned_by"] == "vllm"
    # vLLM's /tokenize takes prompt or messages, not llama.cpp's content.
    assert (await client.post("/tokenize", json={"content": "hi"})).status == 400
    counted = await (await client.post("/tokenize", json={"prompt": "Hello world"})).json()
    assert counted["count"] == 4 and counted["max_model_len"] == 2048

    first = await answer(client, conversation("one"))
    assert "timings" not in first
    second = await answer(
        client, conversation("one", first["choices"][0]["message"]["content"], "b")
    )
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert second["choices"][0]["stop_reason"] is None


async def test_vllm_refuses_prompt_plus_max_tokens_over_the_context(
    client: Client, state: OpenAIReferenceState
) -> None:
    state.kind = "vllm"
    prompt_len = len(prompt_pieces(conversation("hi")))
    state.slot_ctx = prompt_len + 10
    response = await chat(client, conversation("hi"), max_tokens=11)
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["type"] == "BadRequestError" and error["code"] == 400
    assert "maximum context length" in error["message"]
    assert (await chat(client, conversation("hi"), max_tokens=10)).status == 200


async def test_vllm_and_ollama_check_the_model(client: Client, state: OpenAIReferenceState) -> None:
    state.kind = "vllm"
    body = {"model": "other", "messages": conversation("hi")}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status == 404
    assert (await response.json())["error"]["type"] == "NotFoundError"
    state.kind = "ollama"
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status == 404
    assert "not found" in (await response.json())["error"]["message"]


async def test_vllm_stream(client: Client, state: OpenAIReferenceState) -> None:
    state.kind = "vllm"
    chunks = await stream_chunks(
        await chat(client, conversation("v"), stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-3]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-2]["choices"] == [] and "usage" in chunks[-2]
    assert not any("timings" in chunk for chunk in chunks[:-1])


async def test_ollama_persona(client: Client, state: OpenAIReferenceState) -> None:
    state.kind = "ollama"
    assert await (await client.get("/")).text() == "Ollama is running"
    for path in ("/health", "/props", "/slots"):
        response = await client.get(path)
        assert response.status == 404
        assert await response.text() == "404 page not found"
    assert (await client.post("/tokenize", json={"content": "x"})).status == 404
    first = await answer(client, conversation("one"))
    assert "timings" not in first and "prompt_tokens_details" not in first["usage"]
    messages = conversation("one", first["choices"][0]["message"]["content"], "two")
    second = await answer(client, messages)
    # Ollama leaves the cached part out of prompt_tokens.
    assert second["usage"]["prompt_tokens"] < len(prompt_pieces(messages))

    chunks = await stream_chunks(
        await chat(client, conversation("o"), stream=True, stream_options={"include_usage": True})
    )
    assert all(c["choices"][0]["delta"]["role"] == "assistant" for c in chunks[:-2])
    assert chunks[0]["choices"][0]["delta"]["content"]
    assert chunks[-2]["choices"] == [] and "prompt_tokens_details" not in chunks[-2]["usage"]


# -- authentication -----------------------------------------------------------------


async def test_api_key_is_required_where_each_server_requires_it(
    client: Client, state: OpenAIReferenceState
) -> None:
    state.api_key = "sekrit"
    assert (await client.get("/health")).status == 200
    response = await chat(client, conversation("hi"))
    assert response.status == 401
    assert (await response.json())["error"] == {
        "code": 401,
        "message": "Invalid API Key",
        "type": "authentication_error",
    }
    assert (await client.get("/v1/models")).status == 401
    wrong = await client.get("/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status == 401
    right = await client.get("/v1/models", headers={"Authorization": "Bearer sekrit"})
    assert right.status == 200

    state.kind = "vllm"
    assert (await client.get("/health")).status == 200
    response = await client.get("/v1/models")
    assert response.status == 401
    assert await response.json() == {"error": "Unauthorized"}


# -- switches -----------------------------------------------------------------------


async def test_fail_next_answers_in_the_persona_shape(
    client: Client, state: OpenAIReferenceState
) -> None:
    state.fail_next = [429, 503, 500]
    statuses = []
    for _ in range(3):
        response = await chat(client, conversation("hi"))
        statuses.append((response.status, (await response.json())["error"]["type"]))
    assert statuses == [(429, "server_error"), (503, "unavailable_error"), (500, "server_error")]
    assert (await chat(client, conversation("hi"))).status == 200
    state.kind = "vllm"
    state.fail_next = [503]
    response = await chat(client, conversation("hi"))
    assert (await response.json())["error"]["type"] == "ServiceUnavailableError"


async def test_empty_then_blank_replies(client: Client, state: OpenAIReferenceState) -> None:
    state.empty_replies, state.blank_replies = 1, 1
    contents = [
        (await answer(client, conversation("hi")))["choices"][0]["message"]["content"]
        for _ in range(3)
    ]
    assert contents[0] == ""
    assert contents[1] and not contents[1].strip()
    assert contents[2].startswith("Reply 1")
    state.empty_replies = 1
    chunks = await stream_chunks(await chat(client, conversation("hi"), stream=True))
    assert content_of(chunks) == ""
    assert len(chunks) == 3  # role chunk, finish chunk, [DONE]


async def test_reply_text_is_sent_exactly(client: Client, state: OpenAIReferenceState) -> None:
    state.reply_text = "bad \ud800 surrogate"
    body = await answer(client, conversation("hi"), max_tokens=1)
    assert body["choices"][0]["message"]["content"] == "bad \ud800 surrogate"
    chunks = await stream_chunks(await chat(client, conversation("hi"), stream=True))
    assert content_of(chunks) == "bad \ud800 surrogate"
    state.reply_text = "é" * 200_000
    body = await answer(client, conversation("hi"))
    assert body["choices"][0]["message"]["content"] == "é" * 200_000


async def test_hang_never_answers(client: Client, state: OpenAIReferenceState) -> None:
    state.hang = True
    # Kept: "never answers" is shown by a client giving up after a while.
    with pytest.raises(asyncio.TimeoutError):
        body = {"model": state.model, "messages": conversation("hi")}
        await client.post(
            "/v1/chat/completions", json=body, timeout=aiohttp.ClientTimeout(total=0.2)
        )
    assert state.calls["chat"] == 1


async def test_requests_are_recorded_and_bounded(
    client: Client, state: OpenAIReferenceState
) -> None:
    await answer(client, conversation("hi"), id_slot=1, cache_prompt=True)
    recorded = state.requests[-1]
    assert recorded["messages"] == conversation("hi")
    assert (recorded["id_slot"], recorded["cache_prompt"]) == (1, True)
    assert state.calls["chat"] == 1
    for _ in range(105):
        state.requests.append({})
    assert len(state.requests) == 100


# -- the command line -------------------------------------------------------------


async def test_main_serves_the_double_on_the_given_port(tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sessionbridge.reference.openai_server",
            *("--port", str(port), "--kind", "vllm", "--slot-ctx", "1000"),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=clean_env(SESSIONBRIDGE_REFERENCE_API_KEY="k3y-from-env"),
        )
    try:
        models = await _poll_models(port, log_path)
        assert models["data"][0]["max_model_len"] == 1000
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 10)
    output = log_path.read_text()
    assert "test-double-not-a-model" in output
    assert "k3y-from-env" not in output


async def _poll_models(port: int, log_path: Path) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/v1/models"
    models: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as session:

        async def serving() -> bool:
            try:
                headers = {"Authorization": "Bearer k3y-from-env"}
                async with session.get(url, headers=headers) as response:
                    assert response.status == 200
                    models.append(await response.json())
                    return True
            except aiohttp.ClientConnectionError:
                return False

        await wait_until(serving, message=lambda: log_path.read_text())
    return models[-1]


def test_main_rejects_an_unknown_kind(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--kind", "gpt"])
    assert "invalid choice" in capsys.readouterr().err
