"""Several AI servers as real processes: one is killed (SIGKILL) and comes back.

The bridge and three reference seed-protocol servers run as processes of
their own; a replica is killed with SIGKILL between turns and in the middle
of one, then started again on its port with an empty memory, as a crashed
server restarts.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp

from sessionbridge.upstream.placement import preference
from tests.doubles import wait_until
from tests.processes import (
    Processes,
    clean_env,
    run_cli,
    start_bridge,
)
from tests.replicas import SeedProcess, env


class Client:
    def __init__(self, http: aiohttp.ClientSession, url: str, token: str) -> None:
        self.http, self.url = http, url
        self.headers = {"Authorization": f"Bearer {token}"}

    async def new_session(self) -> str:
        async with self.http.post(
            self.url + "/v1/sessions", json={"scenario": "You are a tutor."}, headers=self.headers
        ) as response:
            assert response.status == 201, await response.text()
            return str((await response.json())["id"])

    async def say(self, session_id: str, content: str) -> dict[str, Any]:
        async with self.http.post(
            f"{self.url}/v1/sessions/{session_id}/messages", json={"content": content},
            headers=self.headers,
        ) as response:
            body: dict[str, Any] = await response.json(content_type=None)
            assert response.status == 200, body  # no client-visible error, ever
            return body

    async def replica_states(self) -> dict[str, str]:
        async with self.http.get(self.url + "/readyz") as response:
            body = await response.json(content_type=None)
            return {r["url"]: r["state"] for r in body.get("replicas", [])}


async def cluster(
    procs: Processes, http: aiohttp.ClientSession, tmp_path: Path, *seed_args: str
) -> tuple[list[SeedProcess], Client]:
    seeds = [SeedProcess(procs, *seed_args) for _ in range(3)]
    await asyncio.gather(*(seed.start() for seed in seeds))
    db = tmp_path / "bridge.db"
    bridge = await start_bridge(
        procs, db, ",".join(seed.url for seed in seeds),
        # Placement by hashing alone, so that each conversation's home is its
        # first choice (the load bound may place a new one elsewhere).
        env=env(
            SESSIONBRIDGE_READY_INTERVAL="0.1", SESSIONBRIDGE_HEALTH_TIMEOUT="0.3",
            SESSIONBRIDGE_REPLICA_LOAD_FACTOR="0",
        ),
    )
    done = await run_cli("keys", "create", "tests", "--db", str(db), env=clean_env(**env()))
    assert done.returncode == 0, done.stderr
    return seeds, Client(http, bridge.url, done.stdout.rstrip("\n").splitlines()[-1])


async def conversations(client: Client, seeds: list[SeedProcess], on_each: int) -> dict[str, str]:
    """Conversation id -> the URL of its first choice, at least ``on_each`` on every replica."""
    urls = [seed.url for seed in seeds]
    placed: dict[str, str] = {}
    while min(list(placed.values()).count(url) for url in urls) < on_each:
        session_id = await client.new_session()
        placed[session_id] = preference(session_id, urls)[0]
    return placed


async def test_a_replica_killed_between_turns_hands_its_conversations_on_without_an_error(
    procs: Processes, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    seeds, client = await cluster(procs, http, tmp_path)
    placed = await conversations(client, seeds, on_each=2)
    for turn in (1, 2):
        for session_id in placed:
            await client.say(session_id, f"message {turn}")
    victim = seeds[0]

    await victim.kill()
    for session_id, home in placed.items():
        body = await client.say(session_id, "message 3")
        assert body["ai_session"] == ("recovered" if home == victim.url else "reused"), body
        assert "you said 'message 3'" in body["reply"]["content"]

    async def out() -> bool:
        return (await client.replica_states()).get(victim.url) == "out"

    await wait_until(out, message="the killed replica listed out")

    await victim.start()  # on its port again, its memory empty

    async def back() -> bool:
        return (await client.replica_states()).get(victim.url) == "healthy"

    await wait_until(back, message="the restarted replica listed healthy")
    for session_id, home in placed.items():
        body = await client.say(session_id, "message 4")
        # Its own conversations go back to it, recovered there; the rest stay.
        assert body["ai_session"] == ("recovered" if home == victim.url else "reused"), body
    assert await victim.sessions(http) == list(placed.values()).count(victim.url)


async def test_a_replica_killed_mid_turn_before_any_reply_leaves_the_client_no_error(
    procs: Processes, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    # Serial, as the real server: its /health is silent while a /chat generates.
    seeds, client = await cluster(procs, http, tmp_path, "--serial", "--delay", "1.0")
    placed = await conversations(client, seeds, on_each=1)
    victim = seeds[0]
    session_id = next(s for s, home in placed.items() if home == victim.url)
    await client.say(session_id, "message 1")

    turn = asyncio.create_task(client.say(session_id, "message 2"))

    async def generating() -> bool:
        try:
            async with http.get(victim.url + "/health", timeout=aiohttp.ClientTimeout(0.2)):
                return False
        except TimeoutError:
            return True  # the victim holds message 2 right now

    await wait_until(generating, message="the victim generating message 2")
    await victim.kill()
    body = await turn

    assert body["ai_session"] == "recovered", body
    assert "you said 'message 2'" in body["reply"]["content"]
