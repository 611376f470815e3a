"""Conversations through the bridge with a real model (docs/ai-servers.md), end to end.

llama-server runs Gemma 3 270M (a base model: its replies are often odd, but
they are real generations); token counts are the server's own. What these
tests hold the bridge to: the replies are stored and read as chat, the
prompt cache carries each turn's prompt into the next, a restart of the
server costs the whole history unless the slot was saved, and the context
budget trims in steps. Streaming checks belong beside these (same fixtures).
"""

from __future__ import annotations

import asyncio
import itertools
import re
from typing import Any

import pytest

from tests.conftest import Api, MakeApi

from .conftest import REPLY_TOKENS

pytestmark = pytest.mark.real

SCENARIO = (
    "You are a patient museum guide in a small town. You answer visitors' questions"
    " about the paintings, the building and the town's history in one or two short"
    " sentences, and you always stay polite, even when a question is odd."
)
# What a wrong chat template leaves in replies (ChatML's markers, Gemma's own).
TEMPLATE_MARKERS = re.compile(r"<\|im_(start|end)\|>|<(start|end)_of_turn>")


def usage(answer: dict[str, Any]) -> dict[str, int]:
    found = answer["reply"].get("usage")
    assert isinstance(found, dict), f"the reply carries no usage: {answer['reply']}"
    return found


def computed(answer: dict[str, Any]) -> int:
    """Prompt tokens the server had to compute this turn (not served from its cache)."""
    u = usage(answer)
    return u["prompt_tokens"] - u["cached_tokens"]


async def all_pages(api: Api, session_id: str, limit: int) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        query = f"limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        response = await api.request("GET", f"/v1/sessions/{session_id}/messages?{query}")
        assert response.status == 200, await response.text()
        page = await response.json()
        assert len(page["messages"]) <= limit
        messages.extend(page["messages"])
        cursor = page["next_cursor"]
        if cursor is None:
            return messages


async def metric(api: Api, line_start: str) -> float:
    text = await (await api.client.get("/metrics")).text()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(line_start)]
    return sum(values)


async def test_replies_from_the_model_are_stored_paged_and_read_as_chat(api: Api) -> None:
    session_id = await api.new_session(SCENARIO)
    questions = ["Hello! Who are you?", "What is in the big hall?", "Thank you, goodbye."]

    answers = [await api.say(session_id, q) for q in questions]

    for answer in answers:
        text = answer["reply"]["content"]
        assert text.strip(), answer
        assert not TEMPLATE_MARKERS.search(text), f"template markers in a reply: {text!r}"
        u = usage(answer)
        assert 1 <= u["completion_tokens"] <= REPLY_TOKENS
        assert u["prompt_tokens"] > 0
    stored = await all_pages(api, session_id, limit=4)
    assert [m["seq"] for m in stored] == list(range(1, 2 * len(questions) + 1))
    assert [m["role"] for m in stored] == ["user", "assistant"] * len(questions)
    expected = [text for q, a in zip(questions, answers, strict=True)
                for text in (q, a["reply"]["content"])]
    assert [m["content"] for m in stored] == expected
    assert all(m["status"] == "answered" for m in stored if m["role"] == "user")
    # The usage stored with each reply is what the server reported for it.
    assert [m["usage"] for m in stored if m["role"] == "assistant"] == [
        usage(a) for a in answers
    ]


async def test_the_second_turn_is_served_from_the_prompt_cache(api: Api) -> None:
    session_id = await api.new_session(SCENARIO)

    first = await api.say(session_id, "Hello! Who painted the portrait by the door?")
    second = await api.say(session_id, "And when was it painted?")

    assert first["ai_session"] == "created"
    assert second["ai_session"] == "reused"
    # The second prompt begins with the whole first prompt: the cache served it.
    assert usage(second)["cached_tokens"] >= usage(first)["prompt_tokens"]
    assert computed(second) < usage(first)["prompt_tokens"]
    cached = await metric(api, 'sessionbridge_prompt_tokens_total{source="cached"}')
    assert cached >= usage(second)["cached_tokens"]


async def test_a_restarted_server_recomputes_the_whole_history(api: Api, llama: Any) -> None:
    session_id = await api.new_session(SCENARIO)
    for question in ("Hello!", "What is the oldest painting here?", "Who gave it to you?"):
        await api.say(session_id, question)

    await asyncio.to_thread(llama.restart)
    after = await api.say(session_id, "Is the museum open on Sundays?")

    assert after["ai_session"] == "recovered"
    # Nothing survived the restart: all of the history was computed again.
    assert computed(after) >= 0.9 * usage(after)["prompt_tokens"], usage(after)


