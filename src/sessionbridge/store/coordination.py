"""How bridges sharing one database agree on turns (docs/storage.md, several bridges).

A turn takes its place in its session's line on arrival (``turn_lease``) and
waits for its turn (``take``); a turn running here offers its events, so a
bridge that follows it elsewhere can read them (``relay_turn`` /
``relayed_events``). A database served by one process needs none of it:
:class:`LocalCoordination` does nothing, and the bridge's own session locks
are the whole story.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from ..records import ChatSession
from ..turn_events import TurnEvent, TurnEvents


class TurnLease(Protocol):
    """A turn's hold on its session, among every bridge on the database."""

    async def take(self) -> ChatSession | None:
        """Wait until this turn holds its session; the session row as it is now.

        None where there is nothing to hand over (one process on the
        database: the bridge's own lock is the only one, and its cached row
        is right), or when the session is gone.
        """
        ...


class Coordination(Protocol):
    def turn_lease(self, session_pk: int) -> AbstractAsyncContextManager[TurnLease]:
        """A place in the session's line, taken now (on arrival); ``take()`` waits for the turn.

        Leaving the context gives the session up (or the place, if not taken).
        """
        ...

    def relay_turn(self, question_pk: int, events: TurnEvents) -> None:
        """A turn runs here: a bridge that follows it may have its events."""
        ...

    def end_relay(self, question_pk: int) -> None:
        """The turn has ended here (what is being relayed goes on to its end)."""
        ...

    async def relayed_events(self, question_pk: int, after: int) -> list[TurnEvent]:
        """Events after the first ``after`` of a turn running on another bridge, as far as known."""
        ...

    def on_cancel(self, cancel_here: Callable[[int], bool]) -> None:
        """How this bridge cuts off a turn running here, by its question's pk."""
        ...

    async def request_cancel(self, question_pk: int) -> None:
        """Ask whichever bridge runs the turn to cut it off."""
        ...


class _OneProcessLease:
    """One bridge on the database: its own session lock is the whole lease.

    The same object serves every turn as the lease and as its context manager
    (a plain class: a generator-based one costs a turn far more, for nothing).
    """

    async def take(self) -> ChatSession | None:
        return None

    async def __aenter__(self) -> _OneProcessLease:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None


_ONE_PROCESS_LEASE = _OneProcessLease()


class LocalCoordination:
    """One process on the database: nothing to agree on with anyone."""

    def turn_lease(self, session_pk: int) -> _OneProcessLease:
        return _ONE_PROCESS_LEASE

    def relay_turn(self, question_pk: int, events: TurnEvents) -> None:
        return None

    def end_relay(self, question_pk: int) -> None:
        return None

    async def relayed_events(self, question_pk: int, after: int) -> list[TurnEvent]:
        return []

    def on_cancel(self, cancel_here: Callable[[int], bool]) -> None:
        return None

    async def request_cancel(self, question_pk: int) -> None:
        return None
