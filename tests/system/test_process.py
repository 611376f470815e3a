"""What only a real process shows: the console commands, kill -9, SIGTERM, sd_notify, demo.

The bridge always runs as ``python -m sessionbridge`` in a child process. The
reference AI server runs either as a child process too, or in this process
(``aiohttp_server``) when a test has to flip its switches or read its counters.
Every child is killed and reaped by the ``procs`` fixture's teardown.
"""

from __future__ import annotations

import asyncio
import re
import socket
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from sessionbridge.reference.seed_server import DevServerState, create_devserver_app
from tests.doubles import HANG_TIMEOUT, ServerGate, wait_until
from tests.processes import (
    SIGKILL,
    SIGTERM,
    Bridge,
    Process,
    Processes,
    clean_env,
    create_token,
    free_port,
    port_refuses,
    query,
    run_cli,
    start_bridge,
    start_devserver,
    wait_http_ok,
)

SCENARIO = "You are a patient tutor."


# -- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture
def ai_state() -> DevServerState:
    return DevServerState()


@pytest.fixture
async def inproc_ai(
    aiohttp_server: AiohttpServer, ai_state: DevServerState, ai_gate: ServerGate
) -> AsyncIterator[str]:
    """The reference AI server in this process (its state is ``ai_state``, its /chat
    held by ``ai_gate``); its base URL."""
    server: TestServer = await aiohttp_server(ai_gate.install(create_devserver_app(ai_state)))
    yield str(server.make_url("")).rstrip("/")
    ai_gate.release_all()


class Client:
    """A client of one running bridge, holding one API token."""

    def __init__(self, http: aiohttp.ClientSession, bridge: Bridge, token: str) -> None:
        self.http = http
        self.bridge = bridge
        self.token = token

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        async with self.http.request(
            method, self.bridge.url + path, headers=self.headers, **kwargs
        ) as response:
            body = await response.json(content_type=None) if response.content_length != 0 else None
            return response.status, body

    async def new_session(self) -> str:
        status, body = await self.call("POST", "/v1/sessions", json={"scenario": SCENARIO})
        assert status == 201, body
        return str(body["id"])

    async def say(self, session_id: str, content: str) -> dict[str, Any]:
        status, body = await self.call(
            "POST", f"/v1/sessions/{session_id}/messages", json={"content": content}
        )
        assert status == 200, body
        return dict(body)

    async def messages(self, session_id: str) -> list[dict[str, Any]]:
        status, body = await self.call("GET", f"/v1/sessions/{session_id}/messages?limit=200")
        assert status == 200, body
        return list(body["messages"])


def stored_messages(db: Path) -> dict[str, tuple[str, str, str]]:
    """Every stored message by id: (role, content, status)."""
    rows = query(db, "SELECT id, role, content, status FROM messages")
    return {row[0]: (row[1], row[2], row[3]) for row in rows}


def dead_upstream() -> str:
    # Nothing listens there; enough for tests that never reach the AI server.
    return f"http://127.0.0.1:{free_port()}"


# -- 1. the console commands ------------------------------------------------------------------


