"""The conversation rules without HTTP: a scripted AI server and the real SQLite store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sessionbridge.config import Settings
from sessionbridge.conversation import Conversations
from sessionbridge.errors import BridgeError, SessionLost, UpstreamEmptyReply, UpstreamError
from sessionbridge.metrics import Metrics
from sessionbridge.records import ApiKey, TranscriptTurn
from sessionbridge.store.schema import apply_migrations
from sessionbridge.store.sqlite import SqliteStore
from sessionbridge.upstream.sessions import (
    SessionServerClient,
    recent_transcript,
    recovery_scenario,
)


class ScriptedAI(SessionServerClient):
    """The seed protocol's adapter whose calls answer from a list: a string or an exception."""

    def __init__(self, replies: list[str | Exception]) -> None:
        super().__init__(None, "http://unused")  # type: ignore[arg-type]
        self.replies = replies
        self.created: list[str] = []
        self.chats = 0
        self.gate: asyncio.Event | None = None

    async def create_session(self, scenario: str, session_id: str = "-") -> str:
        self.created.append(scenario)
        return f"ai-{len(self.created)}"

    async def chat(
        self, ai_session_id: str, message: str, max_tokens: int, session_id: str = "-"
    ) -> str:
        self.chats += 1
        if self.gate is not None:
            await self.gate.wait()
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    path = str(tmp_path / "s.db")
    apply_migrations(path)
    opened = await SqliteStore.open(path)
    yield opened
    await opened.close()


async def start(
    store: SqliteStore, ai: ScriptedAI, **settings: object
) -> tuple[Conversations, ApiKey, str]:
    key = await store.create_key("k", b"hash")
    session = await store.create_session(key.id, None, "Scenario.", 100)
    service = Conversations(store, ai, Settings(**settings), Metrics())  # type: ignore[arg-type]
    return service, key, session.id


async def test_whitespace_reply_is_treated_as_empty(store: SqliteStore) -> None:
    ai = ScriptedAI([" \n\t ", "  "])
    service, key, session_id = await start(store, ai, empty_reply_retries=1)

    with pytest.raises(UpstreamEmptyReply):
        await service.send(key, session_id, "hello", None)
    assert ai.chats == 2


async def test_a_session_lost_right_after_creation_is_not_recovered_again(
    store: SqliteStore,
) -> None:
    ai = ScriptedAI([SessionLost("gone")])
    service, key, session_id = await start(store, ai)

    with pytest.raises(UpstreamError):
        await service.send(key, session_id, "hello", None)
    assert len(ai.created) == 1


async def test_recovery_happens_once_per_turn(store: SqliteStore) -> None:
    ai = ScriptedAI(["first answer", SessionLost("gone"), SessionLost("gone again")])
    service, key, session_id = await start(store, ai)
    await service.send(key, session_id, "first", None)

    with pytest.raises(UpstreamError):
        await service.send(key, session_id, "second", None)
    assert len(ai.created) == 2  # the original and one recovery, never a loop


async def test_a_client_that_goes_away_does_not_stop_its_turn(store: SqliteStore) -> None:
    ai = ScriptedAI(["answered anyway"])
    ai.gate = asyncio.Event()
    service, key, session_id = await start(store, ai)
    waiter = asyncio.create_task(service.send(key, session_id, "still there?", None))
    await asyncio.sleep(0.05)

    waiter.cancel()
    ai.gate.set()
    assert await service.wait_idle(2.0)

    session = await store.get_session(key.id, session_id)
    assert session is not None
    messages = await store.list_messages(session.pk, 10, None)
    assert [(m.role, m.status, m.content) for m in messages] == [
        ("user", "answered", "still there?"), ("assistant", "answered", "answered anyway")
    ]


async def test_a_turn_cut_off_by_shutdown_is_stored_as_failed(store: SqliteStore) -> None:
    ai = ScriptedAI(["never"])
    ai.gate = asyncio.Event()
    service, key, session_id = await start(store, ai)
    turn = asyncio.create_task(service.send(key, session_id, "cut off", None))
    await asyncio.sleep(0.05)

    await service.stop()
    with pytest.raises(BridgeError) as cut_off:
        await turn
    assert cut_off.value.code == "upstream_unavailable"

    session = await store.get_session(key.id, session_id)
    assert session is not None
    messages = await store.list_messages(session.pk, 10, None)
    assert [(m.role, m.status) for m in messages] == [("user", "failed")]
    assert len(service.locks) == 0 and service.inflight == 0


async def test_max_tokens_falls_back_to_the_session_setting(store: SqliteStore) -> None:
    seen: list[int] = []

    class Recording(ScriptedAI):
        async def chat(
            self, ai_session_id: str, message: str, max_tokens: int, session_id: str = "-"
        ) -> str:
            seen.append(max_tokens)
            return "ok"

    service, key, session_id = await start(store, Recording([]))
    await service.send(key, session_id, "a", None)
    await service.send(key, session_id, "b", 42)

    assert seen == [100, 42]


def test_recovery_scenario_lists_turns_oldest_first() -> None:
    text = recovery_scenario("Base.", [TranscriptTurn("q1", "a1"), TranscriptTurn("q2", "a2")])

    assert text.startswith("Base.\n")
    assert text.index("User: q1") < text.index("Assistant: a1") < text.index("User: q2")
    assert recovery_scenario("Base.", []) == "Base."


async def test_a_stored_max_tokens_outside_a_narrowed_range_is_moved_into_it(
    store: SqliteStore,
) -> None:
    from sessionbridge.config import TokenRange

    seen: list[int] = []

    class Recording(ScriptedAI):
        async def chat(
            self, ai_session_id: str, message: str, max_tokens: int, session_id: str = "-"
        ) -> str:
            seen.append(max_tokens)
            return "ok"

    # The session was created with 100; the AI server now accepts 10-50.
    service, key, session_id = await start(
        store, Recording([]), upstream_max_tokens=TokenRange(10, 50)
    )
    await service.send(key, session_id, "a", None)

    assert seen == [50]


async def test_an_answer_that_cannot_be_stored_leaves_its_question_failed(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    async def disk_full(*args: object, **kwargs: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    service, key, session_id = await start(store, ScriptedAI(["an answer"]))
    monkeypatch.setattr(store, "finish_turn", disk_full)

    with pytest.raises(BridgeError):  # never a bare driver error, never a 500
        await service.send(key, session_id, "hello", None)

    session = await store.get_session(key.id, session_id)
    assert session is not None
    messages = await store.list_messages(session.pk, 10, None)
    assert [(m.role, m.status) for m in messages] == [("user", "failed")]


def test_a_recovery_transcript_keeps_the_newest_turns_that_fit_oldest_first() -> None:
    turns = [TranscriptTurn(f"q{n}", f"a{n}") for n in range(4)]

    assert recent_transcript(turns, 8) == turns[2:]  # two turns of 4 characters
    assert recent_transcript(turns, 10_000) == turns
    assert recent_transcript(turns, 3) == []  # not even the newest fits
    assert recent_transcript(turns, 0) == []
