"""The OpenAI face (docs/openai-api.md) through the official openai SDK, over a real socket.

Every test runs against both AI-server families: the seed protocol's
reference server (AI sessions: created, reused, recovered) and the
OpenAI-compatible reference server (a prompt cache per slot). The SDK's own
types parse every object; its exceptions carry the bridge's errors.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from sessionbridge.config import TokenRange
from sessionbridge.records import ChatSession
from sessionbridge.reference.openai_server import (
    OpenAIReferenceState,
    create_openai_reference_app,
)
from sessionbridge.reference.seed_server import DevServerState
from sessionbridge.web.appkeys import STORE
from tests.conftest import Api, MakeApi
from tests.doubles import HANG_TIMEOUT, wait_until

FLAVORS = ["seed", "openai"]


class Face:
    """A bridge on a real socket, the SDK pointed at it, and the AI server's own state."""

    def __init__(self, api: Api, flavor: str, upstream: DevServerState | OpenAIReferenceState):
        self.api = api
        self.flavor = flavor
        self.upstream = upstream
        self.base_url = str(api.client.make_url("/v1"))
        self.sdk = openai.AsyncOpenAI(base_url=self.base_url, api_key=api.token, max_retries=0)

    def slow(self, seconds_per_piece: float) -> None:
        """Hold each reply in the AI server (the seed server as one delay)."""
        if isinstance(self.upstream, DevServerState):
            self.upstream.delay = seconds_per_piece * 20
        else:
            self.upstream.piece_delay = seconds_per_piece

    def turns_created(self) -> int:
        """AI sessions the seed server created (scenario or init-session calls)."""
        assert isinstance(self.upstream, DevServerState)
        return self.upstream.calls["scenario"] + self.upstream.calls["init-session"]


@pytest.fixture(params=FLAVORS)
async def face(
    request: pytest.FixtureRequest,
    make_api: MakeApi,
    ai_state: DevServerState,
    aiohttp_server: AiohttpServer,
    tmp_path: Path,
) -> AsyncIterator[Face]:
    if request.param == "seed":
        api = await make_api()
        found = Face(api, "seed", ai_state)
    else:
        state = OpenAIReferenceState(piece_delay=0.0, tokens_per_piece=3)
        server: TestServer = await aiohttp_server(create_openai_reference_app(state))
        api = await make_api(
            db=str(tmp_path / "openai.db"),
            upstream_url=str(server.make_url("/v1")),
            upstream_flavor="openai",
            upstream_max_tokens=TokenRange(1, 500),
        )
        found = Face(api, "openai", state)
    yield found
    await found.sdk.close()


async def messages_of(face: Face, session_id: str) -> list[dict[str, Any]]:
    return await face.api.messages(session_id)


# -- responses ------------------------------------------------------------------------------


async def test_a_response_is_created_retrieved_and_typed_by_the_sdk(face: Face) -> None:
    created = await face.sdk.responses.create(
        model="any", input="Hello there", instructions="Be brief."
    )

    assert created.status == "completed"
    assert created.id.startswith("resp_")
    assert created.output_text.strip()
    assert created.instructions == "Be brief."
    again = await face.sdk.responses.retrieve(created.id)
    assert again.output_text == created.output_text
    assert again.status == "completed"
    if face.flavor == "openai":
        assert again.usage is not None and again.usage.input_tokens > 0


async def test_previous_response_id_continues_the_same_line(face: Face) -> None:
    first = await face.sdk.responses.create(model="any", input="Remember the word cobalt.")
    second = await face.sdk.responses.create(
        model="any", input="Which word?", previous_response_id=first.id
    )
    third = await face.sdk.responses.create(
        model="any", input="Again?", previous_response_id=second.id
    )

    assert second.previous_response_id == first.id
    # Both reference servers number the turn they see: the history went along.
    if face.flavor == "seed":
        assert third.output_text.startswith("turn 3:")
        assert face.turns_created() == 1  # one AI session for the whole chain
    else:
        assert third.output_text.startswith("Reply 3:")
        assert third.usage is not None
        assert third.usage.input_tokens_details.cached_tokens > 0


