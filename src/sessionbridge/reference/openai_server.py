"""The reference OpenAI-compatible AI server: a development and test double, NOT a model.

This module owns a small aiohttp application that answers as the
OpenAI-compatible servers people run (docs/ai-servers.md, docs/streaming.md) do:
llama.cpp's ``llama-server`` (the default persona), vLLM and Ollama. It
generates nothing: every reply comes from a deterministic responder that says
what history it was sent (``Reply 3: I see 4 earlier messages; you said:
...``), so tests can prove which messages the bridge sent.

What it simulates is the part that matters to the bridge: a prompt cache per
slot (a token-prefix match over a deterministic tokenizer, with the Gemma
chat template that llama.cpp applies), latency per computed prompt token and
per streamed piece, slot save and restore files, and a restart that forgets
every cache. The rules live in :mod:`.openai_cache`.

The personas differ where the real servers differ (measured against
llama-server 11434.0.0 here; docs/ai-servers.md has what was measured):

- llama.cpp: ``/health``, ``/props``, ``/slots``, ``/slots/{id}?action=``,
  ``/tokenize``, ``/apply-template``; answers carry ``timings`` and
  ``usage.prompt_tokens_details.cached_tokens``; ``id_slot`` and
  ``cache_prompt`` are honoured; the ``model`` field is ignored (as measured);
  only a prompt larger than the slot is refused (400
  ``exceed_context_size_error``), a reply that runs into the slot's end is cut
  there (``finish_reason: "length"``); streams start with a role-only delta
  whose ``content`` is null and carry ``timings`` on the last chunk; ``usage``
  comes (as its own ``choices: []`` chunk) only with
  ``stream_options.include_usage``; a last ``assistant`` message is the start
  of the reply, which goes on from it (llama.cpp's prefill), the answer
  repeating that start in front (its first streamed piece). ``/health``
  needs no API key, the rest does.
- vLLM: no ``/props`` or ``/slots``; ``/v1/models`` entries carry
  ``max_model_len``; ``/tokenize`` takes ``prompt`` or ``messages`` (not
  llama.cpp's ``content``) and answers ``count``; ``usage`` has
  ``prompt_tokens_details.cached_tokens``; no ``timings``; prompt plus
  ``max_tokens`` over the context is a 400; an unknown ``model`` is a 404.
- Ollama: no ``/health``, ``/props``, ``/slots`` or ``/tokenize``; plain
  ``usage`` whose ``prompt_tokens`` counts only the tokens it evaluated (the
  cached part is left out, as Ollama reports ``prompt_eval_count``); every
  stream chunk repeats ``role``; an unknown ``model`` is a 404; it never
  refuses a long prompt.

Everything lives in one :class:`OpenAIReferenceState` per application. Tests
reach it through ``app[OPENAI_REFERENCE_STATE]`` and mutate its switches
directly; a change takes effect from the next request on.

Run it by hand with ``python -m sessionbridge.reference.openai_server --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from .openai_cache import (
    Slot,
    SlotPool,
    common_prefix,
    prompt_pieces,
    render_chat,
    reply_for,
    token_id,
    tokenize,
    valid_slot_filename,
)
from .openai_wire import (
    JSONObject,
    Rejected,
    Turn,
    completion_body,
    dumps,
    error,
    head_chunks,
    not_found,
    piece_chunk,
    sse,
    tail_chunks,
    unauthorized,
)

__all__ = [
    "KINDS",
    "OPENAI_REFERENCE_STATE",
    "OpenAIReferenceState",
    "create_openai_reference_app",
    "main",
]

log = logging.getLogger(__name__)

KINDS = ("llama.cpp", "vllm", "ollama")
# A stored slot file names its format and model, so a file from anything
# else is refused on restore, as llama.cpp refuses a foreign state file.
SLOT_FILE_FORMAT = "sessionbridge-reference-slot/1"
_REQUEST_LOG = 100
_CLIENT_MAX_SIZE = 64 * 1024 * 1024
_LLAMA_PUBLIC_PATHS = frozenset({"/health", "/v1/health"})


@dataclass
class OpenAIReferenceState:
    """The persona, the simulated slots, the switches and the counters of one server.

    Tests mutate the switches directly; every request reads them afresh.
    ``total_slots`` shapes the slot pool: change it, then call :meth:`restart`.
    """

    kind: str = "llama.cpp"
    # The served model id (what /v1/models lists and answers name).
    model: str = "reference-gemma-3-270m"
    # When set, requests need "Authorization: Bearer <api_key>".
    api_key: str | None = None
    total_slots: int = 4
    # Tokens per slot (llama.cpp's per-slot n_ctx; vLLM's max_model_len).
    slot_ctx: int = 2048
    # Directory for slot files; None = started without --slot-save-path.
    slot_save_path: str | None = None
    # A slot is chosen by shared prefix only above this share of the prompt.
    slot_prompt_similarity: float = 0.1
    # Seconds per computed prompt token before the first piece.
    prompt_token_delay: float = 0.0
    # Seconds between streamed pieces (and per piece of a whole answer).
    piece_delay: float = 0.0
    tokens_per_piece: int = 3
    # Everything answers 503, as llama.cpp does while it loads a model.
    loading: bool = False
    # Status codes answered to the next chat requests, taken from the front.
    fail_next: list[int] = field(default_factory=list)
    # The next N replies are empty; then the next M are whitespace only.
    empty_replies: int = 0
    blank_replies: int = 0
    # Chat requests never answer, to provoke client timeouts.
    hang: bool = False
    # Close the connection after this many streamed pieces (a non-streamed
    # request gets its connection closed without an answer).
    break_after_pieces: int | None = None
    # A fixed reply, sent as it is (not cut to max_tokens).
    reply_text: str | None = None
    calls: collections.Counter[str] = field(default_factory=collections.Counter)
    # Prompt tokens by where they came from ("cached", "computed") and "predicted".
    tokens: collections.Counter[str] = field(default_factory=collections.Counter)
    # The last chat requests' JSON bodies, oldest first.
    requests: collections.deque[JSONObject] = field(
        default_factory=lambda: collections.deque(maxlen=_REQUEST_LOG)
    )
    pool: SlotPool = field(init=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {self.kind!r}")
        self.pool = SlotPool(self.total_slots)

    @property
    def slots(self) -> list[Slot]:
        return self.pool.slots

    def restart(self) -> None:
        """Simulate a restart: every slot's cache and the counters are gone.

        Slot files stay on disk, and the request record stays (it is the
        tests' view of what was sent, not the server's memory).
        """
        if len(self.pool.slots) == self.total_slots:
            self.pool.forget()
        else:
            self.pool = SlotPool(self.total_slots)
        self.calls.clear()
        self.tokens.clear()


OPENAI_REFERENCE_STATE = web.AppKey("openai_reference_state", OpenAIReferenceState)


def _json(body: object, status: int = 200) -> web.Response:
    return web.Response(text=dumps(body), status=status, content_type="application/json")


def _needs_key(kind: str, path: str) -> bool:
    if kind == "llama.cpp":
        return path not in _LLAMA_PUBLIC_PATHS
    if kind == "vllm":
        return path.startswith("/v1/")
    return path != "/"


def _authorized(request: web.Request, api_key: str) -> bool:
    scheme, _, token = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(
        token.strip().encode(), api_key.encode()
    )


def _send(rejected: Rejected) -> web.Response:
    if isinstance(rejected.body, str):
        return web.Response(text=rejected.body, status=rejected.status)
    return _json(rejected.body, rejected.status)


@web.middleware
async def _persona_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[OPENAI_REFERENCE_STATE]
    key = state.api_key
    locked = key is not None and _needs_key(state.kind, request.path)
    try:
        if locked and not _authorized(request, key or ""):
            raise unauthorized(state.kind)
        if state.loading:
            raise error(state.kind, 503, "Loading model")
        return await handler(request)
    except Rejected as rejected:
        return _send(rejected)
    except web.HTTPNotFound:
        return _send(not_found(state.kind))


def _persona(request: web.Request, *kinds: str) -> OpenAIReferenceState:
    """The state, after checking this endpoint exists in the current persona."""
    state = request.app[OPENAI_REFERENCE_STATE]
    if state.kind not in kinds:
        raise not_found(state.kind)
    return state


async def _json_body(request: web.Request, kind: str) -> JSONObject:
    raw = await request.text()
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise error(kind, 400, f"parse error at column {exc.colno}: {exc.msg}") from None
    if not isinstance(body, dict):
        raise error(kind, 400, "the request body must be a JSON object")
    return body


# -- the llama.cpp-only endpoints ---------------------------------------------


async def _handle_health(request: web.Request) -> web.Response:
    state = _persona(request, "llama.cpp", "vllm")
    state.calls["health"] += 1
    if state.kind == "vllm":
        return web.Response(status=200)
    return _json({"status": "ok"})


async def _handle_ollama_root(request: web.Request) -> web.Response:
    state = _persona(request, "ollama")
    state.calls["root"] += 1
    return web.Response(text="Ollama is running")


async def _handle_props(request: web.Request) -> web.Response:
    state = _persona(request, "llama.cpp")
    state.calls["props"] += 1
    return _json(
        {
            "default_generation_settings": {"n_ctx": state.slot_ctx, "params": {"n_predict": -1}},
            "total_slots": state.total_slots,
            "model_alias": state.model,
            "model_path": state.model,
            "chat_template": "gemma (built-in)",
            "bos_token": "<bos>",
            "eos_token": "<eos>",
            "build_info": "reference-test-double",
            "is_sleeping": False,
            "modalities": {"vision": False, "audio": False},
        }
    )


async def _handle_slots(request: web.Request) -> web.Response:
    state = _persona(request, "llama.cpp")
    state.calls["slots"] += 1
    # As llama.cpp: a slot lists its last task and prompt only once it has
    # run one since the server started.
    return _json([
        {
            "id": slot.id,
            "n_ctx": state.slot_ctx,
            "speculative": False,
            "is_processing": slot.busy,
            **(
                {"id_task": slot.last_used, "n_prompt_tokens": len(slot.tokens)}
                if slot.last_used else {}
            ),
            "next_token": [{"has_next_token": slot.busy, "n_remain": -1, "n_decoded": 0}],
        }
        for slot in state.slots
    ])


def _write_slot_file(path: Path, payload: JSONObject) -> int:
    data = dumps(payload).encode("utf-8")
    path.write_bytes(data)
    return len(data)


def _read_slot_file(path: Path) -> tuple[JSONObject, int]:
    data = path.read_bytes()
    return json.loads(data), len(data)


async def _handle_slot_action(request: web.Request) -> web.Response:
    state = _persona(request, "llama.cpp")
    action = request.query.get("action", "")
    state.calls[f"slot_{action}" if action in ("save", "restore", "erase") else "slot_other"] += 1
    if state.slot_save_path is None:
        raise error(
            state.kind,
            501,
            "This server does not support slots action. Start it with `--slot-save-path`",
        )
    try:
        id_slot = int(request.match_info["id_slot"])
    except ValueError:
        raise error(state.kind, 400, "Invalid slot ID") from None
    if not 0 <= id_slot < len(state.slots):
        # The real server answers an id past its slots as if it were idle
        # and empty; here it is refused, so a bridge bug cannot hide.
        raise error(state.kind, 400, "Invalid slot ID")
    if action == "erase":
        slot = await state.pool.acquire(id_slot, [], 0.0)
        erased = len(slot.tokens)
        slot.tokens = []
        await state.pool.release(slot)
        return _json({"id_slot": id_slot, "n_erased": erased})
    if action not in ("save", "restore"):
        raise error(state.kind, 400, "Invalid action")
    filename = (await _json_body(request, state.kind)).get("filename")
    if not isinstance(filename, str):
        raise error(state.kind, 400, "key 'filename' not found")
    if not valid_slot_filename(filename):
        raise error(state.kind, 400, "Invalid filename")
    path = Path(state.slot_save_path) / filename
    # A busy slot is saved or restored once its request has finished, as
    # llama.cpp defers the task.
    slot = await state.pool.acquire(id_slot, [], 0.0)
    started = time.perf_counter()
    try:
        if action == "save":
            payload = {"format": SLOT_FILE_FORMAT, "model": state.model, "tokens": slot.tokens}
            written = await asyncio.to_thread(_write_slot_file, path, payload)
            save_ms = (time.perf_counter() - started) * 1000
            return _json(
                {
                    "id_slot": id_slot,
                    "filename": filename,
                    "n_saved": len(slot.tokens),
                    "n_written": written,
                    "timings": {"save_ms": save_ms},
                }
            )
        try:
            stored, read = await asyncio.to_thread(_read_slot_file, path)
            tokens = stored["tokens"]
            usable = (
                stored.get("format") == SLOT_FILE_FORMAT
                and stored.get("model") == state.model
                and isinstance(tokens, list)
                and len(tokens) <= state.slot_ctx
            )
        except (OSError, ValueError, KeyError, TypeError):
            usable = False
        if not usable:
            raise error(
                state.kind,
                400,
                "Unable to restore slot: No available space in KV cache or invalid slot save file",
            )
        slot.tokens = [int(token) for token in tokens]
        restore_ms = (time.perf_counter() - started) * 1000
        return _json(
            {
                "id_slot": id_slot,
                "filename": filename,
                "n_restored": len(slot.tokens),
                "n_read": read,
                "timings": {"restore_ms": restore_ms},
            }
        )
    finally:
        await state.pool.release(slot)


async def _handle_tokenize(request: web.Request) -> web.Response:
    state = _persona(request, "llama.cpp", "vllm")
    state.calls["tokenize"] += 1
    body = await _json_body(request, state.kind)
    if state.kind == "vllm":
        return _json(_vllm_tokenize(state, body))
    content = body.get("content", "")
    if not isinstance(content, str):
        raise error(state.kind, 400, "'content' must be a string")
    pieces = tokenize(content)
    if body.get("add_special") is True:
        pieces.insert(0, "<bos>")
    if body.get("with_pieces") is True:
        return _json({"tokens": [{"id": token_id(p), "piece": p} for p in pieces]})
    return _json({"tokens": [token_id(p) for p in pieces]})


def _vllm_tokenize(state: OpenAIReferenceState, body: JSONObject) -> JSONObject:
    if isinstance(body.get("prompt"), str):
        pieces = ["<bos>", *tokenize(body["prompt"])]
    elif "messages" in body:
        pieces = prompt_pieces(_messages(state.kind, body.get("messages")))
    else:
        raise error(state.kind, 400, "Field required: 'prompt' or 'messages'")
    return {
        "count": len(pieces),
        "max_model_len": state.slot_ctx,
        "tokens": [token_id(p) for p in pieces],
        "token_strs": None,
    }


async def _handle_apply_template(request: web.Request) -> web.Response:
    state = _persona(request, "llama.cpp")
    state.calls["apply-template"] += 1
    body = await _json_body(request, state.kind)
    return _json({"prompt": render_chat(_messages(state.kind, body.get("messages")))})


async def _handle_models(request: web.Request) -> web.Response:
    state = request.app[OPENAI_REFERENCE_STATE]
    state.calls["models"] += 1
    created = int(time.time())
    entry: JSONObject = {"id": state.model, "object": "model", "created": created}
    if state.kind == "llama.cpp":
        entry |= {"owned_by": "llamacpp", "meta": {"n_ctx": state.slot_ctx, "n_vocab": 2**32}}
    elif state.kind == "vllm":
        entry |= {"owned_by": "vllm", "root": state.model, "parent": None}
        entry |= {"max_model_len": state.slot_ctx, "permission": []}
    else:
        entry |= {"owned_by": "library"}
    return _json({"object": "list", "data": [entry]})


# -- chat completions ---------------------------------------------------------


def _messages(kind: str, value: object) -> list[dict[str, str]]:
    """The messages as role/content strings; text parts are joined, as the servers do."""
    if value is None:
        raise error(kind, 400, "'messages' is required")
    if not isinstance(value, list):
        raise error(kind, 400, "Expected 'messages' to be an array")
    messages = []
    for item in value:
        if not isinstance(item, dict) or item.get("role") not in ("system", "user", "assistant"):
            raise error(kind, 400, "each message needs a role of system, user or assistant")
        content = item.get("content")
        if isinstance(content, list):
            texts = [part.get("text") for part in content if isinstance(part, dict)]
            if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
                raise error(kind, 400, "only text content parts are supported")
            content = "".join(str(text) for text in texts)
        if not isinstance(content, str):
            raise error(kind, 400, "Invalid 'content' type")
        messages.append({"role": item["role"], "content": content})
    return messages


def _optional_int(kind: str, body: Mapping[str, object], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise error(kind, 400, f"'{name}' must be an integer")
    return value


def _reply_pieces(state: OpenAIReferenceState, text: str) -> list[str]:
    tokens = tokenize(text)
    step = max(state.tokens_per_piece, 1)
    return ["".join(tokens[i : i + step]) for i in range(0, len(tokens), step)]


def _reply(
    state: OpenAIReferenceState,
    messages: list[dict[str, str]],
    limit: int | None,
    start: str = "",
) -> tuple[str, str]:
    """The reply text and its finish_reason; after ``start``, what follows it."""
    if state.empty_replies > 0:
        state.empty_replies -= 1
        return "", "stop"
    if state.blank_replies > 0:
        state.blank_replies -= 1
        return " \n\t ", "stop"
    if state.reply_text is not None:
        return state.reply_text, "stop"
    whole = reply_for(messages)
    # The deterministic reply goes on where ``start`` ends (the whole of it
    # if ``start`` is not its beginning).
    tokens = tokenize(whole[len(start):] if whole.startswith(start) else whole)
    if limit is not None and len(tokens) > limit:
        return "".join(tokens[: max(limit, 0)]), "length"
    return "".join(tokens), "stop"


async def _hang_forever() -> None:
    # Only cancellation (the client giving up, or shutdown) ends the wait.
    await asyncio.Event().wait()


def _context_check(state: OpenAIReferenceState, prompt: list[int], max_tokens: int | None) -> None:
    wanted = max(max_tokens or 0, 0)
    if state.kind == "llama.cpp" and len(prompt) > state.slot_ctx:
        raise Rejected(
            400,
            {
                "error": {
                    "code": 400,
                    "message": f"request ({len(prompt)} tokens) exceeds the available context "
                    f"size ({state.slot_ctx} tokens), try increasing it",
                    "type": "exceed_context_size_error",
                    "n_prompt_tokens": len(prompt),
                    "n_ctx": state.slot_ctx,
                }
            },
        )
    if state.kind == "vllm" and len(prompt) + wanted > state.slot_ctx:
        raise error(
            state.kind,
            400,
            f"This model's maximum context length is {state.slot_ctx} tokens. However, you "
            f"requested {len(prompt) + wanted} tokens ({len(prompt)} in the messages, "
            f"{wanted} in the completion). Please reduce the length of the messages or completion.",
        )


def _check_model(state: OpenAIReferenceState, body: JSONObject) -> None:
    # llama.cpp serves one model and ignores the field (measured); the others look it up.
    requested = body.get("model")
    if state.kind == "llama.cpp" or requested == state.model:
        return
    if state.kind == "vllm":
        raise error(state.kind, 404, f"The model `{requested}` does not exist.")
    raise error(state.kind, 404, f'model "{requested}" not found, try pulling it first')


async def _handle_chat(request: web.Request) -> web.StreamResponse:
    state = request.app[OPENAI_REFERENCE_STATE]
    state.calls["chat"] += 1
    body = await _json_body(request, state.kind)
    state.requests.append(body)
    if state.hang:
        await _hang_forever()
    if state.fail_next:
        status = state.fail_next.pop(0)
        raise error(state.kind, status, f"Injected failure {status}")
    _check_model(state, body)
    messages = _messages(state.kind, body.get("messages"))
    max_tokens = _optional_int(state.kind, body, "max_tokens")
    if max_tokens is None:
        max_tokens = _optional_int(state.kind, body, "max_completion_tokens")
    stream = body.get("stream") is True
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    id_slot: int | None = None
    cache_prompt = True
    if state.kind == "llama.cpp":
        id_slot = _optional_int(state.kind, body, "id_slot")
        # An id outside the slots (-1 included) lets the server choose, as measured.
        if id_slot is not None and not 0 <= id_slot < len(state.slots):
            id_slot = None
        cache_prompt = body.get("cache_prompt") is not False

    # llama.cpp goes on with a last assistant message instead of answering it
    # (its prefill, on unless started with --no-prefill-assistant).
    start_of_reply = ""
    if state.kind == "llama.cpp" and messages and messages[-1]["role"] == "assistant":
        start_of_reply = messages.pop()["content"]
    prompt = [token_id(piece) for piece in prompt_pieces(messages)]
    prompt += [token_id(piece) for piece in tokenize(start_of_reply)]
    _context_check(state, prompt, max_tokens)
    if state.break_after_pieces is not None and not stream:
        # A whole answer cannot break halfway: the server "dies" before it.
        _drop_connection(request)
        return web.Response()

    slot = await state.pool.acquire(id_slot, prompt, state.slot_prompt_similarity)
    try:
        cache_n = common_prefix(slot.tokens, prompt) if cache_prompt else 0
        if cache_n == len(prompt):
            # The last prompt token is evaluated again to get the logits of
            # the first reply token, as llama.cpp does.
            cache_n -= 1
        limit = max_tokens if max_tokens is not None and max_tokens >= 0 else None
        if state.kind == "llama.cpp":
            # Generation stops where the slot ends.
            room = state.slot_ctx - len(prompt)
            limit = room if limit is None else min(limit, room)
        text, finish_reason = _reply(state, messages, limit, start_of_reply)
        turn = Turn(
            kind=state.kind,
            model=state.model,
            id="chatcmpl-" + secrets.token_hex(12),
            created=int(time.time()),
            prompt=prompt,
            cache_n=cache_n,
            pieces=_reply_pieces(state, text),
            finish_reason=finish_reason,
            include_usage=include_usage,
            prompt_token_delay=state.prompt_token_delay,
            piece_delay=state.piece_delay,
            echo=start_of_reply,
        )
        state.tokens["cached"] += turn.cache_n
        state.tokens["computed"] += turn.prompt_n
        # The prompt is in the slot from here on, whatever happens to the reply.
        slot.tokens = list(prompt)
        if turn.prompt_n and state.prompt_token_delay > 0:
            await asyncio.sleep(turn.prompt_n * state.prompt_token_delay)
        if stream:
            return await _stream(request, state, turn, slot)
        for _ in turn.pieces:
            await _piece_pause(state)
        _cache_reply(slot, turn.pieces, len(turn.pieces), turn.finish_reason)
        state.tokens["predicted"] += turn.predicted_n
        return _json(completion_body(turn))
    finally:
        await state.pool.release(slot)


async def _piece_pause(state: OpenAIReferenceState) -> None:
    if state.piece_delay > 0:
        await asyncio.sleep(state.piece_delay)


def _cache_reply(slot: Slot, pieces: list[str], sent: int, finish_reason: str) -> None:
    """Put the reply's tokens after the prompt in the slot's cache."""
    generated = [token_id(p) for piece in pieces[:sent] for p in tokenize(piece)]
    if finish_reason == "length" and generated:
        # The last sampled token was never fed back to the model, so it is
        # not in the cache (llama.cpp: n_saved = prompt + reply - 1). A reply
        # that ends at "stop" ends with an end-of-turn token instead.
        generated.pop()
    slot.tokens.extend(generated)


def _drop_connection(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.close()


async def _stream(
    request: web.Request, state: OpenAIReferenceState, turn: Turn, slot: Slot
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={hdrs.CONTENT_TYPE: "text/event-stream", hdrs.CACHE_CONTROL: "no-cache"}
    )
    await response.prepare(request)
    for chunk in head_chunks(turn):
        await response.write(sse(chunk))
    if turn.echo:
        await response.write(sse(piece_chunk(turn, turn.echo)))
    sent = 0
    try:
        for piece in turn.pieces:
            if sent:
                await _piece_pause(state)
            if state.break_after_pieces is not None and sent >= state.break_after_pieces:
                # The server "dies" mid-reply: no final chunk, no [DONE].
                _drop_connection(request)
                return response
            await response.write(sse(piece_chunk(turn, piece)))
            sent += 1
            state.tokens["predicted"] += len(tokenize(piece))
    finally:
        _cache_reply(slot, turn.pieces, sent, turn.finish_reason)
    for chunk in tail_chunks(turn):
        await response.write(sse(chunk))
    await response.write(sse("[DONE]"))
    await response.write_eof()
    return response


def create_openai_reference_app(state: OpenAIReferenceState | None = None) -> web.Application:
    """Build the reference OpenAI-compatible server around ``state`` (a fresh one by default).

    The routes of every persona are registered, so a test can switch
    ``state.kind`` on a running server; handlers answer 404 where that
    persona has no such endpoint.
    """
    app = web.Application(middlewares=[_persona_middleware], client_max_size=_CLIENT_MAX_SIZE)
    app[OPENAI_REFERENCE_STATE] = state if state is not None else OpenAIReferenceState()
    app.router.add_get("/", _handle_ollama_root)
    app.router.add_get("/health", _handle_health)
    app.router.add_get("/v1/health", _handle_health)
    app.router.add_get("/props", _handle_props)
    app.router.add_get("/slots", _handle_slots)
    app.router.add_post("/slots/{id_slot}", _handle_slot_action)
    app.router.add_post("/tokenize", _handle_tokenize)
    app.router.add_post("/apply-template", _handle_apply_template)
    app.router.add_get("/v1/models", _handle_models)
    app.router.add_post("/v1/chat/completions", _handle_chat)
    return app


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sessionbridge.reference.openai_server",
        description="Reference OpenAI-compatible AI server for development and tests "
        "(a test double, not a model). Its OpenAI base URL is http://HOST:PORT/v1.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--kind", choices=KINDS, default="llama.cpp")
    parser.add_argument("--model", default=OpenAIReferenceState.model)
    parser.add_argument("--slots", type=int, default=4, help="number of slots")
    parser.add_argument("--slot-ctx", type=int, default=2048, help="tokens per slot")
    parser.add_argument("--slot-save-path", default=None, help="directory for slot files")
    parser.add_argument("--prompt-token-delay", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("--piece-delay", type=float, default=0.0, metavar="SECONDS")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Command line entry point: parse the options and serve until interrupted.

    The API key, if any, comes from ``SESSIONBRIDGE_REFERENCE_API_KEY``, never
    from the command line (where other users of the machine could read it).
    """
    args = _parse_args(argv)
    state = OpenAIReferenceState(
        kind=args.kind,
        model=args.model,
        api_key=os.environ.get("SESSIONBRIDGE_REFERENCE_API_KEY") or None,
        total_slots=args.slots,
        slot_ctx=args.slot_ctx,
        slot_save_path=args.slot_save_path,
        prompt_token_delay=args.prompt_token_delay,
        piece_delay=args.piece_delay,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    log.info(
        "reference openai server listening base_url=http://%s:%d/v1 kind=%s model=%s slots=%d "
        "slot_ctx=%d slot_save=%s kind_of_server=test-double-not-a-model",
        args.host,
        args.port,
        state.kind,
        state.model,
        state.total_slots,
        state.slot_ctx,
        state.slot_save_path is not None,
    )
    web.run_app(create_openai_reference_app(state), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
