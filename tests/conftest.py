"""Fixtures built from the real factories: the bridge on a real loopback socket,
talking to the reference AI server on another real loopback socket, or to
:class:`~tests.doubles.FakeAIServer` in this process (``fake``, ``make_fake_api``)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer
from aioresponses import aioresponses
from aioresponses import core as aioresponses_core
from pytest_aiohttp import AiohttpClient, AiohttpServer

from sessionbridge.app import RUNNER_OPTIONS, create_app
from sessionbridge.config import Settings, TokenRange
from sessionbridge.reference.openai_server import (
    OpenAIReferenceState,
    create_openai_reference_app,
)
from sessionbridge.reference.seed_server import (
    DEFAULT_MAX_TOKENS_RANGE,
    DevServerState,
    create_devserver_app,
)
from sessionbridge.tokens import hash_token, new_token
from sessionbridge.upstream import AIServer
from sessionbridge.web.appkeys import AI_SERVER, SETTINGS, STORE

from .doubles import HANG_TIMEOUT, FakeAIServer, ServerGate, wait_until
from .postgres import migrated_postgres_dsn, own_postgres, postgres_dsn, postgres_server
from .processes import Processes

__all__ = ["migrated_postgres_dsn", "own_postgres", "postgres_dsn", "postgres_server"]  # fixtures

BridgeClient = TestClient[web.Request, web.Application]


class ServedTestServer(TestServer):
    """A test server that runs the bridge's handlers as ``serve`` does.

    aiohttp's test server cancels a handler whose client goes away; the
    bridge's server does not (``RUNNER_OPTIONS``), and a turn may run in its
    handler's task.
    """

    async def _make_runner(self, **kwargs: Any) -> web.BaseRunner:
        return await super()._make_runner(**{**kwargs, **RUNNER_OPTIONS})


@pytest.fixture
def aiohttp_client(aiohttp_client: AiohttpClient) -> AiohttpClient:
    """pytest-aiohttp's client fixture, with the bridge's apps served as ``serve`` serves them."""

    async def client(param: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(param, web.Application) and SETTINGS in param:
            param = ServedTestServer(param, **kwargs.pop("server_kwargs", None) or {})
        return await aiohttp_client(param, *args, **kwargs)

    return client  # type: ignore[return-value]


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    """Real processes for the test; teardown kills and reaps whatever still runs."""
    registry = Processes(tmp_path)
    try:
        yield registry
    finally:
        registry.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client for bridges running as processes."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session


@pytest.fixture
def ai_state() -> DevServerState:
    return DevServerState()


@pytest.fixture
def ai_gate() -> ServerGate:
    """Holds the reference AI server's /chat calls while a test looks (open unless held)."""
    return ServerGate("/chat")


@pytest.fixture
def openai_gate() -> ServerGate:
    """Holds a reference OpenAI-compatible server's chat requests, or their streamed writes."""
    return ServerGate("/v1/chat/completions")


@pytest.fixture
async def ai_server(
    aiohttp_server: AiohttpServer, ai_state: DevServerState, ai_gate: ServerGate
) -> AsyncIterator[TestServer]:
    yield await aiohttp_server(ai_gate.install(create_devserver_app(ai_state)))
    ai_gate.release_all()  # before the server closes: no call may stay held


@pytest.fixture
def settings(tmp_path: Path, ai_server: TestServer, ai_state: DevServerState) -> Settings:
    return Settings(
        db=str(tmp_path / "bridge.db"),
        upstream_url=str(ai_server.make_url("")).rstrip("/"),
        upstream_user=ai_state.user,
        upstream_password=ai_state.password,
        upstream_flavor=ai_state.flavor,
        upstream_max_tokens=TokenRange(*ai_state.max_tokens_range),
        upstream_timeout=5.0,
        health_timeout=0.5,
    )


class Api:
    """The bridge's test client with a bearer token and small helpers for common calls."""

    def __init__(self, client: BridgeClient, token: str) -> None:
        self.client = client
        self.token = token

    @property
    def app(self) -> web.Application:
        return self.client.app

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", **(extra or {})}

    async def request(
        self, method: str, path: str, *, headers: dict[str, str] | None = None, **kwargs: Any
    ) -> ClientResponse:
        return await self.client.request(method, path, headers=self.headers(headers), **kwargs)

    async def new_session(self, scenario: str = "You are a patient tutor.", **fields: Any) -> str:
        response = await self.request("POST", "/v1/sessions", json={"scenario": scenario, **fields})
        assert response.status == 201, await response.text()
        return str((await response.json())["id"])

    async def send(self, session_id: str, content: str, **kwargs: Any) -> ClientResponse:
        return await self.request(
            "POST", f"/v1/sessions/{session_id}/messages", json={"content": content}, **kwargs
        )

    async def say(self, session_id: str, content: str) -> dict[str, Any]:
        response = await self.send(session_id, content)
        assert response.status == 200, await response.text()
        body: dict[str, Any] = await response.json()
        return body

    async def messages(self, session_id: str) -> list[dict[str, Any]]:
        response = await self.request("GET", f"/v1/sessions/{session_id}/messages?limit=200")
        assert response.status == 200, await response.text()
        return list((await response.json())["messages"])