async def test_a_response_continued_twice_branches_with_a_history_of_its_own(face: Face) -> None:
    root = await face.sdk.responses.create(model="any", input="Pick a color.")
    left = await face.sdk.responses.create(model="any", input="Left?", previous_response_id=root.id)
    right = await face.sdk.responses.create(
        model="any", input="Right?", previous_response_id=root.id
    )
    after_left = await face.sdk.responses.create(
        model="any", input="Then?", previous_response_id=left.id
    )

    if face.flavor == "seed":
        # The first continuation goes on in the root's AI session; the branch
        # gets an AI session of its own, made from its history (the root's
        # turn, not the other branch's).
        assert left.output_text.startswith("turn 2:")
        assert right.output_text.startswith("turn 1:")
        assert "The conversation so far" in right.output_text
        assert after_left.output_text.startswith("turn 3:")
        assert face.turns_created() == 2
        branch = [s for s in face.upstream.sessions.values() if "Pick a color." in s.scenario]
        assert len(branch) == 1 and "Left?" not in branch[0].scenario
    else:
        assert left.output_text.startswith("Reply 2: I see 2 earlier messages")
        assert right.output_text.startswith("Reply 2: I see 2 earlier messages")
        assert after_left.output_text.startswith("Reply 3: I see 4 earlier messages")
        # The branch's prompt begins byte for byte as the root's: the cache serves it.
        assert right.usage is not None and root.usage is not None
        assert right.usage.input_tokens_details.cached_tokens >= root.usage.input_tokens // 2


async def test_input_items_and_system_items_are_the_responses_context(face: Face) -> None:
    response = await face.sdk.responses.create(
        model="any",
        input=[
            {"role": "developer", "content": "Answer in one line."},
            {"role": "user", "content": "My name is Ada."},
            {"role": "assistant", "content": "Hello Ada."},
            {"role": "user", "content": [{"type": "input_text", "text": "Who am I?"}]},
        ],
    )
    items = await face.sdk.responses.input_items.list(response.id, order="asc")

    assert [item.role for item in items.data] == ["developer", "user", "assistant", "user"]
    if face.flavor == "seed":
        assert response.output_text.startswith("turn 1:")  # the context is in the scenario
    else:
        assert response.output_text.startswith("Reply 2: I see 2 earlier messages")


async def test_a_response_that_is_not_stored_is_gone_afterwards(face: Face) -> None:
    response = await face.sdk.responses.create(model="any", input="Just once", store=False)

    assert response.status == "completed"
    with pytest.raises(openai.NotFoundError):
        await face.sdk.responses.retrieve(response.id)


async def test_a_deleted_response_is_gone_and_its_continuations_keep_working(face: Face) -> None:
    first = await face.sdk.responses.create(model="any", input="one")
    second = await face.sdk.responses.create(
        model="any", input="two", previous_response_id=first.id
    )

    deleted = await face.sdk.responses.delete(first.id)
    assert deleted is None or getattr(deleted, "deleted", True)
    with pytest.raises(openai.NotFoundError):
        await face.sdk.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        await face.sdk.responses.create(model="any", input="x", previous_response_id=first.id)
    third = await face.sdk.responses.create(
        model="any", input="three", previous_response_id=second.id
    )
    assert third.status == "completed"


async def test_the_same_idempotency_key_gives_the_first_response_again(face: Face) -> None:
    headers = {"Idempotency-Key": "order-7"}
    first = await face.sdk.responses.create(model="any", input="hi", extra_headers=headers)
    again = await face.sdk.responses.create(model="any", input="hi", extra_headers=headers)

    assert again.id == first.id and again.output_text == first.output_text
    with pytest.raises(openai.UnprocessableEntityError):
        await face.sdk.responses.create(model="any", input="other", extra_headers=headers)


# -- streaming ------------------------------------------------------------------------------


async def test_the_sdk_stream_helper_gets_every_event_and_the_final_response(face: Face) -> None:
    kinds: list[str] = []
    deltas: list[str] = []
    async with face.sdk.responses.stream(model="any", input="Stream this") as stream:
        async for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = await stream.get_final_response()

    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "".join(deltas) == final.output_text
    stored = await face.sdk.responses.retrieve(final.id)
    assert stored.output_text == final.output_text


