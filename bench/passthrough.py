"""The bare aiohttp passthrough: the floor for any aiohttp bridge.

``POST /v1/sessions/{id}/messages`` forwards the request body, byte for byte,
to the AI server's ``/chat`` with one ClientSession and answers the AI
server's JSON. Nothing else: no database, no lock, no validation, no
metrics. Each session id gets its AI session up front (one ``/scenario`` at
start), so a measured request is exactly one ``/chat``, like a bridge turn
that reuses its AI session.

Run: ``python bench/passthrough.py --port P --upstream URL --sessions-file F``
(F holds one session id a line).
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web

HTTP = web.AppKey("http", aiohttp.ClientSession)
AI_SESSIONS: web.AppKey[dict[str, str]] = web.AppKey("ai_sessions")
CHAT_HEADERS: web.AppKey[dict[str, str]] = web.AppKey("chat_headers")
CHAT_URL = web.AppKey("chat_url", str)

# The bridge's AI-server connector allows its in-flight limit (256 in the
# benchmark) plus a few; the passthrough gets the same room.
CONNECTION_LIMIT = 264
SETUP_CONCURRENCY = 16


async def create_ai_session(
    http: aiohttp.ClientSession, upstream: str, auth: str, scenario: str
) -> str:
    async with http.post(
        upstream + "/scenario", json={"scenario": scenario}, headers={"Authorization": auth}
    ) as response:
        response.raise_for_status()
        return response.cookies["session_id"].value


async def create_ai_sessions(
    http: aiohttp.ClientSession, upstream: str, auth: str, session_ids: list[str]
) -> dict[str, str]:
    gate = asyncio.Semaphore(SETUP_CONCURRENCY)

    async def one(session_id: str) -> tuple[str, str]:
        async with gate:
            return session_id, await create_ai_session(
                http, upstream, auth, "You are a benchmark partner."
            )

    return dict(await asyncio.gather(*(one(session_id) for session_id in session_ids)))


async def forward(request: web.Request) -> web.Response:
    ai_session_id = request.app[AI_SESSIONS].get(request.match_info["id"])
    if ai_session_id is None:
        raise web.HTTPNotFound()
    body = await request.read()
    chat_headers: dict[str, str] = request.app[CHAT_HEADERS]
    headers = {**chat_headers, "Cookie": f"session_id={ai_session_id}"}
    async with request.app[HTTP].post(request.app[CHAT_URL], data=body, headers=headers) as reply:
        return web.Response(
            body=await reply.read(), status=reply.status, content_type="application/json"
        )


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_app(upstream: str, user: str, password: str, session_ids: list[str]) -> web.Application:
    app = web.Application()
    auth = aiohttp.encode_basic_auth(user, password)
    app[CHAT_URL] = upstream + "/chat"
    app[CHAT_HEADERS] = {"Authorization": auth, "Content-Type": "application/json"}

    async def client(app: web.Application) -> AsyncIterator[None]:
        # No cookie jar, like the bridge: the AI session cookie goes by hand per request.
        http = aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar(),
            connector=aiohttp.TCPConnector(limit=CONNECTION_LIMIT),
            timeout=aiohttp.ClientTimeout(total=120),
        )
        app[HTTP] = http
        # Before the socket listens, so no measured request pays for a /scenario.
        app[AI_SESSIONS] = await create_ai_sessions(http, upstream, auth, session_ids)
        yield
        await http.close()

    app.cleanup_ctx.append(client)
    app.router.add_post("/v1/sessions/{id}/messages", forward)
    app.router.add_get("/healthz", healthz)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="AI server base URL")
    parser.add_argument("--sessions-file", type=Path, required=True)
    parser.add_argument("--user", default="dev")
    parser.add_argument("--password", default="dev")
    args = parser.parse_args()
    session_ids = [line.strip() for line in args.sessions_file.read_text().splitlines()
                   if line.strip()]
    app = create_app(args.upstream.rstrip("/"), args.user, args.password, session_ids)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
