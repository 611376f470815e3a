"""Every object the OpenAI face shows validates against the official SDK's own types."""

from __future__ import annotations

from typing import Any

import pytest
from openai.types import Model
from openai.types.conversations import (
    Conversation,
    ConversationDeletedResource,
    ConversationItem,
    ConversationItemList,
)
from openai.types.responses import Response, ResponseItem, ResponseItemList

from sessionbridge import jsoncodec
from sessionbridge.responses.records import Item, Page, ResponseError
from sessionbridge.responses.service import unix_seconds
from sessionbridge.web.openai import objects

from . import factories
from .sdk import problems, validate

STATUSES = ["queued", "in_progress", "completed", "incomplete", "failed", "cancelled"]


def wire(obj: dict[str, Any]) -> Any:
    """``obj`` as a client receives it: through the bridge's JSON encoder and back."""
    return jsoncodec.loads(jsoncodec.dumps(obj))


def record_in(status: str) -> Any:
    start = factories.response(background=status == "queued")
    if status in ("queued", "in_progress"):
        return factories.response(status=status)
    return factories.ended(start, status, "Hi there" if status != "failed" else "Hi")


@pytest.mark.parametrize("status", STATUSES)
def test_response_object_validates_in_every_status(status: str) -> None:
    response = validate(Response, wire(objects.response_object(record_in(status))))

    assert response.status == status
    assert response.object == "response"
    assert response.id == "resp_0001"


def test_a_completed_response_reads_as_openai_shows_it() -> None:
    record = factories.ended(factories.response(), "completed", "Hi there")

    body = wire(objects.response_object(record))
    response = validate(Response, body)

    assert response.output_text == "Hi there"
    message = response.output[0]
    assert message.type == "message"
    assert message.id == "msg_out_0001"
    assert message.status == "completed"
    assert message.content[0].type == "output_text"
    assert message.content[0].annotations == []
    assert response.usage is not None
    assert response.usage.input_tokens == 12
    assert response.usage.input_tokens_details.cached_tokens == 4
    assert response.usage.input_tokens_details.cache_write_tokens == 0
    assert response.usage.output_tokens_details.reasoning_tokens == 0
    assert response.usage.total_tokens == 15
    assert response.completed_at == record.completed_at
    assert response.error is None and response.incomplete_details is None
    # OpenAI's defaults for what the bridge has no use for.
    assert response.tools == [] and response.tool_choice == "auto"
    assert response.parallel_tool_calls is True
    assert response.text is not None and response.text.format is not None
    assert response.text.format.type == "text"
    assert body["store"] is True and body["background"] is False
    assert body["truncation"] == "disabled"
    assert response.instructions == "Be brief."
    assert response.metadata == {"topic": "greeting"}


def test_request_fields_are_shown_as_asked() -> None:
    record = factories.response(
        previous_response_id="resp_0000",
        conversation_id=None,
        max_output_tokens=64,
        temperature=0.2,
        top_p=0.9,
        truncation="auto",
        prompt_cache_key="chain-7",
        store=False,
        background=False,
        model="any-model",
    )

    response = validate(Response, wire(objects.response_object(record)))

    assert response.previous_response_id == "resp_0000"
    assert response.max_output_tokens == 64
    assert response.temperature == 0.2 and response.top_p == 0.9
    assert response.truncation == "auto"
    assert response.prompt_cache_key == "chain-7"
    assert response.model == "any-model"
    assert response.conversation is None


def test_a_response_in_a_conversation_names_it() -> None:
    response = validate(
        Response, wire(objects.response_object(factories.response(conversation_id="conv_9")))
    )

    assert response.conversation is not None and response.conversation.id == "conv_9"


def test_unset_sampling_fields_are_null_not_openai_s_numbers() -> None:
    body = objects.response_object(factories.response())

    assert body["temperature"] is None and body["top_p"] is None


def test_an_incomplete_response_says_why_and_keeps_its_text() -> None:
    record = factories.ended(factories.response(max_output_tokens=16), "incomplete", "Hi th")

    response = validate(Response, wire(objects.response_object(record)))

    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == "Hi th"
    assert response.output[0].status == "incomplete"


@pytest.mark.parametrize(
    ("bridge_code", "shown"),
    [
        ("upstream_timeout", "server_error"),
        ("upstream_error", "server_error"),
        ("upstream_unavailable", "server_error"),
        ("storage_unavailable", "server_error"),
        ("session_busy", "rate_limit_exceeded"),
        ("overloaded", "rate_limit_exceeded"),
        ("context_length_exceeded", "invalid_prompt"),
        ("something_new", "server_error"),
    ],
)
def test_a_failed_response_shows_a_code_the_sdk_allows(bridge_code: str, shown: str) -> None:
    start = factories.response()
    record = factories.ended(
        start, "failed", error=ResponseError(code=bridge_code, message="it broke")
    )

    response = validate(Response, wire(objects.response_object(record)))

    assert response.error is not None
    assert response.error.code == shown
    assert response.error.message == "it broke"
    assert response.output == []  # nothing was streamed before it failed


