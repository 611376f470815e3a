"""The client API: the /v1 routes.

Handlers parse and validate, call one service method and shape the answer.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from aiohttp import web

from .. import jsoncodec
from ..config import Settings
from ..errors import FieldError, InvalidField, InvalidJSON, NotFound
from ..records import ApiKey, ChatSession, is_storable
from . import events
from .appkeys import API_KEY, CONVERSATIONS, SETTINGS, STORE
from .jsonhttp import json_response

MAX_PAGE = 200
DEFAULT_PAGE = 50
MAX_IDEMPOTENCY_KEY = 255
MAX_POSITION = 2**63 - 1  # the largest row position either store holds (a 64-bit integer)

routes = web.RouteTableDef()


# -- input -------------------------------------------------------------------------------


async def read_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object, or InvalidJSON. Oversized bodies raise 413 in read()."""
    raw = await request.read()
    try:
        body = jsoncodec.loads(raw)  # JSON travels as UTF-8 (RFC 8259)
    except (ValueError, RecursionError):  # ValueError covers bad UTF-8 and bad JSON
        raise InvalidJSON("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidJSON("the body must be a JSON object")
    return body


class Fields:
    """Collects every field error of one request, so a client sees them all at once."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.errors: list[FieldError] = []

    def fail(self, field: str, message: str) -> None:
        self.errors.append(FieldError(field, message))

    def text(self, field: str, max_chars: int, *, required: bool) -> str | None:
        value = self.body.get(field)
        if value is None:
            if required:
                self.fail(field, "is required")
            return None
        if not isinstance(value, str):
            self.fail(field, "must be a string")
            return None
        if required and not value.strip():
            self.fail(field, "must not be blank")
            return None
        if len(value) > max_chars:
            self.fail(field, f"must be at most {max_chars} characters")
            return None
        if "\x00" in value:
            self.fail(field, "must not contain NUL characters")
            return None
        if not is_storable(value):
            self.fail(field, "must be valid Unicode (no lone surrogates)")
            return None
        return value

    def max_tokens(self, settings: Settings) -> int | None:
        value = self.body.get("max_tokens")
        if value is None:
            return None
        limits = settings.upstream_max_tokens
        if not isinstance(value, int) or isinstance(value, bool) or value not in limits:
            self.fail("max_tokens", f"must be an integer from {limits.low} to {limits.high}")
            return None
        return value

    def check(self) -> None:
        if self.errors:
            raise InvalidField(self.errors)


def page_limit(request: web.Request) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return DEFAULT_PAGE
    # The length check comes first: int() refuses strings of thousands of digits.
    if (
        not raw.isascii()
        or not raw.isdigit()
        or len(raw.lstrip("0")) > 3
        or not 1 <= int(raw) <= MAX_PAGE
    ):
        raise InvalidField([FieldError("limit", f"must be an integer from 1 to {MAX_PAGE}")])
    return int(raw)


def encode_cursor(kind: str, position: int) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{position}".encode()).decode().rstrip("=")


def decode_cursor(request: web.Request, kind: str) -> int | None:
    raw = request.query.get("cursor")
    if raw is None or raw == "":
        return None
    try:
        text = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode("ascii")
        prefix, _, position = text.partition(":")
        # The length check keeps int() away from absurd digit strings.
        if (
            prefix != kind
            or not position.isdigit()
            or len(position) > 19
            or int(position) > MAX_POSITION
        ):
            raise ValueError
        return int(position)
    except (ValueError, binascii.Error):
        raise InvalidField([FieldError("cursor", "is not a cursor this list gave out")]) from None


def api_key(request: web.Request) -> ApiKey:
    return request[API_KEY]


async def owned_session(request: web.Request) -> ChatSession:
    session = await request.app[STORE].get_session(api_key(request).id, request.match_info["id"])
    if session is None:
        raise NotFound("no such session")
    return session


# -- handlers ----------------------------------------------------------------------------


@routes.post("/v1/sessions")
async def create_session(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    fields = Fields(await read_object(request))
    scenario = fields.text("scenario", settings.max_scenario_chars, required=True)
    title = fields.text("title", settings.max_title_chars, required=False)
    max_tokens = fields.max_tokens(settings)
    fields.check()
    assert scenario is not None
    session = await request.app[STORE].create_session(
        api_key(request).id,
        title,
        scenario,
        max_tokens if max_tokens is not None else settings.session_max_tokens_default,
    )
    return json_response(
        session.public(), status=201, headers={"Location": f"/v1/sessions/{session.id}"}
    )


@routes.get("/v1/sessions")
async def list_sessions(request: web.Request) -> web.Response:
    limit = page_limit(request)
    before = decode_cursor(request, "s")
    # One row more than asked tells whether another page exists.
    sessions = await request.app[STORE].list_sessions(api_key(request).id, limit + 1, before)
    next_cursor = encode_cursor("s", sessions[limit - 1].pk) if len(sessions) > limit else None
    return json_response(
        {"sessions": [s.public() for s in sessions[:limit]], "next_cursor": next_cursor}
    )


@routes.get("/v1/sessions/{id}")
async def get_session(request: web.Request) -> web.Response:
    return json_response((await owned_session(request)).public())


@routes.delete("/v1/sessions/{id}")
async def delete_session(request: web.Request) -> web.Response:
    session = await owned_session(request)
    if not await request.app[STORE].delete_session(api_key(request).id, session.id):
        raise NotFound("no such session")
    await request.app[CONVERSATIONS].deleted(session)
    return web.Response(status=204)


@routes.post("/v1/sessions/{id}/messages")
async def post_message(request: web.Request) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    idempotency_key = request.headers.get("Idempotency-Key")
    fields = Fields(await read_object(request))
    content = fields.text("content", settings.max_content_chars, required=True)
    max_tokens = fields.max_tokens(settings)
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= MAX_IDEMPOTENCY_KEY:
        fields.fail("Idempotency-Key", f"must be 1 to {MAX_IDEMPOTENCY_KEY} characters")
    elif idempotency_key is not None and not is_storable(idempotency_key):
        fields.fail("Idempotency-Key", "must be UTF-8 text")
    fields.check()
    assert content is not None
    service = request.app[CONVERSATIONS]
    if events.wants_stream(request):
        # Anything refused before the question is stored raises here, and so
        # keeps its plain problem+json answer; after that the answer streams.
        turn = await service.begin(
            api_key(request), request.match_info["id"], content, max_tokens, idempotency_key,
            follow_running=True,
        )
        return await events.stream(request, turn.events, keepalive=settings.sse_keepalive)
    if idempotency_key is None:
        # Nobody else waits on this turn: it runs in this handler's task (the
        # server never cancels a handler whose client leaves).
        result = await service.answer_here(
            api_key(request), request.match_info["id"], content, max_tokens
        )
    else:
        result = await service.send(
            api_key(request), request.match_info["id"], content, max_tokens, idempotency_key
        )
    return json_response(result.public())


def last_event_id(request: web.Request) -> int:
    raw = request.headers.get("Last-Event-ID", "").strip()
    if not raw:
        return 0
    if not raw.isascii() or not raw.isdigit() or len(raw) > 9:
        raise InvalidField([FieldError("Last-Event-ID", "must be a delta id this stream gave")])
    return int(raw)


@routes.get("/v1/sessions/{id}/messages/{message_id}/events")
async def turn_events(request: web.Request) -> web.StreamResponse:
    after = last_event_id(request)
    turn = await request.app[CONVERSATIONS].follow(
        api_key(request), request.match_info["id"], request.match_info["message_id"]
    )
    return await events.stream(
        request, turn, after_delta=after, keepalive=request.app[SETTINGS].sse_keepalive
    )


@routes.get("/v1/sessions/{id}/messages")
async def list_messages(request: web.Request) -> web.Response:
    limit = page_limit(request)
    after = decode_cursor(request, "m")
    session = await owned_session(request)
    messages = await request.app[STORE].list_messages(session.pk, limit + 1, after)
    next_cursor = encode_cursor("m", messages[limit - 1].seq) if len(messages) > limit else None
    return json_response(
        {"messages": [m.public() for m in messages[:limit]], "next_cursor": next_cursor}
    )
