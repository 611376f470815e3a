"""The rules of a conversation, whatever the AI server and whatever the face (docs/internals.md).

    service.py       Conversations: a turn from its arrival to its answer
    locks.py         one FIFO lock per session: one turn at a time, in arrival order
    idempotency.py   the Idempotency-Keys being answered here
    following.py     following a turn: live, relayed from another bridge, or stored
    reply_gate.py    nothing blank reaches a client; replies bounded
    session_rows.py  the rows of recently active sessions
    turn_context.py  what an AI-server adapter may know and do in a turn
    results.py       a turn's outcome, events and message
    rules.py         the limits and counters the rules are given

These modules import only the store and AI-server interfaces, the records,
the turn events and the error family: never an HTTP library, a database
driver or the migration tool (``tests/unit/test_imports.py`` holds them to it).
"""

from __future__ import annotations

from .idempotency import request_fingerprint
from .results import Turn, TurnResult
from .service import Conversations

__all__ = ["Conversations", "Turn", "TurnResult", "request_fingerprint"]
