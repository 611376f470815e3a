"""The seed protocol (docs/ai-servers.md): an AI server that keeps conversations in sessions.

Both generations speak it: ``scenario`` (``POST /scenario``, the id arrives in
a cookie) and ``init-session`` (the bridge names the session). A conversation
maps to one AI session for its whole life: created on its first turn, reused
after, and recovered, once, with the recent transcript when the AI server has
lost it (a restart keeps nothing).

The AI session travels in a ``session_id`` cookie. A shared cookie jar would
hand one conversation's AI session to another, so the client session keeps no
jar and the cookie is set by hand on each ``/chat`` request, and never sent to
the call that creates a session (that would reset the named session).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from http.cookies import CookieError, SimpleCookie
from typing import Any

import aiohttp
from yarl import URL

from .. import jsoncodec
from ..errors import SessionLost, UpstreamError
from ..records import AISessionKind, ChatSession, HistoryTurn, TranscriptTurn
from .base import CallObserver, DeltaSink, HealthReport, Reply, TurnContext, no_observer
from .http import SMALL_BODY, observed, read_limited, refuse_redirect, status_error
from .replica_health import CannotContinue

log = logging.getLogger(__name__)

SESSION_COOKIE = "session_id"

# A cookie value sent back must be a plain token (RFC 6265 cookie-octets, no
# quotes): an unquoted '"<id>; admin=1"' would become two cookies.
_PLAIN_TOKEN = re.compile(r"[!#-+\--:<-\[\]-~]{1,512}")


def is_session_lost(status: int, detail: object) -> bool:
    """Both generations' ways of saying the AI session is gone.

    The first answers 404; the later wraps every /chat error in a 500 whose
    detail contains "Session not found". Any other 5xx is a plain failure.
    """
    if status == 404:
        return True
    return status == 500 and isinstance(detail, str) and "Session not found" in detail


def recovery_scenario(scenario: str, transcript: list[TranscriptTurn]) -> str:
    """The scenario of a recovered AI session: the original one, then the recent turns."""
    if not transcript:
        return scenario
    # A response without instructions has no scenario: the transcript alone.
    lines = [scenario, ""] if scenario else []
    lines.append("The conversation so far (oldest first):")
    for turn in transcript:
        lines.append(f"User: {turn.user}")
        lines.append(f"Assistant: {turn.assistant}")
    return "\n".join(lines)


def recent_transcript(turns: list[TranscriptTurn], budget_chars: int) -> list[TranscriptTurn]:
    """The most recent turns, oldest first, whose text fits the budget (newest kept first)."""
    kept: list[TranscriptTurn] = []
    used = 0
    for turn in reversed(turns):
        used += len(turn.user) + len(turn.assistant)
        if used > budget_chars:
            break
        kept.append(turn)
    kept.reverse()
    return kept


def session_cookie(response: aiohttp.ClientResponse) -> str:
    """The AI session id from ``Set-Cookie``, refused unless it is a plain token."""
    for header in response.headers.getall("Set-Cookie", []):
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(header)
        except CookieError:
            continue
        morsel = jar.get(SESSION_COOKIE)
        if morsel is None:
            continue
        if not morsel.coded_value.isascii() or not _PLAIN_TOKEN.fullmatch(morsel.coded_value):
            raise UpstreamError("the AI server set a session cookie that is not a plain token")
        return morsel.coded_value
    raise UpstreamError("the AI server set no session cookie")


class SessionServerClient:
    """Speaks either generation of the seed protocol over the app's one ClientSession."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        base_url: str,
        *,
        flavor: str = "scenario",
        user: str = "",
        password: str = "",
        timeout: float = 120.0,
        recovery_budget: int = 6000,
        max_reply_bytes: int = 256 * 1024,
        observe: CallObserver = no_observer,
    ) -> None:
        self._http = http
        self._base = base_url.rstrip("/")
        # Each endpoint's URL parsed once, not on every call.
        self._urls: dict[str, URL] = {}
        self.create_endpoint = "init-session" if flavor == "init-session" else "scenario"
        # The body goes as bytes already encoded (jsoncodec), so its type is said here.
        self._headers: dict[str, str] = {"Content-Type": "application/json"}
        if user or password:
            self._headers["Authorization"] = aiohttp.encode_basic_auth(user, password)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._recovery_budget = recovery_budget
        self._max_reply_bytes = max_reply_bytes
        self._observe = observe
        self.last_success: float | None = None  # monotonic time of the last good answer
        # An AI session per conversation, as many as the server keeps: no cache to count.
        self.cache_slots: int | None = None

    # -- the conversation strategy --------------------------------------------------

    async def check_fits(self, session: ChatSession, content: str, max_tokens: int) -> None:
        return None  # the AI server keeps the history; any stored message can be sent

    async def forget(self, session: ChatSession) -> None:
        return None  # the AI server's session expires on its own; nothing is kept here

    async def exchange(self, turn: TurnContext, on_delta: DeltaSink | None) -> Reply:
        session = turn.session
        kind: AISessionKind = "reused"
        ai_session_id = turn.state
        just_created = ai_session_id is None
        if ai_session_id is None:
            # A conversation with no AI session yet may still have a history:
            # a branch of a chain of responses, items a client gave, or a new
            # scenario. Its AI session then starts from that history.
            history = await turn.history()
            kind = "recovered" if history else "created"
            ai_session_id = await self.create_session(
                self._scenario_with(session.scenario, history), session.id
            )
            # Stored at once: even if this /chat fails, the next turn reuses it.
            await turn.save_state(ai_session_id)
        try:
            text = await self.chat(ai_session_id, turn.content, turn.max_tokens, session.id)
        except SessionLost:
            if just_created:
                raise UpstreamError("the AI server lost a session it had just created") from None
            # The AI server restarted or evicted the session: one new session
            # that carries the scenario and the recent transcript, then the message.
            return await self._recover(turn, on_delta, "recovered")
        return await self._passed_on(text, kind, on_delta)

    async def continue_reply(self, turn: TurnContext, start: str, on_delta: DeltaSink) -> Reply:
        # Never needed: a reply of this protocol arrives whole, so no piece of
        # it is out before the server has answered.
        raise CannotContinue("the seed protocol cannot go on with a reply begun elsewhere")

    async def recover(self, turn: TurnContext, on_delta: DeltaSink | None) -> Reply:
        """Answer on a new AI session that carries the conversation so far.

        For a pool of replicas (``replicas.py``): the conversation comes to a
        server that holds no up-to-date AI session of it, whatever
        ``turn.state`` says. With no answered turn yet it is simply created.
        """
        history = await turn.history()
        return await self._recover(turn, on_delta, "recovered" if history else "created", history)

    async def _recover(
        self,
        turn: TurnContext,
        on_delta: DeltaSink | None,
        kind: AISessionKind,
        history: list[HistoryTurn] | None = None,
    ) -> Reply:
        session = turn.session
        if history is None:
            history = await turn.history()
        scenario = self._scenario_with(session.scenario, history)
        ai_session_id = await self.create_session(scenario, session.id)
        await turn.save_state(ai_session_id)
        try:
            text = await self.chat(ai_session_id, turn.content, turn.max_tokens, session.id)
        except SessionLost:
            raise UpstreamError(f"the AI server lost a session it had just {kind}") from None
        return await self._passed_on(text, kind, on_delta)

    @staticmethod
    async def _passed_on(text: str, kind: AISessionKind, on_delta: DeltaSink | None) -> Reply:
        # This protocol does not stream: the reply is one piece.
        if on_delta is not None and text:
            await on_delta(text)
        return Reply(text, kind)

    def _scenario_with(self, scenario: str, history: list[HistoryTurn]) -> str:
        """The scenario followed by the recent transcript, within the recovery budget."""
        transcript = recent_transcript(
            [TranscriptTurn(t.user, t.assistant) for t in history], self._recovery_budget
        )
        return recovery_scenario(scenario, transcript)

    # -- the calls ---------------------------------------------------------------------

    async def create_session(self, scenario: str, session_id: str = "-") -> str:
        if self.create_endpoint == "init-session":
            # The later generation lets the caller name the session; a fresh
            # UUID can never collide with (and so reset) a live one.
            ai_session_id = uuid.uuid4().hex
            await self._call(
                self.create_endpoint,
                {"session_id": ai_session_id, "system_prompt": scenario},
                session_id=session_id,
            )
            return ai_session_id
        _, cookie = await self._call("scenario", {"scenario": scenario}, session_id=session_id)
        if cookie is None:
            raise UpstreamError("the AI server set no session cookie")
        return cookie

    async def chat(
        self, ai_session_id: str, message: str, max_tokens: int, session_id: str = "-"
    ) -> str:
        body, _ = await self._call(
            "chat",
            {"message": message, "max_tokens": max_tokens},
            headers={**self._headers, "Cookie": f"{SESSION_COOKIE}={ai_session_id}"},
            session_id=session_id,
        )
        reply = body.get("response")
        if not isinstance(reply, str):
            raise UpstreamError("the AI server's answer has no response text")
        return reply

    async def health(self, timeout: float) -> HealthReport:
        try:
            async with self._http.get(
                self._base + "/health",
                timeout=aiohttp.ClientTimeout(total=timeout),
                allow_redirects=False,
            ) as response:
                body = jsoncodec.loads(await read_limited(response, SMALL_BODY, "/health"))
        except TimeoutError:
            return HealthReport(False, "the AI server's /health did not answer in time", True)
        except (aiohttp.ClientError, ValueError, RecursionError, UpstreamError) as exc:
            return HealthReport(False, f"the AI server cannot be reached: {type(exc).__name__}")
        if response.status == 200 and isinstance(body, dict) and body.get("status") == "healthy":
            return HealthReport(True, "healthy")
        return HealthReport(False, f"the AI server reports itself unhealthy ({response.status})")

    def _url(self, endpoint: str) -> URL:
        url = self._urls.get(endpoint)
        if url is None:
            url = self._urls[endpoint] = URL(f"{self._base}/{endpoint}")
        return url

    async def _call(
        self,
        endpoint: str,
        payload: dict[str, Any],
        headers: dict[str, str] | None = None,
        session_id: str = "-",
    ) -> tuple[dict[str, Any], str | None]:
        """POST one call; the JSON object answered and, from /scenario, the session cookie."""
        async with (
            observed(endpoint, self._observe, session_id),
            self._http.post(
                self._url(endpoint),
                data=jsoncodec.dumps(payload),
                headers=headers or self._headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as response,
        ):
            refuse_redirect(response, "/" + endpoint)
            raw = await read_limited(response, self._max_reply_bytes, "/" + endpoint)
            try:
                body = jsoncodec.loads(raw)
            except (ValueError, RecursionError):
                body = None
            detail = body.get("detail") if isinstance(body, dict) else None
            if endpoint == "chat" and is_session_lost(response.status, detail):
                raise SessionLost("the AI server no longer knows this session")
            if response.status != 200:
                # detail may echo what we sent; keep only its status in the client's view.
                raise status_error(response, "/" + endpoint)
            if not isinstance(body, dict):
                raise UpstreamError(f"/{endpoint} answered something that is not a JSON object")
            cookie = session_cookie(response) if endpoint == "scenario" else None
            self.last_success = time.monotonic()
            return body, cookie
