"""Going on with a reply begun elsewhere (upstream/openai/prefill.py): what follows the start."""

from __future__ import annotations

import pytest

from sessionbridge.upstream.openai.prefill import AfterStart, after_start, with_start


async def passed(start: str, pieces: list[str]) -> list[str]:
    out: list[str] = []

    async def sink(piece: str) -> None:
        out.append(piece)

    after = AfterStart(start, sink)
    for piece in pieces:
        await after(piece)
    return out


@pytest.mark.parametrize(
    ("pieces", "expected"),
    [
        (["The old town", " of Lisbon", " is"], [" of Lisbon", " is"]),  # repeated whole
        (["The old", " town of", " Lisbon"], [" of", " Lisbon"]),  # repeated over two pieces
        ([" of Lisbon", " is"], [" of Lisbon", " is"]),  # not repeated
        (["The", " new", " town"], ["The new", " town"]),  # begins alike, then differs
    ],
)
async def test_only_what_follows_the_start_is_passed_on(
    pieces: list[str], expected: list[str]
) -> None:
    assert await passed("The old town", pieces) == expected


async def test_with_no_start_every_piece_is_passed_on() -> None:
    assert await passed("", ["a", "b"]) == ["a", "b"]


def test_the_answer_loses_the_start_it_repeats_and_the_start_is_sent_last() -> None:
    assert after_start("The old town of Lisbon", "The old town") == " of Lisbon"
    assert after_start(" of Lisbon", "The old town") == " of Lisbon"
    question = [{"role": "user", "content": "Describe Lisbon."}]
    start = {"role": "assistant", "content": "The old"}
    assert with_start(question, "The old") == [*question, start]
    assert with_start(question, "") == question
