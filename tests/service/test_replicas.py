"""Several seed-protocol AI servers behind one bridge (docs/ai-servers.md#several-ai-servers).

Real sockets: the bridge in this process in front of three reference AI
servers, each on a port of its own, which a test stops (the port refuses
connections) and starts again around the same sessions, as a replica that
was only busy or cut off comes back holding its old AI sessions. Where each
conversation should be is the placement function's answer; where it is, the
replicas' own sessions and counters say.
"""

from __future__ import annotations

import collections
import itertools
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pytest_aiohttp import AiohttpClient

from sessionbridge.app import create_app
from sessionbridge.config import Settings, TokenRange
from sessionbridge.reference.seed_server import DevServerState, create_devserver_app
from sessionbridge.upstream.placement import LOAD_FACTOR, place, preference
from tests.conftest import Api, issue_token
from tests.doubles import wait_until
from tests.replicas import ReplicaServer, sessions_of


class Seed:
    """A seed-protocol reference replica and its state (sessions, counters, switches)."""

    def __init__(self, flavor: str) -> None:
        self.state = DevServerState(flavor=flavor)
        self.server = ReplicaServer(lambda: create_devserver_app(self.state))

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def creates(self) -> int:
        return self.state.calls["scenario"] + self.state.calls["init-session"]


