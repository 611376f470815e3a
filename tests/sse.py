"""A small Server-Sent Events reader for tests: events as the wire carries them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import ClientResponse


@dataclass
class Event:
    name: str
    data: Any
    id: int | None = None


@dataclass
class Stream:
    events: list[Event] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.events]

    @property
    def deltas(self) -> list[Event]:
        return [e for e in self.events if e.name == "reply.delta"]

    @property
    def text(self) -> str:
        return "".join(e.data["text"] for e in self.deltas)


def joined(*parts: Stream) -> Stream:
    """One stream read in parts (``read_events`` again on the same response goes on)."""
    return Stream(
        [e for part in parts for e in part.events], [c for part in parts for c in part.comments]
    )


async def read_events(
    response: ClientResponse,
    *,
    stop_after_deltas: int | None = None,
    stop_after_events: int | None = None,
) -> Stream:
    """Read events until the stream ends (or after so many deltas, or events of any kind)."""
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"].startswith("text/event-stream")
    stream = Stream()
    name, data, event_id = "message", "", None
    while True:
        raw = await response.content.readline()
        if not raw:
            return stream
        line = raw.decode("utf-8").rstrip("\n")
        if line.startswith(":"):
            stream.comments.append(line[1:].strip())
        elif line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("id: "):
            event_id = int(line[len("id: "):])
        elif line.startswith("data: "):
            data += line[len("data: "):]
        elif line == "":
            if data:
                stream.events.append(Event(name, json.loads(data), event_id))
                if stop_after_deltas is not None and len(stream.deltas) >= stop_after_deltas:
                    return stream
                if stop_after_events is not None and len(stream.events) >= stop_after_events:
                    return stream
            name, data, event_id = "message", "", None
