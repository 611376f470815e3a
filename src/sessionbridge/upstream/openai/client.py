"""OpenAI-compatible chat completions (contract §5): llama.cpp's server, vLLM, Ollama and the like.

These servers keep no conversation: every turn sends the whole history, and
the server saves work only where it finds that history's beginning in its
prompt cache. So the bridge is the memory, and "reusing the AI session" means
sending a prompt whose beginning is byte for byte the previous turn's:

- ``messages`` is the scenario as the system message, every answered turn
  exactly as stored, then the new message; nothing is ever re-rendered.
- When the prompt would not fit the context budget, the oldest turns are
  dropped in one step down to half the budget, and the new start of the
  window is kept (the adapter's state), so the next many turns share their
  beginning again. A scenario and one message that alone cannot fit are
  refused before the question is stored.
- Token counts come from what the server reports (``usage``, llama.cpp's
  ``timings``) or its ``/tokenize``; no tokenizer of the bridge's own.

llama.cpp slots (``slots.py``) are used only with ``slot_save=on``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from .. import jsoncodec
from ..errors import (
    FieldError,
    InvalidField,
    UpstreamError,
    UpstreamFailure,
    UpstreamUnavailable,
)
from ..records import AISessionKind, ChatSession, HistoryTurn, Usage
from .base import (
    SMALL_BODY,
    CallObserver,
    DeltaSink,
    HealthReport,
    Reply,
    TurnContext,
    no_observer,
    observed,
    read_limited,
    read_lines,
    refuse_redirect,
)
from .slots import SlotFiles

log = logging.getLogger(__name__)

DEFAULT_CONTEXT_TOKENS = 4096
# Tokens a chat template adds around each message (role markers, turn ends).
TEMPLATE_TOKENS_PER_MESSAGE = 8
# Bytes per token assumed before the server has reported any usage.
DEFAULT_BYTES_PER_TOKEN = 3.0
# A streamed line is one JSON chunk of a few tokens.
STREAM_LINE_LIMIT = 256 * 1024
# Chunk framing costs a few hundred bytes per piece: the whole stream may be
# this many times the reply limit.
STREAM_OVERHEAD = 16
RETRY_AFTER_DEFAULT = 5
# Token counts of recent scenarios and messages, by a digest of their text.
TOKEN_COUNT_CACHE = 512


@dataclass(frozen=True, slots=True)
class ServerInfo:
    model: str
    context_tokens: int
    # llama.cpp's number of slots; None for servers without slots.
    total_slots: int | None


@dataclass(frozen=True, slots=True)
class _Answer:
    text: str
    prompt_tokens: int | None
    cached_tokens: int | None  # None: the server does not say
    completion_tokens: int | None


class _ContextExceeded(UpstreamError):
    """The server says the prompt does not fit its context."""


def window_start(state: str | None) -> int:
    """The first question seq of the history window kept in the adapter's state."""
    if state and state.startswith("from="):
        try:
            return int(state[5:])
        except ValueError:
            return 0
    return 0


