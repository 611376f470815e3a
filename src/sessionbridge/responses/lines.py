"""Where a response lives: the line of turns (a session) its context is, and what it adds to it.

A response continues a conversation (its session), or the response before it
(``previous_response_id``), or starts a chain of its own. The first response
to continue another goes on in that response's line; a second one branches:
its line is a copy of the first line up to that response, so both share the
same stored history, byte for byte (an OpenAI-compatible server's prompt cache
serves both), and a seed-protocol server gives the branch an AI session of
its own, made from that history.

What a response's input adds: system and developer items join its
instructions; user and assistant items before its last user item are stored
as context ahead of the question; the last user item is the question. User
items a client added to a conversation since its last answer (and user items
of the input just before the question) are given to the AI server in front of
the question, joined by a blank line, as the stored history will give them
from then on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .. import jsoncodec
from ..errors import FieldError, InvalidField, NotFound, Unsupported
from ..records import ApiKey, ChatSession, ContextMessage, ResponseRow
from ..store.base import Store
from ..store.history import USER_JOIN
from .records import ResponseRequest

# How far back a conversation's tail is read for the items added since its last answer.
TAIL_MESSAGES = 64


@dataclass(frozen=True, slots=True)
class Line:
    """The session a response runs in, and what to undo if it never starts."""

    session: ChatSession
    conversation_id: str | None = None
    # The response continued in its own line (its claim is given back if this one fails).
    claimed: ResponseRow | None = None
    # A line made for this response alone (store: false): deleted once it is shown.
    temporary: bool = False
    created: bool = False
    # The first response of the chain this one continues (None: it starts one,
    # or it is in a conversation).
    root: str | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    """What a response's turn asks: the question and what goes before it."""

    question: str
    context: tuple[ContextMessage, ...]
    prompt_prefix: str
    scenario: str | None
    fresh_ai_session: bool


def instructions_of(request: ResponseRequest) -> str | None:
    """The response's instructions with its system and developer items after them."""
    parts = [request.instructions] if request.instructions else []
    parts += [m.text for m in request.input if m.role in ("system", "developer")]
    return USER_JOIN.join(parts) if parts else None


# A session as turns see it (Conversations.session): a cached row, its counters maybe behind.
SessionOf = Callable[[ApiKey, str], Awaitable[ChatSession]]


async def choose_line(
    store: Store, session_of: SessionOf, key: ApiKey, request: ResponseRequest, max_tokens: int
) -> Line:
    instructions = instructions_of(request)
    if request.conversation_id is not None:
        if not request.store:
            raise Unsupported(
                "a response that is not stored cannot be added to a conversation", param="store"
            )
        # No read when its turns keep it cached: nothing here needs its counters.
        try:
            session = await session_of(key, request.conversation_id)
        except NotFound:
            raise NotFound(f"no conversation {request.conversation_id}") from None
        return Line(session, conversation_id=session.id)
    if request.previous_response_id is not None:
        return await _continue(store, key, request, instructions or "", max_tokens)
    session = await store.create_session(key.id, None, instructions or "", max_tokens, kind="chain")
    return Line(session, temporary=not request.store, created=True)


async def _continue(
    store: Store, key: ApiKey, request: ResponseRequest, scenario: str, max_tokens: int
) -> Line:
    assert request.previous_response_id is not None
    previous = await store.get_response(key.id, request.previous_response_id)
    if previous is None:
        raise NotFound(f"no response {request.previous_response_id}")
    if previous.answer is None:
        raise InvalidField([FieldError(
            "previous_response_id", "names a response that has not completed"
        )])
    body = jsoncodec.loads_text(previous.body)
    source = await store.get_session(key.id, body["session_id"])
    if source is None:
        raise NotFound(f"the context of {previous.id} is no longer stored")
    root = body.get("chain_root") or previous.id
    own_line = request.store and source.kind == "chain" and body.get("conversation_id") is None
    if own_line and await store.claim_continuation(previous.pk):
        return Line(source, claimed=previous, root=root)
    # A branch (or a response kept nowhere): a line of its own, the history copied.
    fork = await store.fork_session(source, previous.answer.seq, scenario, max_tokens)
    return Line(fork, temporary=not request.store, created=True, root=root)


async def plan_turn(store: Store, request: ResponseRequest, line: Line) -> Plan:
    """The question, its context and what the AI server gets before it."""
    said = [m for m in request.input if m.role in ("user", "assistant")]
    loose: list[ContextMessage] = []
    fresh = False
    if line.conversation_id is not None:
        loose, fresh = await _since_last_answer(store, line.session)
    if not said or said[-1].role != "user":
        # The question is the input's last user item (a conversation's own
        # items are its context, not a question to answer).
        raise Unsupported("the input must end with a user message", param="input")
    question = said[-1]
    context = tuple(ContextMessage(m.role, m.text) for m in said[:-1])  # type: ignore[arg-type]
    if any(m.role == "assistant" for m in context):
        fresh = True
    before = [*loose, *context]
    pending: list[str] = []
    for message in before:
        if message.role == "assistant":
            pending.clear()
        else:
            pending.append(message.content)
    prefix = USER_JOIN.join(pending) + USER_JOIN if pending else ""
    scenario = instructions_of(request)
    if line.conversation_id is None:
        scenario = scenario or ""
    return Plan(question.text, context, prefix, scenario, fresh)


async def _since_last_answer(
    store: Store, session: ChatSession
) -> tuple[list[ContextMessage], bool]:
    """Items added to a conversation since its last answer, and whether any is an answer.

    An answer a client added as an item was never given to the AI server:
    its AI session lacks it, so a new one is made from the history.
    """
    # After the last answer a turn gave, the AI server has seen nothing.
    tail = await store.added_since_answer(session.pk, TAIL_MESSAGES)
    added = [ContextMessage(m.role, m.content) for m in tail]
    fresh = any(m.role == "assistant" for m in added)
    return added, fresh


