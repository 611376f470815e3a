"""A turn's events as Server-Sent Events (docs/streaming.md).

The stream is written with aiohttp's own ``StreamResponse``: the format is a
few lines per event, and what matters here (resuming after ``Last-Event-ID``,
keep-alive comments, a turn that outlives its reader) lives in the turn's
event log, not in the transport, so a helper library would add a dependency
and hide nothing worth hiding.

A reader that goes away only stops its own stream: the turn runs on, and its
events stay readable (live while it runs, from the database after).
"""

from __future__ import annotations

import logging

from aiohttp import web

from .. import jsoncodec
from ..turn_events import ENDINGS, FAILED, TurnEvent, TurnEvents
from .problems import problem_from

log = logging.getLogger(__name__)

EVENT_STREAM = "text/event-stream"
KEEPALIVE = b": keep-alive\n\n"


def wants_stream(request: web.Request) -> bool:
    """Whether the client asked for an event stream (``Accept: text/event-stream``)."""
    return any(
        part.split(";", 1)[0].strip().lower() == EVENT_STREAM
        for part in request.headers.get("Accept", "").split(",")
    )


def encode(event: TurnEvent) -> bytes:
    # JSON has no raw line breaks, so one data line holds the whole object.
    lines = [b"event: " + event.name.encode()]
    if event.id is not None:
        lines.append(b"id: " + str(event.id).encode())
    data = problem_from(event.data) if event.name == FAILED else event.data
    lines.append(b"data: " + jsoncodec.dumps(data))
    return b"\n".join(lines) + b"\n\n"


async def stream(
    request: web.Request, events: TurnEvents, *, after_delta: int = 0, keepalive: float = 15.0
) -> web.StreamResponse:
    """Write ``events`` (the deltas after ``after_delta``) as they come, to the turn's end."""
    response = web.StreamResponse(
        status=200,
        headers={
            "Content-Type": EVENT_STREAM + "; charset=utf-8",
            "Cache-Control": "no-cache",
            # A proxy that buffers would hold the pieces back until the end.
            "X-Accel-Buffering": "no",
        },
    )
    await response.prepare(request)
    position = 0
    try:
        while True:
            for event in events.since(position):
                position += 1
                if event.id is not None and event.id <= after_delta:
                    continue
                await response.write(encode(event))
                if event.name in ENDINGS:
                    await response.write_eof()
                    return response
            if not await events.wait_beyond(position, keepalive):
                await response.write(KEEPALIVE)
    except (ConnectionResetError, ConnectionError):
        # The reader went away; the turn goes on without it.
        log.info("event=stream_reader_gone path=%s", request.path)
    return response