async def test_keys_create_list_revoke_and_migrate_on_fresh_databases(
    tmp_path: Path, procs: Processes, http: aiohttp.ClientSession
) -> None:
    db = tmp_path / "fresh" / "keys.db"
    assert not db.exists()

    created = await run_cli("keys", "create", "alice", "--db", str(db))
    assert created.returncode == 0, created.stderr
    token = created.stdout.rstrip("\n").splitlines()[-1]
    # The token stands alone on its line: a script can take it with `tail -n1`.
    assert re.fullmatch(r"sb_[A-Za-z0-9_-]{20,}", token), created.stdout
    # The command applied the migrations on a path that did not exist.
    assert query(db, "SELECT name FROM api_keys WHERE revoked_at IS NULL") == [("alice",)]
    # Only a hash is stored, never the token.
    assert token.encode() not in db.read_bytes()

    listed = await run_cli("keys", "list", "--db", str(db))
    assert listed.returncode == 0, listed.stderr
    assert "alice" in listed.stdout and "live" in listed.stdout, listed.stdout
    assert token not in listed.stdout

    duplicate = await run_cli("keys", "create", "alice", "--db", str(db))
    assert duplicate.returncode != 0
    assert "alice" in duplicate.stderr
    assert query(db, "SELECT count(*) FROM api_keys") == [(1,)]

    bridge = await start_bridge(procs, db, dead_upstream())
    client = Client(http, bridge, token)
    status, body = await client.call("GET", "/v1/sessions")
    assert status == 200, body

    revoked = await run_cli("keys", "revoke", "alice", "--db", str(db))
    assert revoked.returncode == 0, revoked.stderr
    # The running bridge honours a revocation made by another process once its
    # cached key is older than SESSIONBRIDGE_KEY_CACHE_SECONDS (1 s by default).
    answers: list[tuple[int, Any]] = []

    async def refused() -> bool:
        answers.append(await client.call("GET", "/v1/sessions"))
        return answers[-1][0] != 200

    await wait_until(refused, every=0.05)
    status, body = answers[-1]
    assert status == 401, body
    assert body["code"] == "unauthorized"

    listed = await run_cli("keys", "list", "--db", str(db))
    assert "revoked" in listed.stdout, listed.stdout
    again = await run_cli("keys", "revoke", "alice", "--db", str(db))
    assert again.returncode != 0
    # A revoked name may be issued again.
    reissued = await run_cli("keys", "create", "alice", "--db", str(db))
    assert reissued.returncode == 0, reissued.stderr

    migrated_db = tmp_path / "other" / "m.db"
    first = await run_cli("migrate", "--db", str(migrated_db))
    assert first.returncode == 0, first.stderr
    applied = re.search(r"applied (\d+)", first.stdout)
    assert applied is not None and int(applied.group(1)) >= 1, first.stdout
    # One line: nothing of the migration tool's own output.
    assert first.stdout == f"applied {applied.group(1)} migration(s) to {migrated_db}\n"
    tables = {row[0] for row in query(migrated_db, "SELECT name FROM sqlite_master")}
    assert {"api_keys", "chat_sessions", "messages", "idempotency_keys"} <= tables
    schema_before = query(migrated_db, "SELECT type, name, sql FROM sqlite_master ORDER BY name")

    second = await run_cli("migrate", "--db", str(migrated_db))
    assert second.returncode == 0, second.stderr
    assert re.search(r"applied 0\b", second.stdout), second.stdout
    assert query(migrated_db, "SELECT type, name, sql FROM sqlite_master ORDER BY name") == (
        schema_before
    )


# -- 2. serve needs an AI server ---------------------------------------------------------------


async def test_serve_without_upstream_exits_2_with_a_clear_message(tmp_path: Path) -> None:
    done = await run_cli(
        "serve", "--port", str(free_port()), "--db", str(tmp_path / "b.db"),
        env=clean_env(), cwd=tmp_path,
    )
    assert done.returncode == 2, (done.stdout, done.stderr)
    message = done.stderr.lower()
    assert "upstream" in message or "ai server" in message, done.stderr
    assert "Traceback" not in done.stderr


async def test_serve_on_uvloop_holds_a_conversation_and_stops_on_sigterm(
    tmp_path: Path, procs: Processes, http: aiohttp.ClientSession
) -> None:
    upstream = await start_devserver(procs)
    db = tmp_path / "b.db"
    token = await create_token(db)
    bridge = await start_bridge(procs, db, upstream, env={"SESSIONBRIDGE_EVENT_LOOP": "uvloop"})
    client = Client(http, bridge, token)
    session_id = await client.new_session()

    first = await client.say(session_id, "one")
    second = await client.say(session_id, "two")

    assert (first["ai_session"], second["ai_session"]) == ("created", "reused")
    bridge.process.signal(SIGTERM)
    assert await bridge.process.wait_exit(HANG_TIMEOUT) == 0


async def test_an_unknown_event_loop_is_one_line_and_exit_2(tmp_path: Path) -> None:
    done = await run_cli(
        "serve", "--port", str(free_port()), "--db", str(tmp_path / "b.db"),
        "--upstream", "http://127.0.0.1:9", env=clean_env(SESSIONBRIDGE_EVENT_LOOP="trio"),
        cwd=tmp_path,
    )
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "event_loop" in done.stderr and "Traceback" not in done.stderr


# -- 3. kill -9 -----------------------------------------------------------------------------------