async def test_a_dropped_stream_resumes_after_its_last_sequence_number(face: Face) -> None:
    face.slow(0.02)
    headers = {"Authorization": f"Bearer {face.api.token}"}
    seen: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as http, http.post(
        face.base_url + "/responses", headers=headers,
        json={"model": "any", "input": "A long answer please", "stream": True},
    ) as raw:
        async for line in raw.content:
            if line.startswith(b"data: "):
                seen.append(json.loads(line[6:]))
            if len(seen) == 3:
                break  # the client goes away mid-stream
    response_id = seen[0]["response"]["id"]
    last = seen[-1]["sequence_number"]

    resumed = [e async for e in await face.sdk.responses.retrieve(
        response_id, stream=True, starting_after=last
    )]
    assert resumed[0].sequence_number == last + 1
    assert resumed[-1].type == "response.completed"
    whole = [e async for e in await face.sdk.responses.retrieve(response_id, stream=True)]
    assert [e.sequence_number for e in whole] == list(range(len(whole)))
    assert [e.model_dump() for e in whole[last + 1:]] == [e.model_dump() for e in resumed]
    text = "".join(e.delta for e in whole if e.type == "response.output_text.delta")
    assert text == (await face.sdk.responses.retrieve(response_id)).output_text


async def test_a_background_response_answers_at_once_and_can_be_cancelled(face: Face) -> None:
    face.slow(0.5)
    started = await face.sdk.responses.create(model="any", input="Take your time", background=True)
    assert started.status in ("queued", "in_progress")

    cancelled = await face.sdk.responses.cancel(started.id)
    assert cancelled.status == "cancelled"
    assert (await face.sdk.responses.retrieve(started.id)).status == "cancelled"
    # Cancelling an ended response returns it unchanged.
    assert (await face.sdk.responses.cancel(started.id)).status == "cancelled"


async def test_a_background_response_completes_and_is_retrieved(face: Face) -> None:
    started = await face.sdk.responses.create(model="any", input="In the back", background=True)

    async def completed() -> bool:
        return (await face.sdk.responses.retrieve(started.id)).status == "completed"

    await wait_until(completed, HANG_TIMEOUT, "the background response never completed")
    assert (await face.sdk.responses.retrieve(started.id)).output_text


async def responses_counted(face: Face) -> dict[str, float]:
    response = await face.api.request("GET", "/metrics")
    counted: dict[str, float] = {}
    for line in (await response.text()).splitlines():
        if line.startswith("sessionbridge_responses_total{"):
            name, _, value = line.rpartition(" ")
            counted[name.split('"')[1]] = float(value)
    return counted


async def test_ended_responses_are_counted_by_the_status_they_are_stored_with(
    face: Face,
) -> None:
    completed = await face.sdk.responses.create(model="any", input="Hello")
    expected = {"completed": 1.0, "incomplete": 0.0, "failed": 0.0, "cancelled": 0.0}
    if face.flavor == "openai":
        cut = await face.sdk.responses.create(model="any", input="Say a lot", max_output_tokens=2)
        # Answered from the turn's outcome, as the stored response reads.
        assert cut.status == "incomplete" == (await face.sdk.responses.retrieve(cut.id)).status
        assert cut.incomplete_details is not None
        expected["incomplete"] = 1.0
    face.slow(0.5)
    started = await face.sdk.responses.create(model="any", input="Take your time", background=True)
    await face.sdk.responses.cancel(started.id)

    async def counted() -> bool:
        return await responses_counted(face) == {**expected, "cancelled": 1.0}

    await wait_until(counted, HANG_TIMEOUT, "the ended responses were not counted")
    again = await face.sdk.responses.retrieve(completed.id)
    assert again.model_dump() == completed.model_dump()  # the answer built from memory


async def sessions_listed(face: Face) -> list[dict[str, Any]]:
    listed = await face.api.request("GET", "/v1/sessions")
    sessions: list[dict[str, Any]] = (await listed.json())["sessions"]
    return sessions


