"""The official ``openai`` SDK, over a real socket, reads what the OpenAI face's pieces make.

The server here is a stand-in made of the wire layer alone: its handlers
parse with ``requests``, answer with ``objects`` and ``stream`` through
``sse``, and fail through ``errors``' middleware. Nothing is stored; which
response a request gets is picked by its ``model`` (a request's model is
accepted whatever it names). What is proved is the wire: the SDK's own
requests parse, and its client, its stream helper and its accumulator take
every answer and raise the right exception for every error.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from sessionbridge import jsoncodec
from sessionbridge.errors import (
    BridgeError,
    ContextLengthExceeded,
    IdempotencyInProgress,
    NotFound,
    SessionBusy,
    Unauthorized,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from sessionbridge.responses.records import Item, Page, ResponseRecord
from sessionbridge.web.openai import objects
from sessionbridge.web.openai.errors import error_middleware
from sessionbridge.web.openai.requests import (
    parse_conversation_create,
    parse_items_create,
    parse_page_request,
    parse_response_request,
    parse_retrieve_request,
)
from sessionbridge.web.openai.sse import EVENT_STREAM, encode_event
from sessionbridge.web.openai.stream import events_after, events_for

from . import factories

PIECES = ["Hel", "lo, ", "wor", "ld!"]
START = factories.response()
ENDS: dict[str, tuple[ResponseRecord, list[str]]] = {
    "completed": (factories.ended(START, "completed", "".join(PIECES)), PIECES),
    "incomplete": (factories.ended(START, "incomplete", "Hello, "), PIECES[:2]),
    "failed": (factories.ended(START, "failed", "Hel"), PIECES[:1]),
    "cancelled": (factories.ended(START, "cancelled", "Hello, wor"), PIECES[:3]),
}
# The error each model name makes the stand-in raise.
ERRORS: dict[str, Callable[[], BridgeError]] = {
    "not-found": lambda: NotFound("no such response"),
    "busy": lambda: SessionBusy("too many responses waiting on this conversation"),
    "unauthorized": lambda: Unauthorized("missing or invalid API key"),
    "in-progress": lambda: IdempotencyInProgress("the request with this key is being answered"),
    "unavailable": lambda: UpstreamUnavailable("the AI server cannot be reached"),
    "timeout": lambda: UpstreamTimeout("the AI server did not answer in time"),
    "too-long": lambda: ContextLengthExceeded("the context does not fit 4096 tokens"),
}
ITEMS = (
    Item(id="msg_1", role="user", texts=("Hello",)),
    Item(id="msg_2", role="assistant", texts=("Hi!",)),
    Item(id="msg_3", role="user", texts=("And then?",)),
)

Seen = list[tuple[str, str, dict[str, str], Any]]
SEEN: web.AppKey[Seen] = web.AppKey("seen", list)


async def stream_events(request: web.Request, events: list[dict[str, Any]]) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": EVENT_STREAM + "; charset=utf-8"})
    await response.prepare(request)
    for event in events:
        # One write per event, as a live stream goes out.
        await response.write(encode_event(event))
    await response.write_eof()
    return response


def record(request: web.Request, body: Any = None) -> None:
    request.app[SEEN].append((request.method, request.path, dict(request.query), body))


async def create_response(request: web.Request) -> web.StreamResponse:
    body = jsoncodec.loads(await request.read())
    record(request, body)
    parsed = parse_response_request(body)
    model = parsed.model or "completed"
    if model in ERRORS:
        raise ERRORS[model]()
    end, pieces = ENDS[model]
    if parsed.stream:
        return await stream_events(request, events_for(end, pieces))
    return web.json_response(objects.response_object(end))


async def retrieve_response(request: web.Request) -> web.StreamResponse:
    record(request)
    if request.match_info["id"] != START.id:
        raise NotFound("no such response")
    query = parse_retrieve_request(request.query)
    end, pieces = ENDS["completed"]
    if query.stream:
        return await stream_events(
            request, events_after(events_for(end, pieces), query.starting_after)
        )
    return web.json_response(objects.response_object(end))


async def delete_response(request: web.Request) -> web.Response:
    record(request)
    return web.json_response(objects.response_deleted(request.match_info["id"]))


async def list_input_items(request: web.Request) -> web.Response:
    record(request)
    page = parse_page_request(request.query)
    return web.json_response(objects.item_list(Page(items=ITEMS[: page.limit], has_more=False)))


async def create_conversation(request: web.Request) -> web.Response:
    body = jsoncodec.loads(await request.read())
    record(request, body)
    created = parse_conversation_create(body)
    return web.json_response(
        objects.conversation_object(factories.conversation(metadata=created.metadata))
    )


async def add_items(request: web.Request) -> web.Response:
    body = jsoncodec.loads(await request.read())
    record(request, body)
    added = parse_items_create(body)
    items = [Item(id=f"msg_new_{i}", role=m.role, texts=m.texts) for i, m in enumerate(added.items)]
    return web.json_response(objects.items_added(items))


async def list_items(request: web.Request) -> web.Response:
    record(request)
    page = parse_page_request(request.query)
    # Two pages: the first two items, then the rest; a cursor is the last id seen.
    if page.after is None:
        return web.json_response(objects.item_list(Page(items=ITEMS[:2], has_more=True)))
    return web.json_response(objects.item_list(Page(items=ITEMS[2:], has_more=False)))


async def delete_conversation(request: web.Request) -> web.Response:
    record(request)
    return web.json_response(objects.conversation_deleted(request.match_info["id"]))


async def list_models(request: web.Request) -> web.Response:
    record(request)
    return web.json_response(objects.model_list({"gemma-3-270m": factories.CREATED_AT}))


def stand_in() -> web.Application:
    app = web.Application(middlewares=[error_middleware])
    app[SEEN] = []
    app.router.add_post("/v1/responses", create_response)
    app.router.add_get("/v1/responses/{id}", retrieve_response)
    app.router.add_delete("/v1/responses/{id}", delete_response)
    app.router.add_get("/v1/responses/{id}/input_items", list_input_items)
    app.router.add_post("/v1/conversations", create_conversation)
    app.router.add_delete("/v1/conversations/{id}", delete_conversation)
    app.router.add_post("/v1/conversations/{id}/items", add_items)
    app.router.add_get("/v1/conversations/{id}/items", list_items)
    app.router.add_get("/v1/models", list_models)
    return app


@pytest.fixture
async def server(aiohttp_server: AiohttpServer) -> TestServer:
    return await aiohttp_server(stand_in())


@pytest.fixture
async def client(server: TestServer) -> AsyncIterator[openai.AsyncOpenAI]:
    # No retries: a test sees each answer once, as the server sent it.
    sdk = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="x", max_retries=0)
    try:
        yield sdk
    finally:
        await sdk.close()


def seen(server: TestServer) -> Seen:
    return server.app[SEEN]


# -- responses --------------------------------------------------------------------------


async def test_the_sdk_s_stream_helper_gives_the_final_text(client: openai.AsyncOpenAI) -> None:
    async with client.responses.stream(model="completed", input="Hello") as stream:
        deltas = [
            event.delta async for event in stream if event.type == "response.output_text.delta"
        ]
        final = await stream.get_final_response()

    assert deltas == PIECES
    assert final.output_text == "Hello, world!"
    assert final.status == "completed"
    assert final.usage is not None and final.usage.total_tokens == 15


async def test_the_sdk_s_create_request_parses(
    client: openai.AsyncOpenAI, server: TestServer
) -> None:
    await client.responses.create(
        model="completed",
        input=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "input_text", "text": "Hello"}]},
        ],
        instructions="Answer in English.",
        previous_response_id="resp_0000",
        max_output_tokens=64,
        temperature=0.3,
        top_p=0.9,
        truncation="auto",
        metadata={"k": "v"},
        prompt_cache_key="chain",
        store=True,
    )

    parsed = parse_response_request(seen(server)[-1][3])
    assert [m.role for m in parsed.input] == ["developer", "user"]
    assert parsed.previous_response_id == "resp_0000" and parsed.truncation == "auto"


async def test_a_response_created_without_stream_reads_whole(client: openai.AsyncOpenAI) -> None:
    response = await client.responses.create(model="completed", input="Hello")

    assert response.output_text == "Hello, world!"
    assert response.id == START.id


@pytest.mark.parametrize("ending", ["incomplete", "failed", "cancelled"])
async def test_a_stream_that_does_not_complete_ends_in_its_own_event(
    client: openai.AsyncOpenAI, ending: str
) -> None:
    async with client.responses.stream(model=ending, input="Hello") as stream:
        events = [event async for event in stream]
        with pytest.raises(RuntimeError, match=r"response\.completed"):
            await stream.get_final_response()

    _, pieces = ENDS[ending]
    last = events[-1]
    assert last.type == {"incomplete": "response.incomplete"}.get(ending, "response.failed")
    assert last.response.status == ending
    assert last.response.output_text == "".join(pieces)
    assert [e.sequence_number for e in events] == list(range(len(events)))


async def test_the_stream_helper_resumes_by_filtering_a_whole_replay(
    client: openai.AsyncOpenAI, server: TestServer
) -> None:
    async with client.responses.stream(response_id=START.id, starting_after=5) as stream:
        numbers = [event.sequence_number async for event in stream]
        final = await stream.get_final_response()

    # The helper asks for the whole stream (its accumulator needs response.created)
    # and drops the events up to starting_after itself.
    method, path, query, _ = seen(server)[-1]
    assert (method, path) == ("GET", f"/v1/responses/{START.id}")
    assert query == {"stream": "true"}
    assert numbers[0] == 6 and numbers == list(range(6, numbers[-1] + 1))
    assert final.output_text == "Hello, world!"


async def test_retrieve_with_stream_sends_starting_after_to_the_server(
    client: openai.AsyncOpenAI, server: TestServer
) -> None:
    stream = await client.responses.retrieve(START.id, stream=True, starting_after=5)
    numbers = [event.sequence_number async for event in stream]

    assert seen(server)[-1][2] == {"stream": "true", "starting_after": "5"}
    whole = events_for(*ENDS["completed"])
    assert numbers == [event["sequence_number"] for event in whole[6:]]


async def test_retrieve_delete_and_input_items(client: openai.AsyncOpenAI) -> None:
    response = await client.responses.retrieve(START.id)
    deleted = await client.responses.delete(START.id)
    items = [item async for item in client.responses.input_items.list(START.id, limit=3)]

    assert response.output_text == "Hello, world!"
    assert deleted is None  # the SDK reads nothing of response.deleted
    assert [item.id for item in items] == ["msg_1", "msg_2", "msg_3"]
    assert [item.type for item in items] == ["message"] * 3


# -- conversations and models -----------------------------------------------------------


async def test_conversations_round_trip_through_the_sdk(client: openai.AsyncOpenAI) -> None:
    conversation = await client.conversations.create(
        items=[{"type": "message", "role": "user", "content": "Hello"}], metadata={"a": "b"}
    )
    added = await client.conversations.items.create(
        conversation.id, items=[{"type": "message", "role": "assistant", "content": "Hi!"}]
    )
    listed = [item async for item in client.conversations.items.list(conversation.id)]
    deleted = await client.conversations.delete(conversation.id)

    assert conversation.id == "conv_0001" and conversation.metadata == {"a": "b"}
    assert [item.id for item in added.data] == ["msg_new_0"]
    assert [item.id for item in listed] == ["msg_1", "msg_2", "msg_3"]  # two pages, followed
    assert deleted.deleted is True and deleted.object == "conversation.deleted"


async def test_models_list_through_the_sdk(client: openai.AsyncOpenAI) -> None:
    models = [model async for model in client.models.list()]

    assert [(m.id, m.owned_by) for m in models] == [("gemma-3-270m", "sessionbridge")]


# -- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "exception", "status", "code"),
    [
        ("not-found", openai.NotFoundError, 404, "not_found"),
        ("busy", openai.RateLimitError, 429, "session_busy"),
        ("unauthorized", openai.AuthenticationError, 401, "unauthorized"),
        ("in-progress", openai.ConflictError, 409, "idempotency_in_progress"),
        ("unavailable", openai.InternalServerError, 503, "upstream_unavailable"),
        ("timeout", openai.InternalServerError, 504, "upstream_timeout"),
        ("too-long", openai.BadRequestError, 400, "context_length_exceeded"),
    ],
)
async def test_each_error_raises_the_sdk_s_exception_with_its_message(
    client: openai.AsyncOpenAI,
    model: str,
    exception: type[openai.APIStatusError],
    status: int,
    code: str,
) -> None:
    with pytest.raises(exception) as raised:
        await client.responses.create(model=model, input="Hello")

    error = raised.value
    assert error.status_code == status
    assert error.code == code
    assert isinstance(error.body, dict)
    assert error.body["message"] == ERRORS[model]().detail
    assert error.body["message"] in error.message


async def test_a_refused_field_is_a_bad_request_naming_it(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        await client.responses.create(
            model="completed",
            input=[
                {
                    "role": "user",
                    "content": [{"type": "input_image", "image_url": "x", "detail": "auto"}],
                }
            ],
        )

    assert raised.value.code == "unsupported"
    assert raised.value.param == "input[0].content[0].type"
    assert raised.value.type == "invalid_request_error"


async def test_an_invalid_field_is_400_not_422(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        await client.responses.create(model="completed", input="Hello", temperature=7)

    assert (raised.value.code, raised.value.param) == ("invalid_field", "temperature")


async def test_retry_after_goes_out_with_the_error(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as raised:
        await client.responses.create(model="busy", input="Hello")

    assert raised.value.response.headers["retry-after"] == str(SessionBusy.retry_after)
    assert raised.value.type == "rate_limit_error"


async def test_a_missing_response_is_openai_s_not_found(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        await client.responses.retrieve("resp_missing")

    assert (raised.value.code, raised.value.body) == (
        "not_found",
        {
            "message": "no such response",
            "type": "invalid_request_error",
            "param": None,
            "code": "not_found",
        },
    )


async def test_aiohttp_s_own_errors_are_shown_as_openai_s(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        await client.get("/no/such/route", cast_to=object)
    with pytest.raises(openai.APIStatusError) as not_allowed:
        await client.put("/models", cast_to=object)

    assert not_found.value.code == "not_found"
    assert (not_allowed.value.status_code, not_allowed.value.code) == (405, "method_not_allowed")
    assert "GET" in not_allowed.value.response.headers["allow"]