def build_messages(scenario: str, history: list[HistoryTurn], content: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": scenario}]
    for turn in history:
        messages.append({"role": "user", "content": turn.user})
        messages.append({"role": "assistant", "content": turn.assistant})
    messages.append({"role": "user", "content": content})
    return messages


def _retry_after(response: aiohttp.ClientResponse) -> int:
    raw = response.headers.get("Retry-After", "")
    return int(raw) if raw.isdigit() and 0 < int(raw) <= 3600 else RETRY_AFTER_DEFAULT


def _number(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


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
        self._slots: _SlotTable | None = None
        self._token_counts: OrderedDict[bytes, int] = OrderedDict()
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
                raise UpstreamUnavailable(
                    f"{endpoint} answered {response.status}", retry_after=_retry_after(response)
                )
            if response.status != 200:
                raise UpstreamError(f"{endpoint} answered {response.status}")
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
            if isinstance(props, dict) and _number(props.get("total_slots")):
                total_slots = props["total_slots"]
                settings = props.get("default_generation_settings")
                slot_ctx = _number(settings.get("n_ctx")) if isinstance(settings, dict) else None
                context = context or (slot_ctx or 0)
            context = context or _number(entry.get("max_model_len")) or DEFAULT_CONTEXT_TOKENS
            self._info = ServerInfo(model, context, total_slots)
            if total_slots and self._slot_files is not None:
                self._slots = _SlotTable(total_slots)
            log.info(
                "event=upstream_discovered model=%s context_tokens=%d slots=%s",
                model, context, total_slots,
            )
            return self._info

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
        """Exact where the server tokenizes (llama.cpp), else an estimate from bytes."""
        # A turn counts its scenario and message twice (before the question is
        # stored, then to plan the prompt), and a scenario every turn.
        key = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        known = self._token_counts.get(key)
        if known is not None:
            self._token_counts.move_to_end(key)
            return known
        count = await self._ask_token_count(text, info)
        self._token_counts[key] = count
        if len(self._token_counts) > TOKEN_COUNT_CACHE:
            self._token_counts.popitem(last=False)
        return count

    async def _ask_token_count(self, text: str, info: ServerInfo) -> int:
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

    @staticmethod
    def _bytes_per_token(history: list[HistoryTurn], scenario: str) -> float:
        """Learned from the last reported usage of this window: its text over its tokens."""
        last = history[-1] if history else None
        if last is None or last.usage is None or not last.usage.prompt_tokens:
            return DEFAULT_BYTES_PER_TOKEN
        size = len(scenario.encode()) + sum(
            len(t.user.encode()) + len(t.assistant.encode()) for t in history
        )
        tokens = last.usage.prompt_tokens + last.usage.completion_tokens
        return min(max(size / tokens, 1.0), 8.0)

    def _estimate(self, turns: list[HistoryTurn], ratio: float) -> int:
        return sum(
            math.ceil((len(t.user.encode()) + len(t.assistant.encode())) / ratio)
            + 2 * TEMPLATE_TOKENS_PER_MESSAGE
            for t in turns
        )

    def _trim(
        self, history: list[HistoryTurn], fixed: int, max_tokens: int, budget: int,
        ratio: float, target: int,
    ) -> list[HistoryTurn]:
        """The newest turns that fit ``target`` with the scenario, the message and the reply."""
        kept: list[HistoryTurn] = []
        used = fixed + max_tokens
        for turn in reversed(history):
            used += self._estimate([turn], ratio)
            if used > target:
                break
            kept.append(turn)
        kept.reverse()
        return kept

    # -- one turn -------------------------------------------------------------------------

    async def exchange(self, turn: TurnContext, on_delta: DeltaSink | None) -> Reply:
        info = await self.server_info()
        session = turn.session
        first = turn.state is None
        start = window_start(turn.state)
        history = await turn.history(start)
        ratio = self._bytes_per_token(history, session.scenario)
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
            estimate = fixed + self._estimate(history, ratio)
        trimmed = False
        if estimate + turn.max_tokens > info.context_tokens:
            history = self._trim(
                history, fixed, turn.max_tokens, info.context_tokens, ratio,
                info.context_tokens // 2,
            )
            trimmed = True
        try:
            answer, restored = await self._complete(info, session, history, turn, on_delta)
        except _ContextExceeded:
            if not history:
                raise UpstreamError("the AI server's context cannot hold this message") from None
            # The estimate was short: trim further, once.
            history = self._trim(
                history, fixed, turn.max_tokens, info.context_tokens, ratio,
                info.context_tokens // 4,
            )
            trimmed = True
            answer, restored = await self._complete(info, session, history, turn, on_delta)
        new_start = history[0].seq if history else (last.seq + 2 if last is not None else 0)
        if first or (trimmed and new_start != start):
            await turn.save_state(f"from={new_start}")
        kind = self._kind(first, trimmed, restored, last, answer)
        if restored and self._kind(first, trimmed, False, last, answer) == "recovered":
            # The restore was accepted but the server computed the prompt again
            # anyway (llama.cpp does so for sliding-window models without --swa-full).
            log.warning(
                "event=slot_restore_missed session=%s cached_tokens=%s",
                session.id, answer.cached_tokens,
            )
            self._count_slot_action("restore", "missed")
        usage = None
        if answer.prompt_tokens is not None and answer.completion_tokens is not None:
            usage = Usage(answer.prompt_tokens, answer.cached_tokens or 0, answer.completion_tokens)
        return Reply(answer.text, kind, usage)

    @staticmethod
    def _kind(
        first: bool, trimmed: bool, restored: bool, last: HistoryTurn | None, answer: _Answer
    ) -> AISessionKind:
        if first:
            return "created"
        if restored:
            return "recovered"
        if trimmed or answer.cached_tokens is None or last is None or last.usage is None:
            # After a trim the part shared with the last prompt is the scenario;
            # a server that reports nothing about its cache is taken at its word.
            return "reused"
        # The previous prompt is this prompt's beginning: the cache served it,
        # or the server had lost it (eviction, restart) and computed it again.
        shared = last.usage.prompt_tokens
        return "reused" if answer.cached_tokens * 2 >= shared else "recovered"

    async def _complete(
        self,
        info: ServerInfo,
        session: ChatSession,
        history: list[HistoryTurn],
        turn: TurnContext,
        on_delta: DeltaSink | None,
    ) -> tuple[_Answer, bool]:
        payload: dict[str, Any] = {
            "model": info.model,
            "messages": build_messages(session.scenario, history, turn.content),
            "max_tokens": turn.max_tokens,
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
    ) -> _Answer:
        endpoint = "chat/completions"
        async with (
            observed(endpoint, self._observe, session_id),
            self._http.post(
                self._base + "/chat/completions",
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
                await self._refuse(response, endpoint)
            content_type = response.headers.get("Content-Type", "")
            if "text/event-stream" not in content_type:
                # A server that ignored "stream": one JSON answer.
                raw = await read_limited(response, self._max_reply_bytes, endpoint)
                answer = self._from_body(raw)
                if on_delta is not None and answer.text:
                    await on_delta(answer.text)
            else:
                answer = await self._read_stream(response, endpoint, on_delta)
            self.last_success = time.monotonic()
            return answer

    async def _refuse(self, response: aiohttp.ClientResponse, endpoint: str) -> None:
        raw = await read_limited(response, SMALL_BODY, endpoint)
        # The server's own words go to the log, not to the client.
        text = raw[:500].decode("utf-8", "replace")
        log.warning("event=upstream_refused status=%d body=%r", response.status, text)
        if response.status in (429, 503):
            raise UpstreamUnavailable(
                f"the AI server is busy or loading ({response.status})",
                retry_after=_retry_after(response),
            )
        lowered = text.lower()
        if response.status == 400 and ("context" in lowered and (
            "exceed" in lowered or "maximum" in lowered or "too long" in lowered
        )):
            raise _ContextExceeded("the prompt does not fit the AI server's context")
        raise UpstreamError(f"{endpoint} answered {response.status}")

    def _from_body(self, raw: bytes) -> _Answer:
        try:
            body = jsoncodec.loads(raw)
            text = body["choices"][0]["message"]["content"]
        except (ValueError, RecursionError, KeyError, IndexError, TypeError):
            raise UpstreamError("the AI server's answer has no message content") from None
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise UpstreamError("the AI server's message content is not text")
        usage = _Usage()
        usage.read(body)
        return usage.answer(text)

    async def _read_stream(
        self, response: aiohttp.ClientResponse, endpoint: str, on_delta: DeltaSink | None
    ) -> _Answer:
        pieces: list[str] = []
        usage = _Usage()
        finished = False
        async for line in read_lines(
            response, STREAM_LINE_LIMIT, self._max_reply_bytes * STREAM_OVERHEAD, endpoint
        ):
            if not line.startswith(b"data:"):
                if line.startswith(b"error:"):
                    raise UpstreamError("the AI server reported an error mid-stream")
                continue  # comments, event names, blank separators
            data = line[5:].strip()
            if data == b"[DONE]":
                finished = True
                break
            try:
                chunk = jsoncodec.loads(data)
            except (ValueError, RecursionError):
                raise UpstreamError("the AI server streamed a chunk that is not JSON") from None
            if not isinstance(chunk, dict):
                raise UpstreamError("the AI server streamed a chunk that is not an object")
            if "error" in chunk:
                raise UpstreamError("the AI server reported an error mid-stream")
            usage.read(chunk)
            choices = chunk.get("choices")
            if not isinstance(choices, list) or not choices:
                continue  # the usage-only chunk
            choice = choices[0] if isinstance(choices[0], dict) else {}
            delta = choice.get("delta")
            piece = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(piece, str) and piece:
                pieces.append(piece)
                if on_delta is not None:
                    await on_delta(piece)
            elif piece is not None and not isinstance(piece, str):
                raise UpstreamError("the AI server streamed content that is not text")
            if choice.get("finish_reason"):
                finished = True
        if not finished:
            raise UpstreamError("the AI server's stream ended before the reply did")
        return usage.answer("".join(pieces))


class _Usage:
    """Token counts gathered from an answer: OpenAI's ``usage`` or llama.cpp's ``timings``."""

    def __init__(self) -> None:
        self.prompt: int | None = None
        self.cached: int | None = None
        self.completion: int | None = None

    def read(self, document: dict[str, Any]) -> None:
        usage = document.get("usage")
        if isinstance(usage, dict):
            self.prompt = _number(usage.get("prompt_tokens")) or self.prompt
            self.completion = _number(usage.get("completion_tokens")) or self.completion
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict) and _number(details.get("cached_tokens")) is not None:
                self.cached = details["cached_tokens"]
        timings = document.get("timings")
        if isinstance(timings, dict):
            cache_n, prompt_n = _number(timings.get("cache_n")), _number(timings.get("prompt_n"))
            if cache_n is not None:
                self.cached = cache_n
            if self.prompt is None and cache_n is not None and prompt_n is not None:
                self.prompt = cache_n + prompt_n
            predicted = _number(timings.get("predicted_n"))
            if self.completion is None and predicted is not None:
                self.completion = predicted

    def answer(self, text: str) -> _Answer:
        return _Answer(text, self.prompt, self.cached, self.completion)


@dataclass(eq=False)
class _Slot:
    index: int
    lock: asyncio.Lock
    resident: str | None = None
    used: float = 0.0


class _SlotTable:
    """Which conversation each llama.cpp slot holds, as far as this bridge knows."""

    def __init__(self, total: int) -> None:
        self._slots = [_Slot(i, asyncio.Lock()) for i in range(total)]

    def choose(self, session_id: str) -> _Slot:
        """The slot holding this conversation, else the least recently used free one."""
        for slot in self._slots:
            if slot.resident == session_id:
                return slot
        free = [s for s in self._slots if not s.lock.locked()] or self._slots
        return min(free, key=lambda s: s.used)

    def place(self, slot: _Slot, session_id: str | None) -> None:
        slot.resident = session_id
        slot.used = time.monotonic()

    def evict(self, session_id: str) -> None:
        for slot in self._slots:
            if slot.resident == session_id:
                slot.resident = None

    def forget_all(self) -> None:
        for slot in self._slots:
            slot.resident = None
