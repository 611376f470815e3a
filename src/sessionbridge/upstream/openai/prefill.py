"""Going on with a reply another server began: what is sent, and what comes back after the start.

The start of the reply (the pieces a client already has) is sent as the
last, unfinished assistant message; llama.cpp's server prefills its reply
with it, and its answer repeats it in front of what it generated (streamed
as the first piece). What is passed on, and returned, is only what follows
the start, whether the server repeats it or not.
"""

from __future__ import annotations

from ..base import DeltaSink


def with_start(messages: list[dict[str, str]], start: str) -> list[dict[str, str]]:
    """The messages of a turn whose reply goes on from ``start``."""
    return [*messages, {"role": "assistant", "content": start}] if start else messages


def after_start(text: str, start: str) -> str:
    """The answer without the start it repeats (as it is when it does not)."""
    return text[len(start) :] if start and text.startswith(start) else text


class AfterStart:
    """A delta sink that passes on only what follows a repeated start."""

    def __init__(self, start: str, on_delta: DeltaSink | None) -> None:
        self._start = start
        self._on_delta = on_delta
        self._pending = ""
        self._decided = not start

    async def __call__(self, piece: str) -> None:
        if self._decided:
            await self._pass(piece)
            return
        self._pending += piece
        if self._pending.startswith(self._start):
            self._decided = True
            await self._pass(self._pending[len(self._start) :])
        elif not self._start.startswith(self._pending):
            self._decided = True  # not repeated: all of it is new
            await self._pass(self._pending)

    async def _pass(self, piece: str) -> None:
        if piece and self._on_delta is not None:
            await self._on_delta(piece)
