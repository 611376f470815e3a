"""Three AI servers as processes, one killed with SIGKILL under load: no client sees an error.

The bar for several AI servers: list three, kill one while conversations talk
to it, and see no error. Twelve conversations, four placed on each replica,
send turns one after another, all at once (non-streamed turns). Once the load
runs and the victim holds turns of it, the victim is killed with SIGKILL.
Every turn, before and after the kill, must be answered 200 with the reply to
its own message; the victim's conversations are recovered once on their next
choice and reused there after; /readyz answers 200 throughout and lists the
victim out. Then the victim starts again on its port with an empty memory,
and its conversations go back to it (recovered there), again without an
error.

Each test runs twice. With the default settings, a new user's, the load
bound may place a new conversation on its next choice when its first already
holds its share, so only the answers are checked: every one 200 and right.
With placement by hashing alone (``SESSIONBRIDGE_REPLICA_LOAD_FACTOR=0``)
each conversation goes to its first healthy choice, so which conversation is
recovered where is known in advance, and checked.
Every wait is on observed state (answered turns, /readyz, the victim's own
endpoints), never on the clock.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import pytest

from sessionbridge.upstream.placement import preference
from tests.doubles import wait_until
from tests.processes import (
    SIGKILL,
    Bridge,
    Process,
    Processes,
    clean_env,
    run_cli,
    start_bridge,
)
from tests.replicas import OpenAIProcess, SeedProcess, env

# Conversations whose first choice is each replica.
ON_EACH = 4
REPLICAS = 3
# Turns answered before the victim may be killed: two rounds of every conversation.
ANSWERED_BEFORE_KILL = 2 * ON_EACH * REPLICAS
# Turns each conversation starts once the victim is dead.
TURNS_AFTER_KILL = 3
# Turns each conversation sends once the victim is back.
TURNS_AFTER_RESTART = 2
# What a wait allows for a whole phase of the load (it only keeps a broken test from hanging).
PHASE_TIMEOUT = 15.0


class Killable(Protocol):
    """A reference AI server as a process, on a port it keeps across restarts."""

    url: str  # as the bridge is given it
    process: Process | None

    async def start(self) -> None: ...


@dataclass
class Turn:
    content: str
    after_kill: bool  # started once SIGKILL had been sent
    status: int = 0  # 0 while it runs
    body: dict[str, Any] = field(default_factory=dict)

    @property
    def ai_session(self) -> str | None:
        return self.body.get("ai_session")

    @property
    def reply(self) -> str:
        return str((self.body.get("reply") or {}).get("content", ""))


class Load:
    """Conversations sending non-streamed turns one after another, all at once.

    Nothing here asserts: every answer is recorded, so a failing test shows
    every error of the run, not the first.
    """

    def __init__(self, http: aiohttp.ClientSession, url: str, token: str) -> None:
        self.http, self.url = http, url
        self.headers = {"Authorization": f"Bearer {token}"}
        self.turns: dict[str, list[Turn]] = {}
        self.killed = False
        self.answered = 0

    async def new_session(self) -> str:
        # A scenario of its own: conversations share no more than the chat template's
        # first tokens, so an OpenAI-compatible server's slot goes by conversation.
        scenario = f"Conversation {len(self.turns)}: you are a patient tutor who answers briefly."
        async with self.http.post(
            self.url + "/v1/sessions", json={"scenario": scenario}, headers=self.headers
        ) as response:
            assert response.status == 201, await response.text()
            session_id = str((await response.json())["id"])
        self.turns[session_id] = []
        return session_id

    async def turn(self, session_id: str) -> Turn:
        turns = self.turns[session_id]
        index = list(self.turns).index(session_id)
        turn = Turn(f"conversation {index} message {len(turns) + 1}", self.killed)
        turns.append(turn)
        try:
            async with self.http.post(
                f"{self.url}/v1/sessions/{session_id}/messages", json={"content": turn.content},
                headers=self.headers,
            ) as response:
                turn.status = response.status
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            turn.status, turn.body = -1, {"client_error": repr(exc)}
            return turn
        try:
            turn.body = dict(json.loads(text))
        except ValueError:
            turn.body = {"text": text}
        self.answered += 1
        return turn

    async def until_after_kill(self, session_id: str) -> None:
        """Turns one after another until ``TURNS_AFTER_KILL`` of them started after the kill."""
        turns = self.turns[session_id]
        while sum(t.after_kill for t in turns) < TURNS_AFTER_KILL:
            await self.turn(session_id)

    async def more(self, session_id: str, count: int) -> None:
        for _ in range(count):
            await self.turn(session_id)

    def in_flight(self, sessions: list[str]) -> int:
        return sum(1 for s in sessions if self.turns[s] and self.turns[s][-1].status == 0)

    def errors(self) -> list[tuple[str, Turn]]:
        return [(s, t) for s, turns in self.turns.items() for t in turns if t.status != 200]


class ReadyzWatch:
    """Every /readyz answer while the load runs (it must stay 200)."""

    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http, self.url = http, url
        self.answers: list[tuple[int, dict[str, Any]]] = []
        self.stopped = False

    async def look(self) -> tuple[int, dict[str, Any]]:
        async with self.http.get(self.url + "/readyz") as response:
            answer = (response.status, await response.json(content_type=None))
        self.answers.append(answer)
        return answer

    def listed(self, replica: str) -> dict[str, Any]:
        """The replica as the latest /readyz answer lists it."""
        if not self.answers:
            return {}
        by_url = {r["url"]: r for r in self.answers[-1][1].get("replicas", [])}
        return dict(by_url.get(replica, {}))

    def state(self, replica: str) -> str | None:
        state = self.listed(replica).get("state")
        return None if state is None else str(state)

    def running(self, replica: str) -> int:
        return int(self.listed(replica).get("running", 0))

    async def all_healthy(self, urls: list[str]) -> bool:
        await self.look()
        return all(self.state(url) == "healthy" for url in urls)

    async def watch(self) -> None:
        async def stop_asked() -> bool:
            await self.look()
            return self.stopped

        await wait_until(stop_asked, 4 * PHASE_TIMEOUT, "the /readyz watch never stopped",
                         every=0.02)

    def failures(self) -> list[tuple[int, dict[str, Any]]]:
        return [answer for answer in self.answers if answer[0] != 200]


async def placed_evenly(load: Load, urls: list[str]) -> dict[str, str]:
    """Conversation id -> its first choice, exactly ``ON_EACH`` on every replica.

    New sessions are made until every replica is the first choice of
    ``ON_EACH``; the extra ones are left idle and take no part in the load.
    """
    placed: dict[str, str] = {}
    while len(placed) < ON_EACH * len(urls):
        session_id = await load.new_session()
        home = preference(session_id, urls)[0]
        if list(placed.values()).count(home) < ON_EACH:
            placed[session_id] = home
        else:
            del load.turns[session_id]
    return placed


def report(load: Load, bridge: Bridge, victims: list[Process]) -> str:
    errors = "\n".join(
        f"{session} {turn.content!r} after_kill={turn.after_kill}: {turn.status} {turn.body}"
        for session, turn in load.errors()
    )
    logs = "\n".join(p.describe() for p in victims)
    return f"errors:\n{errors}\n--- bridge ---\n{bridge.process.describe()}\n{logs}"


def check_answers(
    load: Load, reply_ok: Callable[[int, Turn], bool], detail: Callable[[], str]
) -> None:
    """No turn failed, and each reply answers its own message."""
    assert not load.errors(), detail()
    for session_id, turns in load.turns.items():
        for number, turn in enumerate(turns, start=1):
            assert reply_ok(number, turn), (session_id, number, turn)


def check_kill_phase(
    load: Load, placed: dict[str, str], victim_url: str, reply_ok: Callable[[int, Turn], bool],
    detail: Callable[[], str], exact: bool,
) -> None:
    """Every turn 200 and right, those after the kill too; with exact placement, the
    victim's conversations recovered once, then reused, and the others reused."""
    check_answers(load, reply_ok, detail)
    # The turns after the kill count: every conversation's, all answered.
    after = [t for turns in load.turns.values() for t in turns if t.after_kill]
    assert len(after) == TURNS_AFTER_KILL * len(placed)
    assert all(t.status == 200 for t in after)
    if not exact:
        return
    crossed = 0
    for session_id, home in placed.items():
        turns = load.turns[session_id]
        sessions = [t.ai_session for t in turns]
        first_after = next(i for i, t in enumerate(turns) if t.after_kill)
        assert sessions[0] == "created", sessions
        if home != victim_url:
            assert set(sessions[1:]) == {"reused"}, (session_id, sessions)
            continue
        # Recovered on its next choice exactly once, by the first turn after the kill
        # at the latest (the turn the victim held when it died, or the next one).
        assert sessions.count("recovered") == 1, (session_id, sessions)
        recovered = sessions.index("recovered")
        assert recovered <= first_after, (session_id, sessions, first_after)
        assert set(sessions[1:recovered] + sessions[recovered + 1:]) <= {"reused"}, sessions
        crossed += not turns[recovered].after_kill
    # At least one turn the victim held when it died was answered by another replica.
    assert crossed >= 1, detail()


