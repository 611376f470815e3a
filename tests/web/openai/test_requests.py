"""Request bodies and queries of the OpenAI face: what is accepted, and what each refusal names."""

from __future__ import annotations

from typing import Any

import pytest

from sessionbridge.errors import BridgeError, InvalidField, InvalidJSON, Unsupported
from sessionbridge.responses.records import InputMessage, PageRequest, RetrieveRequest
from sessionbridge.web.openai.requests import (
    RequestLimits,
    parse_conversation_create,
    parse_conversation_update,
    parse_items_create,
    parse_page_request,
    parse_response_request,
    parse_retrieve_request,
)


def refusal(error: BridgeError) -> tuple[str, str | None]:
    """The code and the field a refusal names."""
    if isinstance(error, InvalidField):
        return error.code, error.errors[0].field
    return error.code, getattr(error, "param", None)


# -- POST /v1/responses: accepted -------------------------------------------------------


def test_a_string_input_is_one_user_message_and_the_defaults_are_openai_s() -> None:
    request = parse_response_request({"model": "any", "input": "Hello"})

    assert request.input == (InputMessage(role="user", texts=("Hello",)),)
    assert request.model == "any"
    assert request.store is True and request.stream is False and request.background is False
    assert request.truncation == "disabled"
    assert request.metadata == {}
    assert request.instructions is None and request.previous_response_id is None
    assert request.conversation_id is None and request.max_output_tokens is None
    assert request.temperature is None and request.top_p is None
    assert request.prompt_cache_key is None


def test_a_list_input_keeps_roles_and_parts_in_order() -> None:
    request = parse_response_request(
        {
            "input": [
                {"role": "developer", "content": "Be brief."},
                {
                    "type": "message",
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "Hello "},
                        {"type": "input_text", "text": "there"},
                    ],
                },
                {
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "Hi!"}],
                    "id": "msg_x",
                    "status": "completed",
                },
                {"role": "system", "content": "Answer in English."},
            ]
        }
    )

    assert request.input == (
        InputMessage("developer", ("Be brief.",)),
        InputMessage("user", ("Hello ", "there")),
        InputMessage("assistant", ("Hi!",)),
        InputMessage("system", ("Answer in English.",)),
    )
    assert request.input[1].text == "Hello there"


def test_every_honoured_field_is_read() -> None:
    request = parse_response_request(
        {
            "model": "gemma",
            "input": "Hi",
            "instructions": "Be brief.",
            "previous_response_id": "resp_1",
            "store": True,
            "stream": True,
            "background": True,
            "max_output_tokens": 64,
            "temperature": 0.5,
            "top_p": 1,
            "truncation": "auto",
            "metadata": {"k": "v"},
            "prompt_cache_key": "chain-1",
        }
    )

    assert request.instructions == "Be brief."
    assert request.previous_response_id == "resp_1"
    assert request.stream is True and request.background is True
    assert request.max_output_tokens == 64
    assert request.temperature == 0.5 and request.top_p == 1.0
    assert request.truncation == "auto"
    assert request.metadata == {"k": "v"}
    assert request.prompt_cache_key == "chain-1"


@pytest.mark.parametrize("conversation", ["conv_1", {"id": "conv_1"}])
def test_a_conversation_is_an_id_or_an_object_with_one(conversation: Any) -> None:
    assert parse_response_request(
        {"input": "Hi", "conversation": conversation}
    ).conversation_id == ("conv_1")


def test_a_conversation_may_leave_the_question_to_its_items() -> None:
    request = parse_response_request({"conversation": "conv_1"})

    assert request.input == () and request.conversation_id == "conv_1"


def test_unknown_fields_and_null_optionals_are_ignored() -> None:
    request = parse_response_request(
        {
            "input": "Hi",
            "reasoning": {"effort": "low"},
            "include": ["message.output_text.logprobs"],
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "parallel_tool_calls": True,
            "user": "u1",
            "tools": [],
            "store": None,
            "metadata": None,
            "truncation": None,
            "instructions": None,
        }
    )

    assert request.store is True and request.metadata == {} and request.truncation == "disabled"