async def problem(response: ClientResponse, status: int, code: str) -> dict[str, Any]:
    """Assert an RFC 9457 problem with this status and code; return its body."""
    text = await response.text()
    assert response.status == status, text
    assert response.content_type == "application/problem+json", response.content_type
    body: dict[str, Any] = await response.json(content_type=None)
    assert body["code"] == code, body
    assert body["status"] == status
    assert {"type", "title", "detail"} <= body.keys()
    return body


async def readyz(api: Api) -> tuple[int, dict[str, Any]]:
    """/readyz's status and body (a 503 is checked to be the not_ready problem)."""
    response = await api.client.get("/readyz")
    body: dict[str, Any] = await response.json(content_type=None)
    if response.status == 503:
        assert response.content_type == "application/problem+json"
        assert body["code"] == "not_ready"
    return response.status, body


async def readyz_becomes(api: Api, status: int, timeout: float = HANG_TIMEOUT) -> dict[str, Any]:
    """Poll /readyz until it answers ``status`` (readiness is probed in the background)."""
    answers: list[tuple[int, dict[str, Any]]] = []

    async def answers_status() -> bool:
        answers.append(await readyz(api))
        return answers[-1][0] == status

    await wait_until(answers_status, timeout, lambda: f"/readyz still answers {answers[-1]}")
    return answers[-1][1]


async def issue_token(app: web.Application, name: str) -> str:
    token = new_token()
    await app[STORE].create_key(name, hash_token(token))
    return token


MakeApi = Callable[..., Awaitable[Api]]


@pytest.fixture
def make_api(aiohttp_client: AiohttpClient, settings: Settings) -> MakeApi:
    """Start a bridge (optionally with changed settings) and give an Api with a fresh key."""

    async def make(**changes: Any) -> Api:
        client = await aiohttp_client(create_app(dataclasses.replace(settings, **changes)))
        return Api(client, await issue_token(client.app, "test"))

    return make


@pytest.fixture
async def api(make_api: MakeApi) -> Api:
    return await make_api()


# -- every flavour of AI server ------------------------------------------------------------

FLAVORS = ("scenario", "init-session", "openai")


class ReferenceAI:
    """The reference AI server of one flavour, and the switches tests of every flavour turn.

    ``state`` is the server's own state (``DevServerState`` for both seed
    generations, ``OpenAIReferenceState`` for OpenAI-compatible): its
    ``calls``, ``fail_next`` and ``empty_replies`` mean the same in both.
    ``gate`` holds its chat requests.
    """

    def __init__(
        self,
        flavor: str,
        state: DevServerState | OpenAIReferenceState,
        server: TestServer,
        gate: ServerGate,
    ) -> None:
        self.flavor = flavor
        self.state = state
        self.server = server
        self.gate = gate

    @property
    def seed(self) -> bool:
        """Whether it keeps sessions of its own (the seed protocol)."""
        return isinstance(self.state, DevServerState)

    def settings(self) -> dict[str, Any]:
        """The bridge's settings that point at this server."""
        if isinstance(self.state, DevServerState):
            return {
                "upstream_url": str(self.server.make_url("")).rstrip("/"),
                "upstream_flavor": self.flavor,
                "upstream_user": self.state.user,
                "upstream_password": self.state.password,
                "upstream_max_tokens": TokenRange(*self.state.max_tokens_range),
            }
        return {
            "upstream_url": str(self.server.make_url("/v1")),
            "upstream_flavor": "openai",
            "upstream_max_tokens": TokenRange(1, 500),
            "default_max_tokens": 20,
        }

    @property
    def created(self) -> int:
        """AI sessions the seed protocol created (its /scenario or /init-session calls)."""
        assert isinstance(self.state, DevServerState), "only the seed protocol keeps sessions"
        return self.state.calls[self.flavor]

    def set_ready(self, ready: bool) -> None:
        """The AI server says it is healthy, or not (a seed server unhealthy, an
        OpenAI-compatible one loading its model)."""
        if isinstance(self.state, DevServerState):
            self.state.healthy = ready
        else:
            self.state.loading = not ready

    def restart(self) -> None:
        """The AI server restarts: it forgets every session or cached prompt."""
        if isinstance(self.state, DevServerState):
            self.state.forget_sessions()
        else:
            self.state.restart()


