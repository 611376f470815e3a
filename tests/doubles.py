"""Test doubles and waits that go by events and observed state, never by the clock.

:class:`FakeAIServer`
    An in-process double of the bridge's ``AIServer`` interface, in the manner
    of httpx's ``MockTransport``: a handler decides every answer. It records
    each call and can hold turns inside the AI server (:meth:`~Gate.hold`,
    :meth:`~Gate.release`) while a test looks at what the bridge does
    meanwhile; :meth:`~Gate.wait_entered` says when a turn got there. The
    conversation rules are tested against it. It is not a subclass of any real
    adapter: what an adapter does is tested against the reference servers.

:class:`ServerGate`
    The same holding for an in-process aiohttp server (a reference AI server):
    requests to chosen paths, and the writes of their streamed answers, wait
    at the gate while it is held.

:class:`ManualClock`
    Stands in for the ``time`` and ``asyncio`` modules of one module under
    test, so that its timed waits are seen and stepped by the test.

:func:`wait_until`
    Polls observed state (a counter, a row, an HTTP answer) until it holds,
    with a deadline that only keeps a broken test from hanging.

Nothing here sleeps in the hope that something has happened meanwhile:
waits end on an event, or on what ``wait_until`` sees.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pytest
from aiohttp import web
from aiohttp.typedefs import Handler as WebHandler

from sessionbridge.records import ChatSession, HistoryTurn
from sessionbridge.upstream import DeltaSink, HealthReport, Reply, TurnContext

# What every wait here allows before it fails the test (it never paces one).
HANG_TIMEOUT = 10.0
# How often wait_until looks again at what it watches.
POLL_EVERY = 0.01
# The writes of a reference OpenAI server's stream up to its first piece: the
# role-only chunk, then the piece (hold_writes_after this, and the rest waits).
FIRST_PIECE_WRITES = 2


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float = HANG_TIMEOUT,
    message: str | Callable[[], str] = "",
    *,
    every: float = POLL_EVERY,
) -> None:
    """Return once ``predicate()`` (sync or async) is true; fail after ``timeout`` seconds.

    For state the test can only look at (a reference server's counters, a
    database row, an HTTP answer): it is looked at again ``every`` seconds
    (a few ms unless a look is costly). The timeout only keeps a broken test
    from hanging; it paces nothing.
    """
    deadline = time.monotonic() + timeout
    while True:
        outcome = predicate()
        if inspect.isawaitable(outcome):
            outcome = await outcome
        if outcome:
            return
        if time.monotonic() > deadline:
            detail = message() if callable(message) else message
            raise AssertionError(f"still not true after {timeout} s: {detail}")
        await asyncio.sleep(every)  # the one poll interval of the test suite


class _Changes:
    """Wakes whoever waits for a condition on some state each time the state changes."""

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    def notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait_for(
        self, condition: Callable[[], bool], timeout: float, what: Callable[[], str]
    ) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not condition():
                    waiter = asyncio.get_running_loop().create_future()
                    self._waiters.append(waiter)
                    await waiter
        except TimeoutError:
            raise AssertionError(f"waited {timeout} s for {what()}") from None


class Gate:
    """A point calls pass through, which a test may close to keep them there.

    Open by default. :meth:`hold` closes it: calls arriving afterwards wait at
    it (in arrival order) until :meth:`release` lets them go, all of them and
    every later one, or only the next ``count`` (held now or still to come;
    the ones after them wait again). ``entered`` counts the calls that reached
    the gate, ``passed`` those that went through, ``waiting`` those held there
    now; :meth:`wait_entered` and :meth:`wait_held` wait for those counts.
    """

    def __init__(self) -> None:
        self.entered = 0
        self.passed = 0
        self._held = False
        self._allowance = 0
        self._queue: deque[asyncio.Future[None]] = deque()
        self._changes = _Changes()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def hold(self) -> None:
        """Keep the calls that arrive from now on until released."""
        self._held = True
        self._allowance = 0

    def release(self, count: int | None = None) -> None:
        """Let every call go (and leave the gate open), or only the next ``count`` of them."""
        if count is None:
            self._held = False
            self._allowance = 0
            count = len(self._queue)
        while count and self._queue:
            waiter = self._queue.popleft()
            if not waiter.done():
                waiter.set_result(None)
            count -= 1
        self._allowance += count
        self._changes.notify()

    async def wait_entered(self, count: int = 1, timeout: float = HANG_TIMEOUT) -> None:
        """Return once ``count`` calls in all have reached the gate."""
        await self._changes.wait_for(
            lambda: self.entered >= count, timeout,
            lambda: f"{count} calls at the gate ({self.entered} came)",
        )

    async def wait_held(self, count: int = 1, timeout: float = HANG_TIMEOUT) -> None:
        """Return once ``count`` calls are held at the gate at the same time."""
        await self._changes.wait_for(
            lambda: len(self._queue) >= count, timeout,
            lambda: f"{count} calls held at the gate ({len(self._queue)} are)",
        )

    async def pass_through(self) -> None:
        """Called by what is gated: return at once while open, else when released."""
        self.entered += 1
        self._changes.notify()
        if self._held:
            if self._allowance:
                self._allowance -= 1
            else:
                waiter = asyncio.get_running_loop().create_future()
                self._queue.append(waiter)
                self._changes.notify()
                try:
                    await waiter
                finally:
                    if waiter in self._queue:  # the caller gave up while held
                        self._queue.remove(waiter)
                        self._changes.notify()
        self.passed += 1
        self._changes.notify()


# -- the AI server double -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Call:
    """One exchange the bridge asked of the AI server, as it asked it."""

    session_id: str
    content: str
    max_tokens: int
    state: str | None  # the adapter note the turn carried (None: a conversation's first)


class FakeTurn:
    """The :class:`TurnContext` a handler gets, plus :meth:`delta` to stream a piece."""

    def __init__(self, turn: TurnContext, on_delta: DeltaSink | None) -> None:
        self._turn = turn
        self._on_delta = on_delta
        self.pieces: list[str] = []

    @property
    def session(self) -> ChatSession:
        return self._turn.session

    @property
    def content(self) -> str:
        return self._turn.content

    @property
    def max_tokens(self) -> int:
        return self._turn.max_tokens

    @property
    def state(self) -> str | None:
        return self._turn.state

    async def save_state(self, state: str) -> None:
        await self._turn.save_state(state)

    async def history(self, from_seq: int = 0) -> list[HistoryTurn]:
        return await self._turn.history(from_seq)

    async def delta(self, piece: str) -> None:
        """Send one piece of the reply now, as a streaming AI server would."""
        self.pieces.append(piece)
        if self._on_delta is not None:
            await self._on_delta(piece)


ReplyHandler = Callable[[FakeTurn], Reply | str | Awaitable[Reply | str]]


def echo(turn: FakeTurn) -> str:
    """The default handler: a reply that names the message it answers."""
    return f"answer to {turn.content!r}"


class FakeAIServer(Gate):
    """An in-process ``AIServer`` whose answers come from ``handler``.

    Build it with a handler ``(turn) -> Reply | str`` (plain or async): a
    ``str`` is the reply's text, of kind ``"created"`` when the turn carried no
    adapter state (the conversation's first exchange) and ``"reused"`` when it
    did; a :class:`Reply` is returned as it is, kind and usage included. To
    script a failure the handler raises the bridge's error (``UpstreamTimeout``,
    ``SessionLost``, ``UpstreamError`` ...). Like the seed adapter, which
    creates its AI session before it chats, the double stores a state
    (``"fake-<session id>"``) at the start of a conversation's first exchange,
    so that it stays even when that exchange fails.

    A reply reaches ``on_delta`` as one piece, unless the handler streamed it
    itself with ``await turn.delta(piece)`` (then its pieces must join to
    the reply's text, as the bridge expects of an adapter).

    Every exchange is recorded in ``calls`` (a :class:`Call`) and then passes
    the double itself, a :class:`Gate`, before the handler runs: ``hold()``
    keeps the turns that arrive inside the AI server, ``await
    wait_entered(n)`` returns once ``n`` exchanges have arrived, and
    ``release()`` (or ``release(n)``) lets them be answered::

        fake = FakeAIServer(lambda turn: f"you said {turn.content}")
        fake.hold()
        running = asyncio.create_task(service.send(key, session_id, "hi", None))
        await fake.wait_entered()      # the turn is inside the AI server now
        ...                            # look at the queue, the store, followers
        fake.release()
        await running

    ``health_report`` is what ``health()`` answers; ``refusal``, if set, is
    what ``check_fits`` raises; ``forget`` records the session ids it was given
    in ``forgotten``; ``last_success`` follows each answered exchange.
    """

    def __init__(self, handler: ReplyHandler = echo) -> None:
        super().__init__()
        self.handler = handler
        self.calls: list[Call] = []
        self.health_report = HealthReport(True, "healthy")
        self.refusal: Exception | None = None
        self.forgotten: list[str] = []
        self.last_success: float | None = None

    # -- the AIServer interface --

    async def health(self, timeout: float) -> HealthReport:
        return self.health_report

    async def check_fits(self, session: ChatSession, content: str, max_tokens: int) -> None:
        if self.refusal is not None:
            raise self.refusal

    async def forget(self, session: ChatSession) -> None:
        self.forgotten.append(session.id)

    async def exchange(self, turn: TurnContext, on_delta: DeltaSink | None) -> Reply:
        first = turn.state is None
        self.calls.append(Call(turn.session.id, turn.content, turn.max_tokens, turn.state))
        if first:
            await turn.save_state(f"fake-{turn.session.id}")
        await self.pass_through()
        fake_turn = FakeTurn(turn, on_delta)
        outcome = self.handler(fake_turn)
        if inspect.isawaitable(outcome):
            outcome = await outcome
        reply = outcome if isinstance(outcome, Reply) else Reply(
            outcome, "created" if first else "reused"
        )
        if not fake_turn.pieces and reply.text:
            await fake_turn.delta(reply.text)
        self.last_success = time.monotonic()
        return reply

    # -- for the test --

    def contents(self) -> list[str]:
        """The messages the AI server was asked to answer, in the order it was asked."""
        return [call.content for call in self.calls]


# -- holding a real (in-process) server -------------------------------------------------------


class ServerGate(Gate):
    """Holds requests to some paths of an in-process aiohttp server while the test looks.

    ``install(app)`` before the server starts. A request to one of ``paths``
    passes this gate before its handler runs (inside the app's own
    middlewares, so a held request keeps a serial server busy, as a
    generating one is). ``writes`` is a second gate that every write of their
    streamed answers passes: hold it and ``release(n)`` to let ``n`` writes
    out, and ``wait_entered`` tells when the next one is waiting.
    """

    def __init__(self, *paths: str) -> None:
        super().__init__()
        self.paths = frozenset(paths)
        self.writes = Gate()

    def install(self, app: web.Application, *, outermost: bool = False) -> web.Application:
        """Gate ``app`` (before it starts); ``outermost``: before the app's own middlewares,
        where a request is seen as it arrives, even one a serial server then queues."""
        if outermost:
            app.middlewares.insert(0, self._middleware)
        else:
            app.middlewares.append(self._middleware)
        app.on_response_prepare.append(self._prepared)
        return app

    def hold_writes_after(self, count: int) -> None:
        """Let the next ``count`` writes of streamed answers out, then hold the rest."""
        self.writes.hold()
        self.writes.release(count)

    def release_all(self) -> None:
        """Open both gates (at teardown: nothing may stay held when the server closes)."""
        self.writes.release()
        self.release()

    @web.middleware
    async def _middleware(self, request: web.Request, handler: WebHandler) -> web.StreamResponse:
        if request.path in self.paths:
            await self.pass_through()
        return await handler(request)

    async def _prepared(self, request: web.Request, response: web.StreamResponse) -> None:
        if request.path not in self.paths or isinstance(response, web.Response):
            return
        write = response.write
        gate = self.writes

        async def gated_write(data: bytes | bytearray | memoryview) -> None:
            await gate.pass_through()
            await write(data)

        response.write = gated_write  # type: ignore[method-assign]


# -- a clock the test moves ---------------------------------------------------------------


class _Standin:
    """A module with a few of its attributes replaced."""

    def __init__(self, module: ModuleType, **replaced: Any) -> None:
        self._module = module
        self.__dict__.update(replaced)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


class ManualClock:
    """The clock and the sleeps of one module under test, moved by the test.

    ``install(monkeypatch, module)`` replaces that module's ``time`` (only
    ``monotonic`` changes: it reads ``now``) and ``asyncio`` (only ``sleep``
    changes) for the test. Every sleep asked for is recorded in ``sleeps``. With
    ``stepped=True`` a sleep waits until the test calls :meth:`tick`, which
    lets one sleeper go on and returns when it has come back to sleep (one
    turn of a background loop, whatever it did meanwhile); otherwise sleeps
    return at once. ``advance(seconds)`` moves ``now``.
    """

    def __init__(self, *, stepped: bool = False, start: float = 1000.0) -> None:
        self.now = start
        self.stepped = stepped
        self.sleeps: list[float] = []
        self._sleepers: deque[asyncio.Future[None]] = deque()
        self._changes = _Changes()

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float, result: Any = None) -> Any:
        self.sleeps.append(seconds)
        if self.stepped:
            waiter = asyncio.get_running_loop().create_future()
            self._sleepers.append(waiter)
            self._changes.notify()
            try:
                await waiter
            finally:
                if waiter in self._sleepers:
                    self._sleepers.remove(waiter)
        return result

    async def wait_sleeping(self, count: int = 1, timeout: float = HANG_TIMEOUT) -> None:
        """Return once ``count`` sleeps are waiting for a tick."""
        await self._changes.wait_for(
            lambda: len(self._sleepers) >= count, timeout,
            lambda: f"{count} sleepers ({len(self._sleepers)} sleep)",
        )

    async def tick(self, timeout: float = HANG_TIMEOUT) -> None:
        """Wake the oldest sleeper; return once it sleeps again (its loop went round once)."""
        await self.wait_sleeping(1, timeout)
        others = len(self._sleepers) - 1
        self._sleepers.popleft().set_result(None)
        await self.wait_sleeping(others + 1, timeout)

    def wake_all(self) -> None:
        """Let every sleeper go on (without waiting for them)."""
        while self._sleepers:
            self._sleepers.popleft().set_result(None)

    def run_free(self) -> None:
        """Stop stepping: every sleeper goes on, and later sleeps return at once."""
        self.stepped = False
        self.wake_all()

    def install(self, monkeypatch: pytest.MonkeyPatch, module: ModuleType) -> None:
        """Stand in for whichever of ``time`` and ``asyncio`` the module imported."""
        if hasattr(module, "time"):
            monkeypatch.setattr(module, "time", _Standin(time, monotonic=self.monotonic))
        monkeypatch.setattr(module, "asyncio", _Standin(asyncio, sleep=self.sleep))