async def run_kill_under_load(
    http: aiohttp.ClientSession,
    bridge: Bridge,
    token: str,
    urls: list[str],
    victim: Killable,
    victim_busy: Callable[[], Awaitable[bool]],
    reply_ok: Callable[[int, Turn], bool],
    exact: bool,
) -> None:
    """The load, the kill, the checks; then the victim's restart and its conversations' return.

    ``exact``: placement is exact (no load bound), so where each turn went is checked too.
    """
    load = Load(http, bridge.url, token)
    placed = await placed_evenly(load, urls)
    mine = [s for s, home in placed.items() if home == victim.url]
    assert len(mine) == ON_EACH
    watch = ReadyzWatch(http, bridge.url)
    await wait_until(
        lambda: watch.all_healthy(urls), PHASE_TIMEOUT, lambda: f"{watch.answers[-1:]}"
    )

    def detail() -> str:
        return report(load, bridge, [p for p in (victim.process,) if p is not None])

    watcher = asyncio.create_task(watch.watch())
    talkers = [asyncio.create_task(load.until_after_kill(s)) for s in placed]
    try:

        async def victim_holds_turns() -> bool:
            if load.answered < ANSWERED_BEFORE_KILL or load.in_flight(mine) == 0:
                return False
            return await victim_busy()

        await wait_until(victim_holds_turns, PHASE_TIMEOUT, detail)
        assert victim.process is not None
        victim.process.signal(SIGKILL)
        load.killed = True  # every turn started from here on is after the kill
        assert await victim.process.wait_exit(PHASE_TIMEOUT) == -SIGKILL
        await asyncio.gather(*talkers)  # each turn is bounded by the client's timeout

        check_kill_phase(load, placed, victim.url, reply_ok, detail, exact)
        # The bridge asked another replica instead of the victim, and says so.
        failovers = [
            line for line in bridge.process.stderr().splitlines()
            if "event=failover" in line and f" from={victim.url} " in line
        ]
        assert failovers, detail()
        await wait_until(
            lambda: watch.state(victim.url) == "out", PHASE_TIMEOUT,
            lambda: f"the killed replica not listed out: {watch.answers[-1:]}",
        )

        await victim.start()  # on its port again, its memory empty
        await wait_until(
            lambda: watch.state(victim.url) == "healthy", PHASE_TIMEOUT,
            lambda: f"the restarted replica not listed healthy: {watch.answers[-1:]}",
        )
        before = {s: len(load.turns[s]) for s in placed}
        again = [asyncio.create_task(load.more(s, TURNS_AFTER_RESTART)) for s in placed]
        await asyncio.gather(*again)
    finally:
        watch.stopped = True
        for task in talkers:
            task.cancel()
        await asyncio.gather(*talkers, return_exceptions=True)
        await watcher  # ends at its next look

    check_answers(load, reply_ok, detail)
    assert watch.failures() == [], watch.failures()[:3]
    assert load.answered == sum(len(turns) for turns in load.turns.values())
    if not exact:
        return
    for session_id, home in placed.items():
        sessions = [t.ai_session for t in load.turns[session_id][before[session_id]:]]
        # The victim's conversations go back to it, recovered there; the rest stay.
        expected = "recovered" if home == victim.url else "reused"
        assert sessions == [expected] + ["reused"] * (TURNS_AFTER_RESTART - 1), (
            session_id, sessions,
        )


