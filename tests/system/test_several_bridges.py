"""Several bridge processes on one PostgreSQL database (docs/storage.md).

Each test starts real bridge processes on one migrated database and a
reference AI server in this process, whose counters and switches the test
reads and turns (its /scenario calls count the AI sessions created; holding
its gate keeps a turn open). The database shows what the bridges do: a
message waiting for its session's turn has a row in ``turn_tickets``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import psycopg
import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from sessionbridge.app import create_app
from sessionbridge.config import Settings
from sessionbridge.reference.openai_server import (
    OpenAIReferenceState,
    create_openai_reference_app,
)
from sessionbridge.reference.seed_server import DevServerState, create_devserver_app
from sessionbridge.web.appkeys import SETTINGS
from tests.doubles import FIRST_PIECE_WRITES, HANG_TIMEOUT, ServerGate, wait_until
from tests.processes import SIGKILL, Process, Processes, clean_env, free_port, run_cli, wait_http_ok
from tests.sse import Stream, joined, read_events

STREAM = {"Accept": "text/event-stream"}
# Short enough for a test to wait out, long enough for a loaded machine's beats.
TEST_LEASE = 3.0
# Messages waiting for their session's turn, on every bridge.
WAITING = "SELECT count(*) FROM turn_tickets"


def query(dsn: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as connection:
        return connection.execute(sql, params).fetchall()  # type: ignore[arg-type]


@dataclass
class Bridge:
    process: Process
    url: str


@dataclass
class Cluster:
    """Bridges on one database, one HTTP client, and one API key valid on all of them."""

    procs: Processes
    dsn: str
    upstream: str
    http: aiohttp.ClientSession
    env: dict[str, str]
    token: str = ""

    async def start(self, wait: bool = True, **env: str) -> Bridge:
        port = free_port()
        process = self.procs.start(
            "bridge",
            ["-m", "sessionbridge", "serve", "--port", str(port), "--db", self.dsn,
             "--upstream", self.upstream],
            clean_env(**{**self.env, **env}),
        )
        bridge = Bridge(process, f"http://127.0.0.1:{port}")
        if wait:
            await wait_http_ok(bridge.url + "/healthz", process, deadline=30)
        return bridge

    async def new_token(self, name: str = "tests") -> str:
        done = await run_cli("keys", "create", name, "--db", self.dsn)
        assert done.returncode == 0, done.stderr
        return done.stdout.rstrip("\n").splitlines()[-1]

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", **(extra or {})}

    async def new_session(self, bridge: Bridge) -> str:
        async with self.http.post(
            bridge.url + "/v1/sessions", json={"scenario": "You are a tutor."},
            headers=self.headers(),
        ) as response:
            assert response.status == 201, await response.text()
            return str((await response.json())["id"])

    async def send(
        self, bridge: Bridge, session_id: str, content: str, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        async with self.http.post(
            f"{bridge.url}/v1/sessions/{session_id}/messages", json={"content": content},
            headers=self.headers(headers),
        ) as response:
            return response.status, await response.json(content_type=None), dict(response.headers)

    async def messages(self, bridge: Bridge, session_id: str) -> list[dict[str, Any]]:
        async with self.http.get(
            f"{bridge.url}/v1/sessions/{session_id}/messages?limit=200", headers=self.headers()
        ) as response:
            assert response.status == 200, await response.text()
            return list((await response.json())["messages"])

    async def wait_messages(
        self, bridge: Bridge, session_id: str, count: int, within: float = 15.0
    ) -> list[dict[str, Any]]:
        seen: list[list[dict[str, Any]]] = []

        async def stored() -> bool:
            seen.append(await self.messages(bridge, session_id))
            return len(seen[-1]) >= count

        await wait_until(stored, within, lambda: str(seen[-1]), every=0.05)
        return seen[-1]

    async def wait_waiting(self, count: int) -> None:
        """Return once ``count`` messages wait for their session's turn, on any bridge."""
        await wait_until(lambda: query(self.dsn, WAITING) == [(count,)], every=0.02)


@pytest.fixture
async def seed_server(
    aiohttp_server: AiohttpServer, ai_state: DevServerState, ai_gate: ServerGate
) -> AsyncIterator[TestServer]:
    yield await aiohttp_server(ai_gate.install(create_devserver_app(ai_state)))
    ai_gate.release_all()


