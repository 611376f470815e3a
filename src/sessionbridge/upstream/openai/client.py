"""One OpenAI-compatible server behind the AIServer interface: discovery, health, a turn, slots.

What is sent and when the oldest turns go is ``window.py``'s; how answers are
read, ``wire.py``'s. llama.cpp slot files (``..slots``) are used only with
``slot_save=on``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

from ... import jsoncodec
from ...errors import (
    ContextLengthExceeded,
    FieldError,
    InvalidField,
    UpstreamError,
    UpstreamFailure,
    UpstreamUnavailable,
)
from ...records import ChatSession, HistoryTurn, Usage
from ..base import CallObserver, DeltaSink, HealthReport, Reply, TurnContext, no_observer
from ..http import (
    SMALL_BODY,
    ServerBusy,
    observed,
    read_limited,
    refuse_redirect,
    retry_after,
    status_error,
)
from ..replica_health import CannotContinue
from ..slots import SlotFiles
from .prefill import AfterStart, after_start, with_start
from .slot_table import SlotTable
from .tokens import TokenCounts
from .window import (
    DEFAULT_BYTES_PER_TOKEN,
    TEMPLATE_TOKENS_PER_MESSAGE,
    ai_session_kind,
    build_messages,
    bytes_per_token,
    trim,
    window_start,
    window_state,
)
from .window import estimate as estimate_of
from .wire import Answer, ContextExceeded, number, parse_body, read_stream, refuse

log = logging.getLogger(__name__)

DEFAULT_CONTEXT_TOKENS = 4096

@dataclass(frozen=True, slots=True)
class ServerInfo:
    model: str
    context_tokens: int
    # llama.cpp's number of slots; None for servers without slots.
    total_slots: int | None


class OpenAIClient:
    """One OpenAI-compatible server behind the AIServer interface."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        base_url: str,
        *,
        model: str = "",
        api_key: str = "",
        context_tokens: int = 0,
        timeout: float = 120.0,
        max_reply_bytes: int = 256 * 1024,
        slot_files: SlotFiles | None = None,
        observe: CallObserver = no_observer,
        count_slot_action: Callable[[str, str], None] = lambda action, outcome: None,
    ) -> None:
        self._http = http
        self._base = base_url.rstrip("/")
        # Parsed once, not on every turn.
        self._completions_url = URL(self._base + "/chat/completions")
        # llama.cpp keeps /props, /tokenize and /slots at its root, beside /v1.
        self._root = self._base[: -len("/v1")] if self._base.endswith("/v1") else self._base
        self._model = model
        self._context_tokens = context_tokens
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_reply_bytes = max_reply_bytes
        self._observe = observe
        self._count_slot_action = count_slot_action
        self._slot_files = slot_files
        self._info: ServerInfo | None = None
        self._info_lock = asyncio.Lock()
        self._slots: SlotTable | None = None
        self._tokens = TokenCounts(self._ask_token_count)
        self.last_success: float | None = None

    # -- what the server is -------------------------------------------------------------

    async def _get_json(self, url: str, endpoint: str, timeout: float | None = None) -> Any:
        """GET a small JSON document; None when the server has no such endpoint."""
        async with self._http.get(
            url,
            headers=self._headers,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=timeout) if timeout else self._timeout,
        ) as response:
            refuse_redirect(response, endpoint)
            raw = await read_limited(response, SMALL_BODY, endpoint)
            if response.status in (404, 405, 501):
                return None
            if response.status in (429, 503):
                raise ServerBusy(
                    f"{endpoint} answered {response.status}", retry_after=retry_after(response)
                )
            if response.status != 200:
                raise status_error(response, endpoint)
            try:
                return jsoncodec.loads(raw)
            except (ValueError, RecursionError):
                raise UpstreamError(f"{endpoint} answered something that is not JSON") from None

    async def server_info(self) -> ServerInfo:
        """The model, the context budget and llama.cpp's slots, asked once."""
        if self._info is not None:
            return self._info
        async with self._info_lock:
            if self._info is not None:
                return self._info
            async with observed("models", self._observe):
                models = await self._get_json(self._base + "/models", "/models")
                props = await self._get_json(self._root + "/props", "/props")
            entries = models.get("data") if isinstance(models, dict) else None
            if not isinstance(entries, list):
                raise UpstreamError("/models answered no list of models")
            ids = [e.get("id") for e in entries if isinstance(e, dict)]
            model = self._model or next((i for i in ids if isinstance(i, str) and i), "")
            if not model:
                raise UpstreamError("/models lists no model")
            entry = next((e for e in entries if isinstance(e, dict) and e.get("id") == model), {})
            context = self._context_tokens
            total_slots = None
            if isinstance(props, dict) and number(props.get("total_slots")):
                total_slots = props["total_slots"]
                settings = props.get("default_generation_settings")
                slot_ctx = number(settings.get("n_ctx")) if isinstance(settings, dict) else None
                context = context or (slot_ctx or 0)
            context = context or number(entry.get("max_model_len")) or DEFAULT_CONTEXT_TOKENS
            self._info = ServerInfo(model, context, total_slots)
            if total_slots and self._slot_files is not None:
                self._slots = SlotTable(total_slots)
            log.info(
                "event=upstream_discovered model=%s context_tokens=%d slots=%s",
                model, context, total_slots,
            )
            return self._info

    @property
    def cache_slots(self) -> int | None:
        """How many conversations the server keeps cached at once (llama.cpp's slots), if known."""
        return self._info.total_slots if self._info is not None else None

    async def health(self, timeout: float) -> HealthReport:
        try:
            models = await self._get_json(self._base + "/models", "/models", timeout)
        except TimeoutError:
            return HealthReport(False, "the AI server's /models did not answer in time", True)
        except UpstreamUnavailable as exc:
            self._lost_slots()
            return HealthReport(False, f"the AI server is not ready: {exc.detail}")
        except (aiohttp.ClientError, UpstreamError) as exc:
            self._lost_slots()
            return HealthReport(False, f"the AI server cannot be reached: {type(exc).__name__}")
        if isinstance(models, dict) and isinstance(models.get("data"), list):
            return HealthReport(True, "healthy")
        return HealthReport(False, "the AI server's /models lists no models")

    def _lost_slots(self) -> None:
        # The server is down or loading: when it is back its slots are empty,
        # so each conversation's next turn restores its saved slot.
        if self._slots is not None:
            self._slots.forget_all()

    # -- counting tokens -----------------------------------------------------------------

    async def _count_tokens(self, text: str, info: ServerInfo) -> int:
        return await self._tokens.count(text)

    async def _ask_token_count(self, text: str) -> int:
        """Exact where the server tokenizes (llama.cpp), else an estimate from bytes."""
        info = await self.server_info()
        if info.total_slots is not None:
            try:
                async with self._http.post(
                    self._root + "/tokenize",
                    data=jsoncodec.dumps({"content": text}),
                    headers=self._headers,
                    allow_redirects=False,
                    timeout=self._timeout,
                ) as response:
                    raw = await read_limited(response, self._max_reply_bytes * 8, "/tokenize")
                if response.status == 200:
                    tokens = jsoncodec.loads(raw).get("tokens")
                    if isinstance(tokens, list):
                        return len(tokens)
            except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError):
                pass  # an estimate will do
        return math.ceil(len(text.encode("utf-8")) / DEFAULT_BYTES_PER_TOKEN)

    async def check_fits(self, session: ChatSession, content: str, max_tokens: int) -> None:
        info = await self.server_info()
        needed = (
            await self._count_tokens(session.scenario, info)
            + await self._count_tokens(content, info)
            + 2 * TEMPLATE_TOKENS_PER_MESSAGE
            + max_tokens
        )
        if needed > info.context_tokens:
            raise InvalidField([FieldError(
                "content",
                f"the scenario and this message need about {needed} tokens with max_tokens,"
                f" over the AI server's context of {info.context_tokens}",
            )])

    # -- one turn -------------------------------------------------------------------------

    async def exchange(self, turn: TurnContext, on_delta: DeltaSink | None) -> Reply:
        return await self._exchange(turn, on_delta)

    async def continue_reply(self, turn: TurnContext, start: str, on_delta: DeltaSink) -> Reply:
        """Go on with a reply another replica began, whose ``start`` a client already has.

        The history is sent with ``start`` as the last, unfinished assistant
        message, which llama.cpp's server continues (it prefills the reply
        with it unless started with ``--no-prefill-assistant``). Other servers
        would answer it as a finished message: they are not asked.
        """
        info = await self.server_info()
        if info.total_slots is None:
            raise CannotContinue("only llama.cpp's server is known to continue a reply")
        return await self._exchange(turn, on_delta, start)

    async def _exchange(
        self, turn: TurnContext, on_delta: DeltaSink | None, start_of_reply: str = ""
    ) -> Reply:
        info = await self.server_info()
        session = turn.session
        first = turn.state is None
        start = window_start(turn.state)
        history = await turn.history(start)
        ratio = bytes_per_token(history, session.scenario)
        fixed = await self._count_tokens(session.scenario, info) + await self._count_tokens(
            turn.content, info
        ) + 2 * TEMPLATE_TOKENS_PER_MESSAGE
        last = history[-1] if history else None
        if last is not None and last.usage is not None:
            # The last turn's prompt and reply are this window's history, counted.
            estimate = (
                last.usage.prompt_tokens + last.usage.completion_tokens
                + await self._count_tokens(turn.content, info) + 2 * TEMPLATE_TOKENS_PER_MESSAGE
            )
        else:
            estimate = fixed + estimate_of(history, ratio)
        trimmed = False
        max_tokens = turn.max_tokens
        started = 0
        if start_of_reply:
            started = await self._count_tokens(start_of_reply, info)
            max_tokens = max(1, max_tokens - started)
        if estimate + turn.max_tokens > info.context_tokens and not turn.trim:
            raise ContextLengthExceeded(
                f"the conversation needs about {estimate + turn.max_tokens} tokens with its"
                f" reply, over the AI server's context of {info.context_tokens}"
            )
        if estimate + turn.max_tokens > info.context_tokens:
            history = trim(history, fixed, turn.max_tokens, ratio, info.context_tokens // 2)
            trimmed = True
        try:
            answer, restored = await self._complete(
                info, session, history, turn, on_delta, start_of_reply, max_tokens
            )
        except ContextExceeded:
            if not turn.trim:
                raise ContextLengthExceeded(
                    "the conversation does not fit the AI server's context"
                ) from None
            if not history:
                raise UpstreamError("the AI server's context cannot hold this message") from None
            # The estimate was short: trim further, once.
            history = trim(history, fixed, turn.max_tokens, ratio, info.context_tokens // 4)
            trimmed = True
            answer, restored = await self._complete(
                info, session, history, turn, on_delta, start_of_reply, max_tokens
            )
        new_start = history[0].seq if history else (last.seq + 2 if last is not None else 0)
        if first or (trimmed and new_start != start):
            await turn.save_state(window_state(new_start))
        kind = ai_session_kind(first, trimmed, restored, last, answer.cached_tokens)
        without_restore = ai_session_kind(first, trimmed, False, last, answer.cached_tokens)
        if restored and without_restore == "recovered":
            # The restore was accepted but the server computed the prompt again
            # anyway (llama.cpp does so for sliding-window models without --swa-full).
            log.warning(
                "event=slot_restore_missed session=%s cached_tokens=%s",
                session.id, answer.cached_tokens,
            )
            self._count_slot_action("restore", "missed")
        usage = None
        if answer.prompt_tokens is not None and answer.completion_tokens is not None:
            usage = Usage(
                answer.prompt_tokens, answer.cached_tokens or 0, answer.completion_tokens + started
            )
        text = start_of_reply + after_start(answer.text, start_of_reply)
        return Reply(text, kind, usage, answer.truncated)

    async def recover(self, turn: TurnContext, on_delta: DeltaSink | None) -> Reply:
        """A turn on a server that may hold none of this conversation (a pool's other replica).

        The history is the bridge's, so this is an ordinary turn: the whole
        window is sent, and ``ai_session`` says what the server's cache held.
        """
        return await self.exchange(turn, on_delta)

    async def _complete(
        self,
        info: ServerInfo,
        session: ChatSession,
        history: list[HistoryTurn],
        turn: TurnContext,
        on_delta: DeltaSink | None,
        start_of_reply: str,
        max_tokens: int,
    ) -> tuple[Answer, bool]:
        if start_of_reply:
            on_delta = AfterStart(start_of_reply, on_delta)
        payload: dict[str, Any] = {
            "model": info.model,
            "messages": with_start(
                build_messages(session.scenario, history, turn.content), start_of_reply
            ),
            "max_tokens": max_tokens,
            **turn.sampling,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if info.total_slots is not None:
            payload["cache_prompt"] = True
        if self._slots is None or self._slot_files is None:
            return await self._stream(payload, session.id, on_delta), False
        slot = self._slots.choose(session.id)
        async with slot.lock:
            restored = False
            if slot.resident != session.id or await self._slot_is_empty(slot.index):
                restored = await self._restore(slot.index, session)
                self._slots.place(slot, session.id)
            payload["id_slot"] = slot.index
            try:
                answer = await self._stream(payload, session.id, on_delta)
            except BaseException:
                self._slots.place(slot, None)  # what the slot holds now is unknown
                raise
            await self._save(slot.index, session)
            return answer, restored

    async def _slot_is_empty(self, index: int) -> bool:
        """Whether the slot has served nothing since the server started (it restarted)."""
        # A slot that has run a task lists it (id_task); a restarted server's
        # slots list none, so the conversation they held must be restored.
        try:
            slots = await self._get_json(self._root + "/slots", "/slots")
        except (UpstreamFailure, aiohttp.ClientError, TimeoutError):
            return False
        if not isinstance(slots, list):
            return False
        entry = next((s for s in slots if isinstance(s, dict) and s.get("id") == index), None)
        return isinstance(entry, dict) and "id_task" not in entry

    async def _restore(self, index: int, session: ChatSession) -> bool:
        assert self._slot_files is not None
        filename = self._slot_files.filename(session.id)
        if not self._slot_files.exists(filename):
            return False
        ok = await self._slot_action(index, "restore", filename, session.id)
        return ok

    async def _save(self, index: int, session: ChatSession) -> None:
        assert self._slot_files is not None
        filename = self._slot_files.filename(session.id)
        if await self._slot_action(index, "save", filename, session.id):
            self._slot_files.saved(filename)

    async def _slot_action(self, index: int, action: str, filename: str, session_id: str) -> bool:
        """Save or restore a slot; a failure costs only the cache, never the turn."""
        endpoint = f"slots/{action}"
        for attempt in (1, 2):
            try:
                await self._slot_call(index, action, filename, session_id, endpoint)
            except UpstreamUnavailable as exc:
                # A pooled connection the server had just closed: both
                # actions are idempotent, so one more try on a fresh one.
                if attempt == 1:
                    continue
                failure: UpstreamFailure = exc
            except UpstreamFailure as exc:
                failure = exc
            else:
                self._count_slot_action(action, "ok")
                return True
            log.warning("event=slot_%s_failed session=%s error=%s", action, session_id, failure)
            self._count_slot_action(action, "failed")
            return False
        return False

    async def _slot_call(
        self, index: int, action: str, filename: str, session_id: str, endpoint: str
    ) -> None:
        async with (
            observed(endpoint, self._observe, session_id),
            self._http.post(
                f"{self._root}/slots/{index}",
                params={"action": action},
                data=jsoncodec.dumps({"filename": filename}),
                headers=self._headers,
                allow_redirects=False,
                timeout=self._timeout,
            ) as response,
        ):
            refuse_redirect(response, endpoint)
            raw = await read_limited(response, SMALL_BODY, endpoint)
            if response.status != 200:
                raise UpstreamError(f"{endpoint} answered {response.status}: {raw[:200]!r}")

    async def forget(self, session: ChatSession) -> None:
        if self._slots is not None:
            self._slots.evict(session.id)
        if self._slot_files is not None:
            self._slot_files.remove(self._slot_files.filename(session.id))

    async def _stream(
        self, payload: dict[str, Any], session_id: str, on_delta: DeltaSink | None
    ) -> Answer:
        endpoint = "chat/completions"
        async with (
            observed(endpoint, self._observe, session_id),
            self._http.post(
                self._completions_url,
                data=jsoncodec.dumps(payload),
                # llama.cpp closes a streamed answer's connection after it
                # despite its Keep-Alive header; a pooled connection the next
                # call took would fail. A turn's stream gets its own.
                headers={**self._headers, "Connection": "close"},
                allow_redirects=False,
                timeout=self._timeout,
            ) as response,
        ):
            refuse_redirect(response, endpoint)
            if response.status != 200:
                await refuse(response, endpoint)
            content_type = response.headers.get("Content-Type", "")
            if "text/event-stream" not in content_type:
                # A server that ignored "stream": one JSON answer.
                raw = await read_limited(response, self._max_reply_bytes, endpoint)
                answer = parse_body(raw)
                if on_delta is not None and answer.text:
                    await on_delta(answer.text)
            else:
                answer = await read_stream(response, endpoint, on_delta, self._max_reply_bytes)
            self.last_success = time.monotonic()
            return answer

