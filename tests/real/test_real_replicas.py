"""Several AI servers with a real model (docs/ai-servers.md): two llama-servers behind one bridge.

A conversation stays on one server while it is healthy; when that server is
killed (kill -9) between turns, the next turn is answered by the other one
with no error, its history sent there; once the first is back, the
conversation returns to it.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sessionbridge.config import Settings, TokenRange
from tests.conftest import Api, MakeApi
from tests.doubles import wait_until
from tests.sse import joined, read_events

from .conftest import REPLY_TOKENS, TURN_TIMEOUT, launcher, measured

pytestmark = pytest.mark.real

SCENARIO = "You are a helpful guide. Answer in one short sentence."


@pytest.fixture
def two_llamas(tmp_path: Path) -> Iterator[list[Any]]:
    reason = launcher.missing_reason()
    if reason:
        pytest.skip(f"no real model: {reason}; `make test-real` installs it")
    servers = [
        launcher.LlamaServer(
            tmp_path / f"slots-{n}", tmp_path / f"llama-{n}.log", parallel=2, threads=1
        )
        for n in range(2)
    ]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def settings(tmp_path: Path, two_llamas: list[Any]) -> Settings:
    return Settings(
        db=str(tmp_path / "bridge.db"),
        upstream_url=",".join(server.base_url for server in two_llamas),
        upstream_flavor="openai",
        upstream_max_tokens=TokenRange(1, 500),
        default_max_tokens=REPLY_TOKENS,
        upstream_timeout=TURN_TIMEOUT,
        health_timeout=5.0,
    )


def prompt_tokens_seen(server: Any) -> float:
    """The prompt tokens a llama-server has processed, from its own /metrics."""
    import urllib.request

    with urllib.request.urlopen(server.root + "/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.search(r"^llamacpp:prompt_tokens_total\s+(\S+)", text, re.M)
    return float(found.group(1)) if found else 0.0


async def test_a_killed_server_costs_no_error_and_the_conversation_comes_back(
    make_api: MakeApi, two_llamas: list[Any]
) -> None:
    api: Api = await make_api()
    session_id = await api.new_session(SCENARIO)
    before = [prompt_tokens_seen(s) for s in two_llamas]
    first = await api.say(session_id, "What is the capital of Portugal?")
    second = await api.say(session_id, "What is it famous for?")
    grown = [prompt_tokens_seen(s) - b for s, b in zip(two_llamas, before, strict=True)]
    home = 0 if grown[0] > 0 else 1
    assert grown[1 - home] == 0, grown  # both turns on one server
    assert (first["ai_session"], second["ai_session"]) == ("created", "reused")

    # kill -9 of the conversation's server between turns.
    popen = two_llamas[home]._popen
    popen.send_signal(signal.SIGKILL)
    popen.wait(30)
    elsewhere = await api.say(session_id, "And what should I eat there?")
    after = await api.say(session_id, "Thank you!")

    measured("replicas", f"home {home}; after the kill {elsewhere['ai_session']},"
             f" then {after['ai_session']}")
    assert elsewhere["reply"]["content"].strip()
    assert elsewhere["ai_session"] == "recovered"  # the history was sent to the other
    assert after["ai_session"] == "reused"

    # The server back: once the bridge has seen it healthy, the conversation
    # returns to it (its first choice), the history sent there again.
    two_llamas[home].start()
    await wait_until(lambda: replicas_healthy(api), 120.0, "the server never came back")
    seen = prompt_tokens_seen(two_llamas[home])
    back = await api.say(session_id, "One more thing: is it sunny in May?")
    assert prompt_tokens_seen(two_llamas[home]) > seen
    assert back["ai_session"] == "recovered"
    messages = await api.messages(session_id)
    assert [m["status"] for m in messages if m["role"] == "user"] == ["answered"] * 5


async def replicas_healthy(api: Api) -> bool:
    response = await api.client.get("/readyz")
    if response.status != 200:
        return False
    body = await response.json()
    return all(r["state"] == "healthy" for r in body.get("replicas", []))


async def test_a_server_killed_mid_stream_has_its_reply_finished_by_the_other(
    make_api: MakeApi, two_llamas: list[Any]
) -> None:
    # The client reads the first pieces of a streamed reply; then the server
    # writing it is killed (kill -9). The other server goes on from those
    # pieces (llama.cpp's prefill): one reply, no error.
    api: Api = await make_api()
    session_id = await api.new_session(SCENARIO, max_tokens=160)
    await api.say(session_id, "Hello!")
    before = [prompt_tokens_seen(s) for s in two_llamas]
    response = await api.send(
        session_id, "Describe the old town of Lisbon, street by street, in detail.",
        headers={"Accept": "text/event-stream"},
    )
    seen = await read_events(response, stop_after_deltas=3)
    grown = [prompt_tokens_seen(s) - b for s, b in zip(two_llamas, before, strict=True)]
    home = 0 if grown[0] > 0 else 1
    popen = two_llamas[home]._popen
    popen.send_signal(signal.SIGKILL)
    popen.wait(30)
    events = joined(seen, await read_events(response))

    reply = events.events[-1].data.get("reply", {}).get("content", "")
    measured("replicas", f"killed mid-stream after {len(seen.deltas)} pieces:"
             f" {events.names[-1]}, {len(events.deltas)} pieces in all; the client had"
             f" {seen.text!r}, the reply goes on {reply[len(seen.text):len(seen.text) + 60]!r}")
    assert events.names[-1] == "turn.completed", events.events[-1]
    assert events.text == reply and reply.startswith(seen.text) and len(reply) > len(seen.text)
    # It goes on from those pieces, not over again (the server repeats the
    # start in its answer, which the bridge takes off).
    assert not reply[len(seen.text):].startswith(seen.text), reply
    assert prompt_tokens_seen(two_llamas[1 - home]) > before[1 - home]
    messages = await api.messages(session_id)
    assert messages[-1]["role"] == "assistant" and messages[-1]["content"] == reply
