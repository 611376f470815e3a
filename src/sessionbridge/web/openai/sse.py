"""Responses stream events as Server-Sent Events: ``event: <type>`` and one ``data:`` line.

OpenAI's stream names each event by its ``type`` and sends no ``id:`` lines:
a client resumes by ``sequence_number`` (``starting_after``), not by
``Last-Event-ID``. Writing the stream (keep-alives, a reader that goes away)
is the handler's business; this module only encodes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ... import jsoncodec

EVENT_STREAM = "text/event-stream"
KEEPALIVE = b": keep-alive\n\n"


def encode_event(event: dict[str, Any]) -> bytes:
    """One event; its ``type`` is the SSE event name."""
    # JSON has no raw line breaks, so one data line holds the whole object.
    return b"event: " + str(event["type"]).encode() + b"\ndata: " + jsoncodec.dumps(event) + b"\n\n"


def encode_events(events: Iterable[dict[str, Any]]) -> bytes:
    return b"".join(encode_event(event) for event in events)
