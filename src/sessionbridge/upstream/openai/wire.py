"""An OpenAI-compatible server's answers on the wire: a JSON body, a stream of chunks, a refusal.

Token counts come from what the server reports: OpenAI's ``usage`` or
llama.cpp's ``timings``. Every read is bounded (``http.read_limited`` and
``http.read_lines``), and the server's own error text goes to the log only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import aiohttp

from ... import jsoncodec
from ...errors import UpstreamError
from ..base import DeltaSink
from ..http import SMALL_BODY, ServerBusy, ServerFailed, read_limited, read_lines, retry_after

log = logging.getLogger(__name__)

# A streamed line is one JSON chunk of a few tokens.
STREAM_LINE_LIMIT = 256 * 1024
# Chunk framing costs a few hundred bytes per piece: the whole stream may be
# this many times the reply limit.
STREAM_OVERHEAD = 16


@dataclass(frozen=True, slots=True)
class Answer:
    text: str
    prompt_tokens: int | None
    cached_tokens: int | None  # None: the server does not say
    completion_tokens: int | None
    # The server stopped at max_tokens (finish_reason "length").
    truncated: bool = False


class ContextExceeded(UpstreamError):
    """The server says the prompt does not fit its context."""


def number(value: object) -> int | None:
    """``value`` if it is a count (a non-negative int, not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


class UsageReader:
    """Token counts gathered from an answer: OpenAI's ``usage`` or llama.cpp's ``timings``."""

    def __init__(self) -> None:
        self.prompt: int | None = None
        self.cached: int | None = None
        self.completion: int | None = None
        self.truncated = False

    def read(self, document: dict[str, Any]) -> None:
        usage = document.get("usage")
        if isinstance(usage, dict):
            self.prompt = number(usage.get("prompt_tokens")) or self.prompt
            self.completion = number(usage.get("completion_tokens")) or self.completion
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict) and number(details.get("cached_tokens")) is not None:
                self.cached = details["cached_tokens"]
        timings = document.get("timings")
        if isinstance(timings, dict):
            cache_n, prompt_n = number(timings.get("cache_n")), number(timings.get("prompt_n"))
            if cache_n is not None:
                self.cached = cache_n
            if self.prompt is None and cache_n is not None and prompt_n is not None:
                self.prompt = cache_n + prompt_n
            predicted = number(timings.get("predicted_n"))
            if self.completion is None and predicted is not None:
                self.completion = predicted

    def finish(self, choice: dict[str, Any]) -> None:
        if choice.get("finish_reason") == "length":
            self.truncated = True

    def answer(self, text: str) -> Answer:
        return Answer(text, self.prompt, self.cached, self.completion, self.truncated)


def parse_body(raw: bytes) -> Answer:
    """A whole (not streamed) chat completion."""
    try:
        body = jsoncodec.loads(raw)
        text = body["choices"][0]["message"]["content"]
    except (ValueError, RecursionError, KeyError, IndexError, TypeError):
        raise UpstreamError("the AI server's answer has no message content") from None
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise UpstreamError("the AI server's message content is not text")
    usage = UsageReader()
    usage.read(body)
    usage.finish(body["choices"][0])
    return usage.answer(text)


async def refuse(response: aiohttp.ClientResponse, endpoint: str) -> None:
    """Raise the bridge's error for a non-200 answer."""
    raw = await read_limited(response, SMALL_BODY, endpoint)
    # The server's own words go to the log, not to the client.
    text = raw[:500].decode("utf-8", "replace")
    log.warning("event=upstream_refused status=%d body=%r", response.status, text)
    if response.status in (429, 503):
        raise ServerBusy(
            f"the AI server is busy or loading ({response.status})",
            retry_after=retry_after(response),
        )
    lowered = text.lower()
    if response.status == 400 and ("context" in lowered and (
        "exceed" in lowered or "maximum" in lowered or "too long" in lowered
    )):
        raise ContextExceeded("the prompt does not fit the AI server's context")
    if response.status >= 500:
        raise ServerFailed(f"{endpoint} answered {response.status}")
    raise UpstreamError(f"{endpoint} answered {response.status}")


async def read_stream(
    response: aiohttp.ClientResponse, endpoint: str, on_delta: DeltaSink | None,
    max_reply_bytes: int,
) -> Answer:
    """A streamed chat completion, each piece passed to ``on_delta`` as it arrives."""
    pieces: list[str] = []
    usage = UsageReader()
    finished = False
    async for line in read_lines(
        response, STREAM_LINE_LIMIT, max_reply_bytes * STREAM_OVERHEAD, endpoint
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
            usage.finish(choice)
            finished = True
    if not finished:
        raise ServerFailed("the AI server's stream ended before the reply did")
    return usage.answer("".join(pieces))
