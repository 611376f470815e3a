"""A small client of the bridge's API for setting up and checking benchmark runs.

Setup traffic (creating sessions, warm-up turns) and reading /metrics go
through here; measured traffic goes through loadgen.py.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import aiohttp

T = TypeVar("T")
SCENARIO = "You are a patient guide to a small harbour town."
WARM_UP_CONTENT = "Hello, where should I start?"
REQUEST_TIMEOUT = 60.0


class SetupError(RuntimeError):
    """A setup request failed; the figures after it would mean nothing."""


async def bounded_gather(
    items: Iterable[T], call: Callable[[T], Awaitable[Any]], concurrency: int
) -> list[Any]:
    gate = asyncio.Semaphore(concurrency)

    async def one(item: T) -> Any:
        async with gate:
            return await call(item)

    return await asyncio.gather(*(one(item) for item in items))


class BridgeClient:
    def __init__(self, base_url: str, token: str, connections: int = 32) -> None:
        self.base_url = base_url
        self._token = token
        self._connections = connections
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> BridgeClient:
        self._http = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {self._token}"},
            connector=aiohttp.TCPConnector(limit=self._connections),
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._http is not None:
            await self._http.close()

    @property
    def http(self) -> aiohttp.ClientSession:
        assert self._http is not None, "use BridgeClient in an async with block"
        return self._http

    async def _created(self, path: str, payload: dict[str, str], status: int) -> str:
        """POST ``payload`` to ``path``; the id of what it created (answered ``status``)."""
        async with self.http.post(self.base_url + path, json=payload) as response:
            body = await response.json()
            if response.status != status:
                raise SetupError(f"POST {path} answered {response.status}: {body}")
            return str(body["id"])

    async def create_session(self, _: object = None) -> str:
        return await self._created("/v1/sessions", {"scenario": SCENARIO}, 201)

    async def create_sessions(self, count: int, concurrency: int = 16) -> list[str]:
        return await bounded_gather(range(count), self.create_session, concurrency)

    async def turn(self, session_id: str, content: str = WARM_UP_CONTENT) -> tuple[int, str]:
        """One message; returns the status and the ai_session kind (or the error code).

        The body also carries the AI server's own fields, so the same call
        works against the passthrough (whose answers have no ai_session).
        """
        payload = {"content": content, "message": content, "max_tokens": 64}
        async with self.http.post(
            f"{self.base_url}/v1/sessions/{session_id}/messages", json=payload
        ) as response:
            body = await response.json(content_type=None)
            if response.status == 200:
                return response.status, str(body.get("ai_session", "passthrough"))
            return response.status, str(body.get("code", body.get("detail", "unknown")))

    async def warm(self, session_ids: list[str], concurrency: int = 16) -> dict[str, int]:
        """One turn on each session, so its AI session exists before anything is measured."""
        outcomes = await bounded_gather(session_ids, self.turn, concurrency)
        failed = [outcome for outcome in outcomes if outcome[0] != 200]
        if failed:
            raise SetupError(f"{len(failed)} warm-up turns failed, e.g. {failed[0]}")
        return dict(collections.Counter(kind for _, kind in outcomes))

    async def create_conversation(self, _: object = None) -> str:
        """A conversation of the OpenAI face (a session), with the bench's instructions."""
        return await self._created("/v1/conversations", {}, 200)

    async def create_conversations(self, count: int, concurrency: int = 16) -> list[str]:
        return await bounded_gather(range(count), self.create_conversation, concurrency)

    async def respond(self, conversation_id: str, content: str = WARM_UP_CONTENT) -> str:
        """One response in a conversation; returns its status (or the error's code)."""
        payload = {"model": "bench", "input": content, "conversation": conversation_id,
                   "instructions": SCENARIO, "max_output_tokens": 64}
        async with self.http.post(self.base_url + "/v1/responses", json=payload) as response:
            body = await response.json(content_type=None)
            if response.status == 200:
                return str(body.get("status"))
            return str((body.get("error") or {}).get("code", response.status))

    async def warm_conversations(
        self, conversation_ids: list[str], concurrency: int = 16
    ) -> dict[str, int]:
        """One response in each conversation, so its AI session exists before the measure."""
        outcomes = await bounded_gather(conversation_ids, self.respond, concurrency)
        failed = [outcome for outcome in outcomes if outcome != "completed"]
        if failed:
            raise SetupError(f"{len(failed)} warm-up responses failed, e.g. {failed[0]}")
        return dict(collections.Counter(outcomes))

    async def metrics(self) -> dict[str, float]:
        """GET /metrics as {"name{labels}": value}."""
        async with self.http.get(self.base_url + "/metrics") as response:
            text = await response.text()
        samples: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
        return samples

    async def wait_idle(self, deadline_s: float = 30.0) -> dict[str, float]:
        """Poll /metrics until no turn runs or waits (or the deadline passes); return the last."""
        deadline = time.monotonic() + deadline_s
        while True:
            samples = await self.metrics()
            idle = (samples.get("sessionbridge_locked_sessions", 0) == 0
                    and samples.get("sessionbridge_turns_in_flight", 0) == 0)
            if idle or time.monotonic() >= deadline:
                return samples
            await asyncio.sleep(0.2)


def ai_sessions(samples: dict[str, float], kind: str) -> float:
    return samples.get(f'sessionbridge_ai_sessions_total{{kind="{kind}"}}', 0.0)


def answered_turns(samples: dict[str, float]) -> float:
    return samples.get('sessionbridge_turns_total{outcome="answered"}', 0.0)