async def test_a_saved_slot_is_restored_after_a_restart(make_api: MakeApi, llama: Any) -> None:
    api = await make_api(slot_save="on", slot_dir=str(llama.slot_dir))
    session_id = await api.new_session(SCENARIO)
    answers = [
        await api.say(session_id, q)
        for q in ("Hello!", "What is the oldest painting here?", "Who gave it to you?")
    ]
    files = sorted(p.name for p in llama.slot_dir.iterdir())
    assert files == [f"sessionbridge-{session_id}.slot"]

    await asyncio.to_thread(llama.restart)
    after = await api.say(session_id, "Is the museum open on Sundays?")

    assert after["ai_session"] == "recovered"  # restored from its slot file
    assert await metric(
        api, 'sessionbridge_slot_actions_total{action="restore",outcome="ok"}'
    ) == 1
    # A cold start computes the whole prompt (the test above); the restored
    # slot leaves only what is new since the last turn.
    assert usage(after)["cached_tokens"] >= usage(answers[-1])["prompt_tokens"], usage(after)
    assert computed(after) * 4 <= usage(after)["prompt_tokens"], usage(after)
    following = await api.say(session_id, "Thank you.")
    assert following["ai_session"] == "reused"

    response = await api.request("DELETE", f"/v1/sessions/{session_id}")
    assert response.status == 204
    assert list(llama.slot_dir.iterdir()) == []


async def test_every_turn_saves_its_slot(make_api: MakeApi, llama: Any) -> None:
    # llama-server closes its end of a keep-alive connection after a streamed
    # answer while announcing "Keep-Alive: timeout=5, max=100"; a save sent at
    # once on that pooled connection fails ("Can not write request body"), and
    # the file left behind is an older turn's cache (or none at all).
    api = await make_api(slot_save="on", slot_dir=str(llama.slot_dir))
    session_id = await api.new_session(SCENARIO)
    turns = 5

    for n in range(turns):
        await api.say(session_id, f"Question {n}: what is on the wall in room {n}?")

    saved = 'sessionbridge_slot_actions_total{action="save",outcome='
    assert await metric(api, saved + '"failed"}') == 0
    assert await metric(api, saved + '"ok"}') == turns


async def test_the_context_budget_trims_a_long_conversation_in_steps(
    make_api: MakeApi,
) -> None:
    budget = 512
    api = await make_api(context_tokens=budget)
    session_id = await api.new_session("You are a terse assistant.")
    turns = 18

    answers = [
        await api.say(session_id, f"Question {n}: name one more colour, and say why you like it.")
        for n in range(turns)
    ]

    prompts = [usage(a)["prompt_tokens"] for a in answers]
    assert all(p + REPLY_TOKENS <= budget for p in prompts), prompts
    trims = [i for i, (before, after) in enumerate(itertools.pairwise(prompts), 1)
             if after < before]
    # Trimmed, and in steps: many turns share one window start between trims.
    assert 1 <= len(trims) <= turns // 4, prompts
    for i in range(1, turns):
        if i in trims:
            continue
        # Between trims each prompt begins with the previous one, and the cache serves it.
        assert usage(answers[i])["cached_tokens"] >= prompts[i - 1], (i, prompts, answers[i])
    assert {a["ai_session"] for a in answers[1:]} == {"reused"}
    # Every turn is stored, trimmed or not: trimming is what the model sees.
    assert len(await all_pages(api, session_id, limit=200)) == 2 * turns


async def test_a_streamed_reply_arrives_in_pieces_that_join_to_the_stored_one(
    api: Api,
) -> None:
    from tests.sse import read_events

    session_id = await api.new_session(SCENARIO)
    await api.say(session_id, "Good morning!")

    response = await api.send(
        session_id, "What is in the first room?", headers={"Accept": "text/event-stream"}
    )
    stream = await read_events(response)

    assert stream.names[0] == "turn.started" and stream.names[-1] == "turn.completed"
    assert len(stream.deltas) >= 2  # the model's tokens, passed on as they came
    stored = await api.messages(session_id)
    assert stream.text == stored[-1]["content"] == stream.events[-1].data["reply"]["content"]
    assert stream.events[-1].data["ai_session"] == "reused"
