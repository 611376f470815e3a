"""Records as a test needs them: one call, the fields that matter named, the rest plausible."""

from __future__ import annotations

import dataclasses
from typing import Any

from sessionbridge.responses.records import (
    ConversationRecord,
    Item,
    ResponseError,
    ResponseRecord,
    ResponseUsage,
)

CREATED_AT = 1_760_000_000


def response(**fields: Any) -> ResponseRecord:
    """A response as created (in progress), with ``fields`` changed."""
    base = ResponseRecord(
        id="resp_0001",
        api_key_id=1,
        status="in_progress",
        created_at=CREATED_AT,
        model="gemma-3-270m",
        output_message_id="msg_out_0001",
        input_items=(Item(id="msg_in_0001", role="user", texts=("Hello",)),),
        instructions="Be brief.",
        metadata={"topic": "greeting"},
    )
    return dataclasses.replace(base, **fields)


def ended(start: ResponseRecord, status: str, text: str = "", **fields: Any) -> ResponseRecord:
    """``start`` at its end: ``status`` with ``text``, and what an end of that kind carries."""
    end: dict[str, Any] = {"status": status, "output_text": text}
    if status in ("completed", "incomplete"):
        end["usage"] = ResponseUsage(input_tokens=12, cached_tokens=4, output_tokens=3)
    if status == "completed":
        end["completed_at"] = start.created_at + 2
    if status == "incomplete":
        end["incomplete_reason"] = "max_output_tokens"
    if status == "failed":
        end["error"] = ResponseError(
            code="upstream_timeout", message="the AI server did not answer"
        )
    end.update(fields)
    return dataclasses.replace(start, **end)


def conversation(**fields: Any) -> ConversationRecord:
    base = ConversationRecord(
        id="conv_0001", api_key_id=1, created_at=CREATED_AT, metadata={"project": "demo"}
    )
    return dataclasses.replace(base, **fields)