def bridge_settings(placement: str, **extra: str) -> dict[str, str]:
    """The bridge's environment: quick probes, and exact placement or the default one."""
    exact = {"SESSIONBRIDGE_REPLICA_LOAD_FACTOR": "0"} if placement == "exact" else {}
    return env(
        SESSIONBRIDGE_READY_INTERVAL="0.1", SESSIONBRIDGE_HEALTH_TIMEOUT="0.3", **exact, **extra
    )


# Default placement (with the load bound), then exact placement.
PLACEMENTS = pytest.mark.parametrize("placement", ["default", "exact"])


# -- the seed protocol ---------------------------------------------------------------------

SEED_DELAY = "0.2"  # seconds each /chat takes: the victim holds turns most of the time


@PLACEMENTS
async def test_seed_replica_killed_under_load_leaves_every_turn_answered(
    procs: Processes, http: aiohttp.ClientSession, tmp_path: Path, placement: str
) -> None:
    seeds = [SeedProcess(procs, "--delay", SEED_DELAY) for _ in range(REPLICAS)]
    await asyncio.gather(*(seed.start() for seed in seeds))
    db = tmp_path / "bridge.db"
    bridge = await start_bridge(
        procs, db, ",".join(seed.url for seed in seeds), env=bridge_settings(placement)
    )
    token = await _token(db)
    victim = seeds[0]
    watch = ReadyzWatch(http, bridge.url)

    async def victim_busy() -> bool:
        # The bridge's own count of its turns running on the victim (latest probe).
        await watch.look()
        return watch.running(victim.url) > 0

    def reply_ok(number: int, turn: Turn) -> bool:
        return f"you said {turn.content!r}" in turn.reply

    exact = placement == "exact"
    await run_kill_under_load(
        http, bridge, token, [s.url for s in seeds], victim, victim_busy, reply_ok, exact
    )
    # Its conversations are back on it: one recovered AI session each. With the load
    # bound a turn may go to another replica, or come to it from another conversation.
    back = await victim.sessions(http)
    assert back == ON_EACH if exact else back >= 1, back


