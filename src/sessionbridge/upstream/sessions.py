"""The AI-server client: the session protocol of both generations, behind a small interface.

The AI session travels in a ``session_id`` cookie. A shared cookie jar would
hand one conversation's AI session to another, so the client session keeps no
jar and the cookie is set by hand on each ``/chat`` request, and never sent to
the call that creates a session (that would reset the named session).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from .. import jsoncodec
from ..errors import (
    SessionLost,
    UpstreamError,
    UpstreamFailure,
    UpstreamTimeout,
    UpstreamUnavailable,
)

log = logging.getLogger(__name__)

SESSION_COOKIE = "session_id"


class AIServer(Protocol):
    """What a conversation needs from an AI server that keeps its own sessions."""

    # Monotonic time of the last successful call, or None: readiness uses it.
    last_success: float | None
    # The endpoint that creates a session, for log lines.
    create_endpoint: str

    async def create_session(self, scenario: str) -> str:
        """Create an AI session holding ``scenario``; return its id."""
        ...

    async def chat(self, ai_session_id: str, message: str, max_tokens: int) -> str:
        """One turn on an existing AI session; raises SessionLost when it is gone."""
        ...

    async def health(self, timeout: float) -> HealthReport: ...


@dataclass(frozen=True, slots=True)
class HealthReport:
    healthy: bool
    reason: str
    timed_out: bool = False


# Observes each AI-server call: endpoint, outcome, seconds taken.
CallObserver = Callable[[str, str, float], None]


def _no_observer(endpoint: str, outcome: str, seconds: float) -> None:
    return None


def is_session_lost(status: int, detail: object) -> bool:
    """Both generations' ways of saying the AI session is gone.

    The first answers 404; the later wraps every /chat error in a 500 whose
    detail contains "Session not found". Any other 5xx is a plain failure.
    """
    if status == 404:
        return True
    return status == 500 and isinstance(detail, str) and "Session not found" in detail


class SessionServerClient:
    """Speaks either generation of the AI server over one shared ClientSession."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        base_url: str,
        *,
        flavor: str = "scenario",
        user: str = "",
        password: str = "",
        timeout: float = 120.0,
        observe: CallObserver = _no_observer,
    ) -> None:
        self._http = http
        self._base = base_url.rstrip("/")
        self.create_endpoint = "init-session" if flavor == "init-session" else "scenario"
        # The body goes as bytes already encoded (jsoncodec), so its type is said here.
        self._headers: dict[str, str] = {"Content-Type": "application/json"}
        if user or password:
            self._headers["Authorization"] = aiohttp.encode_basic_auth(user, password)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._observe = observe
        self.last_success: float | None = None  # monotonic time of the last good answer

    async def create_session(self, scenario: str) -> str:
        if self.create_endpoint == "init-session":
            # The later generation lets the caller name the session; a fresh
            # UUID can never collide with (and so reset) a live one.
            ai_session_id = uuid.uuid4().hex
            await self._call(
                self.create_endpoint,
                {"session_id": ai_session_id, "system_prompt": scenario},
            )
            return ai_session_id
        _, response = await self._call("scenario", {"scenario": scenario})
        cookie = response.cookies.get(SESSION_COOKIE)
        if cookie is None or not cookie.value:
            raise UpstreamError("the AI server set no session cookie")
        return cookie.value

    async def chat(self, ai_session_id: str, message: str, max_tokens: int) -> str:
        body, _ = await self._call(
            "chat",
            {"message": message, "max_tokens": max_tokens},
            headers={**self._headers, "Cookie": f"{SESSION_COOKIE}={ai_session_id}"},
        )
        reply = body.get("response")
        if not isinstance(reply, str):
            raise UpstreamError("the AI server's answer has no response text")
        return reply

    async def health(self, timeout: float) -> HealthReport:
        try:
            async with self._http.get(
                self._base + "/health", timeout=aiohttp.ClientTimeout(total=timeout)
            ) as response:
                body = await response.json(content_type=None)
        except TimeoutError:
            return HealthReport(False, "the AI server's /health did not answer in time", True)
        except (aiohttp.ClientError, ValueError) as exc:
            return HealthReport(False, f"the AI server cannot be reached: {type(exc).__name__}")
        if response.status == 200 and isinstance(body, dict) and body.get("status") == "healthy":
            return HealthReport(True, "healthy")
        return HealthReport(False, f"the AI server reports itself unhealthy ({response.status})")

    async def _call(
        self,
        endpoint: str,
        payload: dict[str, Any],
        headers: dict[str, str] | None = None,
    ) -> tuple[dict[str, Any], aiohttp.ClientResponse]:
        started = time.monotonic()
        outcome = "error"
        try:
            body, response = await self._post(endpoint, payload, headers or self._headers)
            outcome = "ok"
            self.last_success = time.monotonic()
            return body, response
        except UpstreamFailure as exc:
            outcome = exc.code if not isinstance(exc, SessionLost) else "session_lost"
            raise
        finally:
            self._observe(endpoint, outcome, time.monotonic() - started)

    async def _post(
        self,
        endpoint: str,
        payload: dict[str, Any],
        headers: dict[str, str],
    ) -> tuple[dict[str, Any], aiohttp.ClientResponse]:
        try:
            async with self._http.post(
                f"{self._base}/{endpoint}",
                data=jsoncodec.dumps(payload),
                headers=headers,
                timeout=self._timeout,
            ) as response:
                try:
                    body = jsoncodec.loads(await response.read())
                except (ValueError, RecursionError):
                    body = None
        except TimeoutError as exc:
            raise UpstreamTimeout(f"/{endpoint} did not answer in time") from exc
        except aiohttp.ClientConnectionError as exc:
            raise UpstreamUnavailable(f"/{endpoint}: {type(exc).__name__}") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"/{endpoint}: {type(exc).__name__}") from exc
        detail = body.get("detail") if isinstance(body, dict) else None
        if endpoint == "chat" and is_session_lost(response.status, detail):
            raise SessionLost("the AI server no longer knows this session")
        if response.status != 200:
            # detail may echo what we sent; keep only its status in the client's view.
            raise UpstreamError(f"/{endpoint} answered {response.status}")
        if not isinstance(body, dict):
            raise UpstreamError(f"/{endpoint} answered something that is not a JSON object")
        return body, response

