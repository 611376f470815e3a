"""What the conversation rules are told by the rest of the bridge: their limits and their counters.

Both are interfaces, so the rules import no settings loader and no metrics
library: the bridge's ``Settings`` and ``Metrics`` fit them as they are.
"""

from __future__ import annotations

from typing import Protocol

from ..records import AISessionKind, Usage


class TokenBounds(Protocol):
    def clamp(self, value: int) -> int:
        """``value`` moved into the range the AI server accepts."""
        ...


class Limits(Protocol):
    """The settings a conversation's rules follow (docs/configuration.md)."""

    @property
    def session_queue(self) -> int:
        """Messages that may wait on one session (over it: session_busy)."""
        ...

    @property
    def max_inflight(self) -> int:
        """AI-server calls in flight at once (over it: overloaded)."""
        ...

    @property
    def empty_reply_retries(self) -> int:
        """Extra attempts after an empty or blank reply."""
        ...

    @property
    def max_reply_bytes(self) -> int:
        """The largest reply stored, in bytes of UTF-8."""
        ...

    @property
    def upstream_max_tokens(self) -> TokenBounds:
        """The max_tokens range the AI server accepts."""
        ...


class TurnMetrics(Protocol):
    """What a turn counts."""

    def count_turn(self, outcome: str) -> None: ...
    def count_ai_session(self, kind: AISessionKind) -> None: ...
    def count_prompt_tokens(self, usage: Usage) -> None: ...
    def count_empty_reply(self) -> None: ...
