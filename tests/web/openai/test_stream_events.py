"""A response's stream events: the SDK's types, OpenAI's order, a replay equal to the live one."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from openai import omit
from openai.lib.streaming.responses import ResponseStreamState
from openai.types.responses import ResponseStreamEvent

from sessionbridge import jsoncodec
from sessionbridge.responses.records import ResponseRecord
from sessionbridge.web.openai.sse import encode_event, encode_events
from sessionbridge.web.openai.stream import ResponseEvents, events_after, events_for

from . import factories
from .sdk import validate

OPENING = ["response.created", "response.in_progress"]
MESSAGE_OPENED = ["response.output_item.added", "response.content_part.added"]
MESSAGE_CLOSED = [
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]

PIECES = ["Hel", "lo, ", "wor", "ld!"]


def live(
    start: ResponseRecord, pieces: list[str], end: ResponseRecord | None
) -> list[dict[str, Any]]:
    """The events as a live stream makes them, stage by stage."""
    builder = ResponseEvents(start)
    events = builder.created()
    if start.status != "queued":
        events += builder.in_progress()
    for piece in pieces:
        events += builder.delta(piece)
    if end is not None:
        events += builder.end(end)
    return events


def types(events: list[dict[str, Any]]) -> list[str]:
    return [event["type"] for event in events]


def deltas(events: list[dict[str, Any]]) -> list[str]:
    return [event["delta"] for event in events if event["type"] == "response.output_text.delta"]


def check_all(events: list[dict[str, Any]]) -> None:
    """Each event valid for the SDK, numbered 0, 1, 2 ... without a gap."""
    for event in events:
        validate(ResponseStreamEvent, jsoncodec.loads(jsoncodec.dumps(event)))
    assert [event["sequence_number"] for event in events] == list(range(len(events)))


SCENARIOS: dict[str, tuple[ResponseRecord, list[str], ResponseRecord]] = {}


def _scenarios() -> None:
    start = factories.response()
    SCENARIOS["completed"] = (start, PIECES, factories.ended(start, "completed", "".join(PIECES)))
    SCENARIOS["incomplete"] = (start, PIECES[:2], factories.ended(start, "incomplete", "Hello, "))
    SCENARIOS["failed mid-reply"] = (start, PIECES[:1], factories.ended(start, "failed", "Hel"))
    SCENARIOS["failed before a piece"] = (start, [], factories.ended(start, "failed"))
    SCENARIOS["cancelled mid-reply"] = (
        start,
        PIECES[:3],
        factories.ended(start, "cancelled", "Hello, wor"),
    )
    SCENARIOS["cancelled before a piece"] = (start, [], factories.ended(start, "cancelled"))
    queued = factories.response(status="queued", background=True)
    SCENARIOS["background completed"] = (
        queued,
        PIECES,
        factories.ended(queued, "completed", "".join(PIECES)),
    )
    SCENARIOS["background cancelled in the queue"] = (
        queued,
        [],
        factories.ended(queued, "cancelled"),
    )


_scenarios()


@pytest.mark.parametrize("name", SCENARIOS)
def test_every_event_validates_and_is_numbered_from_zero(name: str) -> None:
    start, pieces, end = SCENARIOS[name]

    check_all(live(start, pieces, end))


@pytest.mark.parametrize("name", SCENARIOS)
def test_a_replay_from_the_record_is_the_live_stream(name: str) -> None:
    start, pieces, end = SCENARIOS[name]

    assert events_for(end, pieces) == live(start, pieces, end)


@pytest.mark.parametrize("name", SCENARIOS)
def test_a_running_response_s_events_are_the_start_of_its_whole_stream(name: str) -> None:
    start, pieces, end = SCENARIOS[name]
    whole = events_for(end, pieces)

    for seen in range(len(pieces) + 1):
        so_far = events_for(
            dataclasses.replace(start, output_text="".join(pieces[:seen])), pieces[:seen]
        )
        assert so_far == whole[: len(so_far)]


def test_a_completed_stream_is_in_openai_s_order() -> None:
    _, pieces, end = SCENARIOS["completed"]

    events = events_for(end, pieces)

    assert types(events) == [
        *OPENING,
        *MESSAGE_OPENED,
        *["response.output_text.delta"] * 4,
        *MESSAGE_CLOSED,
        "response.completed",
    ]
    assert deltas(events) == PIECES
    assert events[-4]["text"] == "Hello, world!"
    assert events[-2]["item"]["status"] == "completed"
    assert events[-1]["response"]["status"] == "completed"
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "Hello, world!"


def test_the_opening_events_show_the_response_before_any_output() -> None:
    _, pieces, end = SCENARIOS["completed"]

    created, in_progress = events_for(end, pieces)[:2]

    for event, status in ((created, "in_progress"), (in_progress, "in_progress")):
        assert event["response"]["status"] == status
        assert event["response"]["output"] == []
        assert event["response"]["usage"] is None


def test_a_background_response_opens_queued() -> None:
    _, pieces, end = SCENARIOS["background completed"]

    events = events_for(end, pieces)

    assert events[0]["response"]["status"] == "queued"
    assert events[1]["type"] == "response.in_progress"


def test_a_queued_response_has_only_its_created_event_so_far() -> None:
    queued = factories.response(status="queued", background=True)

    assert types(events_for(queued, [])) == ["response.created"]


def test_each_delta_names_the_message_and_its_part() -> None:
    _, pieces, end = SCENARIOS["completed"]

    for event in events_for(end, pieces):
        if event["type"] == "response.output_text.delta":
            assert (event["item_id"], event["output_index"], event["content_index"]) == (
                "msg_out_0001",
                0,
                0,
            )
            assert event["logprobs"] == []


def test_an_incomplete_response_closes_its_message_as_incomplete() -> None:
    _, pieces, end = SCENARIOS["incomplete"]

    events = events_for(end, pieces)

    assert types(events)[-4:] == [*MESSAGE_CLOSED, "response.incomplete"]
    assert events[-2]["item"]["status"] == "incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def test_a_failure_after_some_pieces_closes_the_message_then_fails() -> None:
    _, pieces, end = SCENARIOS["failed mid-reply"]

    events = events_for(end, pieces)

    assert types(events)[-4:] == [*MESSAGE_CLOSED, "response.failed"]
    assert events[-1]["response"]["error"] == {
        "code": "server_error",
        "message": "the AI server did not answer",
    }
    assert events[-1]["response"]["output"][0]["status"] == "incomplete"


def test_a_failure_before_any_piece_opens_no_message() -> None:
    _, pieces, end = SCENARIOS["failed before a piece"]

    assert types(events_for(end, pieces)) == [*OPENING, "response.failed"]


def test_a_cancelled_response_ends_with_response_failed_in_status_cancelled() -> None:
    for name in (
        "cancelled mid-reply",
        "cancelled before a piece",
        "background cancelled in the queue",
    ):
        _, pieces, end = SCENARIOS[name]

        last = events_for(end, pieces)[-1]

        assert last["type"] == "response.failed"
        assert last["response"]["status"] == "cancelled"
        assert last["response"]["error"] is None


def test_a_response_answered_whole_replays_as_one_delta() -> None:
    end = factories.ended(factories.response(), "completed", "All at once.")

    events = events_for(end)

    check_all(events)
    assert deltas(events) == ["All at once."]


def test_a_completed_empty_reply_still_has_its_message() -> None:
    end = factories.ended(factories.response(), "completed", "")

    events = events_for(end, [])

    check_all(events)
    assert types(events) == [*OPENING, *MESSAGE_OPENED, *MESSAGE_CLOSED, "response.completed"]


def test_resuming_after_n_gives_exactly_the_events_after_n() -> None:
    _, pieces, end = SCENARIOS["completed"]
    whole = events_for(end, pieces)

    for n in range(-1, len(whole) + 1):
        rest = events_after(whole, n)
        assert [event["sequence_number"] for event in rest] == list(
            range(max(n + 1, 0), len(whole))
        )
    assert events_after(whole, None) == whole


def test_the_end_must_carry_the_text_that_was_streamed() -> None:
    builder = ResponseEvents(factories.response())
    builder.created()
    builder.delta("Hel")

    with pytest.raises(ValueError, match="streamed"):
        builder.end(factories.ended(factories.response(), "failed", ""))


def test_the_builder_refuses_stages_out_of_order() -> None:
    start = factories.response()
    builder = ResponseEvents(start)

    with pytest.raises(RuntimeError):
        builder.delta("x")
    builder.created()
    with pytest.raises(RuntimeError):
        builder.created()
    with pytest.raises(ValueError, match="not ended"):
        builder.end(start)
    builder.end(factories.ended(start, "completed", ""))
    with pytest.raises(RuntimeError):
        builder.delta("late")


def test_an_empty_piece_makes_no_event() -> None:
    builder = ResponseEvents(factories.response())
    builder.created()

    assert builder.delta("") == []
    assert builder.next_sequence_number == 1


def test_sse_names_each_event_by_its_type() -> None:
    _, pieces, end = SCENARIOS["completed"]
    events = events_for(end, pieces)

    frames = encode_events(events).decode().split("\n\n")

    assert frames[-1] == ""
    for frame, event in zip(frames[:-1], events, strict=True):
        name_line, data_line = frame.split("\n")
        assert name_line == f"event: {event['type']}"
        assert jsoncodec.loads(data_line.removeprefix("data: ").encode()) == event
    assert encode_event(events[0]).endswith(b"\n\n")


@pytest.mark.parametrize("name", SCENARIOS)
def test_the_sdk_s_own_accumulator_takes_every_stream(name: str) -> None:
    _, pieces, end = SCENARIOS[name]
    state: ResponseStreamState[Any] = ResponseStreamState(text_format=omit, input_tools=omit)
    adapter_events = [
        validate(ResponseStreamEvent, jsoncodec.loads(jsoncodec.dumps(event)))
        for event in events_for(end, pieces)
    ]

    for event in adapter_events:
        state.handle_event(event)

    final = state._completed_response
    if end.status == "completed":
        assert final is not None and final.output_text == "".join(pieces)
    else:
        assert final is None  # only response.completed makes a final response