async def _cluster(
    procs: Processes, dsn: str, upstream: str, env: dict[str, str]
) -> AsyncIterator[Cluster]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        cluster = Cluster(procs, dsn, upstream, http, env)
        cluster.token = await cluster.new_token()
        yield cluster
        procs.close()  # the bridges close their pools before the database is dropped


@pytest.fixture
async def cluster(
    migrated_postgres_dsn: str, procs: Processes, seed_server: TestServer, ai_state: DevServerState
) -> AsyncIterator[Cluster]:
    env = {
        "SESSIONBRIDGE_UPSTREAM_USER": ai_state.user,
        "SESSIONBRIDGE_UPSTREAM_PASSWORD": ai_state.password,
        "SESSIONBRIDGE_UPSTREAM_TIMEOUT": "60",
        "SESSIONBRIDGE_TURN_LEASE": str(TEST_LEASE),
        "SESSIONBRIDGE_KEY_CACHE_SECONDS": "1",
    }
    upstream = str(seed_server.make_url("")).rstrip("/")
    async for made in _cluster(procs, migrated_postgres_dsn, upstream, env):
        yield made


def questions_and_answers(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(question, answer) pairs; asserts each question is followed by its answer."""
    pairs = []
    for question, answer in zip(messages[::2], messages[1::2], strict=True):
        assert (question["role"], answer["role"]) == ("user", "assistant"), messages
        assert answer["seq"] == question["seq"] + 1
        pairs.append((question["content"], answer["content"]))
    return pairs


# -- one conversation, two bridges ------------------------------------------------------------


async def test_racing_first_messages_through_two_bridges_create_one_ai_session(
    cluster: Cluster, ai_state: DevServerState, ai_gate: ServerGate
) -> None:
    a, b = await cluster.start(), await cluster.start()
    session_id = await cluster.new_session(a)
    ai_gate.hold()

    sending = asyncio.gather(
        cluster.send(a, session_id, "first via A"), cluster.send(b, session_id, "first via B")
    )
    # One is inside the AI server, the other waits for the session on its bridge.
    await ai_gate.wait_held()
    await cluster.wait_waiting(1)
    ai_gate.release()
    answers = await sending

    assert [status for status, _, _ in answers] == [200, 200], answers
    assert sorted(body["ai_session"] for _, body, _ in answers) == ["created", "reused"]
    assert ai_state.calls["scenario"] == 1
    assert len(questions_and_answers(await cluster.messages(b, session_id))) == 2


async def test_messages_through_both_bridges_are_answered_one_at_a_time_in_arrival_order(
    cluster: Cluster, ai_state: DevServerState, ai_gate: ServerGate
) -> None:
    a, b = await cluster.start(), await cluster.start()
    session_id = await cluster.new_session(a)
    await cluster.send(a, session_id, "warm up")  # the AI session exists
    ai_gate.hold()
    # Two in a row on one bridge, then two on the other: a bridge's own queue
    # must not jump ahead of a message that reached the other bridge first.
    route = [a, a, b, b, a, b]
    sends = []
    for number, bridge in enumerate(route, start=1):
        sends.append(asyncio.create_task(cluster.send(bridge, session_id, f"message {number}")))
        if number == 1:
            await ai_gate.wait_held()  # the first is inside the AI server
        else:
            await cluster.wait_waiting(number - 1)  # in line before the next is sent
    ai_gate.release()
    answers = await asyncio.gather(*sends)

    assert [status for status, _, _ in answers] == [200] * len(route), answers
    pairs = questions_and_answers(await cluster.messages(a, session_id))
    assert [question for question, _ in pairs[1:]] == [
        f"message {n}" for n in range(1, len(route) + 1)
    ]
    # Each answer saw every earlier turn: they ran one after the other, in one AI session.
    for index, (question, answer) in enumerate(pairs, start=1):
        assert answer.startswith(f"turn {index}: you said {question!r}"), answer
    assert ai_state.calls["scenario"] == 1


async def test_an_idempotency_key_in_progress_on_one_bridge_is_409_on_the_other(
    cluster: Cluster, ai_state: DevServerState, ai_gate: ServerGate
) -> None:
    a, b = await cluster.start(), await cluster.start()
    session_id = await cluster.new_session(a)
    ai_gate.hold()
    key = {"Idempotency-Key": "once-only"}

    first = asyncio.create_task(cluster.send(a, session_id, "hello", key))
    await ai_gate.wait_held()  # the question is stored and being answered: in progress
    status, body, headers = await cluster.send(b, session_id, "hello", key)
    assert (status, body["code"]) == (409, "idempotency_in_progress"), body
    assert int(headers["Retry-After"]) > 0
    ai_gate.release()

    status, answered, _ = await first
    assert status == 200, answered
    for bridge in (a, b):
        again_status, again, _ = await cluster.send(bridge, session_id, "hello", key)
        assert (again_status, again) == (200, answered)
    assert ai_state.calls["chat"] == 1


async def test_a_streamed_idempotent_retry_on_another_bridge_follows_the_turn_running_there(
    cluster: Cluster, ai_state: DevServerState, ai_gate: ServerGate
) -> None:
    a, b = await cluster.start(), await cluster.start()
    session_id = await cluster.new_session(a)
    ai_gate.hold()
    key = {"Idempotency-Key": "streamed-once"}

    async def stream(bridge: Bridge, *, started: asyncio.Event | None = None) -> Stream:
        async with cluster.http.post(
            f"{bridge.url}/v1/sessions/{session_id}/messages", json={"content": "hello"},
            headers=cluster.headers({**key, **STREAM}),
        ) as response:
            head = await read_events(response, stop_after_events=1)
            if started is not None:
                started.set()
            return joined(head, await read_events(response))

    first = asyncio.create_task(stream(a))
    await ai_gate.wait_held()  # the question is stored: in progress on A
    b_started = asyncio.Event()
    following = asyncio.create_task(stream(b, started=b_started))
    await asyncio.wait_for(b_started.wait(), HANG_TIMEOUT)
    # B was following while A's turn ran (held in the AI server), not replaying it afterwards.
    assert not first.done()
    assert ai_gate.waiting == 1
    ai_gate.release()
    followed = await following
    own = await first

    assert own.names[0] == followed.names[0] == "turn.started"
    assert own.names[-1] == followed.names[-1] == "turn.completed"
    started, completed = own.events[0].data, own.events[-1].data
    assert followed.events[0].data["user_message"]["id"] == started["user_message"]["id"]
    assert followed.events[-1].data == completed
    messages = await cluster.messages(b, session_id)
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert followed.text == own.text == messages[1]["content"] == completed["reply"]["content"]
    assert ai_state.calls["chat"] == 1

    status, again, _ = await cluster.send(b, session_id, "hello", key)
    assert (status, again) == (200, completed)
    assert again["user_message"]["id"] == messages[0]["id"]
    assert again["reply"]["id"] == messages[1]["id"]
    assert ai_state.calls["chat"] == 1


async def test_a_key_revoked_through_one_bridge_is_refused_by_the_other_within_the_cache_time(
    cluster: Cluster,
) -> None:
    a, b = await cluster.start(), await cluster.start()
    cluster.token = await cluster.new_token("soon-revoked")
    for bridge in (a, b):  # now cached by both
        await cluster.new_session(bridge)

    done = await run_cli("keys", "revoke", "soon-revoked", "--db", cluster.dsn)
    assert done.returncode == 0, done.stderr

    for bridge in (a, b):

        async def refused(bridge: Bridge = bridge) -> bool:
            async with cluster.http.get(bridge.url + "/v1/sessions",
                                        headers=cluster.headers()) as response:
                assert response.status in (200, 401)
                return response.status == 401

        # Once the cached key is older than SESSIONBRIDGE_KEY_CACHE_SECONDS=1.
        await wait_until(refused, every=0.05)


# -- a bridge that dies, a bridge that starts -------------------------------------------------


async def test_a_bridge_killed_mid_turn_frees_its_session_within_the_lease(
    cluster: Cluster, ai_gate: ServerGate
) -> None:
    a, b = await cluster.start(), await cluster.start()
    session_id = await cluster.new_session(a)
    await cluster.send(a, session_id, "before")
    ai_gate.hold()  # the turn on A never ends by itself
    cut_off = asyncio.create_task(cluster.send(a, session_id, "cut off"))
    await ai_gate.wait_held()

    a.process.signal(SIGKILL)
    with pytest.raises(aiohttp.ClientError):
        await cut_off
    ai_gate.release()

    # Its question ends failed without anyone asking, once the lease has run
    # out (and the next beat of the live bridge has seen it).
    async def failed() -> bool:
        return bool((await cluster.messages(b, session_id))[2]["status"] != "pending")

    await wait_until(failed, TEST_LEASE * 2 + HANG_TIMEOUT, "still pending", every=0.1)
    status, body, _ = await cluster.send(b, session_id, "after")
    assert status == 200, body
    messages = await cluster.messages(b, session_id)
    assert [(m["content"], m["status"]) for m in messages if m["role"] == "user"] == [
        ("before", "answered"), ("cut off", "failed"), ("after", "answered"),
    ]
    assert body["ai_session"] == "reused"


async def test_the_next_message_on_another_bridge_waits_out_a_dead_turns_lease(
    cluster: Cluster, ai_gate: ServerGate
) -> None:
    a, b = await cluster.start(), await cluster.start()
    session_id = await cluster.new_session(a)
    ai_gate.hold()  # the turn on A never ends by itself
    cut_off = asyncio.create_task(cluster.send(a, session_id, "cut off"))
    await ai_gate.wait_held()
    a.process.signal(SIGKILL)
    with pytest.raises(aiohttp.ClientError):
        await cut_off
    ai_gate.release()

    # Answered once the dead turn's lease has run out (the client's timeout
    # only stops a hang).
    status, body, _ = await cluster.send(b, session_id, "next")

    assert status == 200, body
    users = [m for m in await cluster.messages(b, session_id) if m["role"] == "user"]
    assert [(m["content"], m["status"]) for m in users] == [
        ("cut off", "failed"), ("next", "answered"),
    ]


async def test_a_bridge_starting_does_not_fail_the_turns_running_on_another(
    cluster: Cluster, ai_gate: ServerGate
) -> None:
    a = await cluster.start()
    session_id = await cluster.new_session(a)
    ai_gate.hold()
    running = asyncio.create_task(cluster.send(a, session_id, "long question"))
    await ai_gate.wait_held()

    await cluster.start()  # fails the pending turns of dead bridges at start, not A's

    assert [m["status"] for m in await cluster.messages(a, session_id)] == ["pending"]
    ai_gate.release()
    status, body, _ = await running
    assert status == 200, body
    assert [m["status"] for m in await cluster.messages(a, session_id)] == ["answered"] * 2


async def test_two_bridges_serving_an_empty_database_at_once_both_migrate_it(
    postgres_dsn: str, procs: Processes, seed_server: TestServer, ai_state: DevServerState
) -> None:
    env = {
        "SESSIONBRIDGE_UPSTREAM_USER": ai_state.user,
        "SESSIONBRIDGE_UPSTREAM_PASSWORD": ai_state.password,
    }
    upstream = str(seed_server.make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as http:
        cluster = Cluster(procs, postgres_dsn, upstream, http, env)
        starting = [await cluster.start(wait=False) for _ in range(2)]
        for bridge in starting:
            await wait_http_ok(bridge.url + "/readyz", bridge.process, deadline=30)
        cluster.token = await cluster.new_token()
        for bridge in starting:
            session_id = await cluster.new_session(bridge)
            status, body, _ = await cluster.send(bridge, session_id, "hello")
            assert status == 200, body
        procs.close()
    ids = [row[0] for row in query(postgres_dsn, "SELECT migration_id FROM _yoyo_migration")]
    assert len(ids) == len(set(ids)) >= 3


# -- streams across bridges -------------------------------------------------------------------


@pytest.fixture
def openai_state() -> OpenAIReferenceState:
    # A reply of 40 one-word pieces (hold openai_gate.writes to pause it).
    return OpenAIReferenceState(tokens_per_piece=1, reply_text=" ".join(["word"] * 40))


@pytest.fixture
async def openai_cluster(
    migrated_postgres_dsn: str,
    procs: Processes,
    aiohttp_server: AiohttpServer,
    openai_state: OpenAIReferenceState,
    openai_gate: ServerGate,
) -> AsyncIterator[Cluster]:
    server = await aiohttp_server(openai_gate.install(create_openai_reference_app(openai_state)))
    env = {
        "SESSIONBRIDGE_UPSTREAM_FLAVOR": "openai",
        "SESSIONBRIDGE_UPSTREAM_MAX_TOKENS": "1-500",
        "SESSIONBRIDGE_TURN_LEASE": str(TEST_LEASE),
    }
    async for made in _cluster(procs, migrated_postgres_dsn, str(server.make_url("/v1")), env):
        yield made
    openai_gate.release_all()


async def follow_events(
    cluster: Cluster, bridge: Bridge, session_id: str, message_id: str
) -> Stream:
    async with cluster.http.get(
        f"{bridge.url}/v1/sessions/{session_id}/messages/{message_id}/events",
        headers=cluster.headers(),
    ) as response:
        return await read_events(response)


async def test_events_on_another_bridge_follow_a_running_turn_and_replay_an_ended_one(
    openai_cluster: Cluster, openai_gate: ServerGate
) -> None:
    cluster = openai_cluster
    a, b = await cluster.start(), await cluster.start()
    session_id = await cluster.new_session(a)
    openai_gate.hold_writes_after(FIRST_PIECE_WRITES)

    async with cluster.http.post(
        f"{a.url}/v1/sessions/{session_id}/messages", json={"content": "tell me"},
        headers=cluster.headers(STREAM),
    ) as response:
        first_line = await response.content.readuntil(b"\n\n")  # turn.started
        assert b"turn.started" in first_line, first_line
        message_id = (await cluster.wait_messages(b, session_id, 1))[0]["id"]
        async with cluster.http.get(
            f"{b.url}/v1/sessions/{session_id}/messages/{message_id}/events",
            headers=cluster.headers(),
        ) as following:
            # Live: a piece reaches the other bridge's reader while the AI
            # server still holds back the rest of the reply.
            head = await read_events(following, stop_after_deltas=1)
            assert openai_gate.writes.waiting == 1
            openai_gate.writes.release()
            followed, own = await asyncio.gather(read_events(following), read_events(response))
        followed = joined(head, followed)

    assert followed.names[0] == "turn.started" and followed.names[-1] == "turn.completed"
    completed_on_a = own.events[-1]
    assert completed_on_a.name == "turn.completed"
    stored = (await cluster.messages(b, session_id))[1]["content"]
    assert followed.text == stored == " ".join(["word"] * 40)
    assert len(followed.deltas) > 1
    assert [d.id for d in followed.deltas] == list(range(1, len(followed.deltas) + 1))
    assert followed.events[-1].data == completed_on_a.data

    replayed = await follow_events(cluster, b, session_id, message_id)
    assert replayed.names[0] == "turn.started" and replayed.names[-1] == "turn.completed"
    assert replayed.text == stored
    assert replayed.events[-1].data == completed_on_a.data



def test_llama_cpp_slot_saving_is_off_with_a_warning_on_postgresql(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    wanted = {"slot_save": "on", "slot_dir": str(tmp_path), "upstream_flavor": "openai"}
    on_postgres = create_app(Settings(db="postgresql://h/db", **wanted))  # type: ignore[arg-type]
    on_sqlite = create_app(Settings(db=str(tmp_path / "b.db"), **wanted))  # type: ignore[arg-type]

    assert on_postgres[SETTINGS].slot_save == "off"
    assert on_sqlite[SETTINGS].slot_save == "on"
    assert "event=slot_save_disabled" in caplog.text


# -- the OpenAI face across bridges -----------------------------------------------------------


async def test_a_response_running_on_one_bridge_is_retrieved_streamed_and_cancelled_on_another(
    cluster: Cluster, ai_state: DevServerState
) -> None:
    a, b = await cluster.start(), await cluster.start()
    via_a = openai.AsyncOpenAI(base_url=a.url + "/v1", api_key=cluster.token, max_retries=0)
    via_b = openai.AsyncOpenAI(base_url=b.url + "/v1", api_key=cluster.token, max_retries=0)
    try:
        done = await via_a.responses.create(model="any", input="quick")
        assert (await via_b.responses.retrieve(done.id)).output_text == done.output_text
        replayed = [e async for e in await via_b.responses.retrieve(done.id, stream=True)]
        assert replayed[-1].type == "response.completed"

        ai_state.delay = 30.0  # the next answer stays in the AI server until cancelled
        running = await via_a.responses.create(model="any", input="slow", background=True)
        assert (await via_b.responses.retrieve(running.id)).status == "in_progress"
        cancelled = await via_b.responses.cancel(running.id)
        assert cancelled.status == "cancelled"
        assert (await via_a.responses.retrieve(running.id)).status == "cancelled"
    finally:
        await via_a.close()
        await via_b.close()
