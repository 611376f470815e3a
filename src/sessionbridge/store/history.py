"""A session's stored messages as the turns an AI server is given, for every store alike.

A turn is a run of user messages followed by the assistant message that
answered it. Most runs hold one message (a question); the OpenAI face may
store several user items before an answer, and they are given as one user
message, joined by a blank line, every time, so the prompt stays the same
bytes from turn to turn. Only answered messages count: a failed or pending
question, and the context a failed response brought, are left out. User
messages after the last answer (items a client added) belong to no turn yet;
the OpenAI face gives them in front of the next question (responses/lines.py).
"""

from __future__ import annotations

from collections.abc import Iterable

from ..records import HistoryTurn, Usage

# How user messages of one run are joined into the text the AI server sees.
USER_JOIN = "\n\n"

# seq, role, content, and the answer's usage (None for a question).
StoredMessage = tuple[int, str, str, Usage | None]


def group_turns(messages: Iterable[StoredMessage]) -> list[HistoryTurn]:
    """The answered turns among ``messages`` (answered ones only, in seq order)."""
    turns: list[HistoryTurn] = []
    run: list[str] = []
    first_seq: int | None = None
    for seq, role, content, usage in messages:
        if role == "user":
            if first_seq is None:
                first_seq = seq
            run.append(content)
            continue
        turns.append(HistoryTurn(
            seq if first_seq is None else first_seq, USER_JOIN.join(run), content, usage
        ))
        run, first_seq = [], None
    return turns
