"""Two bridges on one PostgreSQL database in front of the same replicas place alike.

Placement is a function of the conversation and the set of healthy replicas,
and where a conversation was placed (its home) is stored with it, so bridges
agree without talking: turns of one conversation sent through either bridge
reach one replica and reuse one AI session there; and when a replica goes,
both send its conversations to one next replica.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import sessionbridge
from sessionbridge.reference.seed_server import DevServerState, create_devserver_app
from sessionbridge.upstream.placement import preference
from tests.processes import Processes, clean_env, free_port, run_cli, wait_http_ok
from tests.replicas import ReplicaServer, sessions_of

SOURCE = str(Path(sessionbridge.__file__).resolve().parents[1])


class Seed:
    def __init__(self) -> None:
        self.state = DevServerState()
        self.server = ReplicaServer(lambda: create_devserver_app(self.state))


@pytest.fixture
async def seeds() -> AsyncIterator[list[Seed]]:
    replicas = [Seed() for _ in range(3)]
    for replica in replicas:
        await replica.server.start()
    yield replicas
    for replica in replicas:
        await replica.server.stop()


async def start_bridge(procs: Processes, dsn: str, upstream: str) -> str:
    port = free_port()
    process = procs.start(
        "bridge",
        ["-m", "sessionbridge", "serve", "--port", str(port), "--db", dsn, "--upstream", upstream],
        clean_env(
            PYTHONPATH=SOURCE,
            SESSIONBRIDGE_UPSTREAM_USER="dev",
            SESSIONBRIDGE_UPSTREAM_PASSWORD="dev",
            SESSIONBRIDGE_UPSTREAM_TIMEOUT="20",
            SESSIONBRIDGE_READY_INTERVAL="0.1",
        ),
    )
    url = f"http://127.0.0.1:{port}"
    await wait_http_ok(url + "/healthz", process, deadline=30)
    return url


async def test_two_bridges_on_one_database_send_each_conversation_to_the_same_replica(
    migrated_postgres_dsn: str, procs: Processes, seeds: list[Seed]
) -> None:
    urls = [seed.server.url for seed in seeds]
    bridges = [await start_bridge(procs, migrated_postgres_dsn, ",".join(urls)) for _ in range(2)]
    done = await run_cli(
        "keys", "create", "tests", "--db", migrated_postgres_dsn, env=clean_env(PYTHONPATH=SOURCE)
    )
    assert done.returncode == 0, done.stderr
    headers = {"Authorization": f"Bearer {done.stdout.rstrip().splitlines()[-1]}"}
    through = itertools.cycle(bridges)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:

        async def say(session_id: str, content: str) -> dict[str, Any]:
            async with http.post(
                f"{next(through)}/v1/sessions/{session_id}/messages",
                json={"content": content}, headers=headers,
            ) as response:
                body: dict[str, Any] = await response.json(content_type=None)
                assert response.status == 200, body
                return body

        marks = {}
        for number in range(12):
            async with http.post(
                bridges[0] + "/v1/sessions",
                json={"scenario": f"Conversation {number}. You are a tutor."}, headers=headers,
            ) as response:
                assert response.status == 201, await response.text()
                marks[str((await response.json())["id"])] = f"Conversation {number}."

        # Turns of every conversation alternate between the two bridges.
        for turn in (1, 2, 3, 4):
            for session_id in marks:
                body = await say(session_id, f"message {turn}")
                assert body["ai_session"] == ("created" if turn == 1 else "reused"), body

        # Each conversation has one AI session, on one replica (its home: its
        # first choice unless the bridge that placed it found that one holding
        # its share), whichever bridge its turns went through.
        home: dict[str, Seed] = {}
        for session_id, mark in marks.items():
            holders = [seed for seed in seeds if sessions_of(seed.state, mark)]
            assert len(holders) == 1, (session_id, [seed.server.url for seed in holders])
            (held,) = sessions_of(holders[0].state, mark)
            assert len(held.history) == 4
            home[session_id] = holders[0]
        at_first_choice = sum(home[s].server.url == preference(s, urls)[0] for s in marks)
        assert at_first_choice >= 8, at_first_choice

        # A replica goes: both bridges send its conversations to one next replica.
        gone = max(seeds, key=lambda seed: list(home.values()).count(seed))
        await gone.server.stop()
        moved = [s for s in marks if home[s] is gone]
        assert moved
        for turn in (5, 6, 7):
            for session_id in moved:
                body = await say(session_id, f"message {turn}")
                assert body["ai_session"] == ("recovered" if turn == 5 else "reused"), body
        for session_id in moved:
            there = [
                seed for seed in seeds
                if seed is not gone and sessions_of(seed.state, marks[session_id])
            ]
            assert len(there) == 1, session_id
            (held,) = sessions_of(there[0].state, marks[session_id])
            assert [q for q, _ in held.history] == ["message 5", "message 6", "message 7"]
    procs.close()  # the bridges close their pools before the database is dropped