async def test_kill9_loses_no_answer_the_client_received(
    tmp_path: Path, procs: Processes, http: aiohttp.ClientSession
) -> None:
    upstream = await start_devserver(procs)
    db = tmp_path / "b.db"
    token = await create_token(db)
    bridge = await start_bridge(procs, db, upstream)
    client = Client(http, bridge, token)
    session_id = await client.new_session()

    received = []
    for n in range(1, 6):
        turn = await client.say(session_id, f"question {n}")
        assert turn["reply"]["content"].startswith(f"turn {n}:"), turn
        received.append(turn)

    bridge.process.signal(SIGKILL)
    assert await bridge.process.wait_exit(5) == -SIGKILL

    assert query(db, "PRAGMA integrity_check") == [("ok",)]
    stored = stored_messages(db)
    for turn in received:
        reply, question = turn["reply"], turn["user_message"]
        assert stored[reply["id"]] == ("assistant", reply["content"], "answered")
        assert stored[question["id"]] == ("user", question["content"], "answered")
    assert len(stored) == 2 * len(received)


async def test_kill9_mid_turn_leaves_it_failed_and_the_session_goes_on(
    tmp_path: Path,
    procs: Processes,
    http: aiohttp.ClientSession,
    inproc_ai: str,
    ai_state: DevServerState,
    ai_gate: ServerGate,
) -> None:
    db = tmp_path / "b.db"
    token = await create_token(db)
    bridge = await start_bridge(procs, db, inproc_ai)
    client = Client(http, bridge, token)
    session_id = await client.new_session()

    ai_gate.hold()
    in_flight = asyncio.create_task(client.say(session_id, "cut off"))
    await ai_gate.wait_held()  # the turn is inside the AI server
    bridge.process.signal(SIGKILL)
    with pytest.raises(aiohttp.ClientError):
        await in_flight
    await bridge.process.wait_exit(5)
    assert query(db, "PRAGMA integrity_check") == [("ok",)]
    ai_gate.release()

    restarted = await start_bridge(procs, db, inproc_ai)
    client = Client(http, restarted, token)
    messages = await client.messages(session_id)
    assert [(m["role"], m["content"], m["status"]) for m in messages] == [
        ("user", "cut off", "failed")
    ]
    assert query(db, "SELECT count(*) FROM messages WHERE status = 'pending'") == [(0,)]

    turn = await client.say(session_id, "still there?")
    assert turn["ai_session"] == "reused"
    assert turn["user_message"]["status"] == "answered"
    assert ai_state.calls["scenario"] == 1


# -- 4. restart ----------------------------------------------------------------------------------


async def test_restarted_bridge_reuses_the_stored_ai_session(
    tmp_path: Path,
    procs: Processes,
    http: aiohttp.ClientSession,
    inproc_ai: str,
    ai_state: DevServerState,
) -> None:
    db = tmp_path / "b.db"
    token = await create_token(db)
    bridge = await start_bridge(procs, db, inproc_ai)
    client = Client(http, bridge, token)
    session_id = await client.new_session()
    assert (await client.say(session_id, "one"))["ai_session"] == "created"
    assert (await client.say(session_id, "two"))["ai_session"] == "reused"

    bridge.process.signal(SIGTERM)
    assert await bridge.process.wait_exit(10) == 0

    restarted = await start_bridge(procs, db, inproc_ai)
    turn = await Client(http, restarted, token).say(session_id, "three")
    assert turn["ai_session"] == "reused"
    # The AI server's own view: one session, holding the two earlier turns.
    assert turn["reply"]["content"].startswith("turn 3: you said 'three'; I hold 2 earlier turns")
    assert ai_state.calls["scenario"] == 1
    assert len(ai_state.sessions) == 1


# -- 5. and 6. SIGTERM ----------------------------------------------------------------------------


async def test_sigterm_lets_the_inflight_turn_finish_and_stops_accepting(
    tmp_path: Path,
    procs: Processes,
    http: aiohttp.ClientSession,
    inproc_ai: str,
    ai_gate: ServerGate,
) -> None:
    # A grace far longer than the test may take: the bridge must stop once its
    # turn is done, not when the grace runs out.
    grace = 10 * HANG_TIMEOUT
    db = tmp_path / "b.db"
    token = await create_token(db)
    bridge = await start_bridge(
        procs, db, inproc_ai, env={"SESSIONBRIDGE_SHUTDOWN_GRACE": str(grace)}
    )
    client = Client(http, bridge, token)
    session_id = await client.new_session()
    ai_gate.hold()

    in_flight = asyncio.create_task(client.say(session_id, "finish me"))
    await ai_gate.wait_held()  # the turn is inside the AI server
    bridge.process.signal(SIGTERM)

    # New connections are refused while the turn is still held in flight.
    await wait_until(lambda: asyncio.to_thread(port_refuses, bridge.port), every=0.02)
    assert not in_flight.done()
    ai_gate.release()

    turn = await in_flight
    assert turn["reply"]["content"].startswith("turn 1: you said 'finish me'")
    code = await bridge.process.wait_exit(HANG_TIMEOUT)
    assert code == 0, bridge.process.describe()
    assert port_refuses(bridge.port)

    stored = stored_messages(db)
    assert stored[turn["reply"]["id"]] == ("assistant", turn["reply"]["content"], "answered")
    assert stored[turn["user_message"]["id"]][2] == "answered"


