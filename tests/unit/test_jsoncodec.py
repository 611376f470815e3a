"""The JSON codec: the fast path accepts and refuses exactly what the standard library did."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sessionbridge import jsoncodec
from sessionbridge.web.jsonhttp import json_response

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@given(json_values)
def test_well_formed_documents_parse_as_the_standard_library_parses_them(value: object) -> None:
    raw = json.dumps(value).encode()
    assert jsoncodec.loads(raw) == json.loads(raw)


@given(json_values)
def test_what_it_writes_reads_back_the_same(value: object) -> None:
    assert json.loads(jsoncodec.dumps(value)) == value


@pytest.mark.parametrize(
    ("raw", "check"),
    [
        # The corners orjson refuses and the standard library accepts: they
        # still parse, so the field validation reports them as before.
        (b'{"max_tokens": NaN}', lambda body: math.isnan(body["max_tokens"])),
        (b'{"max_tokens": 1' + b"0" * 400 + b"}", lambda body: body["max_tokens"] == math.inf),
        (b'{"content": "\\ud800"}', lambda body: body["content"] == "\ud800"),
    ],
)
def test_the_standard_library_decides_what_orjson_refuses(raw: bytes, check: object) -> None:
    assert callable(check) and check(jsoncodec.loads(raw))


@pytest.mark.parametrize("raw", [b"", b"{", b'{"a": 1} x', b"\xff\xfe", b"{'a': 1}"])
def test_what_neither_accepts_is_a_value_error(raw: bytes) -> None:
    with pytest.raises(ValueError):
        jsoncodec.loads(raw)


def test_json_response_declares_utf8_json() -> None:
    response = json_response({"ok": "é"}, status=201, headers={"Location": "/x"})
    assert response.status == 201
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    assert response.headers["Location"] == "/x"
    assert response.body == '{"ok":"é"}'.encode()


def test_stored_text_is_read_back_as_written() -> None:
    body = {"instructions": "Réponds en français ✓", "temperature": 0.7, "input": [], "n": None}
    text = jsoncodec.dumps_text(body)

    assert "✓" in text  # non-ASCII kept as itself, as the column always held it
    assert jsoncodec.loads_text(text) == body
    # A body stored by an earlier version (the standard library's spacing) reads the same.
    assert jsoncodec.loads_text(json.dumps(body, ensure_ascii=False)) == body
