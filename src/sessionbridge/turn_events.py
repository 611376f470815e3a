"""The events of one turn, as a client following it sees them (docs/streaming.md), free of HTTP.

A running turn appends to its :class:`TurnEvents`; any number of readers
follow it, each at its own pace, from the start or after a given delta. The
turn never waits for a reader: an append is a list append and one wake-up of
whoever is waiting. What a running turn keeps is bounded by the reply limit
(the deltas are the reply), and the log is let go once the turn has ended
and its answer is stored: a later reader is served from the database
(:func:`stored_events`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from .errors import BridgeError
from .records import Message

STARTED = "turn.started"
DELTA = "reply.delta"
COMPLETED = "turn.completed"
FAILED = "turn.failed"
ENDINGS = (COMPLETED, FAILED)


class TurnEvent:
    """One event: its name, its data, and for a delta its number (1, 2, 3 ...) in the turn.

    The data of the start and end events may be given as a function that
    builds it: most turns are never followed, and building their message
    objects for nobody was a noticeable share of a turn.
    """

    __slots__ = ("_data", "_render", "id", "name")

    def __init__(
        self,
        name: str,
        data: dict[str, Any] | None = None,
        id: int | None = None,
        render: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.name = name
        self.id = id
        self._data = data
        self._render = render

    @property
    def data(self) -> dict[str, Any]:
        if self._data is None:
            self._data = self._render() if self._render is not None else {}
            self._render = None
        return self._data

    def __repr__(self) -> str:
        return f"TurnEvent({self.name!r}, id={self.id!r})"


# Looks for the rest of a turn that runs elsewhere; True when something was added.
Poller = Callable[["TurnEvents"], Awaitable[bool]]
POLL_INTERVAL = 0.25


class TurnEvents:
    """The event log of one turn; readers follow it while it grows.

    A log of a turn that runs in another process (or whose end is not known
    here yet) has a ``poller`` that looks for the rest while a reader waits.
    """

    def __init__(self, poller: Poller | None = None) -> None:
        self._events: list[TurnEvent] = []
        self._deltas = 0
        # A reader was handed a delta: the reply's pieces so far are out.
        self._deltas_read = False
        self._grown: asyncio.Future[None] | None = None
        self._poller = poller

    def __len__(self) -> int:
        return len(self._events)

    def since(self, position: int) -> list[TurnEvent]:
        if self._deltas:
            self._deltas_read = True
        return self._events[position:]

    def withdraw_deltas(self) -> bool:
        """Take the reply's pieces back out of the log if no reader was handed one.

        True when the log holds no delta any more (the reply may start
        afresh, on another AI server); False when a reader may have one.
        """
        if self._deltas_read:
            return False
        if self._deltas:
            self._events = [event for event in self._events if event.name != DELTA]
            self._deltas = 0
        return True

    async def wait_beyond(self, position: int, timeout: float) -> bool:
        """Wait until the log holds more than ``position`` events; False after ``timeout``."""
        if len(self._events) > position:
            return True
        if self._poller is not None:
            deadline = asyncio.get_running_loop().time() + timeout
            while len(self._events) <= position:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    return False
                await asyncio.sleep(min(POLL_INTERVAL, remaining))
                await self._poller(self)
            return True
        if self._grown is None:
            self._grown = asyncio.get_running_loop().create_future()
        try:
            # Shielded: a reader that gives up must not cancel the others' wake-up.
            await asyncio.wait_for(asyncio.shield(self._grown), timeout)
        except TimeoutError:
            return False
        return True

    def extend(self, events: list[TurnEvent]) -> None:
        """Append events told by another log (the stored end of a turn run elsewhere)."""
        for event in events:
            if event.name == DELTA:
                self._deltas += 1
                event = TurnEvent(DELTA, event.data, self._deltas)
            self._append(event)

    @property
    def ended(self) -> bool:
        return bool(self._events) and self._events[-1].name in ENDINGS

    def _append(self, event: TurnEvent) -> None:
        if self.ended:
            return  # exactly one end event, whatever happens afterwards
        self._events.append(event)
        grown, self._grown = self._grown, None
        if grown is not None and not grown.done():
            grown.set_result(None)

    def started(self, user_message: Message) -> None:
        self._append(TurnEvent(STARTED, render=lambda: {"user_message": user_message.public()}))

    def delta(self, text: str) -> None:
        self._deltas += 1
        self._append(TurnEvent(DELTA, {"text": text}, self._deltas))

    def completed(self, result: dict[str, Any] | Callable[[], dict[str, Any]]) -> None:
        """The end of an answered turn: its body, or a function that builds it."""
        if callable(result):
            self._append(TurnEvent(COMPLETED, render=result))
        else:
            self._append(TurnEvent(COMPLETED, result))

    def failed(self, error: BridgeError) -> None:
        # The error's description; each face writes it in its own shape.
        self._append(TurnEvent(FAILED, error.describe()))

    async def follow(self, after_delta: int = 0) -> AsyncIterator[TurnEvent]:
        """Every event from the start (deltas after ``after_delta``), then live ones, to the end."""
        position = 0
        while True:
            for event in self.since(position):
                position += 1
                if event.id is not None and event.id <= after_delta:
                    continue
                yield event
                if event.name in ENDINGS:
                    return
            await self.wait_beyond(position, 3600.0)


def split_pieces(text: str, piece_ends: str | None) -> list[str]:
    """A stored reply cut where its streamed pieces ended (one piece when not streamed)."""
    if not piece_ends:
        return [text] if text else []
    pieces: list[str] = []
    start = 0
    for raw_end in piece_ends.split(","):
        end = int(raw_end)
        pieces.append(text[start:end])
        start = end
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def stored_events(
    question: Message, answer: Message | None, result: dict[str, Any] | None, error: BridgeError
) -> TurnEvents:
    """The events of a turn that has ended, rebuilt from the database.

    ``result`` is the turn's completed body when it was answered; ``error``
    describes the failure otherwise.
    """
    events = TurnEvents()
    events.started(question)
    if answer is not None and result is not None:
        for piece in split_pieces(answer.content, answer.piece_ends):
            events.delta(piece)
        events.completed(result)
    else:
        events.failed(error)
    return events