def test_a_failed_or_cancelled_response_keeps_what_it_streamed_as_an_incomplete_message() -> None:
    for status in ("failed", "cancelled"):
        record = factories.ended(factories.response(), status, "Hal")

        response = validate(Response, wire(objects.response_object(record)))

        assert response.output_text == "Hal"
        assert response.output[0].status == "incomplete"


def test_a_running_response_has_no_usage_and_no_output_yet() -> None:
    response = validate(Response, wire(objects.response_object(factories.response())))

    assert response.usage is None
    assert response.output == []
    assert response.completed_at is None


def test_response_deleted_has_openai_s_shape() -> None:
    # The SDK's delete() returns None and has no type for this body: its shape is checked here.
    assert objects.response_deleted("resp_1") == {
        "id": "resp_1",
        "object": "response.deleted",
        "deleted": True,
    }


def test_conversation_objects_validate() -> None:
    conversation = validate(
        Conversation, wire(objects.conversation_object(factories.conversation()))
    )
    deleted = validate(ConversationDeletedResource, wire(objects.conversation_deleted("conv_0001")))

    assert conversation.id == "conv_0001" and conversation.created_at == factories.CREATED_AT
    assert conversation.metadata == {"project": "demo"}
    assert deleted.deleted is True and deleted.id == "conv_0001"


ITEMS = [
    Item(id="msg_a", role="user", texts=("Hello", " there")),
    Item(id="msg_b", role="assistant", texts=("Hi!",)),
    Item(id="msg_c", role="system", texts=("Be brief.",)),
    Item(id="msg_d", role="developer", texts=("Use English.",)),
]


@pytest.mark.parametrize("item", ITEMS, ids=lambda item: item.role)
def test_items_validate_as_conversation_and_response_items(item: Item) -> None:
    body = wire(objects.item_object(item))

    as_conversation_item = validate(ConversationItem, body)
    as_response_item = validate(ResponseItem, body)

    assert as_conversation_item.type == "message"
    assert as_response_item.id == item.id
    expected_part = "output_text" if item.role == "assistant" else "input_text"
    assert [part.type for part in as_conversation_item.content] == [expected_part] * len(item.texts)
    assert [part.text for part in as_conversation_item.content] == list(item.texts)


def test_item_lists_validate_and_name_their_ends() -> None:
    page = Page(items=tuple(ITEMS), has_more=True)

    as_conversation_items = validate(ConversationItemList, wire(objects.item_list(page)))
    as_response_items = validate(ResponseItemList, wire(objects.item_list(page)))

    assert as_conversation_items.first_id == "msg_a" and as_conversation_items.last_id == "msg_d"
    assert as_conversation_items.has_more is True
    assert [item.id for item in as_response_items.data] == ["msg_a", "msg_b", "msg_c", "msg_d"]


def test_an_empty_list_validates() -> None:
    empty = validate(ConversationItemList, wire(objects.item_list(Page(items=(), has_more=False))))

    assert empty.data == [] and empty.has_more is False


def test_items_added_is_a_list_of_the_items() -> None:
    added = validate(ConversationItemList, wire(objects.items_added(ITEMS[:2])))

    assert [item.id for item in added.data] == ["msg_a", "msg_b"]


def test_model_list_validates() -> None:
    body = wire(objects.model_list({"gemma-3-270m": factories.CREATED_AT}))

    assert body["object"] == "list"
    models = [validate(Model, model) for model in body["data"]]
    assert [(m.id, m.object, m.created, m.owned_by) for m in models] == [
        ("gemma-3-270m", "model", factories.CREATED_AT, "sessionbridge")
    ]


def test_the_strict_check_catches_a_missing_required_field() -> None:
    # The checker itself: without this, a lenient validator would pass anything.
    body = wire(objects.response_object(record_in("completed")))
    del body["output"][0]["content"][0]["annotations"]

    with pytest.raises(ValueError, match="annotations"):
        validate(Response, body)


def test_the_strict_check_catches_a_misspelt_optional_field() -> None:
    body = wire(objects.response_object(record_in("completed")))
    body["output"][0]["content"][0]["annotationz"] = []

    assert problems(Response.model_validate(body)) == [
        "$.output[0].content[0].annotationz: not a field of ResponseOutputText"
    ]


def test_a_stored_time_is_its_unix_second() -> None:
    assert unix_seconds("2026-12-03T06:09:18.123Z") == 1796278158
    assert unix_seconds("1970-01-01T00:00:00.000Z") == 0
