"""Conversations through the bridge with a real model (docs/ai-servers.md), end to end.

llama-server runs SmolLM2-135M-Instruct (a tiny instruct model: it answers
like a chat model, often wrongly); token counts are the server's own. What
these tests hold the bridge to: the model's chat template is applied (the
replies answer, and carry no template markers), the replies are stored and
read as chat, the prompt cache carries each turn's prompt into the next, a
restart of the server costs the whole history unless the slot was saved, and
the context budget trims in steps. Streaming checks belong beside these (same
fixtures). Each test notes what it measured (conftest.measured); the
thresholds were set from those figures, with a margin for sampling.
"""

from __future__ import annotations

import asyncio
import difflib
import itertools
import re
from typing import Any

import pytest

from tests.conftest import Api, MakeApi

from .conftest import REPLY_TOKENS, measured

pytestmark = pytest.mark.real

SCENARIO = (
    "You are a patient museum guide in a small town. You answer visitors' questions"
    " about the paintings, the building and the town's history in one or two short"
    " sentences, and you always stay polite, even when a question is odd."
)
# What a wrong chat template (or a missing end-of-turn token) leaves in
# replies: ChatML's markers (SmolLM2's own), its end of text, Gemma's.
TEMPLATE_MARKERS = re.compile(
    r"<\|im_(start|end)\|>|<\|endoftext\|>|<(start|end)_of_turn>|^\s*(user|assistant)\s*\n"
)


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


def figures(answer: dict[str, Any]) -> str:
    """One turn's token counts, as the measured notes show them."""
    u = usage(answer)
    return (f"prompt {u['prompt_tokens']} = cached {u['cached_tokens']} + computed"
            f" {computed(answer)}, reply {u['completion_tokens']} ({answer['ai_session']})")


async def metric(api: Api, line_start: str) -> float:
    text = await (await api.client.get("/metrics")).text()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(line_start)]
    return sum(values)


async def test_replies_from_the_model_are_stored_paged_and_read_as_chat(api: Api) -> None:
    session_id = await api.new_session(SCENARIO)
    questions = ["Hello! Who are you?", "What is in the big hall?", "Thank you, goodbye."]

    answers = [await api.say(session_id, q) for q in questions]

    for question, answer in zip(questions, answers, strict=True):
        measured("stored", f"{question!r} -> {answer['reply']['content']!r}")
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

    measured("second turn", f"first {figures(first)}; second {figures(second)}")
    assert first["ai_session"] == "created"
    assert second["ai_session"] == "reused"
    # The second prompt begins with the whole first prompt: the cache served it.
    assert usage(second)["cached_tokens"] >= usage(first)["prompt_tokens"]
    # And the first reply, stored and sent back as the history: the cache
    # holds it as generated (SmolLM2: all of it but its last token). Half of
    # it is the margin for a reply whose tokens re-tokenize differently.
    assert usage(second)["cached_tokens"] >= (
        usage(first)["prompt_tokens"] + usage(first)["completion_tokens"] // 2
    ), (usage(first), usage(second))
    assert computed(second) < usage(first)["prompt_tokens"]
    cached = await metric(api, 'sessionbridge_prompt_tokens_total{source="cached"}')
    assert cached >= usage(second)["cached_tokens"]


async def test_a_restarted_server_recomputes_the_whole_history(api: Api, llama: Any) -> None:
    session_id = await api.new_session(SCENARIO)
    for question in ("Hello!", "What is the oldest painting here?", "Who gave it to you?"):
        await api.say(session_id, question)

    await asyncio.to_thread(llama.restart)
    after = await api.say(session_id, "Is the museum open on Sundays?")

    measured("restart, no slot file", f"after the restart {figures(after)}")
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

    measured("restart, slot restored", f"last turn before {figures(answers[-1])};"
             f" after the restart {figures(after)}")
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
    ok = await metric(api, saved + '"ok"}')
    failed = await metric(api, saved + '"failed"}')
    measured("slot saves", f"{turns} turns: saves ok {ok:.0f}, failed {failed:.0f}")
    assert failed == 0
    assert ok == turns


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
    measured("trimming", f"budget {budget}: prompts {prompts}; computed"
             f" {[computed(a) for a in answers]}")
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
    measured("stream", f"{len(stream.deltas)} pieces joining to {stream.text!r}")
    assert not TEMPLATE_MARKERS.search(stream.text), stream.text
    assert stream.text == stored[-1]["content"] == stream.events[-1].data["reply"]["content"]
    assert stream.events[-1].data["ai_session"] == "reused"


async def test_the_model_answers_questions_instead_of_echoing_them(api: Api) -> None:
    # A base model (Gemma 3 270M, here before) given the same three questions
    # repeated them, recited the system prompt ("You are a helpful
    # assistant."), wrote the next user line itself ("What colour is the sky
    # ...?") and gave near-identical replies to different questions; an
    # instruct model with its chat template applied answers each one.
    scenario = "You are a helpful assistant."
    session_id = await api.new_session(scenario)
    topics = {
        "What colour is the sky on a clear day?": {"sky", "blue", "colour", "color", "clear"},
        "Can you suggest a name for a small black cat?": {"cat", "cats", "name", "black",
                                                          "kitten"},
        "How do I boil an egg?": {"egg", "eggs", "boil", "boiling", "boiled", "water"},
    }
    questions = list(topics)
    # What a model that does not take turns writes: the system prompt's words,
    # or the start of a user's line (the first four words of a question).
    not_its_lines = [*runs(words(scenario), 4), *(words(q)[:4] for q in questions)]

    answers = [await api.say(session_id, q) for q in questions]

    replies = [a["reply"]["content"] for a in answers]
    on_topic = [question for question, reply in zip(questions, replies, strict=True)
                if topics[question] & set(words(reply))]
    pairs = sorted(
        (similarity(a, b) for a, b in itertools.combinations(replies, 2)), reverse=True
    )
    closest = pairs[0]
    for question, reply in zip(questions, replies, strict=True):
        measured("chat", f"{question!r} -> {reply!r} (similarity to the question"
                 f" {similarity(question, reply):.2f})")
    measured("chat", f"on topic {len(on_topic)} of {len(questions)}; the two closest"
             f" replies' similarity {closest:.2f}")
    for question, reply in zip(questions, replies, strict=True):
        assert not TEMPLATE_MARKERS.search(reply), reply
        # Not the question again, whole or nearly.
        assert question.lower().rstrip("?") not in reply.lower(), reply
        assert similarity(question, reply) < 0.8, (question, reply)
        found = [run for run in not_its_lines if contains(words(reply), run)]
        assert not found, (reply, found)
    # Sampled replies stray now and then: most, not all, are on their question's topic.
    assert len(on_topic) >= 2, replies
    # Different questions, different replies. A reply that strays back to the
    # previous question's topic (seen once in a CI run: two sky answers, 0.84
    # alike) is the same straying the topic check allows; a model that does
    # not take turns gives near-identical replies to all (Gemma: up to 1.00).
    # So of the three pairs, at most one may be alike.
    assert pairs[1] < 0.75, replies


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def runs(seq: list[str], n: int) -> list[list[str]]:
    return [seq[i:i + n] for i in range(len(seq) - n + 1)]


def contains(seq: list[str], run: list[str]) -> bool:
    return run in runs(seq, len(run))


def similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a.lower(), b.lower()).ratio()
