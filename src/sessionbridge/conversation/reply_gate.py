"""The gate between a reply's pieces and the turn's events: nothing blank goes out.

A blank reply is retried and must never reach a client, so leading blank
pieces wait here until the reply holds a non-blank character; text that
cannot be stored (a lone surrogate) or a reply over the limit fails the turn
as an upstream error.
"""

from __future__ import annotations

from ..errors import UpstreamError
from ..turn_events import TurnEvents


class ReplyGate:
    def __init__(self, events: TurnEvents, limit_bytes: int) -> None:
        self._events = events
        self._limit = limit_bytes
        self._held: list[str] = []
        self._size = 0
        self.sent: list[str] = []

    async def push(self, piece: str) -> None:
        if not piece:
            return
        try:
            self._size += len(piece.encode("utf-8"))
        except UnicodeEncodeError:
            raise UpstreamError(
                "the AI server sent text that cannot be stored (lone surrogate)"
            ) from None
        if self._size > self._limit:
            raise UpstreamError(f"the AI server's reply is over the limit of {self._limit} bytes")
        if not self.sent and not piece.strip() and not any(p.strip() for p in self._held):
            self._held.append(piece)
            return
        self._held.append(piece)
        for held in self._held:
            self._events.delta(held)
            self.sent.append(held)
        self._held.clear()

    def withdraw(self) -> bool:
        """Take back every piece sent so far if no client was handed one; True if taken back."""
        if not self._events.withdraw_deltas():
            return False
        self.sent.clear()
        self.discard()
        return True

    def discard(self) -> None:
        """Forget a blank attempt's pieces (none was sent)."""
        self._held.clear()
        self._size = 0

    def finish(self, text: str) -> str | None:
        """Send what the adapter returned beyond the pieces; the pieces' ends, if several."""
        streamed = "".join(self.sent)
        if not text.startswith(streamed):
            # The adapter's text and its pieces disagree: the pieces went out,
            # so they are what is stored.
            text = streamed
        rest = text[len(streamed):]
        if rest:
            self._events.delta(rest)
            self.sent.append(rest)
        if len(self.sent) < 2:
            return None
        ends, position = [], 0
        for piece in self.sent:
            position += len(piece)
            ends.append(str(position))
        return ",".join(ends)

    @property
    def text(self) -> str:
        return "".join(self.sent)
