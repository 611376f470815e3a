"""Records passed between the storage layer, the conversation logic and the API."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any, Literal

Role = Literal["user", "assistant"]
MessageStatus = Literal["pending", "answered", "failed"]
AISessionKind = Literal["created", "reused", "recovered"]
SessionKind = Literal["session", "conversation", "chain"]


@functools.lru_cache(maxsize=2)
def _utc_second(epoch_second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch_second))


def utc_now() -> str:
    """The current time as RFC 3339 in UTC, to the millisecond (every message is stamped)."""
    epoch_ms = time.time_ns() // 1_000_000
    second, ms = divmod(epoch_ms, 1000)
    return f"{_utc_second(second)}.{ms:03d}Z"


def is_storable(text: str) -> bool:
    """Whether ``text`` can be stored and sent as UTF-8: no lone surrogates.

    They come from a JSON ``\\ud800`` escape, or from header bytes that are not
    UTF-8 (aiohttp decodes headers with surrogateescape).
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: int
    name: str
    created_at: str
    revoked_at: str | None = None


@dataclass(frozen=True, slots=True)
class ChatSession:
    pk: int
    id: str
    api_key_id: int
    title: str | None
    scenario: str
    max_tokens: int
    ai_session_id: str | None
    message_count: int
    created_at: str
    updated_at: str
    # "session" (the sessions API), "conversation" or "chain" (the OpenAI face).
    kind: SessionKind = "session"
    # A conversation's metadata, as JSON text.
    metadata: str | None = None

    def public(self) -> dict[str, Any]:
        # ai_session_id is the AI server's credential: it never leaves the bridge.
        return {
            "id": self.id,
            "title": self.title,
            "scenario": self.scenario,
            "max_tokens": self.max_tokens,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "message_count": self.message_count,
        }


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one turn as the AI server reported them (OpenAI's meaning).

    ``prompt_tokens`` is the whole prompt, its cached part included.
    """

    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int

    def public(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "completion_tokens": self.completion_tokens,
        }


@dataclass(frozen=True, slots=True)
class Message:
    pk: int
    id: str
    seq: int
    role: Role
    content: str
    status: MessageStatus
    created_at: str
    # An answer: how its turn got its AI session, and the AI server's usage.
    ai_session: AISessionKind | None = None
    usage: Usage | None = None
    # A failed question: the error code its turn ended with.
    error_code: str | None = None
    # A streamed answer: where each piece ended, in characters ("5,12,20"), so
    # a stream resumed after the turn ended gets exactly the pieces it missed.
    piece_ends: str | None = None

    def public(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "seq": self.seq,
            "role": self.role,
            "content": self.content,
            "status": self.status,
            "created_at": self.created_at,
        }
        if self.ai_session is not None:
            body["ai_session"] = self.ai_session
        if self.usage is not None:
            body["usage"] = self.usage.public()
        if self.error_code is not None:
            body["error"] = self.error_code
        return body


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    fingerprint: str
    state: Literal["in_progress", "succeeded", "failed"]
    user_message_pk: int | None
    ai_session: str | None


@dataclass(frozen=True, slots=True)
class IdempotencyStart:
    """An Idempotency-Key being answered: who sent it, the key and the body's fingerprint."""

    api_key_id: int
    key: str
    fingerprint: str
    created_at: float  # unix time, for expiry


@dataclass(frozen=True, slots=True)
class TranscriptTurn:
    user: str
    assistant: str


@dataclass(frozen=True, slots=True)
class HistoryTurn:
    """One answered turn as stored: the question's seq, both texts, the answer's usage."""

    seq: int
    user: str
    assistant: str
    usage: Usage | None = None


@dataclass(frozen=True, slots=True)
class ContextMessage:
    """A message stored as context only (an item a client gave), not as a question asked."""

    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class ResponseRow:
    """A response of the OpenAI face as stored; what it asked is its ``body`` (JSON text).

    Its outcome is its question's and answer's: the question (once stored)
    says whether it runs, was answered or failed (and why); the answer holds
    the text, its pieces and its usage.
    """

    pk: int
    id: str
    api_key_id: int
    session_pk: int | None
    created_at: int
    model: str
    output_message_id: str
    body: str
    continued: bool = False
    incomplete: bool = False
    question: Message | None = None
    answer: Message | None = None
