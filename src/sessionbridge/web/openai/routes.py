"""The OpenAI face's routes: /v1/responses, /v1/conversations, /v1/models (docs/openai-api.md).

Handlers parse and validate (``requests.py``), call the responses or
conversations service, and shape OpenAI's objects (``objects.py``) or its
stream (``stream.py``). Every error on these routes is OpenAI's error object.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from ... import jsoncodec
from ...errors import FieldError, InvalidField
from ...records import ApiKey, ResponseRow, is_storable
from ...responses.conversations import paged
from ...responses.records import ENDED_STATUSES, Item, ResponseRecord
from ...responses.service import Responses, Started, record_of
from ...turn_events import COMPLETED, DELTA, ENDINGS, STARTED, TurnEvents, split_pieces
from ..api import MAX_IDEMPOTENCY_KEY, read_object
from ..appkeys import API_KEY, CONVERSATION_SERVICE, REPLAYS, RESPONSES, SETTINGS
from ..jsonhttp import json_response
from .errors import error_middleware
from .objects import (
    conversation_deleted,
    conversation_object,
    item_list,
    item_object,
    items_added,
    model_list,
    response_deleted,
    response_object,
)
from .requests import (
    RequestLimits,
    parse_conversation_create,
    parse_conversation_update,
    parse_items_create,
    parse_page_request,
    parse_response_request,
    parse_retrieve_request,
)
from .sse import EVENT_STREAM, KEEPALIVE, encode_events
from .stream import Event, ResponseEvents, events_after, events_for

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

# The paths this face answers, whose errors are OpenAI's error object.
OPENAI_PATHS = ("/v1/responses", "/v1/conversations", "/v1/models")


def is_openai_path(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in OPENAI_PATHS)


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """OpenAI's error object on this face's routes (auth refusals included); others pass."""
    if not is_openai_path(request.path):
        return await handler(request)
    return await error_middleware(request, handler)


def _key(request: web.Request) -> ApiKey:
    return request[API_KEY]


def _limits(request: web.Request) -> RequestLimits:
    settings = request.app[SETTINGS]
    return RequestLimits(
        max_text_chars=settings.max_content_chars,
        max_instructions_chars=settings.max_scenario_chars,
        max_output_tokens=settings.upstream_max_tokens.high,
    )


def _idempotency_key(request: web.Request) -> str | None:
    value = request.headers.get("Idempotency-Key")
    if value is not None and not 1 <= len(value) <= MAX_IDEMPOTENCY_KEY:
        raise InvalidField([FieldError(
            "Idempotency-Key", f"must be 1 to {MAX_IDEMPOTENCY_KEY} characters"
        )])
    # Header bytes that are not UTF-8 arrive as lone surrogates, which no store can hold.
    if value is not None and not is_storable(value):
        raise InvalidField([FieldError("Idempotency-Key", "must be UTF-8 text")])
    return value


def fingerprint(body: object) -> str:
    """The request as sent, canonical: a retry with the same key must send the same."""
    return hashlib.sha256(jsoncodec.dumps_sorted(body)).hexdigest()


# -- responses ----------------------------------------------------------------------------


@routes.post("/v1/responses")
async def create_response(request: web.Request) -> web.StreamResponse:
    body = await read_object(request)
    ask = parse_response_request(body, _limits(request))
    idempotency_key = _idempotency_key(request)
    service = request.app[RESPONSES]
    if not (ask.stream or ask.background or idempotency_key is not None):
        # Answered in this handler's task (not cancelled when its client goes away).
        row = await service.answer(_key(request), ask)
        return json_response(response_object(record_of(row)))
    started = await service.create(
        _key(request), ask, idempotency_key=idempotency_key,
        fingerprint=fingerprint(body) if idempotency_key is not None else None,
    )
    try:
        if ask.stream:
            return await _stream(request, started, None)
        if ask.background or started.turn is None:
            row = await service.get(_key(request), started.row.id)
            return json_response(response_object(record_of(row)))
        # Raises the turn's error (OpenAI's error object); a client gone does not stop it.
        await asyncio.shield(started.turn.outcome)
        row = service.ended(started) or await service.get(_key(request), started.row.id)
        return json_response(response_object(record_of(row)))
    finally:
        await service.discard(started)


@routes.get("/v1/responses/{id}")
async def get_response(request: web.Request) -> web.StreamResponse:
    query = parse_retrieve_request(request.query)
    row = await request.app[RESPONSES].get(_key(request), request.match_info["id"])
    if query.stream:
        return await _stream(request, Started(row), query.starting_after)
    return json_response(response_object(record_of(row)))


@routes.post("/v1/responses/{id}/cancel")
async def cancel_response(request: web.Request) -> web.Response:
    row = await request.app[RESPONSES].cancel(_key(request), request.match_info["id"])
    return json_response(response_object(record_of(row)))


@routes.delete("/v1/responses/{id}")
async def delete_response(request: web.Request) -> web.Response:
    response_id = request.match_info["id"]
    await request.app[RESPONSES].delete(_key(request), response_id)
    return json_response(response_deleted(response_id))


@routes.get("/v1/responses/{id}/input_items")
async def input_items(request: web.Request) -> web.Response:
    page = parse_page_request(request.query)
    row = await request.app[RESPONSES].get(_key(request), request.match_info["id"])
    items: list[Item] = list(record_of(row).input_items)
    return json_response(item_list(paged(items, page)))


@routes.get("/v1/models")
async def models(request: web.Request) -> web.Response:
    service = request.app[RESPONSES]
    return json_response(model_list({service.model: service.started_at}))


# -- the stream of a response -------------------------------------------------------------


async def _stream(
    request: web.Request, started: Started, starting_after: int | None
) -> web.StreamResponse:
    """Write a response's events (after ``starting_after``) as they come, to its end."""
    response = web.StreamResponse(
        status=200,
        headers={
            "Content-Type": EVENT_STREAM + "; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        },
    )
    await response.prepare(request)
    keepalive = request.app[SETTINGS].sse_keepalive
    try:
        async for batch in _events(request, started, keepalive):
            if batch is None:
                await response.write(KEEPALIVE)
                continue
            fresh = events_after(batch, starting_after)
            if fresh:
                await response.write(encode_events(fresh))
        await response.write_eof()
    except (ConnectionResetError, ConnectionError):
        # The reader went away; the response goes on without it.
        log.info("event=stream_reader_gone path=%s", request.path)
    return response


async def _events(
    request: web.Request, started: Started, keepalive: float
) -> AsyncIterator[list[Event] | None]:
    """A response's events in batches from the start; None when a keep-alive is due."""
    service = request.app[RESPONSES]
    key = _key(request)
    row = started.row
    record = record_of(row)
    if record.status in ENDED_STATUSES:
        answer = row.answer
        stored = split_pieces(answer.content, answer.piece_ends) if answer is not None else None
        yield events_for(record, stored)
        return
    events: TurnEvents | None = started.turn.events if started.turn is not None else None
    if events is None:
        events = await service.events(key, row)
    builder = ResponseEvents(dataclasses.replace(record, status="in_progress"))
    yield builder.created()
    if events is None:
        return  # never started here in time; the client may retrieve it later
    pieces: list[str] = []
    position = 0
    while True:
        for event in events.since(position):
            position += 1
            if event.name == STARTED:
                yield builder.in_progress()
            elif event.name == DELTA:
                pieces.append(event.data["text"])
                yield builder.delta(event.data["text"])
            elif event.name in ENDINGS:
                yield builder.end(await _final(service, key, row, pieces, event.name))
                return
        if not await events.wait_beyond(position, keepalive):
            yield None


async def _final(
    service: Responses, key: ApiKey, row: ResponseRow, pieces: list[str], ending: str
) -> ResponseRecord:
    """The ended response as stored; one that failed keeps the text its stream carried."""
    record = record_of(await service.get(key, row.id))
    if ending != COMPLETED or record.status not in ("completed", "incomplete"):
        status = record.status if record.status in ENDED_STATUSES else "failed"
        record = dataclasses.replace(record, status=status, output_text="".join(pieces))
    return record


# -- conversations ------------------------------------------------------------------------


@routes.post("/v1/conversations")
async def create_conversation(request: web.Request) -> web.Response:
    body = await read_object(request)
    ask = parse_conversation_create(body, _limits(request))
    key = _key(request)
    service = request.app[CONVERSATION_SERVICE]

    async def work() -> tuple[dict[str, Any], Callable[[], Awaitable[None]]]:
        record = await service.create(key, ask)
        return conversation_object(record), lambda: service.delete(key, record.id)

    answer = await request.app[REPLAYS].once(
        key, _idempotency_key(request), fingerprint({"body": body}), work
    )
    return json_response(answer)


@routes.get("/v1/conversations/{id}")
async def get_conversation(request: web.Request) -> web.Response:
    record = await request.app[CONVERSATION_SERVICE].get(_key(request), request.match_info["id"])
    return json_response(conversation_object(record))


@routes.post("/v1/conversations/{id}")
async def update_conversation(request: web.Request) -> web.Response:
    ask = parse_conversation_update(await read_object(request))
    record = await request.app[CONVERSATION_SERVICE].update(
        _key(request), request.match_info["id"], dict(ask.metadata)
    )
    return json_response(conversation_object(record))


@routes.delete("/v1/conversations/{id}")
async def delete_conversation(request: web.Request) -> web.Response:
    conversation_id = request.match_info["id"]
    await request.app[CONVERSATION_SERVICE].delete(_key(request), conversation_id)
    return json_response(conversation_deleted(conversation_id))


@routes.post("/v1/conversations/{id}/items")
async def add_items(request: web.Request) -> web.Response:
    body = await read_object(request)
    ask = parse_items_create(body, _limits(request))
    key = _key(request)
    conversation_id = request.match_info["id"]
    service = request.app[CONVERSATION_SERVICE]

    async def work() -> tuple[dict[str, Any], Callable[[], Awaitable[None]]]:
        items = await service.add_items(key, conversation_id, ask.items)

        async def undo() -> None:
            for item in items:
                await service.delete_item(key, conversation_id, item.id)

        return items_added(items), undo

    fingerprinted = {"conversation": conversation_id, "body": body}
    answer = await request.app[REPLAYS].once(
        key, _idempotency_key(request), fingerprint(fingerprinted), work
    )
    return json_response(answer)


@routes.get("/v1/conversations/{id}/items")
async def list_items(request: web.Request) -> web.Response:
    page = parse_page_request(request.query)
    listed = await request.app[CONVERSATION_SERVICE].list_items(
        _key(request), request.match_info["id"], page
    )
    return json_response(item_list(listed))


@routes.get("/v1/conversations/{id}/items/{item_id}")
async def get_item(request: web.Request) -> web.Response:
    item = await request.app[CONVERSATION_SERVICE].get_item(
        _key(request), request.match_info["id"], request.match_info["item_id"]
    )
    return json_response(item_object(item))


@routes.delete("/v1/conversations/{id}/items/{item_id}")
async def delete_item(request: web.Request) -> web.Response:
    record = await request.app[CONVERSATION_SERVICE].delete_item(
        _key(request), request.match_info["id"], request.match_info["item_id"]
    )
    return json_response(conversation_object(record))
