"""Records shown as OpenAI's objects: response, conversation, item, list, deleted, model.

Every field the official SDK's types mark required is present, and OpenAI's
own defaults fill the fields the bridge has no use for (``tools: []``,
``tool_choice: "auto"``, ``parallel_tool_calls: true``, a plain-text
``text.format``), so a client that reads them finds what OpenAI would send.

Where the bridge differs, on purpose:

- ``temperature`` and ``top_p`` are what the request asked, or null when it
  asked nothing: the AI server's own default then applies, and the bridge
  does not know it.
- ``usage.input_tokens_details.cache_write_tokens`` is 0: AI servers do not
  report what they wrote to their cache.
- A failed response's ``error.code`` is one of the codes the SDK's type
  allows (``server_error``, ``rate_limit_exceeded``, ``invalid_prompt``);
  the bridge's own code maps onto them (:func:`response_error_code`).
- An empty list's ``first_id`` and ``last_id`` are ``""``: the SDK's list
  types call them strings, and its paginators read an empty one as "no more".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ...responses.records import (
    ConversationRecord,
    Item,
    ItemStatus,
    Page,
    ResponseError,
    ResponseRecord,
    ResponseStatus,
    ResponseUsage,
)

# The bridge's error codes as the code of a failed response. The SDK's type
# allows only OpenAI's own list; what a client should do next is what matters:
# wait and retry (rate), change the request (prompt), or try later (server).
_RATE_CODES = frozenset({"session_busy", "overloaded"})
_PROMPT_CODES = frozenset(
    {"context_length_exceeded", "invalid_field", "invalid_json", "too_large", "unsupported"}
)


def response_error_code(code: str) -> str:
    """The code a failed response shows for the bridge's error ``code``."""
    if code in _RATE_CODES:
        return "rate_limit_exceeded"
    if code in _PROMPT_CODES:
        return "invalid_prompt"
    return "server_error"


# -- parts and items --------------------------------------------------------------------


def output_text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def input_text_part(text: str) -> dict[str, Any]:
    return {"type": "input_text", "text": text}


def output_message(message_id: str, text: str | None, status: ItemStatus) -> dict[str, Any]:
    """The assistant's message of a response; ``text`` None for one just opened (no part yet)."""
    return {
        "type": "message",
        "id": message_id,
        "status": status,
        "role": "assistant",
        "content": [] if text is None else [output_text_part(text)],
    }


def item_object(item: Item) -> dict[str, Any]:
    """A message item of a conversation or of a response's input.

    An assistant's parts are ``output_text``, everyone else's ``input_text``,
    as OpenAI shows them, whichever the client sent.
    """
    part = output_text_part if item.role == "assistant" else input_text_part
    return {
        "type": "message",
        "id": item.id,
        "status": item.status,
        "role": item.role,
        "content": [part(text) for text in item.texts],
    }


# -- the response -----------------------------------------------------------------------


def usage_object(usage: ResponseUsage) -> dict[str, Any]:
    return {
        "input_tokens": usage.input_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": usage.output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
    }


def error_object(error: ResponseError) -> dict[str, Any]:
    return {"code": response_error_code(error.code), "message": error.message}


def message_status(status: ResponseStatus) -> ItemStatus:
    """The status of a response's message while the response has ``status``."""
    if status == "completed":
        return "completed"
    if status in ("queued", "in_progress"):
        return "in_progress"
    return "incomplete"


def has_message(response: ResponseRecord) -> bool:
    """Whether the response's output holds its message.

    A completed response always does; any other only once a piece of its
    reply exists, as a stream opens the message with the first piece.
    """
    return response.status == "completed" or response.output_text != ""


def output_items(response: ResponseRecord) -> list[dict[str, Any]]:
    if not has_message(response):
        return []
    return [
        output_message(
            response.output_message_id, response.output_text, message_status(response.status)
        )
    ]


def response_object(response: ResponseRecord) -> dict[str, Any]:
    """The response as ``GET /v1/responses/{id}`` shows it now."""
    return _response_object(
        response,
        status=response.status,
        output=output_items(response),
        usage=None if response.usage is None else usage_object(response.usage),
        error=None if response.error is None else error_object(response.error),
        incomplete_details=(
            None
            if response.status != "incomplete"
            else {"reason": response.incomplete_reason or "max_output_tokens"}
        ),
        completed_at=response.completed_at if response.status == "completed" else None,
    )


def response_snapshot(response: ResponseRecord, status: ResponseStatus) -> dict[str, Any]:
    """The response as it was before any output: the object of the opening stream events.

    Only what a response is created with shows here, so a stream rebuilt from
    the record of an ended response opens exactly as the live one did.
    """
    return _response_object(
        response,
        status=status,
        output=[],
        usage=None,
        error=None,
        incomplete_details=None,
        completed_at=None,
    )


def _response_object(
    response: ResponseRecord,
    *,
    status: ResponseStatus,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
    error: dict[str, Any] | None,
    incomplete_details: dict[str, Any] | None,
    completed_at: int | None,
) -> dict[str, Any]:
    # OpenAI's field order, so a reader comparing the two finds each field where it looks.
    return {
        "id": response.id,
        "object": "response",
        "created_at": response.created_at,
        "status": status,
        "background": response.background,
        "completed_at": completed_at,
        "conversation": (
            None if response.conversation_id is None else {"id": response.conversation_id}
        ),
        "error": error,
        "incomplete_details": incomplete_details,
        "instructions": response.instructions,
        "max_output_tokens": response.max_output_tokens,
        "max_tool_calls": None,
        "model": response.model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": response.previous_response_id,
        "prompt_cache_key": response.prompt_cache_key,
        "prompt_cache_retention": None,
        "reasoning": {"effort": None, "summary": None},
        "safety_identifier": None,
        "service_tier": "default",
        "store": response.store,
        "temperature": response.temperature,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_logprobs": 0,
        "top_p": response.top_p,
        "truncation": response.truncation,
        "usage": usage,
        "user": None,
        "metadata": dict(response.metadata),
    }


def response_deleted(response_id: str) -> dict[str, Any]:
    return {"id": response_id, "object": "response.deleted", "deleted": True}


# -- conversations, lists, models -------------------------------------------------------


def conversation_object(conversation: ConversationRecord) -> dict[str, Any]:
    return {
        "id": conversation.id,
        "object": "conversation",
        "created_at": conversation.created_at,
        "metadata": dict(conversation.metadata),
    }


def conversation_deleted(conversation_id: str) -> dict[str, Any]:
    return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}


def list_object(data: list[dict[str, Any]], *, has_more: bool) -> dict[str, Any]:
    """OpenAI's list: ``data`` with the first and last ids and whether more follow."""
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else "",
        "last_id": data[-1]["id"] if data else "",
        "has_more": has_more,
    }


def item_list(page: Page) -> dict[str, Any]:
    """A page of items (a conversation's, or a response's input) as OpenAI's list."""
    return list_object([item_object(item) for item in page.items], has_more=page.has_more)


def items_added(items: Iterable[Item]) -> dict[str, Any]:
    """The answer to ``POST /v1/conversations/{id}/items``: the added items, in order."""
    return list_object([item_object(item) for item in items], has_more=False)


def model_object(model_id: str, *, created: int, owned_by: str = "sessionbridge") -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}


def model_list(models: Mapping[str, int], *, owned_by: str = "sessionbridge") -> dict[str, Any]:
    """``GET /v1/models``: each model id with the unix time it was first served."""
    return {
        "object": "list",
        "data": [
            model_object(model_id, created=created, owned_by=owned_by)
            for model_id, created in models.items()
        ],
    }