def test_metadata_at_openai_s_limits_is_accepted() -> None:
    metadata = {f"{i:0>64}": "v" * 512 for i in range(16)}

    assert parse_response_request({"input": "Hi", "metadata": metadata}).metadata == metadata


def test_the_output_token_range_comes_from_the_limits() -> None:
    limits = RequestLimits(min_output_tokens=10, max_output_tokens=500)

    assert (
        parse_response_request({"input": "Hi", "max_output_tokens": 500}, limits).max_output_tokens
        == 500
    )
    with pytest.raises(InvalidField) as raised:
        parse_response_request({"input": "Hi", "max_output_tokens": 501}, limits)
    assert "from 10 to 500" in raised.value.detail


# -- POST /v1/responses: refused --------------------------------------------------------

REFUSED: list[tuple[str, Any, str, str]] = [
    # (what, body, code, param)
    ("no input", {"model": "m"}, "invalid_field", "input"),
    ("input a number", {"input": 3}, "invalid_field", "input"),
    ("blank input", {"input": "  "}, "invalid_field", "input"),
    ("input item not an object", {"input": ["hi"]}, "invalid_field", "input[0]"),
    (
        "unknown role",
        {"input": [{"role": "tool", "content": "x"}]},
        "invalid_field",
        "input[0].role",
    ),
    ("no role", {"input": [{"content": "x"}]}, "invalid_field", "input[0].role"),
    (
        "role not a string",
        {"input": [{"role": ["user"], "content": "x"}]},
        "invalid_field",
        "input[0].role",
    ),
    ("no content", {"input": [{"role": "user"}]}, "invalid_field", "input[0].content"),
    (
        "content a number",
        {"input": [{"role": "user", "content": "x"}, {"role": "user", "content": 1}]},
        "invalid_field",
        "input[1].content",
    ),
    (
        "blank content",
        {"input": [{"role": "user", "content": [{"type": "input_text", "text": " "}]}]},
        "invalid_field",
        "input[0].content",
    ),
    (
        "part not an object",
        {"input": [{"role": "user", "content": ["x"]}]},
        "invalid_field",
        "input[0].content[0]",
    ),
    (
        "part without type",
        {"input": [{"role": "user", "content": [{"text": "x"}]}]},
        "invalid_field",
        "input[0].content[0].type",
    ),
    (
        "part without text",
        {"input": [{"role": "user", "content": [{"type": "input_text"}]}]},
        "invalid_field",
        "input[0].content[0].text",
    ),
    (
        "part text a number",
        {"input": [{"role": "user", "content": [{"type": "input_text", "text": 1}]}]},
        "invalid_field",
        "input[0].content[0].text",
    ),
    (
        "item type not a string",
        {"input": [{"type": 1, "role": "user", "content": "x"}]},
        "invalid_field",
        "input[0].type",
    ),
    (
        "image part",
        {
            "input": [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "look"},
                        {"type": "input_image", "image_url": "https://example.com/a.png"},
                    ],
                }
            ]
        },
        "unsupported",
        "input[0].content[1].type",
    ),
    (
        "refusal part",
        {"input": [{"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]}]},
        "unsupported",
        "input[0].content[0].type",
    ),
    (
        "function call item",
        {
            "input": [
                {"role": "user", "content": "x"},
                {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
            ]
        },
        "unsupported",
        "input[1].type",
    ),
    (
        "function call output item",
        {"input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]},
        "unsupported",
        "input[0].type",
    ),
    ("tools", {"input": "x", "tools": [{"type": "function", "name": "f"}]}, "unsupported", "tools"),
    ("tools not a list", {"input": "x", "tools": "all"}, "invalid_field", "tools"),
    (
        "both conversation and chain",
        {"input": "x", "conversation": "conv_1", "previous_response_id": "resp_1"},
        "invalid_field",
        "conversation",
    ),
    ("conversation a number", {"input": "x", "conversation": 5}, "invalid_field", "conversation"),
    (
        "conversation object without id",
        {"input": "x", "conversation": {}},
        "invalid_field",
        "conversation.id",
    ),
    ("empty conversation id", {"input": "x", "conversation": ""}, "invalid_field", "conversation"),
    (
        "previous id a number",
        {"input": "x", "previous_response_id": 7},
        "invalid_field",
        "previous_response_id",
    ),
    (
        "background without store",
        {"input": "x", "background": True, "store": False},
        "invalid_field",
        "background",
    ),
    ("store a string", {"input": "x", "store": "yes"}, "invalid_field", "store"),
    ("stream a number", {"input": "x", "stream": 1}, "invalid_field", "stream"),
    (
        "max_output_tokens zero",
        {"input": "x", "max_output_tokens": 0},
        "invalid_field",
        "max_output_tokens",
    ),
    (
        "max_output_tokens a float",
        {"input": "x", "max_output_tokens": 16.5},
        "invalid_field",
        "max_output_tokens",
    ),
    (
        "max_output_tokens true",
        {"input": "x", "max_output_tokens": True},
        "invalid_field",
        "max_output_tokens",
    ),
    ("temperature above 2", {"input": "x", "temperature": 2.5}, "invalid_field", "temperature"),
    ("temperature a string", {"input": "x", "temperature": "hot"}, "invalid_field", "temperature"),
    (
        "temperature NaN",
        {"input": "x", "temperature": float("nan")},
        "invalid_field",
        "temperature",
    ),
    ("top_p above 1", {"input": "x", "top_p": 1.5}, "invalid_field", "top_p"),
    ("truncation unknown", {"input": "x", "truncation": "middle"}, "invalid_field", "truncation"),
    ("metadata a list", {"input": "x", "metadata": ["a"]}, "invalid_field", "metadata"),
    (
        "metadata too many pairs",
        {"input": "x", "metadata": {str(i): "v" for i in range(17)}},
        "invalid_field",
        "metadata",
    ),
    (
        "metadata key too long",
        {"input": "x", "metadata": {"k" * 65: "v"}},
        "invalid_field",
        "metadata",
    ),
    (
        "metadata value too long",
        {"input": "x", "metadata": {"k": "v" * 513}},
        "invalid_field",
        "metadata.k",
    ),
    (
        "metadata value a number",
        {"input": "x", "metadata": {"k": 1}},
        "invalid_field",
        "metadata.k",
    ),
    ("model a number", {"input": "x", "model": 4}, "invalid_field", "model"),
    ("instructions a list", {"input": "x", "instructions": ["a"]}, "invalid_field", "instructions"),
    ("NUL in input", {"input": "a\x00b"}, "invalid_field", "input"),
    (
        "lone surrogate in a part",
        {"input": [{"role": "user", "content": [{"type": "input_text", "text": "a\ud800"}]}]},
        "invalid_field",
        "input[0].content[0].text",
    ),
    (
        "prompt_cache_key a number",
        {"input": "x", "prompt_cache_key": 1},
        "invalid_field",
        "prompt_cache_key",
    ),
]


@pytest.mark.parametrize(
    ("body", "code", "param"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED]
)
def test_a_refused_body_names_its_field(body: Any, code: str, param: str) -> None:
    with pytest.raises(BridgeError) as raised:
        parse_response_request(body)

    assert refusal(raised.value) == (code, param)


def test_a_message_longer_than_the_limit_is_refused_on_its_content() -> None:
    limits = RequestLimits(max_text_chars=10)
    body = {
        "input": [
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "x" * 6},
                    {"type": "input_text", "text": "x" * 6},
                ],
            }
        ]
    }

    with pytest.raises(InvalidField) as raised:
        parse_response_request(body, limits)

    assert refusal(raised.value) == ("invalid_field", "input[0].content")


@pytest.mark.parametrize("body", [[], "text", None, 3])
def test_a_body_that_is_not_an_object_is_invalid_json(body: Any) -> None:
    with pytest.raises(InvalidJSON):
        parse_response_request(body)


def test_unsupported_keeps_its_field_when_rebuilt_from_its_code() -> None:
    # A stored failure is told again through error_from_code, which knows only code and text.
    from sessionbridge.errors import error_from_code

    error = error_from_code("unsupported", "tools are not supported")

    assert isinstance(error, Unsupported) and error.status == 400 and error.param is None


# -- conversations ----------------------------------------------------------------------


def test_a_conversation_may_be_created_empty_or_with_items_and_metadata() -> None:
    assert parse_conversation_create({}).items == ()
    created = parse_conversation_create(
        {"items": [{"type": "message", "role": "user", "content": "Hello"}], "metadata": {"a": "b"}}
    )
    assert created.items == (InputMessage("user", ("Hello",)),)
    assert created.metadata == {"a": "b"}


def test_at_most_twenty_items_are_added_at_once() -> None:
    items = [{"role": "user", "content": "x"}] * 21

    with pytest.raises(InvalidField) as raised:
        parse_conversation_create({"items": items})
    assert refusal(raised.value) == ("invalid_field", "items")
    assert len(parse_conversation_create({"items": items[:20]}).items) == 20


def test_conversation_items_name_their_field_as_items() -> None:
    with pytest.raises(Unsupported) as raised:
        parse_conversation_create({"items": [{"type": "reasoning", "summary": []}]})

    assert refusal(raised.value) == ("unsupported", "items[0].type")


def test_a_conversation_update_replaces_its_metadata() -> None:
    assert parse_conversation_update({"metadata": {"x": "y"}}).metadata == {"x": "y"}
    assert parse_conversation_update({"metadata": None}).metadata == {}
    with pytest.raises(InvalidField) as raised:
        parse_conversation_update({})
    assert refusal(raised.value) == ("invalid_field", "metadata")


def test_items_create_needs_one_to_twenty_message_items() -> None:
    added = parse_items_create({"items": [{"role": "assistant", "content": "Sure."}]})

    assert added.items == (InputMessage("assistant", ("Sure.",)),)
    for body, param in (
        ({}, "items"),
        ({"items": []}, "items"),
        ({"items": "x"}, "items"),
        ({"items": [{"role": "user", "content": 2}]}, "items[0].content"),
    ):
        with pytest.raises(InvalidField) as raised:
            parse_items_create(body)
        assert refusal(raised.value) == ("invalid_field", param)


# -- queries ----------------------------------------------------------------------------


def test_a_list_query_defaults_to_twenty_newest_first() -> None:
    assert parse_page_request({}) == PageRequest(limit=20, order="desc", after=None)
    assert parse_page_request({"limit": "100", "order": "asc", "after": "msg_1"}) == PageRequest(
        limit=100, order="asc", after="msg_1"
    )
    assert parse_page_request({"after": ""}).after is None


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "101"}, "limit"),
        ({"limit": "-1"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "1" * 5000}, "limit"),
        ({"limit": "٣"}, "limit"),  # a digit to str.isdigit(), not to a client
        ({"order": "newest"}, "order"),
        ({"after": "a\x00"}, "after"),
    ],
)
def test_a_bad_list_query_names_its_parameter(query: dict[str, str], param: str) -> None:
    with pytest.raises(InvalidField) as raised:
        parse_page_request(query)

    assert refusal(raised.value) == ("invalid_field", param)


def test_a_retrieve_query_reads_stream_and_starting_after() -> None:
    assert parse_retrieve_request({}) == RetrieveRequest(stream=False, starting_after=None)
    assert parse_retrieve_request({"stream": "true", "starting_after": "7"}) == RetrieveRequest(
        stream=True, starting_after=7
    )
    assert parse_retrieve_request({"stream": "False"}).stream is False
    for query, param in (
        ({"stream": "yes"}, "stream"),
        ({"starting_after": "-1"}, "starting_after"),
        ({"starting_after": "x"}, "starting_after"),
        ({"starting_after": "9" * 40}, "starting_after"),
    ):
        with pytest.raises(InvalidField) as raised:
            parse_retrieve_request(query)
        assert refusal(raised.value) == ("invalid_field", param)
