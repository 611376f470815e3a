"""The client of the slow-AI-server measurement: many conversations at once, each turn after turn.

wrk cannot drive this shape (every connection must keep to its own session
and wait for each answer before the next question), and aiohttp's client
spends about 0.3 ms of CPU a turn, which on two cores is taken from the
servers being measured. This client writes pre-formatted HTTP/1.1 requests
on one keep-alive connection per conversation and reads answers by their
Content-Length (both targets send one), at about half that cost.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import statistics
import time
from typing import Any
from urllib.parse import urlsplit

from procs import cpu_seconds

REQUEST_TIMEOUT = 60.0


def _request(host: str, path: str, token: str, content: str) -> bytes:
    # The body carries both targets' field names, like the load generator's.
    body = json.dumps({"content": content, "message": content, "max_tokens": 64}).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, Any]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length is None:
        raise ValueError("an answer without Content-Length")
    body = await reader.readexactly(length)
    try:
        return status, json.loads(body)
    except ValueError:
        return status, None


def _outcome(status: int, body: Any) -> str:
    """The answer's ai_session kind ("passthrough" for the AI server's own answer), or its error."""
    if not isinstance(body, dict):
        return f"{status} unreadable"
    if status == 200:
        return str(body.get("ai_session", "passthrough"))
    return f"{status} {body.get('code', body.get('detail', 'unknown'))}"


async def _conversation(
    base_url: str, token: str, session_id: str, turns: int, outcomes: collections.Counter[str]
) -> list[float]:
    """One connection, ``turns`` questions one after another; the seconds each turn took."""
    url = urlsplit(base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    path = f"/v1/sessions/{session_id}/messages"
    requests = [_request(f"{host}:{port}", path, token, f"question {n + 1}") for n in range(turns)]
    reader, writer = await asyncio.open_connection(host, port)
    took: list[float] = []
    try:
        for request in requests:
            started = time.perf_counter()
            try:
                writer.write(request)
                status, body = await asyncio.wait_for(_read_answer(reader), REQUEST_TIMEOUT)
            except (OSError, ValueError, TimeoutError, asyncio.IncompleteReadError) as exc:
                outcomes[type(exc).__name__] += 1
                break  # the connection's state is unknown; this conversation ends
            took.append(time.perf_counter() - started)
            outcomes[_outcome(status, body)] += 1
    finally:
        writer.close()
    return took


async def run_conversations(
    base_url: str, token: str, session_ids: list[str], turns: int
) -> dict[str, Any]:
    """Every session at once, each sending its turns one after another; wall time and more."""
    outcomes: collections.Counter[str] = collections.Counter()
    cpu = cpu_seconds(os.getpid())
    started = time.perf_counter()
    per_conversation = await asyncio.gather(
        *(_conversation(base_url, token, sid, turns, outcomes) for sid in session_ids)
    )
    wall = time.perf_counter() - started
    client_cpu = cpu_seconds(os.getpid()) - cpu
    all_turns = [seconds for took in per_conversation for seconds in took]
    durations = [sum(took) for took in per_conversation]
    return {
        "wall_s": wall,
        "slowest_conversation_s": max(durations),
        "median_conversation_s": statistics.median(durations),
        "turn_p50_ms": statistics.median(all_turns) * 1000 if all_turns else None,
        "turn_max_ms": max(all_turns) * 1000 if all_turns else None,
        "client_cpu_s": client_cpu,
        "outcomes": dict(outcomes),
    }
