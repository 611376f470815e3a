"""A response's stages as OpenAI's Responses stream events, numbered 0, 1, 2 ...

One builder, :class:`ResponseEvents`, turns the stages of a response into
events: it opens (``response.created``), starts running
(``response.in_progress``), gets each piece of its reply, and ends. A live
stream feeds it as the stages happen; :func:`events_for` feeds it the stages
of a stored response in one go. Both go through the same code, and every
event is built only from what the response record holds once it has ended
(or from what it was created with), so a stream rebuilt from the database
has the same events, the same numbers and the same deltas as the live one,
and a client that resumes with ``starting_after=N`` gets exactly the events
after N (:func:`events_after`).

The order is OpenAI's::

    response.created                 the object, queued (background) or in_progress
    response.in_progress
    response.output_item.added       with the first piece: the message, no content yet
    response.content_part.added      an empty output_text part
    response.output_text.delta       one per piece
    response.output_text.done        at the end, when the message was opened:
    response.content_part.done         the whole text
    response.output_item.done          the message, completed or incomplete
    response.completed | response.incomplete | response.failed

A cancelled response ends with ``response.failed`` carrying the object in
status ``cancelled``: OpenAI's stream has no event of its own for it, and of
the ending events the SDK knows, ``response.failed`` is the one that tells a
client the response did not finish (the SDK's ``get_final_response()``
raises on it, as it should; on ``response.completed`` it would hand the
partial reply over as final).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ...responses.records import ResponseRecord, ResponseStatus
from .objects import (
    has_message,
    message_status,
    output_message,
    output_text_part,
    response_object,
    response_snapshot,
)

OUTPUT_INDEX = 0  # the message is the response's only output item
CONTENT_INDEX = 0  # and its text the message's only part

ENDING_EVENTS = {
    "completed": "response.completed",
    "incomplete": "response.incomplete",
    "failed": "response.failed",
    "cancelled": "response.failed",
}

Event = dict[str, Any]


class ResponseEvents:
    """Numbers the events of one response as its stages come (not safe to share across tasks).

    ``response`` is the record the response was created with; only what
    does not change while it runs is read from it (its id, model, request
    fields, the message id), so a later copy of the record serves alike.
    """

    def __init__(self, response: ResponseRecord) -> None:
        self._response = response
        self._next = 0
        self._in_progress = False
        self._message_open = False
        self._pieces: list[str] = []
        self._ended = False

    @property
    def next_sequence_number(self) -> int:
        return self._next

    @property
    def ended(self) -> bool:
        return self._ended

    def created(self) -> list[Event]:
        """The first event: the object as created, ``queued`` when it runs in the background."""
        if self._next != 0:
            raise RuntimeError("the response has opened already")
        status: ResponseStatus = "queued" if self._response.background else "in_progress"
        return [self._event("response.created", response=response_snapshot(self._response, status))]

    def in_progress(self) -> list[Event]:
        """The response has begun to run (at once unless it waited in the background queue)."""
        self._check_open()
        if self._in_progress:
            return []
        self._in_progress = True
        return [
            self._event(
                "response.in_progress", response=response_snapshot(self._response, "in_progress")
            )
        ]

    def delta(self, piece: str) -> list[Event]:
        """One piece of the reply; the first opens the message."""
        self._check_open()
        if not piece:
            return []  # an empty delta tells a client nothing and a replay would not have it
        events = self.in_progress() + self._open_message()
        self._pieces.append(piece)
        events.append(
            self._event(
                "response.output_text.delta",
                item_id=self._response.output_message_id,
                output_index=OUTPUT_INDEX,
                content_index=CONTENT_INDEX,
                delta=piece,
                logprobs=[],
            )
        )
        return events

    def end(self, response: ResponseRecord) -> list[Event]:
        """The response has ended: ``response`` is its final record.

        The message (when one was opened, or for a completed response, which
        always has one) is closed with the record's text, which must be the
        pieces joined; then comes the ending event with the final object.
        """
        self._check_open()
        if not response.ended:
            raise ValueError(f"response {response.id} has not ended (status {response.status})")
        if response.id != self._response.id:
            raise ValueError("the final record is of another response")
        # A response that failed or was cancelled after some pieces went out
        # keeps them as its text; otherwise its replay would differ from its stream.
        if (self._pieces or has_message(response)) and response.output_text != "".join(
            self._pieces
        ):
            raise ValueError("the stored text is not the pieces streamed, joined")
        events = self.in_progress()
        if has_message(response):
            events += self._open_message() + self._close_message(response)
        self._ended = True
        events.append(
            self._event(ENDING_EVENTS[response.status], response=response_object(response))
        )
        return events

    # -- the message ---------------------------------------------------------------------

    def _open_message(self) -> list[Event]:
        if self._message_open:
            return []
        self._message_open = True
        message_id = self._response.output_message_id
        return [
            self._event(
                "response.output_item.added",
                output_index=OUTPUT_INDEX,
                item=output_message(message_id, None, "in_progress"),
            ),
            self._event(
                "response.content_part.added",
                item_id=message_id,
                output_index=OUTPUT_INDEX,
                content_index=CONTENT_INDEX,
                part=output_text_part(""),
            ),
        ]

    def _close_message(self, response: ResponseRecord) -> list[Event]:
        message_id = self._response.output_message_id
        text = response.output_text
        return [
            self._event(
                "response.output_text.done",
                item_id=message_id,
                output_index=OUTPUT_INDEX,
                content_index=CONTENT_INDEX,
                text=text,
                logprobs=[],
            ),
            self._event(
                "response.content_part.done",
                item_id=message_id,
                output_index=OUTPUT_INDEX,
                content_index=CONTENT_INDEX,
                part=output_text_part(text),
            ),
            self._event(
                "response.output_item.done",
                output_index=OUTPUT_INDEX,
                item=output_message(message_id, text, message_status(response.status)),
            ),
        ]

    def _check_open(self) -> None:
        if self._next == 0:
            raise RuntimeError("the response has not opened: created() comes first")
        if self._ended:
            raise RuntimeError("the response has ended")

    def _event(self, kind: str, **fields: Any) -> Event:
        event: Event = {"type": kind, "sequence_number": self._next, **fields}
        self._next += 1
        return event


def events_for(response: ResponseRecord, pieces: Iterable[str] | None = None) -> list[Event]:
    """Every event of ``response`` so far, from its record and the pieces of its reply.

    ``pieces`` are the deltas as they were streamed; None for a response
    whose reply was never split (it was answered whole): its text is then
    one piece. A running response's events stop after its last piece; an
    ended one's include its end.
    """
    builder = ResponseEvents(response)
    events = builder.created()
    if response.status != "queued":
        events += builder.in_progress()
    if pieces is None:
        pieces = [response.output_text] if response.output_text else []
    for piece in pieces:
        events += builder.delta(piece)
    if response.ended:
        events += builder.end(response)
    return events


def events_after(events: Iterable[Event], starting_after: int | None) -> list[Event]:
    """The events a client resuming after ``starting_after`` is owed (all of them for None)."""
    if starting_after is None:
        return list(events)
    return [event for event in events if event["sequence_number"] > starting_after]
