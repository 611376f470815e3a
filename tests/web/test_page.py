"""The web page (docs/page.md) in a real headless Chromium, against a bridge on a real socket.

The browser is Debian's ``chromium`` package, driven through Playwright's Python
package with ``executable_path``: nothing is downloaded (``make test`` installs
the package when it is missing). Without Chromium the tests skip and say why.

The bridge runs on a loopback socket (``aiohttp_server``) with the reference AI
server on another, as in the rest of the suite; the browser is another process
that reaches both only over HTTP.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from playwright.async_api import Browser, Page, Route, async_playwright, expect
from pytest_aiohttp import AiohttpServer

from sessionbridge.app import create_app
from sessionbridge.config import Settings, TokenRange
from sessionbridge.reference.openai_server import (
    OpenAIReferenceState,
    create_openai_reference_app,
)
from sessionbridge.reference.seed_server import DevServerState
from tests.conftest import issue_token
from tests.doubles import FIRST_PIECE_WRITES, ServerGate


def _chromium() -> str | None:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed (make test installs it: apt-get install chromium)",
)

# Headless on a machine without network: nothing may reach out on its own.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
# Where the README's screenshots come from: `PAGE_SCREENSHOTS=docs pytest tests/test_page.py`.
SCREENSHOTS_ENV = "PAGE_SCREENSHOTS"
# Long enough for a loaded two-core machine, short enough to fail before pytest gives up.
WAIT_MS = 10_000
expect.set_options(timeout=WAIT_MS)
XSS_SCENARIO = '<img src=x onerror="window.__pwned=1"> <script>window.__pwned=2</script>'
XSS_MESSAGE = "<script>window.__pwned=3</script> and <b>bold?</b>"


@dataclass
class Bridge:
    server: TestServer
    token: str

    @property
    def url(self) -> str:
        return str(self.server.make_url("/"))

    async def api(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"}
        async with (
            aiohttp.ClientSession() as http,
            http.request(method, self.server.make_url(path), headers=headers, **kwargs) as reply,
        ):
            assert reply.status < 300, await reply.text()
            return await reply.json() if reply.status != 204 else None


async def start_bridge(aiohttp_server: AiohttpServer, settings: Settings) -> Bridge:
    server = await aiohttp_server(create_app(settings))
    return Bridge(server, await issue_token(server.app, "page"))


@pytest.fixture
async def bridge(aiohttp_server: AiohttpServer, settings: Settings) -> Bridge:
    return await start_bridge(aiohttp_server, settings)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as driver:
        launched = await driver.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS
        )
        try:
            yield launched
        finally:
            await launched.close()


class PageErrors:
    """What the browser complained about: script errors and refused loads (CSP)."""

    def __init__(self, page: Page) -> None:
        self.messages: list[str] = []
        page.on("pageerror", lambda error: self.messages.append(f"pageerror: {error}"))
        page.on("console", self._console)

    def _console(self, message: Any) -> None:
        text = message.text
        # A refused API call (401, 502) is logged as a failed load: expected.
        if message.type == "error" and "Failed to load resource" not in text:
            self.messages.append(f"console: {text}")


async def open_page(browser: Browser, viewport: dict[str, int], **context: Any) -> Page:
    browser_context = await browser.new_context(viewport=viewport, **context)
    browser_context.set_default_timeout(WAIT_MS)
    return await browser_context.new_page()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    opened = await open_page(browser, DESKTOP)
    errors = PageErrors(opened)
    yield opened
    assert errors.messages == [], errors.messages


async def log_in(page: Page, bridge: Bridge, token: str | None = None) -> None:
    await page.goto(bridge.url)
    key = token if token is not None else bridge.token
    await page.get_by_label("API key", exact=True).fill(key)
    await page.get_by_role("button", name="Use key").click()
    if token is None:
        await expect(page.locator("#sessions")).to_be_visible()


async def create_session(page: Page, scenario: str, title: str) -> None:
    details = page.locator("#new-session")
    if await details.get_attribute("open") is None:
        await page.get_by_text("New session", exact=True).click()
    await page.get_by_label("Scenario", exact=True).fill(scenario)
    await page.get_by_label("Title (optional)", exact=True).fill(title)
    await page.get_by_role("button", name="Create session").click()
    await expect(page.locator("#chat-title")).to_have_text(title)


async def say(page: Page, text: str) -> None:
    """Type into the message box as a person does and press Enter."""
    box = page.get_by_label("Message", exact=True)
    await box.click()
    lines = text.split("\n")
    for index, line in enumerate(lines):
        await box.press_sequentially(line)
        if index < len(lines) - 1:
            await box.press("Shift+Enter")
    await box.press("Enter")


def messages(page: Page) -> Any:
    return page.locator("#messages > li.message")


async def wait_answered(page: Page, count: int) -> None:
    """Until the page shows ``count`` stored messages and no turn in flight."""
    await expect(messages(page)).to_have_count(count)
    await expect(page.locator("#messages .status-pending")).to_have_count(0)
    await expect(page.get_by_role("button", name="Send")).to_be_enabled()


# -- headers and markup -------------------------------------------------------------------


class _Markup(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.inline_script = False
        self.style_elements = 0
        self.style_attributes = 0
        self.handler_attributes: list[str] = []
        self.urls: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        if tag == "script":
            self.scripts.append(named)
            self._in_script = True
        if tag == "style":
            self.style_elements += 1
        self.style_attributes += "style" in named
        self.handler_attributes += [name for name in named if name.startswith("on")]
        # In-page links (#...) load nothing.
        self.urls += [
            value
            for name, value in attrs
            if name in ("src", "href") and value and not value.startswith("#")
        ]

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_script = True


async def test_page_and_its_files_carry_security_and_cache_headers(bridge: Bridge) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(bridge.server.make_url("/")) as index:
            assert index.status == 200
            assert index.content_type == "text/html"
            html = await index.text()
            index_headers = index.headers
        markup = _Markup()
        markup.feed(html)
        assert markup.scripts and not markup.inline_script
        assert markup.style_elements == 0 and markup.style_attributes == 0
        assert markup.handler_attributes == []
        # Every file the page names is its own, and carries its content hash.
        assert all(url.startswith("/static/") and "?v=" in url for url in markup.urls), markup.urls

        csp = index_headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert index_headers["X-Content-Type-Options"] == "nosniff"
        assert index_headers["Referrer-Policy"] == "no-referrer"
        assert index_headers["Cache-Control"] == "no-cache"
        assert index_headers["ETag"]

        for url in markup.urls:
            async with http.get(bridge.server.make_url(url)) as asset:
                assert asset.status == 200, url
                assert asset.headers["Content-Security-Policy"] == csp
                assert asset.headers["X-Content-Type-Options"] == "nosniff"
                assert "immutable" in asset.headers["Cache-Control"]
                etag = asset.headers["ETag"]
            async with http.get(
                bridge.server.make_url(url), headers={"If-None-Match": etag}
            ) as again:
                assert again.status == 304
                assert again.headers["Content-Security-Policy"] == csp
        # Without the current hash a file is revalidated, never kept for good.
        async with http.get(bridge.server.make_url("/static/app.js")) as stale:
            assert stale.status == 200
            assert stale.content_type == "text/javascript"
            assert stale.headers["Cache-Control"] == "no-cache"
        for missing in ("/static/nothing.js", "/static/..%2Fpage.py", "/static/index.html"):
            async with http.get(bridge.server.make_url(missing)) as refused:
                assert refused.status == 404, missing
                assert refused.headers["X-Content-Type-Options"] == "nosniff"


# -- a person at the page -----------------------------------------------------------------


async def test_log_in_create_chat_reuse_and_find_it_after_reload(
    page: Page, bridge: Bridge, ai_state: DevServerState
) -> None:
    await log_in(page, bridge)
    await expect(page.get_by_text("No sessions yet for this key.")).to_be_visible()
    key_in_tab = await page.evaluate("sessionStorage.getItem('sessionbridge.key')")
    assert key_in_tab == bridge.token
    assert bridge.token not in page.url
    assert await page.context.cookies() == []

    await create_session(page, "You are a friendly travel guide.", "Trip to Lisbon")
    await say(page, "Hello!\nTwo lines.")
    await wait_answered(page, 2)
    await say(page, "And tomorrow?")
    await wait_answered(page, 4)

    shown = messages(page)
    await expect(shown.nth(0).locator(".text")).to_have_text("Hello!\nTwo lines.")
    await expect(shown.nth(1).locator(".ai-session")).to_have_text("AI session created")
    await expect(shown.nth(3).locator(".ai-session")).to_have_text("AI session reused")
    await expect(shown.nth(3).locator(".text")).to_contain_text("turn 2: you said 'And tomorrow?'")
    for index, seq in enumerate(["#1", "#2", "#3", "#4"]):
        await expect(shown.nth(index).locator(".seq")).to_have_text(seq)
        await expect(shown.nth(index).locator(".status")).to_have_text("answered")
        await expect(shown.nth(index).locator("time")).to_have_count(1)
    await expect(shown.nth(2).locator(".role")).to_have_text("user")
    await expect(shown.nth(3).locator(".role")).to_have_text("assistant")
    # What the page shows is what the bridge stored: one AI session, two turns.
    assert ai_state.calls["scenario"] == 1 and ai_state.calls["chat"] == 2

    await page.reload()
    await expect(page.locator("#chat-title")).to_have_text("Trip to Lisbon")
    await expect(messages(page)).to_have_count(4)
    await expect(messages(page).nth(3).locator(".text")).to_contain_text("turn 2")
    await expect(page.locator(".session-item")).to_have_count(1)
    await expect(page.locator(".session-item .session-meta")).to_contain_text("4 messages")


async def test_enter_sends_and_shift_enter_breaks_the_line(page: Page, bridge: Bridge) -> None:
    await log_in(page, bridge)
    await create_session(page, "You are terse.", "Keys")
    box = page.get_by_label("Message", exact=True)
    await box.press_sequentially("one")
    await box.press("Shift+Enter")
    await box.press_sequentially("two")
    await expect(box).to_have_value("one\ntwo")
    await expect(messages(page)).to_have_count(0)
    await box.press("Enter")
    await wait_answered(page, 2)
    await expect(box).to_have_value("")
    assert (await bridge.api("GET", f"/v1/sessions/{await current_id(page)}/messages"))[
        "messages"
    ][0]["content"] == "one\ntwo"


async def current_id(page: Page) -> str:
    match = re.search(r"#session=(.+)$", page.url)
    assert match, page.url
    return match.group(1)


async def test_failed_turn_is_marked_and_retry_answers_the_same_question(
    page: Page, bridge: Bridge, ai_state: DevServerState
) -> None:
    await log_in(page, bridge)
    await create_session(page, "You are a patient tutor.", "Flaky")
    ai_state.fail_next = [500]
    await say(page, "Will this fail?")

    alert = page.get_by_role("alert")
    await expect(alert).to_contain_text("The AI server failed")
    await expect(alert).to_contain_text("code upstream_error, HTTP 502")
    failed = messages(page).nth(0)
    await expect(messages(page)).to_have_count(1)
    await expect(failed).to_have_class(re.compile(r"\bfailed\b"))
    await expect(failed.locator(".status")).to_have_text("failed")

    await failed.get_by_role("button", name="Retry").click()
    await wait_answered(page, 2)
    await expect(messages(page).nth(0).locator(".status")).to_have_text("answered")
    await expect(messages(page).nth(1).locator(".text")).to_contain_text("Will this fail?")
    # Retry asked the same question again: the bridge holds one copy of it.
    stored = await bridge.api("GET", f"/v1/sessions/{await current_id(page)}/messages")
    assert [(m["role"], m["status"]) for m in stored["messages"]] == [
        ("user", "answered"),
        ("assistant", "answered"),
    ]


async def test_wrong_key_is_refused_in_words(page: Page, bridge: Bridge) -> None:
    await log_in(page, bridge, token="sb_not-a-key-of-this-bridge")
    alert = page.get_by_role("alert")
    await expect(alert).to_contain_text("The bridge refused the API key")
    await expect(alert).to_contain_text("code unauthorized, HTTP 401")
    await expect(page.get_by_label("API key", exact=True)).to_be_visible()
    await expect(page.locator("#sessions")).to_be_hidden()
    assert await page.evaluate("sessionStorage.getItem('sessionbridge.key')") is None

    await page.get_by_label("API key", exact=True).fill(bridge.token)
    await page.get_by_role("button", name="Use key").click()
    await expect(alert).to_be_hidden()
    await expect(page.locator("#sessions")).to_be_visible()


async def test_markup_from_the_api_is_shown_as_text(page: Page, bridge: Bridge) -> None:
    await log_in(page, bridge)
    await create_session(page, XSS_SCENARIO, "<img src=y onerror=\"window.__pwned=4\">")
    await say(page, XSS_MESSAGE)
    await wait_answered(page, 2)

    reply = messages(page).nth(1).locator(".text")
    # The reference AI server quotes the message and the scenario back.
    await expect(reply).to_contain_text(f"you said '{XSS_MESSAGE}'")
    await expect(reply).to_contain_text("scenario starts '<img src=x onerror=")
    await expect(messages(page).nth(0).locator(".text")).to_have_text(XSS_MESSAGE)
    await expect(page.locator("#scenario-text")).to_have_text(XSS_SCENARIO)
    await expect(page.locator(".session-item .snippet")).to_have_text(XSS_SCENARIO)
    await expect(page.locator("#chat-title")).to_have_text('<img src=y onerror="window.__pwned=4">')
    for where in ("#messages", "#session-list", ".chat-head"):
        assert await page.locator(f"{where} img, {where} script, {where} b").count() == 0
    assert await page.evaluate("window.__pwned") is None


async def test_sessions_newest_first_and_paged_through_the_cursor(
    page: Page, bridge: Bridge
) -> None:
    for number in range(23):
        await bridge.api("POST", "/v1/sessions", json={"scenario": "s", "title": f"s{number}"})
    await log_in(page, bridge)
    titles = page.locator(".session-item .session-title")
    await expect(titles).to_have_count(20)
    await expect(titles.first).to_have_text("s22")
    await page.get_by_role("button", name="More sessions").click()
    await expect(titles).to_have_count(23)
    assert await titles.all_text_contents() == [f"s{n}" for n in range(22, -1, -1)]
    await expect(page.get_by_role("button", name="More sessions")).to_be_hidden()

    await page.locator(".session-item", has_text="s3").click()
    await expect(page.locator("#chat-title")).to_have_text("s3")


# -- streaming ----------------------------------------------------------------------------


async def test_page_reads_an_event_stream_and_resumes_after_it_drops(
    page: Page, bridge: Bridge
) -> None:
    """The page's stream reader and its resume path, whatever the bridge does today.

    The turn is the bridge's own (the request reaches it and is answered); only
    the framing on the way back is rewritten into stream events (docs/streaming.md), cut after two
    deltas, so that the page must ask ``.../events`` with ``Last-Event-ID``.
    """
    seen_resume_headers: list[dict[str, str]] = []
    answered: dict[str, Any] = {}

    async def post_as_stream(route: Route) -> None:
        request = route.request
        if request.method != "POST":
            await route.continue_()
            return
        assert "text/event-stream" in request.headers["accept"]
        upstream = await route.fetch(headers={**request.headers, "accept": "application/json"})
        result = await upstream.json()
        answered.update(result)
        text = result["reply"]["content"]
        head = "".join(
            [
                ": keep-alive\r\n\r\n",
                sse("turn.started", {"user_message": result["user_message"]}),
                sse("reply.delta", {"text": text[:5]}, event_id=1),
                # CRLF line ends, as the format allows.
                f"event: reply.delta\r\nid: 2\r\ndata: {json.dumps({'text': text[5:9]})}\r\n\r\n",
            ]
        )
        await route.fulfill(status=200, content_type="text/event-stream", body=head)

    async def events(route: Route) -> None:
        seen_resume_headers.append(dict(route.request.headers))
        text = answered["reply"]["content"]
        tail = sse("reply.delta", {"text": text[5:9]}, event_id=2)  # repeated: must be skipped
        tail += sse("reply.delta", {"text": text[9:]}, event_id=3)
        tail += sse("turn.completed", answered)
        await route.fulfill(status=200, content_type="text/event-stream", body=tail)

    await log_in(page, bridge)
    await create_session(page, "You are a friendly travel guide.", "Streamed")
    await say(page, "Hello!")
    await wait_answered(page, 2)
    await page.route(re.compile(r".*/v1/sessions/[^/]+/messages$"), post_as_stream)
    await page.route(re.compile(r".*/messages/[^/]+/events$"), events)
    await say(page, "And tomorrow?")
    await wait_answered(page, 4)

    reply = messages(page).nth(3)
    await expect(reply.locator(".text")).to_have_text(answered["reply"]["content"])
    await expect(reply.locator(".ai-session")).to_have_text("AI session reused")
    await expect(reply.locator(".delivery")).to_have_text("streamed in 3 pieces")
    assert len(seen_resume_headers) == 1
    assert seen_resume_headers[0]["last-event-id"] == "2"
    assert seen_resume_headers[0]["authorization"] == f"Bearer {bridge.token}"
    assert bridge.token not in page.url


def sse(event: str, data: Any, event_id: int | None = None) -> str:
    lines = [f"event: {event}"]
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.append(f"data: {json.dumps(data)}")
    return "\n".join(lines) + "\n\n"


async def test_second_reply_streams_in_pieces_and_is_marked_reused(
    page: Page, aiohttp_server: AiohttpServer, settings: Settings, openai_gate: ServerGate
) -> None:
    # The OpenAI-compatible reference server streams a reply in pieces of three
    # tokens; holding its writes lets a reader watch one arrive before the rest.
    ai = OpenAIReferenceState(tokens_per_piece=3)
    upstream = await aiohttp_server(openai_gate.install(create_openai_reference_app(ai)))
    bridge = await start_bridge(
        aiohttp_server,
        dataclasses.replace(
            settings, upstream_flavor="openai", upstream_url=str(upstream.make_url("/v1"))
        ),
    )
    await log_in(page, bridge)
    await create_session(page, "You are a friendly travel guide.", "Pieces")
    await say(page, "Hello!")
    await wait_answered(page, 2)
    openai_gate.hold_writes_after(FIRST_PIECE_WRITES)
    await say(page, "And tomorrow, and the day after, and the whole week?")
    # While the AI server still holds back the rest, the page already shows a part.
    streaming = page.locator("#messages .message.streaming .text")
    await expect(streaming).to_have_text(re.compile(r"^Reply 2"))
    partial = await streaming.text_content()
    assert openai_gate.writes.waiting == 1
    openai_gate.writes.release()
    await wait_answered(page, 4)

    stored = await bridge.api("GET", f"/v1/sessions/{await current_id(page)}/messages")
    final = stored["messages"][3]["content"]
    assert partial is not None and final.startswith(partial) and partial != final
    reply = messages(page).nth(3)
    await expect(reply.locator(".text")).to_have_text(final)
    await expect(reply.locator(".ai-session")).to_have_text("AI session reused")
    await expect(reply.locator(".delivery")).to_have_text(re.compile(r"streamed in \d+ pieces"))
    pieces = int(re.findall(r"\d+", await reply.locator(".delivery").inner_text())[0])
    assert pieces >= 2


# -- sizes and colour schemes -------------------------------------------------------------


async def fits_width(page: Page) -> bool:
    return bool(
        await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    )


async def test_usable_at_phone_and_desktop_size_in_light_and_dark(
    page: Page, aiohttp_server: AiohttpServer, settings: Settings, tmp_path: Path
) -> None:
    # The OpenAI-compatible reference server: its answers stream and carry
    # usage, so the screenshots show all that the page can tell.
    ai_state = OpenAIReferenceState(tokens_per_piece=4)
    upstream = await aiohttp_server(create_openai_reference_app(ai_state))
    bridge = await start_bridge(
        aiohttp_server,
        dataclasses.replace(
            settings, upstream_flavor="openai", upstream_url=str(upstream.make_url("/v1")),
            upstream_max_tokens=TokenRange(1, 500),
        ),
    )
    for title in ("Recipes for a rainy week", "Spanish practice"):
        await bridge.api("POST", "/v1/sessions", json={"scenario": "You help.", "title": title})
    await log_in(page, bridge)
    await create_session(page, "You are a friendly travel guide for Lisbon.", "Trip to Lisbon")
    await say(page, "Hello! Which district should we stay in?")
    await wait_answered(page, 2)
    ai_state.fail_next = [503]
    await say(page, "And what about the trams?")
    await wait_answered(page, 3)
    await say(page, "And tomorrow, if it rains?")
    await wait_answered(page, 5)

    out = Path(os.environ.get(SCREENSHOTS_ENV) or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    shots = [("desktop", DESKTOP, "light"), ("phone", PHONE, "light"),
             ("desktop-dark", DESKTOP, "dark")]
    for name, viewport, scheme in shots:
        await page.set_viewport_size(viewport)
        await page.emulate_media(color_scheme=scheme)
        # The same tab after a reload: the key, the open session and what
        # this tab learnt about each turn are still there.
        await page.reload()
        await expect(messages(page)).to_have_count(5)
        await expect(messages(page).nth(1).locator(".ai-session")).to_have_text(
            "AI session created"
        )
        await expect(messages(page).nth(4).locator(".ai-session")).to_have_text(
            "AI session reused"
        )
        await expect(messages(page).nth(2).get_by_role("button", name="Retry")).to_be_visible()
        await expect(page.get_by_label("Message", exact=True)).to_be_in_viewport()
        await expect(page.get_by_role("button", name="Send")).to_be_in_viewport()
        assert await fits_width(page), f"{name}: wider than the window"
        if viewport is PHONE:
            # One thing at a time: the list is behind the back button.
            await expect(page.locator("#sessions")).to_be_hidden()
            await page.get_by_role("button", name="← Sessions").click()
            await expect(page.locator("#sessions")).to_be_visible()
            await expect(page.locator("#chat")).to_be_hidden()
            assert await fits_width(page)
            await page.locator(".session-item", has_text="Trip to Lisbon").click()
            await expect(page.locator("#chat")).to_be_visible()
        background = await page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert (background == "rgb(18, 20, 24)") == (scheme == "dark"), background
        await page.evaluate("document.activeElement && document.activeElement.blur()")
        await page.screenshot(path=str(out / f"page-{name}.png"))
    assert all((out / f"page-{name}.png").stat().st_size > 10_000 for name, _, _ in shots)
