"""Records of the Responses and Conversations API: what is stored, and what a request asks.

These are handed between the web face, the service and the stores, so they
import nothing but the standard library and carry no behaviour beyond small
derived values. Times are unix seconds (OpenAI's ``created_at``), not the RFC
3339 strings of the sessions API: these objects are shown in OpenAI's shapes.

Text is kept as text: a message item holds the texts of its content parts,
and which part type they are shown as (``input_text`` or ``output_text``)
follows from the role when the item is shown, so nothing is stored twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

RESPONSE_ID_PREFIX = "resp_"
MESSAGE_ID_PREFIX = "msg_"
CONVERSATION_ID_PREFIX = "conv_"

ResponseStatus = Literal["queued", "in_progress", "completed", "failed", "cancelled", "incomplete"]
# A response in one of these has ended: nothing about it changes any more.
ENDED_STATUSES: frozenset[ResponseStatus] = frozenset(
    {"completed", "failed", "cancelled", "incomplete"}
)

Role = Literal["user", "assistant", "system", "developer"]
ItemStatus = Literal["in_progress", "completed", "incomplete"]
Truncation = Literal["disabled", "auto"]
IncompleteReason = Literal["max_output_tokens"]
Order = Literal["asc", "desc"]

MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512


def _no_metadata() -> Mapping[str, str]:
    return {}


@dataclass(frozen=True, slots=True)
class InputMessage:
    """A message as a client sent it, before it is stored and given an id."""

    role: Role
    texts: tuple[str, ...]

    @property
    def text(self) -> str:
        """The parts' texts joined: what the AI server is given as this message."""
        return "".join(self.texts)


@dataclass(frozen=True, slots=True)
class Item:
    """A stored message item of a response's input or of a conversation (id ``msg_…``)."""

    id: str
    role: Role
    texts: tuple[str, ...]
    status: ItemStatus = "completed"

    @property
    def text(self) -> str:
        return "".join(self.texts)


@dataclass(frozen=True, slots=True)
class ResponseUsage:
    """Token counts of one response (OpenAI's meaning: ``input_tokens`` includes the cached)."""

    input_tokens: int
    cached_tokens: int
    output_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class ResponseError:
    """Why a response failed: the bridge's error code and the message a client may read."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class ResponseRecord:
    """One response as stored, from ``queued`` to its end.

    ``output_message_id`` is given when the response is created, not when it
    ends: a stream names the message before the first delta, and a stream
    rebuilt from the database later must name it alike.

    ``output_text`` is the reply so far; a response that failed or was
    cancelled keeps what it had streamed, so its events read back as they
    went out.
    """

    id: str
    api_key_id: int
    status: ResponseStatus
    created_at: int
    model: str
    output_message_id: str
    input_items: tuple[Item, ...] = ()
    instructions: str | None = None
    previous_response_id: str | None = None
    conversation_id: str | None = None
    output_text: str = ""
    usage: ResponseUsage | None = None
    metadata: Mapping[str, str] = field(default_factory=_no_metadata)
    error: ResponseError | None = None
    incomplete_reason: IncompleteReason | None = None
    background: bool = False
    store: bool = True
    max_output_tokens: int | None = None
    truncation: Truncation = "disabled"
    temperature: float | None = None
    top_p: float | None = None
    prompt_cache_key: str | None = None
    completed_at: int | None = None

    @property
    def ended(self) -> bool:
        return self.status in ENDED_STATUSES


@dataclass(frozen=True, slots=True)
class ConversationRecord:
    """A conversation (id ``conv_…``, or a session's id: every conversation is a session)."""

    id: str
    api_key_id: int
    created_at: int
    metadata: Mapping[str, str] = field(default_factory=_no_metadata)


# -- what a request asks -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResponseRequest:
    """A validated ``POST /v1/responses`` body.

    ``input`` is empty only when the request names a conversation and leaves
    the question to the conversation's own items.
    """

    input: tuple[InputMessage, ...]
    model: str | None = None
    instructions: str | None = None
    previous_response_id: str | None = None
    conversation_id: str | None = None
    store: bool = True
    stream: bool = False
    background: bool = False
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    truncation: Truncation = "disabled"
    metadata: Mapping[str, str] = field(default_factory=_no_metadata)
    prompt_cache_key: str | None = None


@dataclass(frozen=True, slots=True)
class ConversationCreate:
    """A validated ``POST /v1/conversations`` body."""

    items: tuple[InputMessage, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=_no_metadata)


@dataclass(frozen=True, slots=True)
class ConversationUpdate:
    """A validated ``POST /v1/conversations/{id}`` body: the new metadata, whole."""

    metadata: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class ItemsCreate:
    """A validated ``POST /v1/conversations/{id}/items`` body."""

    items: tuple[InputMessage, ...]


@dataclass(frozen=True, slots=True)
class PageRequest:
    """The query of a list of items: ids after ``after`` in ``order``, ``limit`` of them."""

    limit: int = 20
    order: Order = "desc"
    after: str | None = None


@dataclass(frozen=True, slots=True)
class RetrieveRequest:
    """The query of ``GET /v1/responses/{id}``: the object, or its events after a number."""

    stream: bool = False
    starting_after: int | None = None


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a list: its items and whether more follow."""

    items: tuple[Item, ...]
    has_more: bool