@pytest.fixture(params=["scenario", "init-session"])
def flavor(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def seeds(flavor: str) -> AsyncIterator[list[Seed]]:
    replicas = [Seed(flavor) for _ in range(3)]
    for replica in replicas:
        await replica.server.start()
    yield replicas
    for replica in replicas:
        await replica.server.stop()


async def bridge(
    aiohttp_client: AiohttpClient, tmp_path: Path, seeds: list[Seed], **changes: Any
) -> Api:
    settings = Settings(**{
        "db": str(tmp_path / "bridge.db"),
        "upstream_url": ",".join(seed.url for seed in seeds),
        "upstream_user": "dev",
        "upstream_password": "dev",
        "upstream_flavor": seeds[0].state.flavor,
        "upstream_max_tokens": TokenRange(10, 500),
        "upstream_timeout": 5.0,
        "health_timeout": 0.5,
        "ready_interval": 0.05,
        # Placement by hashing alone, so that a test knows where each conversation
        # goes; the load bound's tests say otherwise.
        "replica_load_factor": 0,
        **changes,
    })
    client = await aiohttp_client(create_app(settings))
    return Api(client, await issue_token(client.app, "test"))


NUMBERS = itertools.count()  # every scenario names its conversation apart


def first_choice(session_id: str, seeds: list[Seed]) -> Seed:
    by_url = {seed.url: seed for seed in seeds}
    return by_url[preference(session_id, list(by_url))[0]]


def second_choice(session_id: str, seeds: list[Seed]) -> Seed:
    by_url = {seed.url: seed for seed in seeds}
    return by_url[preference(session_id, list(by_url))[1]]


async def conversations_on(api: Api, seeds: list[Seed], target: Seed, count: int) -> list[str]:
    """New conversations ("Conversation N." scenarios) until ``count`` of them prefer ``target``."""
    found: list[str] = []
    while len(found) < count:
        session_id = await api.new_session(f"Conversation {next(NUMBERS)}. You are a tutor.")
        if first_choice(session_id, seeds) is target:
            found.append(session_id)
    return found


async def marker(api: Api, session_id: str) -> str:
    response = await api.request("GET", f"/v1/sessions/{session_id}")
    scenario = str((await response.json())["scenario"])
    return scenario.split(" ", 2)[0] + " " + scenario.split(" ", 2)[1]


async def readyz(api: Api) -> tuple[int, dict[str, Any]]:
    response = await api.client.get("/readyz")
    return response.status, await response.json(content_type=None)


async def replica_state(api: Api, url: str) -> str | None:
    _, body = await readyz(api)
    for replica in body.get("replicas", []):
        if replica["url"] == url:
            return str(replica["state"])
    return None


async def until_state(api: Api, seed: Seed, state: str) -> None:
    """Until /readyz (the latest probe) lists the replica in ``state``."""

    async def check() -> bool:
        return await replica_state(api, seed.url) == state

    await wait_until(check, message=f"{seed.url} {state} in /readyz")


async def replica_up(api: Api, url: str) -> float | None:
    """The replica's sessionbridge_replica_healthy gauge: set at once when a turn takes it out."""
    text = await (await api.client.get("/metrics")).text()
    found = re.search(
        r'^sessionbridge_replica_healthy\{replica="' + re.escape(url) + r'"\} (\S+)$',
        text, re.MULTILINE,
    )
    return float(found.group(1)) if found else None


async def until_up(api: Api, seed: Seed, up: bool = True) -> None:
    async def check() -> bool:
        return await replica_up(api, seed.url) == (1.0 if up else 0.0)

    await wait_until(check, message=f"{seed.url} {'up' if up else 'out'} in /metrics")


# -- affinity ---------------------------------------------------------------------------------


async def test_each_conversation_is_answered_by_its_first_choice_and_stays_there(
    aiohttp_client: AiohttpClient, tmp_path: Path, seeds: list[Seed]
) -> None:
    api = await bridge(aiohttp_client, tmp_path, seeds, replica_load_factor=LOAD_FACTOR)
    conversations = {}
    for number in range(24):
        session_id = await api.new_session(f"Conversation {number}. You are a tutor.")
        conversations[session_id] = f"Conversation {number}."
    # Where each goes: its first choice, unless that one already holds its
    # share of the conversations placed before it (the load bound).
    urls = [seed.url for seed in seeds]
    by_url = {seed.url: seed for seed in seeds}
    held: collections.Counter[str] = collections.Counter()
    placed = {}
    for session_id in conversations:
        url = place(session_id, urls, held)[0]
        held[url] += 1
        placed[session_id] = by_url[url]

    for turn in range(1, 4):
        for session_id in conversations:
            body = await api.say(session_id, f"message {turn}")
            assert body["ai_session"] == ("created" if turn == 1 else "reused"), body

    assert sum(1 for s in conversations if placed[s] is first_choice(s, seeds)) >= 18
    for session_id, mark in conversations.items():
        home = placed[session_id]
        for seed in seeds:
            held = sessions_of(seed.state, mark)
            if seed is home:
                assert len(held) == 1 and len(held[0].history) == 3, (seed.url, held)
            else:
                assert held == [], (seed.url, mark)
    # One AI session per conversation, on all three replicas between them.
    assert sum(seed.creates for seed in seeds) == len(conversations)
    assert all(seed.creates > 0 for seed in seeds)


# -- a replica goes, and comes back -----------------------------------------------------------


async def test_a_replica_that_goes_away_hands_its_conversations_on_and_gets_them_back(
    aiohttp_client: AiohttpClient, tmp_path: Path, seeds: list[Seed]
) -> None:
    api = await bridge(aiohttp_client, tmp_path, seeds)
    away = seeds[0]
    moving = await conversations_on(api, seeds, away, 3)
    staying = await conversations_on(api, seeds, seeds[1], 2)
    for session_id in moving + staying:
        for turn in (1, 2):
            await api.say(session_id, f"message {turn}")
    marks = {session_id: await marker(api, session_id) for session_id in moving}

    await away.server.stop()  # unreachable; its sessions stay in its memory
    for session_id in moving + staying:
        body = await api.say(session_id, "message 3")  # no client-visible error
        assert body["ai_session"] == ("recovered" if session_id in moving else "reused"), body
    for session_id in moving:
        # Recovered on its second choice: a new AI session carrying the transcript.
        (elsewhere,) = sessions_of(second_choice(session_id, seeds).state, marks[session_id])
        assert "The conversation so far" in elsewhere.scenario
        assert "User: message 2" in elsewhere.scenario
        assert [question for question, _ in elsewhere.history] == ["message 3"]

    creates_before = away.creates
    await away.server.start()
    await until_up(api, away)
    for session_id in moving:
        body = await api.say(session_id, "message 4")
        # Back on its first choice, whose old AI session lacks message 3:
        # recovered with the whole history, never reused stale.
        assert body["ai_session"] == "recovered", body
        assert "I hold 0 earlier turns" in body["reply"]["content"]
        old, new = sessions_of(away.state, marks[session_id])
        assert [q for q, _ in old.history] == ["message 1", "message 2"]  # untouched
        assert "User: message 3" in new.scenario and [q for q, _ in new.history] == ["message 4"]
    assert away.creates == creates_before + len(moving)

    for session_id in moving:
        body = await api.say(session_id, "message 5")
        assert body["ai_session"] == "reused", body
        # Its AI session on the second choice was left behind at message 3.
        (elsewhere,) = sessions_of(second_choice(session_id, seeds).state, marks[session_id])
        assert [question for question, _ in elsewhere.history] == ["message 3"]


async def test_an_ai_session_is_reused_when_nothing_was_answered_elsewhere_meanwhile(
    aiohttp_client: AiohttpClient, tmp_path: Path, seeds: list[Seed]
) -> None:
    api = await bridge(aiohttp_client, tmp_path, seeds[:2])
    home, other = seeds[0], seeds[1]
    (session_id,) = await conversations_on(api, seeds[:2], home, 1)
    mark = await marker(api, session_id)
    for turn in (1, 2):
        await api.say(session_id, f"message {turn}")

    await home.server.stop()
    await until_up(api, home, up=False)
    other.state.fail_next = [500]
    response = await api.send(session_id, "message 3")  # both fail: the client is told
    assert response.status == 502, await response.text()
    assert len(sessions_of(other.state, mark)) == 1  # recovered there, but nothing answered

    await home.server.start()
    await until_up(api, home)
    body = await api.say(session_id, "message 4")

    assert body["ai_session"] == "reused", body
    (kept,) = sessions_of(home.state, mark)
    assert [question for question, _ in kept.history] == ["message 1", "message 2", "message 4"]


# -- failover within a turn --------------------------------------------------------------------


async def test_a_replica_answering_5xx_is_out_and_the_turn_is_answered_by_the_next(
    aiohttp_client: AiohttpClient, tmp_path: Path, seeds: list[Seed]
) -> None:
    api = await bridge(aiohttp_client, tmp_path, seeds)
    home = seeds[0]
    (session_id,) = await conversations_on(api, seeds, home, 1)
    await api.say(session_id, "message 1")
    home.state.fail_next = [500]

    body = await api.say(session_id, "message 2")

    assert body["ai_session"] == "recovered", body
    assert "you said 'message 2'" in body["reply"]["content"]
    metrics = await (await api.client.get("/metrics")).text()
    assert failovers(metrics, home.url, "upstream_error") == 1
    # Out until its probe passes again; then the conversation goes back.
    await until_up(api, home)
    assert (await api.say(session_id, "message 3"))["ai_session"] == "recovered"
    assert (await api.say(session_id, "message 4"))["ai_session"] == "reused"


async def test_a_replica_that_does_not_answer_in_time_is_out_and_the_turn_goes_on(
    aiohttp_client: AiohttpClient, tmp_path: Path, seeds: list[Seed]
) -> None:
    api = await bridge(aiohttp_client, tmp_path, seeds, upstream_timeout=1.0)
    home = seeds[0]
    (session_id,) = await conversations_on(api, seeds, home, 1)
    await api.say(session_id, "message 1")
    home.state.hang = True

    body = await api.say(session_id, "message 2")

    assert body["ai_session"] == "recovered", body
    metrics = await (await api.client.get("/metrics")).text()
    assert failovers(metrics, home.url, "upstream_timeout") == 1
    home.state.hang = False


def failovers(metrics: str, url: str, reason: str) -> float:
    pattern = (
        r'^sessionbridge_replica_failovers_total\{reason="' + reason
        + r'",replica="' + re.escape(url) + r'"\} (\S+)$'
    )
    found = re.search(pattern, metrics, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


# -- readiness and metrics ---------------------------------------------------------------------


async def test_readyz_lists_each_replica_and_is_ready_while_one_takes_turns(
    aiohttp_client: AiohttpClient, tmp_path: Path, seeds: list[Seed]
) -> None:
    api = await bridge(aiohttp_client, tmp_path, seeds)
    status, body = await readyz(api)
    assert status == 200
    assert [(r["url"], r["state"]) for r in body["replicas"]] == [
        (seed.url, "healthy") for seed in seeds
    ]

    await seeds[0].server.stop()
    await until_state(api, seeds[0], "out")
    assert (await readyz(api))[0] == 200
    seeds[1].state.healthy = False
    await until_state(api, seeds[1], "out")
    assert (await readyz(api))[0] == 200  # one replica still takes turns

    await seeds[2].server.stop()

    async def not_ready() -> bool:
        return (await readyz(api))[0] == 503

    await wait_until(not_ready, message="/readyz 503")
    _, body = await readyz(api)
    assert body["code"] == "not_ready" and "no AI server replica is healthy" in body["detail"]
    assert all(seed.url in body["detail"] for seed in seeds)

    await seeds[2].server.start()
    await until_state(api, seeds[2], "healthy")
    assert (await readyz(api))[0] == 200


async def test_metrics_count_turns_prompt_sources_failovers_and_health_by_replica(
    aiohttp_client: AiohttpClient, tmp_path: Path, seeds: list[Seed]
) -> None:
    api = await bridge(aiohttp_client, tmp_path, seeds)
    home = seeds[0]
    (session_id,) = await conversations_on(api, seeds, home, 1)
    await api.say(session_id, "message 1")
    await api.say(session_id, "message 2")
    await home.server.stop()
    await until_up(api, home, up=False)

    text = await (await api.client.get("/metrics")).text()

    answered = f'sessionbridge_replica_turns_total{{outcome="answered",replica="{home.url}"}}'
    assert f"{answered} 2.0" in text
    assert f'sessionbridge_replica_healthy{{replica="{home.url}"}} 0.0' in text
    for seed in seeds[1:]:
        assert f'sessionbridge_replica_healthy{{replica="{seed.url}"}} 1.0' in text
    # The totals keep their names and meaning.
    assert 'sessionbridge_turns_total{outcome="answered"} 2.0' in text