async def test_a_failed_response_is_stored_failed_counted_and_gives_its_line_back(
    face: Face,
) -> None:
    first = await face.sdk.responses.create(model="any", input="Hello")
    face.upstream.fail_next = [500] * 3

    with pytest.raises(openai.APIStatusError) as failed:
        await face.sdk.responses.create(
            model="any", input="Again?", previous_response_id=first.id
        )

    face.upstream.fail_next = []
    assert failed.value.status_code == 502
    counted = await responses_counted(face)
    assert (counted["completed"], counted["failed"]) == (1.0, 1.0)
    (session,) = await sessions_listed(face)
    stored = await face.api.messages(session["id"])
    assert [(m["content"], m["status"]) for m in stored] == [
        ("Hello", "answered"), (first.output_text, "answered"), ("Again?", "failed")]
    # Its claim on the line was given back: the next continuation goes on in
    # the same session rather than branching into a copy of it.
    later = await face.sdk.responses.create(
        model="any", input="Once more?", previous_response_id=first.id
    )
    assert later.status == "completed" and len(await sessions_listed(face)) == 1


async def test_a_response_refused_before_its_question_is_stored_leaves_nothing(
    face: Face,
) -> None:
    if face.flavor != "openai":
        pytest.skip("the context budget is checked before a turn on OpenAI-compatible servers")
    # Too long for the context whatever is cut: refused before its question is stored.
    with pytest.raises(openai.BadRequestError) as refused:
        await face.sdk.responses.create(model="any", input="word " * 2_500)

    assert "over the AI server's context" in refused.value.message
    assert len(await sessions_listed(face)) == 0
    assert await responses_counted(face) == {
        "completed": 0.0, "incomplete": 0.0, "failed": 0.0, "cancelled": 0.0}


# -- conversations --------------------------------------------------------------------------


async def test_a_conversation_holds_its_items_and_its_responses(face: Face) -> None:
    conversation = await face.sdk.conversations.create(
        items=[{"type": "message", "role": "user", "content": "I like tea."}],
        metadata={"topic": "drinks"},
    )
    assert conversation.id.startswith("conv_") and conversation.metadata == {"topic": "drinks"}
    await face.sdk.conversations.items.create(
        conversation.id,
        items=[{"type": "message", "role": "assistant", "content": "Noted."}],
    )
    first = await face.sdk.responses.create(
        model="any", input="What do I like?", conversation=conversation.id
    )
    second = await face.sdk.responses.create(
        model="any", input="And then?", conversation={"id": conversation.id}
    )

    assert first.conversation is not None and first.conversation.id == conversation.id
    items = [i async for i in face.sdk.conversations.items.list(conversation.id, order="asc")]
    assert [i.role for i in items] == ["user", "assistant"] * 3
    if face.flavor == "seed":
        # The items were never said to the AI server: its AI session starts
        # from them (in its scenario), then counts the responses' turns.
        assert second.output_text.startswith("turn 2:")
        assert face.turns_created() == 1
        (ai_session,) = face.upstream.sessions.values()
        assert "User: I like tea." in ai_session.scenario
        assert "Assistant: Noted." in ai_session.scenario
    else:
        assert second.output_text.startswith("Reply 3: I see 4 earlier messages")
    # A conversation is a session: listed, with its turns' ai_session.
    listed = await face.api.request("GET", "/v1/sessions")
    assert conversation.id in [s["id"] for s in (await listed.json())["sessions"]]
    stored = await face.api.messages(conversation.id)
    assert [m.get("ai_session") for m in stored if m["role"] == "assistant"][-1] in (
        "reused", "recovered"
    )