@pytest.fixture(params=FLAVORS)
async def reference_ai(
    request: pytest.FixtureRequest, aiohttp_server: AiohttpServer
) -> AsyncIterator[ReferenceAI]:
    """Each flavour's reference AI server in turn (the test runs once per flavour)."""
    flavor: str = request.param
    state: DevServerState | OpenAIReferenceState
    if flavor == "openai":
        state = OpenAIReferenceState()
        gate = ServerGate("/v1/chat/completions")
        app = create_openai_reference_app(state)
    else:
        state = DevServerState(flavor=flavor, max_tokens_range=DEFAULT_MAX_TOKENS_RANGE[flavor])
        gate = ServerGate("/chat")
        app = create_devserver_app(state)
    yield ReferenceAI(flavor, state, await aiohttp_server(gate.install(app)), gate)
    gate.release_all()


@pytest.fixture
def flavored_settings(tmp_path: Path, reference_ai: ReferenceAI) -> Settings:
    return Settings(
        db=str(tmp_path / "bridge.db"),
        upstream_timeout=5.0,
        health_timeout=0.5,
        **reference_ai.settings(),
    )


@pytest.fixture
def make_flavored_api(aiohttp_client: AiohttpClient, flavored_settings: Settings) -> MakeApi:
    """Start a bridge in front of ``reference_ai`` (optionally with changed settings)."""

    async def make(**changes: Any) -> Api:
        client = await aiohttp_client(create_app(dataclasses.replace(flavored_settings, **changes)))
        return Api(client, await issue_token(client.app, "test"))

    return make


def answering_with(app: web.Application, ai: AIServer) -> web.Application:
    """The bridge ``app`` with ``ai`` in place of the adapter its settings name.

    Each of the app's cleanup contexts is wrapped so that, right after the
    one that sets the app's AI server, ``ai`` replaces it: everything started
    after it (the conversations, readiness) talks to ``ai``.
    """

    def swapping(context: Callable[[web.Application], Any]) -> Any:
        async def swapped(app: web.Application) -> AsyncIterator[None]:
            inner = aiter(context(app))
            await anext(inner)
            if AI_SERVER in app and app[AI_SERVER] is not ai:
                app[AI_SERVER] = ai
            yield
            await anext(inner, None)

        return swapped

    for index, context in enumerate(list(app.cleanup_ctx)):
        app.cleanup_ctx[index] = swapping(context)
    return app


@pytest.fixture
def fake() -> Iterator[FakeAIServer]:
    """The AI server double (echoing by default: set ``fake.handler``); released at teardown."""
    ai = FakeAIServer()
    yield ai
    ai.release()


@pytest.fixture
def fake_settings(tmp_path: Path) -> Settings:
    return Settings(
        db=str(tmp_path / "bridge.db"),
        upstream_url="http://127.0.0.1:9",  # never called: the fake answers
        upstream_timeout=5.0,
        health_timeout=0.5,
    )


@pytest.fixture
def make_fake_api(
    aiohttp_client: AiohttpClient, fake_settings: Settings, fake: FakeAIServer
) -> MakeApi:
    """Start a bridge that talks to ``fake`` (optionally with changed settings)."""

    async def make(**changes: Any) -> Api:
        app = answering_with(create_app(dataclasses.replace(fake_settings, **changes)), fake)
        client = await aiohttp_client(app)
        return Api(client, await issue_token(client.app, "test"))

    return make


@pytest.fixture
async def fake_api(make_fake_api: MakeApi) -> Api:
    return await make_fake_api()


class _ResponseWithWriter(ClientResponse):
    # aioresponses 0.7.9 builds responses without the stream_writer argument
    # that aiohttp 3.14 requires (aioresponses issue #289, fix in PR #288);
    # aiohttp reads only stream_writer.output_size. Delete this class and its
    # use below when a fixed aioresponses release lands.
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", SimpleNamespace(output_size=0))
        super().__init__(*args, **kwargs)


@pytest.fixture
def mock_upstream(monkeypatch: pytest.MonkeyPatch) -> Iterator[aioresponses]:
    """aioresponses for AI-server edge cases a real server cannot easily produce."""
    monkeypatch.setattr(aioresponses_core, "ClientResponse", _ResponseWithWriter)
    with aioresponses() as mocked:
        yield mocked
