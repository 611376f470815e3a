"""Request bodies and queries of the OpenAI face, checked and turned into records.

Each parser takes what the client sent (a decoded JSON body, or a query
mapping) and returns a record of :mod:`sessionbridge.responses.records`, or
raises: :class:`~sessionbridge.errors.InvalidField` naming the offending
field OpenAI's way (``input[1].content[0].text``), or
:class:`~sessionbridge.errors.Unsupported` for a field or item type
the bridge does not serve. The first problem found is the one reported, as
OpenAI's error object has room for one ``param``.

Fields the bridge does not know are ignored, as OpenAI's SDKs send more
than any one server serves; only those whose meaning would be silently lost
(``tools``, non-text items and parts) are refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from ...errors import FieldError, InvalidField, InvalidJSON, Unsupported
from ...records import is_storable
from ...responses.records import (
    MAX_METADATA_KEY_CHARS,
    MAX_METADATA_PAIRS,
    MAX_METADATA_VALUE_CHARS,
    ConversationCreate,
    ConversationUpdate,
    InputMessage,
    ItemsCreate,
    Order,
    PageRequest,
    ResponseRequest,
    RetrieveRequest,
    Role,
    Truncation,
)

ROLES: tuple[Role, ...] = ("user", "assistant", "system", "developer")
_ROLE_BY_NAME: dict[str, Role] = {role: role for role in ROLES}
TEXT_PART_TYPES = ("input_text", "output_text")
MAX_CONVERSATION_ITEMS = 20  # OpenAI's limit on items added in one request
MAX_PAGE = 100
DEFAULT_PAGE = 20


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Sizes a request may have; the service's settings decide them, these are the defaults.

    ``max_text_chars`` bounds each message (its parts joined), as the sessions
    API bounds a message's ``content``.
    """

    max_text_chars: int = 16_000
    max_instructions_chars: int = 16_000
    max_id_chars: int = 255
    max_model_chars: int = 255
    max_prompt_cache_key_chars: int = 255
    min_output_tokens: int = 1
    max_output_tokens: int | None = None


DEFAULT_LIMITS = RequestLimits()


def _invalid(param: str, message: str) -> NoReturn:
    raise InvalidField([FieldError(param, message)])


def _body_object(body: Any) -> Mapping[str, Any]:
    # A handler that decoded the body already refused what is not JSON; what
    # is JSON but not an object is refused here, as the sessions API does.
    if not isinstance(body, Mapping):
        raise InvalidJSON("the body must be a JSON object")
    return body


# -- scalar fields ----------------------------------------------------------------------