async def test_a_response_in_a_conversation_reads_no_session_row_yet_sees_added_items(
    face: Face, monkeypatch: pytest.MonkeyPatch
) -> None:
    conversation = await face.sdk.conversations.create()
    await face.sdk.responses.create(model="any", input="First.", conversation=conversation.id)
    store = face.api.app[STORE]
    reads: list[str] = []
    read_session = store.get_session

    async def counted(api_key_id: int, session_id: str) -> ChatSession | None:
        reads.append(session_id)
        return await read_session(api_key_id, session_id)

    monkeypatch.setattr(store, "get_session", counted)

    await face.sdk.conversations.items.create(
        conversation.id, items=[{"type": "message", "role": "user", "content": "I like tea."}]
    )
    reads.clear()  # adding items reads the conversation; a response need not
    later = await face.sdk.responses.create(
        model="any", input="What do I like?", conversation=conversation.id
    )

    assert reads == []
    if face.flavor == "seed":
        # The item added since the last answer reaches the AI server before the question.
        assert repr("I like tea.\n\nWhat do I like?") in later.output_text
    items = [i async for i in face.sdk.conversations.items.list(conversation.id, order="asc")]
    assert [i.role for i in items] == ["user", "assistant", "user", "user", "assistant"]


async def test_conversation_items_page_and_delete(face: Face) -> None:
    conversation = await face.sdk.conversations.create(
        items=[{"role": "user", "content": f"item {n}"} for n in range(5)]
    )
    page = await face.sdk.conversations.items.list(conversation.id, limit=2, order="asc")
    assert [i.content[0].text for i in page.data] == ["item 0", "item 1"]  # type: ignore[union-attr]
    assert page.has_more
    after = await face.sdk.conversations.items.list(
        conversation.id, limit=2, order="asc", after=page.data[-1].id
    )
    assert [i.content[0].text for i in after.data] == ["item 2", "item 3"]  # type: ignore[union-attr]
    everything = [i async for i in face.sdk.conversations.items.list(conversation.id, limit=2)]
    assert len(everything) == 5  # the SDK's paginator follows has_more and after

    await face.sdk.conversations.items.delete(page.data[0].id, conversation_id=conversation.id)
    with pytest.raises(openai.NotFoundError):
        await face.sdk.conversations.items.retrieve(
            page.data[0].id, conversation_id=conversation.id
        )
    updated = await face.sdk.conversations.update(conversation.id, metadata={"k": "v"})
    assert updated.metadata == {"k": "v"}
    await face.sdk.conversations.delete(conversation.id)
    with pytest.raises(openai.NotFoundError):
        await face.sdk.conversations.retrieve(conversation.id)


# -- errors ---------------------------------------------------------------------------------


async def test_errors_reach_the_sdk_as_its_own_exceptions(face: Face) -> None:
    with pytest.raises(openai.NotFoundError):
        await face.sdk.responses.create(model="any", input="x", previous_response_id="resp_nope")
    with pytest.raises(openai.BadRequestError) as bad:
        await face.sdk.responses.create(
            model="any", input="x",
            tools=[{"type": "function", "name": "f", "parameters": {}}],  # type: ignore[list-item]
        )
    assert bad.value.code == "unsupported"
    with pytest.raises(openai.BadRequestError):
        await face.sdk.responses.create(
            model="any", input="x", previous_response_id="resp_a", conversation="conv_b"
        )
    stranger = openai.AsyncOpenAI(base_url=face.base_url, api_key="sb_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await stranger.responses.create(model="any", input="x")
    await stranger.close()


async def test_models_lists_the_model_the_bridge_serves(face: Face) -> None:
    models = [m async for m in face.sdk.models.list()]
    assert len(models) == 1
    response = await face.sdk.responses.create(model="whatever", input="hi")
    assert response.model == models[0].id


async def test_an_idempotency_key_makes_one_conversation_and_adds_items_once(face: Face) -> None:
    created = [
        await face.sdk.conversations.create(
            metadata={"n": "1"}, extra_headers={"Idempotency-Key": "make-conv"}
        )
        for _ in range(2)
    ]
    assert created[0].id == created[1].id
    with pytest.raises(openai.UnprocessableEntityError):
        await face.sdk.conversations.create(
            metadata={"n": "2"}, extra_headers={"Idempotency-Key": "make-conv"}
        )
    for _ in range(2):
        await face.sdk.conversations.items.create(
            created[0].id, items=[{"role": "user", "content": "once"}],
            extra_headers={"Idempotency-Key": "add-once"},
        )
    items = [i async for i in face.sdk.conversations.items.list(created[0].id)]
    assert len(items) == 1
