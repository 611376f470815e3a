"""The reference AI server: a development and test double, NOT a model.

This module owns a small aiohttp application that speaks the upstream
AI-server protocol (docs/ai-servers.md) in both generations, ``scenario``
and ``init-session``, so the bridge can be developed, tested and demonstrated
without a real model. It generates nothing: every reply comes from
:func:`reply_for`, a deterministic function that reports which context the
session holds, so tests can prove that a conversation reuses one session and
that a recovered session carries its transcript.

Everything lives in one :class:`DevServerState` per application (sessions,
call counters and fault-injection switches). Tests reach it through
``app[DEVSERVER_STATE]`` and mutate it directly; sessions live only in memory,
exactly like the real server, so :meth:`DevServerState.forget_sessions`
simulates a restart.

Run it by hand with ``python -m sessionbridge.reference.seed_server --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import collections
import json
import logging
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

__all__ = [
    "DEVSERVER_STATE",
    "DevServerState",
    "DevSession",
    "create_devserver_app",
    "main",
    "reply_for",
]

log = logging.getLogger(__name__)

FLAVORS = ("scenario", "init-session")
DEFAULT_MAX_TOKENS_RANGE: Mapping[str, tuple[int, int]] = {
    "scenario": (10, 500),
    "init-session": (50, 1000),
}
SESSION_COOKIE = "session_id"

# The real server has no body limit of its own; a recovered session's scenario
# carries a transcript, so aiohttp's 1 MiB default must not be what rejects it.
_CLIENT_MAX_SIZE = 16 * 1024 * 1024

ValidationIssue = dict[str, object]


@dataclass
class DevSession:
    """One AI-server session: its scenario and its answered (user, assistant) turns."""

    scenario: str
    history: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class DevServerState:
    """The switches, sessions and counters of one reference AI server.

    Tests mutate the fields directly; every request reads them afresh, so a
    change takes effect from the next request on.
    """

    flavor: str = "scenario"
    user: str = "dev"
    password: str = "dev"
    # Callers that want the init-session generation's range pass (50, 1000).
    max_tokens_range: tuple[int, int] = (10, 500)
    # Seconds each /chat takes, standing in for generation time.
    delay: float = 0.0
    # The real server answers one request at a time, /health included.
    serial: bool = False
    # The next N /chat calls answer an empty reply.
    empty_replies: int = 0
    # Status codes for the next /chat calls, taken from the front.
    fail_next: list[int] = field(default_factory=list)
    # /chat never answers, to provoke client timeouts.
    hang: bool = False
    healthy: bool = True
    sessions: dict[str, DevSession] = field(default_factory=dict)
    calls: collections.Counter[str] = field(default_factory=collections.Counter)

    def __post_init__(self) -> None:
        if self.flavor not in FLAVORS:
            raise ValueError(f"flavor must be one of {FLAVORS}, not {self.flavor!r}")
        low, high = self.max_tokens_range
        if low > high:
            raise ValueError(f"max_tokens_range is empty: {self.max_tokens_range}")

    def forget_sessions(self) -> None:
        """Simulate a restart: every session is gone, the counters stay."""
        self.sessions.clear()


DEVSERVER_STATE = web.AppKey("devserver_state", DevServerState)
# One lock per application serialises every handler when state.serial is set.
_SERIAL_LOCK = web.AppKey("devserver_serial_lock", asyncio.Lock)


def reply_for(session: DevSession, message: str) -> str:
    """The deterministic responder: a reply that shows what context the session holds."""
    history = session.history
    return (
        f"turn {len(history) + 1}: you said {message!r}; "
        f"I hold {len(history)} earlier turns; "
        f"scenario starts {session.scenario[:40]!r}"
    )


class _Rejected(Exception):
    """A request the server refuses; the middleware turns it into a JSON answer."""

    def __init__(
        self,
        status: int,
        detail: str | list[ValidationIssue],
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(status, detail)
        self.status = status
        self.detail = detail
        self.headers = dict(headers or {})


def _issue(loc: list[str | int], msg: str, kind: str) -> ValidationIssue:
    # Shaped like the validation errors the real (FastAPI) server returns.
    return {"loc": loc, "msg": msg, "type": kind}


@web.middleware
async def _protocol_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[DEVSERVER_STATE]
    if not state.serial:
        return await _answer(request, handler)
    # Holding the lock for the whole handler is what makes /health go silent
    # while a /chat "generates", as it does on the real server.
    async with request.app[_SERIAL_LOCK]:
        return await _answer(request, handler)


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except _Rejected as rejected:
        return web.json_response(
            {"detail": rejected.detail}, status=rejected.status, headers=rejected.headers
        )
    except web.HTTPException as exc:
        # Router errors (unknown path, wrong method, body too large) get the
        # real server's JSON shape instead of aiohttp's plain text.
        if exc.status < 400:
            raise
        headers = {hdrs.ALLOW: exc.headers[hdrs.ALLOW]} if hdrs.ALLOW in exc.headers else {}
        return web.json_response({"detail": exc.reason}, status=exc.status, headers=headers)


def _basic_credentials(header: str) -> tuple[str, str] | None:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, colon, password = decoded.partition(":")
    if not colon:
        return None
    return user, password


def _require_auth(request: web.Request, state: DevServerState) -> None:
    credentials = _basic_credentials(request.headers.get(hdrs.AUTHORIZATION, ""))
    if credentials is not None:
        user, password = credentials
        # Both comparisons always run, so timing does not tell which one failed.
        user_ok = secrets.compare_digest(user.encode(), state.user.encode())
        password_ok = secrets.compare_digest(password.encode(), state.password.encode())
        if user_ok and password_ok:
            return
    raise _Rejected(401, "Invalid credentials", headers={hdrs.WWW_AUTHENTICATE: "Basic"})


def _require_flavor(state: DevServerState, flavor: str) -> None:
    # Each generation knows only its own way to create a session; the other
    # endpoint simply does not exist there.
    if state.flavor != flavor:
        raise web.HTTPNotFound()


def _not_an_object() -> _Rejected:
    return _Rejected(
        422,
        [
            _issue(
                ["body"],
                "Input should be a valid dictionary or object to extract fields from",
                "model_attributes_type",
            )
        ],
    )


async def _json_object(request: web.Request) -> dict[str, object]:
    raw = await request.text()
    if not raw.strip():
        raise _Rejected(422, [_issue(["body"], "Field required", "missing")])
    if request.content_type != "application/json":
        # Like the real server: a body not declared as JSON is not parsed as
        # JSON, so it cannot be the object the endpoint expects.
        raise _not_an_object()
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise _Rejected(
            422, [_issue(["body", exc.pos], "JSON decode error", "json_invalid")]
        ) from None
    if not isinstance(body, dict):
        raise _not_an_object()
    return body


def _string_field(
    body: Mapping[str, object], name: str, issues: list[ValidationIssue]
) -> str | None:
    if name not in body:
        issues.append(_issue(["body", name], "Field required", "missing"))
        return None
    value = body[name]
    if not isinstance(value, str):
        issues.append(_issue(["body", name], "Input should be a valid string", "string_type"))
        return None
    return value


def _int_field(body: Mapping[str, object], name: str, issues: list[ValidationIssue]) -> int | None:
    if name not in body:
        issues.append(_issue(["body", name], "Field required", "missing"))
        return None
    value = body[name]
    # bool is an int subclass in Python, but true/false is no token count.
    if not isinstance(value, int) or isinstance(value, bool):
        issues.append(_issue(["body", name], "Input should be a valid integer", "int_type"))
        return None
    return value


def _check_range(
    name: str, value: int, bounds: tuple[int, int], issues: list[ValidationIssue]
) -> None:
    low, high = bounds
    if value < low:
        issues.append(
            _issue(
                ["body", name],
                f"Input should be greater than or equal to {low}",
                "greater_than_equal",
            )
        )
    elif value > high:
        issues.append(
            _issue(
                ["body", name], f"Input should be less than or equal to {high}", "less_than_equal"
            )
        )


def _chat_failure(state: DevServerState, status: int, detail: str) -> _Rejected:
    if state.flavor == "init-session":
        # The later generation catches every error inside /chat and re-raises
        # it as a 500 whose detail embeds the original "status: detail".
        return _Rejected(500, f"Chat request failed: {status}: {detail}")
    return _Rejected(status, detail)


async def _hang_forever() -> None:
    # Only cancellation (the client giving up, or shutdown) ends the wait.
    await asyncio.Event().wait()


async def _accept(
    request: web.Request, endpoint: str, flavor: str | None = None
) -> tuple[DevServerState, dict[str, object]]:
    """The start of every POST: the endpoint exists (in this generation), is
    counted, the caller is authenticated, and the body is a JSON object."""
    state = request.app[DEVSERVER_STATE]
    if flavor is not None:
        _require_flavor(state, flavor)
    state.calls[endpoint] += 1
    _require_auth(request, state)
    return state, await _json_object(request)


async def _handle_scenario(request: web.Request) -> web.Response:
    state, body = await _accept(request, "scenario", flavor="scenario")
    issues: list[ValidationIssue] = []
    scenario = _string_field(body, "scenario", issues)
    if scenario is None:
        raise _Rejected(422, issues)
    # The protocol trap, reproduced on purpose: a cookie naming a live session
    # makes /scenario wipe that session's history and keep its id.
    cookie_id = request.cookies.get(SESSION_COOKIE, "")
    session_id = cookie_id if cookie_id in state.sessions else uuid.uuid4().hex
    state.sessions[session_id] = DevSession(scenario=scenario)
    log.debug("scenario set session=%s reset=%s", session_id, session_id == cookie_id)
    response = web.json_response({"message": "Scenario set!"})
    response.set_cookie(SESSION_COOKIE, session_id, path="/", samesite="lax")
    return response


async def _handle_init_session(request: web.Request) -> web.Response:
    state, body = await _accept(request, "init-session", flavor="init-session")
    issues: list[ValidationIssue] = []
    session_id = _string_field(body, "session_id", issues)
    system_prompt = _string_field(body, "system_prompt", issues)
    if session_id == "":
        # An empty id could never come back in a cookie, so refuse it early.
        too_short = "String should have at least 1 character"
        issues.append(_issue(["body", "session_id"], too_short, "string_too_short"))
    if issues or session_id is None or system_prompt is None:
        raise _Rejected(422, issues)
    # Same trap as /scenario: an id that exists is reset, not refused.
    state.sessions[session_id] = DevSession(scenario=system_prompt)
    log.debug("session initialized session=%s", session_id)
    return web.json_response({"message": "Session initialized", "session_id": session_id})


async def _handle_chat(request: web.Request) -> web.Response:
    state, body = await _accept(request, "chat")
    issues: list[ValidationIssue] = []
    message = _string_field(body, "message", issues)
    max_tokens = _int_field(body, "max_tokens", issues)
    if max_tokens is not None:
        _check_range("max_tokens", max_tokens, state.max_tokens_range, issues)
    if issues or message is None:
        raise _Rejected(422, issues)

    session_id = request.cookies.get(SESSION_COOKIE, "")
    if not session_id:
        raise _Rejected(400, "Missing session ID")
    session = state.sessions.get(session_id)
    if session is None:
        raise _chat_failure(state, 404, "Session not found")

    if state.hang:
        await _hang_forever()
    if state.fail_next:
        raise _chat_failure(state, state.fail_next.pop(0), "Injected failure")
    if state.delay > 0:
        # A sleep, not a blocking wait: without serial mode, many sessions
        # "generate" at once.
        await asyncio.sleep(state.delay)
    if state.empty_replies > 0:
        state.empty_replies -= 1
        # An empty generation leaves no turn behind in the session.
        return web.json_response({"response": ""})

    reply = reply_for(session, message)
    session.history.append((message, reply))
    return web.json_response({"response": reply})


async def _handle_health(request: web.Request) -> web.Response:
    state = request.app[DEVSERVER_STATE]
    state.calls["health"] += 1
    if not state.healthy:
        return web.json_response({"status": "unhealthy"}, status=503)
    return web.json_response(
        {"status": "healthy", "sessions": len(state.sessions), "flavor": state.flavor}
    )


def create_devserver_app(state: DevServerState | None = None) -> web.Application:
    """Build the reference AI server around ``state`` (a fresh one by default)."""
    app = web.Application(middlewares=[_protocol_middleware], client_max_size=_CLIENT_MAX_SIZE)
    app[DEVSERVER_STATE] = state if state is not None else DevServerState()
    app[_SERIAL_LOCK] = asyncio.Lock()
    # Both generations' routes are always registered so a test can switch
    # state.flavor on a running server; the handler answers 404 for the other one.
    app.router.add_post("/scenario", _handle_scenario)
    app.router.add_post("/init-session", _handle_init_session)
    app.router.add_post("/chat", _handle_chat)
    app.router.add_get("/health", _handle_health)
    return app


def _token_range(text: str) -> tuple[int, int]:
    low_text, sep, high_text = text.partition("-")
    try:
        if not sep:
            raise ValueError(text)
        low, high = int(low_text), int(high_text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW-HIGH, e.g. 10-500, not {text!r}") from None
    if low > high:
        raise argparse.ArgumentTypeError(f"empty range {text!r}")
    return low, high


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sessionbridge.reference.seed_server",
        description="Reference AI server for development and tests (a test double, not a model).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--flavor", choices=FLAVORS, default="scenario")
    parser.add_argument("--user", default="dev")
    parser.add_argument("--password", default="dev")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds each /chat takes")
    parser.add_argument(
        "--serial", action="store_true", help="answer one request at a time, /health included"
    )
    parser.add_argument(
        "--max-tokens",
        type=_token_range,
        default=None,
        help="accepted max_tokens range LOW-HIGH (default: 10-500, or 50-1000 for init-session)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Command line entry point: parse the options and serve until interrupted."""
    args = _parse_args(argv)
    max_tokens_range: tuple[int, int] = args.max_tokens or DEFAULT_MAX_TOKENS_RANGE[args.flavor]
    state = DevServerState(
        flavor=args.flavor,
        user=args.user,
        password=args.password,
        max_tokens_range=max_tokens_range,
        delay=args.delay,
        serial=args.serial,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    log.info(
        "devserver listening url=http://%s:%d flavor=%s max_tokens=%d-%d delay=%s serial=%s "
        "kind=test-double-not-a-model",
        args.host,
        args.port,
        state.flavor,
        max_tokens_range[0],
        max_tokens_range[1],
        state.delay,
        state.serial,
    )
    # print=None: the line above is the one start-up line.
    web.run_app(create_devserver_app(state), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