def _text(value: object, param: str, max_chars: int | None, *, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        _invalid(param, "must be a string")
    if not allow_empty and not value:
        _invalid(param, "must not be empty")
    if max_chars is not None and len(value) > max_chars:
        _invalid(param, f"must be at most {max_chars} characters")
    # NUL cannot be stored in PostgreSQL text; lone surrogates are not UTF-8.
    if "\x00" in value:
        _invalid(param, "must not contain NUL characters")
    if not is_storable(value):
        _invalid(param, "must be valid Unicode (no lone surrogates)")
    return value


def _optional_text(body: Mapping[str, Any], name: str, max_chars: int) -> str | None:
    value = body.get(name)
    return None if value is None else _text(value, name, max_chars)


def _optional_id(body: Mapping[str, Any], name: str, limits: RequestLimits) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    return _text(value, name, limits.max_id_chars, allow_empty=False)


def _flag(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        _invalid(name, "must be a boolean")
    return value


def _number(body: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    # bool is an int to Python, never a number to a client.
    if isinstance(value, bool) or not isinstance(value, int | float):
        _invalid(name, "must be a number")
    if not math.isfinite(value) or not low <= value <= high:
        _invalid(name, f"must be a number from {low:g} to {high:g}")
    return float(value)


def _output_tokens(body: Mapping[str, Any], limits: RequestLimits) -> int | None:
    value = body.get("max_output_tokens")
    if value is None:
        return None
    high = limits.max_output_tokens
    wanted = (
        f"an integer of at least {limits.min_output_tokens}"
        if high is None
        else f"an integer from {limits.min_output_tokens} to {high}"
    )
    if isinstance(value, bool) or not isinstance(value, int):
        _invalid("max_output_tokens", f"must be {wanted}")
    if value < limits.min_output_tokens or (high is not None and value > high):
        _invalid("max_output_tokens", f"must be {wanted}")
    return value


def _truncation(body: Mapping[str, Any]) -> Truncation:
    value = body.get("truncation")
    if value is None or value == "disabled":
        return "disabled"
    if value == "auto":
        return "auto"
    _invalid("truncation", "must be 'disabled' or 'auto'")


def parse_metadata(value: object, param: str = "metadata") -> dict[str, str]:
    """OpenAI's metadata: at most 16 pairs, keys to 64 characters, string values to 512."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        _invalid(param, "must be an object of string values")
    if len(value) > MAX_METADATA_PAIRS:
        _invalid(param, f"must have at most {MAX_METADATA_PAIRS} pairs")
    metadata: dict[str, str] = {}
    for key, pair_value in value.items():
        _text(key, param, MAX_METADATA_KEY_CHARS, allow_empty=False)
        metadata[key] = _text(pair_value, f"{param}.{key}", MAX_METADATA_VALUE_CHARS)
    return metadata


# -- message items ----------------------------------------------------------------------


def _content_texts(content: object, param: str) -> tuple[str, ...]:
    if isinstance(content, str):
        return (_text(content, param, None),)  # bounded per message, as parts are
    if not isinstance(content, list):
        _invalid(param, "must be a string or a list of content parts")
    texts: list[str] = []
    for index, part in enumerate(content):
        part_param = f"{param}[{index}]"
        if not isinstance(part, Mapping):
            _invalid(part_param, "must be an object")
        kind = part.get("type")
        if not isinstance(kind, str):
            _invalid(f"{part_param}.type", "is required")
        if kind not in TEXT_PART_TYPES:
            raise Unsupported(
                f"content parts of type {kind!r} are not supported: only text",
                param=f"{part_param}.type",
            )
        text = part.get("text")
        if text is None:
            _invalid(f"{part_param}.text", "is required")
        texts.append(_text(text, f"{part_param}.text", None))  # bounded per message
    return tuple(texts)


def parse_message(value: object, param: str, limits: RequestLimits) -> InputMessage:
    """One message item, ``{"type"?: "message", "role", "content"}``; its other fields ignored."""
    if not isinstance(value, Mapping):
        _invalid(param, "must be a message object")
    kind = value.get("type", "message")
    if not isinstance(kind, str):
        _invalid(f"{param}.type", "must be a string")
    if kind != "message":
        raise Unsupported(
            f"items of type {kind!r} are not supported: only messages", param=f"{param}.type"
        )
    raw_role = value.get("role")
    role = _ROLE_BY_NAME.get(raw_role) if isinstance(raw_role, str) else None
    if role is None:
        _invalid(f"{param}.role", "must be one of " + ", ".join(ROLES))
    if "content" not in value:
        _invalid(f"{param}.content", "is required")
    texts = _content_texts(value["content"], f"{param}.content")
    joined = "".join(texts)
    if len(joined) > limits.max_text_chars:
        _invalid(f"{param}.content", f"must be at most {limits.max_text_chars} characters")
    if not joined.strip():
        _invalid(f"{param}.content", "must not be blank")
    return InputMessage(role=role, texts=texts)


def parse_messages(
    value: object, param: str, limits: RequestLimits, *, max_items: int | None = None
) -> tuple[InputMessage, ...]:
    """A list of message items (``param`` names the list: ``input``, ``items``)."""
    if not isinstance(value, list):
        _invalid(param, "must be a list of message items")
    if max_items is not None and len(value) > max_items:
        _invalid(param, f"must have at most {max_items} items")
    return tuple(
        parse_message(item, f"{param}[{index}]", limits) for index, item in enumerate(value)
    )


def _input(body: Mapping[str, Any], limits: RequestLimits) -> tuple[InputMessage, ...]:
    value = body.get("input")
    if value is None:
        return ()
    if isinstance(value, str):
        text = _text(value, "input", limits.max_text_chars)
        if not text.strip():
            _invalid("input", "must not be blank")
        return (InputMessage(role="user", texts=(text,)),)
    if not isinstance(value, list):
        _invalid("input", "must be a string or a list of message items")
    return parse_messages(value, "input", limits)


def _conversation_id(body: Mapping[str, Any], limits: RequestLimits) -> str | None:
    value = body.get("conversation")
    if value is None:
        return None
    if isinstance(value, Mapping):
        if value.get("id") is None:
            _invalid("conversation.id", "is required")
        return _text(value["id"], "conversation.id", limits.max_id_chars, allow_empty=False)
    if not isinstance(value, str):
        _invalid("conversation", 'must be a conversation id or {"id": ...}')
    return _text(value, "conversation", limits.max_id_chars, allow_empty=False)


def _refuse_tools(body: Mapping[str, Any]) -> None:
    tools = body.get("tools")
    if tools is None or tools == []:
        return
    if not isinstance(tools, list):
        _invalid("tools", "must be a list")
    raise Unsupported("tools are not supported: this server answers with text only", param="tools")


# -- bodies -----------------------------------------------------------------------------


def parse_response_request(body: Any, limits: RequestLimits = DEFAULT_LIMITS) -> ResponseRequest:
    """A ``POST /v1/responses`` body."""
    fields = _body_object(body)
    model = _optional_text(fields, "model", limits.max_model_chars)
    messages = _input(fields, limits)
    instructions = _optional_text(fields, "instructions", limits.max_instructions_chars)
    previous_response_id = _optional_id(fields, "previous_response_id", limits)
    conversation_id = _conversation_id(fields, limits)
    if conversation_id is not None and previous_response_id is not None:
        _invalid("conversation", "cannot be given together with previous_response_id")
    # Without a conversation there is nothing to answer but the input.
    if not messages and conversation_id is None:
        _invalid("input", "is required")
    store = _flag(fields, "store", True)
    background = _flag(fields, "background", False)
    if background and not store:
        _invalid("background", "needs store: a background response is kept to be retrieved")
    _refuse_tools(fields)
    return ResponseRequest(
        input=messages,
        model=model,
        instructions=instructions,
        previous_response_id=previous_response_id,
        conversation_id=conversation_id,
        store=store,
        stream=_flag(fields, "stream", False),
        background=background,
        max_output_tokens=_output_tokens(fields, limits),
        temperature=_number(fields, "temperature", 0.0, 2.0),
        top_p=_number(fields, "top_p", 0.0, 1.0),
        truncation=_truncation(fields),
        metadata=parse_metadata(fields.get("metadata")),
        prompt_cache_key=_optional_text(
            fields, "prompt_cache_key", limits.max_prompt_cache_key_chars
        ),
    )


def parse_conversation_create(
    body: Any, limits: RequestLimits = DEFAULT_LIMITS
) -> ConversationCreate:
    """A ``POST /v1/conversations`` body (``items`` at most 20, ``metadata``); may be ``{}``."""
    fields = _body_object(body)
    items = fields.get("items")
    return ConversationCreate(
        items=()
        if items is None
        else parse_messages(items, "items", limits, max_items=MAX_CONVERSATION_ITEMS),
        metadata=parse_metadata(fields.get("metadata")),
    )


def parse_conversation_update(body: Any) -> ConversationUpdate:
    """A ``POST /v1/conversations/{id}`` body: ``metadata`` replaces the old (null clears it)."""
    fields = _body_object(body)
    if "metadata" not in fields:
        _invalid("metadata", "is required")
    return ConversationUpdate(metadata=parse_metadata(fields["metadata"]))


def parse_items_create(body: Any, limits: RequestLimits = DEFAULT_LIMITS) -> ItemsCreate:
    """A ``POST /v1/conversations/{id}/items`` body: ``{"items": [...]}``, 1 to 20 items."""
    fields = _body_object(body)
    if fields.get("items") is None:
        _invalid("items", "is required")
    items = parse_messages(fields["items"], "items", limits, max_items=MAX_CONVERSATION_ITEMS)
    if not items:
        _invalid("items", "must have at least one item")
    return ItemsCreate(items=items)


# -- queries ----------------------------------------------------------------------------


def _small_int(raw: str, param: str, low: int, high: int) -> int:
    # The length check comes first: int() refuses strings of thousands of digits slowly.
    if (
        not raw.isascii()
        or not raw.isdigit()
        or len(raw.lstrip("0")) > len(str(high))
        or not low <= int(raw) <= high
    ):
        _invalid(param, f"must be an integer from {low} to {high}")
    return int(raw)


def parse_page_request(
    query: Mapping[str, str], limits: RequestLimits = DEFAULT_LIMITS
) -> PageRequest:
    """The query of a list (``after``, ``limit`` 1..100 default 20, ``order`` default desc)."""
    raw_limit = query.get("limit")
    limit = DEFAULT_PAGE if raw_limit is None else _small_int(raw_limit, "limit", 1, MAX_PAGE)
    raw_order = query.get("order", "desc")
    if raw_order not in ("asc", "desc"):
        _invalid("order", "must be 'asc' or 'desc'")
    order: Order = "asc" if raw_order == "asc" else "desc"
    after = query.get("after") or None
    if after is not None:
        after = _text(after, "after", limits.max_id_chars)
    return PageRequest(limit=limit, order=order, after=after)


def _query_flag(query: Mapping[str, str], name: str) -> bool:
    raw = query.get(name)
    if raw is None or raw.lower() == "false":
        return False
    if raw.lower() == "true":
        return True
    _invalid(name, "must be true or false")


# A stream has fewer events than this by far: each delta is at least one character.
MAX_SEQUENCE_NUMBER = 10**9 - 1


def parse_retrieve_request(query: Mapping[str, str]) -> RetrieveRequest:
    """The query of ``GET /v1/responses/{id}``: ``stream`` and ``starting_after``."""
    stream = _query_flag(query, "stream")
    raw_after = query.get("starting_after")
    starting_after = (
        None
        if raw_after is None or raw_after == ""
        else _small_int(raw_after, "starting_after", 0, MAX_SEQUENCE_NUMBER)
    )
    return RetrieveRequest(stream=stream, starting_after=starting_after)
