"""The history window of an OpenAI-compatible turn: what is sent, and when the oldest turns go.

``messages`` is the scenario as the system message, every answered turn of the
window exactly as stored, then the new message; nothing is ever re-rendered,
so each turn's prompt begins with the previous turn's, byte for byte, and the
server's prompt cache serves it. When the prompt would not fit, the oldest
turns are dropped in one step down to half the budget (a quarter if the
server still refuses), and the window's new start is kept as the adapter's
state, so the next many turns share their beginning again.
"""

from __future__ import annotations

import math

from ...records import AISessionKind, HistoryTurn

# Tokens a chat template adds around each message (role markers, turn ends).
TEMPLATE_TOKENS_PER_MESSAGE = 8
# Bytes per token assumed before the server has reported any usage.
DEFAULT_BYTES_PER_TOKEN = 3.0


def window_start(state: str | None) -> int:
    """The first question seq of the history window kept in the adapter's state."""
    if state and state.startswith("from="):
        try:
            return int(state[5:])
        except ValueError:
            return 0
    return 0


def window_state(start: int) -> str:
    """The adapter's state for a window starting at question seq ``start``."""
    return f"from={start}"


def build_messages(scenario: str, history: list[HistoryTurn], content: str) -> list[dict[str, str]]:
    # A response without instructions has no system message; a turn whose
    # question was deleted (a conversation's item) is its answer alone.
    messages = [{"role": "system", "content": scenario}] if scenario else []
    for turn in history:
        if turn.user:
            messages.append({"role": "user", "content": turn.user})
        messages.append({"role": "assistant", "content": turn.assistant})
    messages.append({"role": "user", "content": content})
    return messages


def bytes_per_token(history: list[HistoryTurn], scenario: str) -> float:
    """Learned from the last reported usage of this window: its text over its tokens."""
    last = history[-1] if history else None
    if last is None or last.usage is None or not last.usage.prompt_tokens:
        return DEFAULT_BYTES_PER_TOKEN
    size = len(scenario.encode()) + sum(
        len(t.user.encode()) + len(t.assistant.encode()) for t in history
    )
    tokens = last.usage.prompt_tokens + last.usage.completion_tokens
    return min(max(size / tokens, 1.0), 8.0)


def estimate(turns: list[HistoryTurn], ratio: float) -> int:
    """Tokens of ``turns`` estimated from their bytes at ``ratio`` bytes per token."""
    return sum(
        math.ceil((len(t.user.encode()) + len(t.assistant.encode())) / ratio)
        + 2 * TEMPLATE_TOKENS_PER_MESSAGE
        for t in turns
    )


def trim(
    history: list[HistoryTurn], fixed: int, max_tokens: int, ratio: float, target: int
) -> list[HistoryTurn]:
    """The newest turns that fit ``target`` with the scenario, the message and the reply."""
    kept: list[HistoryTurn] = []
    used = fixed + max_tokens
    for turn in reversed(history):
        used += estimate([turn], ratio)
        if used > target:
            break
        kept.append(turn)
    kept.reverse()
    return kept


def ai_session_kind(
    first: bool, trimmed: bool, restored: bool, last: HistoryTurn | None,
    cached_tokens: int | None,
) -> AISessionKind:
    """How this turn found its conversation on the server (``ai_session``)."""
    if first:
        return "created"
    if restored:
        return "recovered"
    if trimmed or cached_tokens is None or last is None or last.usage is None:
        # After a trim the part shared with the last prompt is the scenario;
        # a server that reports nothing about its cache is taken at its word.
        return "reused"
    # The previous prompt is this prompt's beginning: the cache served it,
    # or the server had lost it (eviction, restart) and computed it again.
    shared = last.usage.prompt_tokens
    return "reused" if cached_tokens * 2 >= shared else "recovered"