async def _token(db: Path) -> str:
    done = await run_cli("keys", "create", "tests", "--db", str(db), env=clean_env(**env()))
    assert done.returncode == 0, done.stderr
    return done.stdout.rstrip("\n").splitlines()[-1]


# -- OpenAI-compatible -------------------------------------------------------------------

PIECE_DELAY = "0.04"  # seconds between streamed pieces: a reply streams for a few tenths


@PLACEMENTS
async def test_openai_replica_killed_mid_reply_under_load_leaves_every_turn_answered(
    procs: Processes, http: aiohttp.ClientSession, tmp_path: Path, placement: str
) -> None:
    # Slots for every conversation a replica may get after the kill (its own and a
    # victim's), so a conversation's prompt stays cached where it is answered.
    servers = [
        OpenAIProcess(procs, "--piece-delay", PIECE_DELAY, "--slots", str(2 * ON_EACH))
        for _ in range(REPLICAS)
    ]
    await asyncio.gather(*(server.start() for server in servers))
    db = tmp_path / "bridge.db"
    bridge = await start_bridge(
        procs, db, ",".join(server.url for server in servers),
        env=bridge_settings(placement, SESSIONBRIDGE_UPSTREAM_FLAVOR="openai"),
    )
    token = await _token(db)
    victim = servers[0]

    async def victim_busy() -> bool:
        # A reply in the middle of streaming on the victim: one of its slots generates.
        return await victim.streaming(http)

    def reply_ok(number: int, turn: Turn) -> bool:
        # The whole history reached whichever replica answered.
        return turn.reply == (
            f"Reply {number}: I see {2 * (number - 1)} earlier messages; "
            f"you said: {turn.content}"
        )

    await run_kill_under_load(
        http, bridge, token, [s.url for s in servers], victim, victim_busy, reply_ok,
        placement == "exact",
    )