@pytest.mark.parametrize("grace", [0, 1])
async def test_sigterm_cuts_a_turn_off_at_the_grace_and_fails_it(
    tmp_path: Path,
    procs: Processes,
    http: aiohttp.ClientSession,
    inproc_ai: str,
    ai_gate: ServerGate,
    grace: int,
) -> None:
    # The grace is what an operator sizes systemd's TimeoutStopSec by: a turn
    # that never ends by itself is cut off, and a grace of 0 must not mean "forever".
    db = tmp_path / "b.db"
    token = await create_token(db)
    bridge = await start_bridge(
        procs, db, inproc_ai, env={"SESSIONBRIDGE_SHUTDOWN_GRACE": str(grace)}
    )
    client = Client(http, bridge, token)
    session_id = await client.new_session()
    ai_gate.hold()  # never released while the bridge runs

    in_flight = asyncio.create_task(client.say(session_id, "too slow"))
    await ai_gate.wait_held()
    bridge.process.signal(SIGTERM)
    code = await bridge.process.wait_exit(grace + HANG_TIMEOUT)
    try:
        await in_flight
        outcome = "answered"
    except (aiohttp.ClientError, AssertionError):
        outcome = "cut off"

    assert code == 0, bridge.process.describe()
    assert outcome == "cut off"
    assert query(db, "SELECT role, content, status FROM messages") == [
        ("user", "too slow", "failed")
    ]
    assert query(db, "PRAGMA integrity_check") == [("ok",)]


async def test_sigterm_ends_a_cut_off_streamed_turn_with_turn_failed(
    tmp_path: Path,
    procs: Processes,
    http: aiohttp.ClientSession,
    inproc_ai: str,
    ai_gate: ServerGate,
) -> None:
    db = tmp_path / "b.db"
    token = await create_token(db)
    bridge = await start_bridge(procs, db, inproc_ai, env={"SESSIONBRIDGE_SHUTDOWN_GRACE": "1"})
    client = Client(http, bridge, token)
    session_id = await client.new_session()
    headers = {**client.headers, "Accept": "text/event-stream"}
    ai_gate.hold()  # never released while the bridge runs

    async with http.post(
        f"{bridge.url}/v1/sessions/{session_id}/messages",
        json={"content": "too slow"}, headers=headers,
    ) as response:
        started = await response.content.readline()
        assert started == b"event: turn.started\n"
        await ai_gate.wait_held()
        bridge.process.signal(SIGTERM)
        rest = (await response.content.read()).decode()
    code = await bridge.process.wait_exit(1 + HANG_TIMEOUT)

    assert code == 0, bridge.process.describe()
    events = re.findall(r"^event: (\S+)$", rest, re.MULTILINE)
    assert events == ["turn.failed"], rest
    assert '"code":"upstream_unavailable"' in rest.replace(" ", "")
    assert query(db, "SELECT role, status, error_code FROM messages") == [
        ("user", "failed", "upstream_unavailable")
    ]


# -- 7. sd_notify ----------------------------------------------------------------------


async def _next_notification(sock: socket.socket, timeout: float) -> str:
    loop = asyncio.get_running_loop()
    data = await asyncio.wait_for(loop.sock_recv(sock, 4096), timeout)
    return data.decode()


