"""JSON in and out of the bridge: orjson on the hot path, the standard library as the judge.

Every turn parses two documents (the client's body, the AI server's answer)
and writes two (the request to the AI server, the answer to the client).
orjson does each in a fraction of the standard library's time, which on a
small box is CPU a turn no longer spends.

orjson is stricter than the standard library in a few corners (NaN and
Infinity literals, lone ``\\ud800`` escapes, numbers too large for a double).
What orjson refuses is handed to the standard library, so the language the
bridge accepts, and the errors it reports for those corners, stay as they
were. One difference remains and is harmless: an integer beyond 64 bits comes
back as a float rather than an int, and no field accepts either.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def _bounded_int(digits: str) -> int | float:
    # An integer longer than any field accepts becomes an out-of-range float
    # rather than a parse failure, so it is reported against its field.
    return int(digits) if len(digits) <= 30 else float("inf")


def loads(raw: bytes) -> Any:
    """Parse UTF-8 JSON; ValueError (or RecursionError) when it is not JSON."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw.decode("utf-8"), parse_int=_bounded_int)


def dumps(value: Any) -> bytes:
    return orjson.dumps(value)


def dumps_sorted(value: Any) -> bytes:
    """``value`` with its keys sorted: the same document always gives the same bytes."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def dumps_text(value: Any) -> str:
    """``value`` as JSON text (for a column of text): non-ASCII as itself, as written."""
    return orjson.dumps(value).decode("utf-8")


def loads_text(text: str) -> Any:
    """Parse JSON text the bridge wrote itself (a stored body)."""
    return orjson.loads(text)