async def test_sd_notify_ready_after_listening_watchdog_and_stopping(
    tmp_path: Path, procs: Processes
) -> None:
    # A short directory of our own: AF_UNIX paths are limited to ~107 bytes.
    with tempfile.TemporaryDirectory(prefix="sbn") as short_dir, socket.socket(
        socket.AF_UNIX, socket.SOCK_DGRAM
    ) as sock:
        address = str(Path(short_dir) / "notify")
        sock.bind(address)
        sock.setblocking(False)
        bridge = await start_bridge(
            procs, tmp_path / "b.db", dead_upstream(),
            env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"},
            wait=False,
        )

        seen: list[str] = []
        while "READY=1" not in seen:
            seen.extend((await _next_notification(sock, 10)).splitlines())
        # READY=1 means "listening": the very next connect must succeed.
        with socket.create_connection(("127.0.0.1", bridge.port), timeout=1):
            pass
        await wait_http_ok(bridge.url + "/healthz", bridge.process, deadline=1)

        watchdogs = 0
        while watchdogs < 2:
            # WATCHDOG_USEC=200000 asks for a ping at least every 0.2 s; the
            # timeout leaves room for a loaded machine, and only stops a hang.
            state = await _next_notification(sock, 2)
            seen.extend(state.splitlines())
            watchdogs += state.splitlines().count("WATCHDOG=1")

        bridge.process.signal(SIGTERM)
        while "STOPPING=1" not in seen:
            seen.extend((await _next_notification(sock, 5)).splitlines())
        assert await bridge.process.wait_exit(10) == 0


# -- 8. demo ---------------------------------------------------------------------------------------


async def _demo_banner_token(process: Process, timeout: float = 10) -> str:
    found: list[str] = []

    def banner_shown() -> bool:
        out = process.stdout()
        token = re.search(r"Demo API key: (sb_\S+)", out)
        if token and "curl" in out:
            found.append(token.group(1))
            return True
        assert process.popen.poll() is None, f"no demo banner: {process.describe()}"
        return False

    await wait_until(banner_shown, timeout, lambda: f"no demo banner: {process.describe()}")
    return found[0]


async def test_demo_runs_without_upstream_and_keeps_its_token(
    tmp_path: Path, procs: Processes, http: aiohttp.ClientSession
) -> None:
    db = tmp_path / "d.db"

    async def run_demo() -> tuple[Bridge, str]:
        port = free_port()
        process = procs.start(
            "demo", ["-m", "sessionbridge", "demo", "--db", str(db), "--port", str(port)],
            clean_env(),
        )
        token = await _demo_banner_token(process)
        bridge = Bridge(process, port, db)
        await wait_http_ok(bridge.url + "/healthz", process)
        return bridge, token

    bridge, token = await run_demo()
    banner = bridge.process.stdout()
    assert re.search(rf"curl .*{bridge.port}|curl .*\$SB", banner), banner
    client = Client(http, bridge, token)
    session_id = await client.new_session()
    assert (await client.say(session_id, "Hello!"))["ai_session"] == "created"
    second = await client.say(session_id, "And tomorrow?")
    assert second["ai_session"] == "reused"
    assert "I hold 1 earlier turns" in second["reply"]["content"]
    assert Path(str(db) + ".demo-token").read_text().strip() == token

    bridge.process.signal(SIGTERM)
    assert await bridge.process.wait_exit(10) == 0

    again, token_again = await run_demo()
    assert token_again == token
    status, body = await Client(http, again, token_again).call("GET", "/v1/sessions")
    assert status == 200, body
    assert [s["id"] for s in body["sessions"]] == [session_id]


async def test_without_a_key_cache_a_revocation_by_another_process_is_at_once(
    procs: Processes, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    db = tmp_path / "keys.db"
    token = (await run_cli("keys", "create", "bob", "--db", str(db))).stdout.splitlines()[-1]
    bridge = await start_bridge(
        procs, db, dead_upstream(), env={"SESSIONBRIDGE_KEY_CACHE_SECONDS": "0"}
    )
    client = Client(http, bridge, token)
    assert (await client.call("GET", "/v1/sessions"))[0] == 200

    assert (await run_cli("keys", "revoke", "bob", "--db", str(db))).returncode == 0
    status, body = await client.call("GET", "/v1/sessions")

    assert status == 401, body


async def test_a_missing_database_driver_is_one_line_naming_the_extra(tmp_path: Path) -> None:
    # The interpreter is told that asyncpg is not installed, as in a plain
    # `pip install sessionbridge`, then runs the console script's main.
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "asyncpg.py").write_text("raise ImportError('No module named asyncpg')\n")
    done = await asyncio.create_subprocess_exec(
        sys.executable, "-c",
        "import sys; from sessionbridge.cli import main; sys.exit(main(sys.argv[1:]))",
        "migrate", "--db", "postgresql://bridge@127.0.0.1:9/none",
        env=clean_env(PYTHONPATH=str(blocked)), cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(done.communicate(), HANG_TIMEOUT)
    stderr = err.decode()

    assert done.returncode == 2, (out, stderr)
    assert "pip install 'sessionbridge[postgres]'" in stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
