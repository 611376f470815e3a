"""The conversation rules without HTTP: the AI server double and the real SQLite store."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sessionbridge.config import Settings, TokenRange
from sessionbridge.conversation import Conversations
from sessionbridge.errors import BridgeError, FieldError, InvalidField, UpstreamEmptyReply
from sessionbridge.metrics import Metrics
from sessionbridge.records import ApiKey, Message, TranscriptTurn
from sessionbridge.store.schema import apply_migrations
from sessionbridge.store.sqlite import SqliteStore
from sessionbridge.upstream.sessions import recent_transcript, recovery_scenario
from tests.doubles import HANG_TIMEOUT, FakeAIServer, FakeTurn, Gate


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    path = str(tmp_path / "s.db")
    apply_migrations(path)
    opened = await SqliteStore.open(path)
    yield opened
    await opened.close()


async def start(
    store: SqliteStore, ai: FakeAIServer, **settings: object
) -> tuple[Conversations, ApiKey, str]:
    key = await store.create_key("k", b"hash")
    session = await store.create_session(key.id, None, "Scenario.", 100)
    service = Conversations(store, ai, Settings(**settings), Metrics())  # type: ignore[arg-type]
    return service, key, session.id


async def start_held(
    store: SqliteStore, reply: str
) -> tuple[FakeAIServer, Conversations, ApiKey, str]:
    """As ``start``, with an AI server that answers ``reply`` once released (held until then)."""
    ai = FakeAIServer(lambda turn: reply)
    ai.hold()
    return (ai, *await start(store, ai))


async def stored(store: SqliteStore, key: ApiKey, session_id: str) -> list[Message]:
    """The session's messages as stored, oldest first."""
    session = await store.get_session(key.id, session_id)
    assert session is not None
    return await store.list_messages(session.pk, 10, None)


async def test_whitespace_reply_is_treated_as_empty(store: SqliteStore) -> None:
    blanks = iter([" \n\t ", "  "])
    ai = FakeAIServer(lambda turn: next(blanks))
    service, key, session_id = await start(store, ai, empty_reply_retries=1)

    with pytest.raises(UpstreamEmptyReply):
        await service.send(key, session_id, "hello", None)
    assert ai.contents() == ["hello", "hello"]


async def test_a_message_the_ai_server_refuses_is_never_stored(store: SqliteStore) -> None:
    ai = FakeAIServer()
    ai.refusal = InvalidField([FieldError("content", "longer than the AI server's context")])
    service, key, session_id = await start(store, ai)

    with pytest.raises(InvalidField):
        await service.send(key, session_id, "far too long", None)

    assert ai.calls == []
    assert await stored(store, key, session_id) == []
    assert len(service.locks) == 0 and service.inflight == 0


async def test_a_client_that_goes_away_does_not_stop_its_turn(store: SqliteStore) -> None:
    ai, service, key, session_id = await start_held(store, "answered anyway")
    waiter = asyncio.create_task(service.send(key, session_id, "still there?", None))
    await ai.wait_entered()  # the turn is inside the AI server

    waiter.cancel()
    ai.release()
    assert await service.wait_idle(10.0)

    messages = await stored(store, key, session_id)
    assert [(m.role, m.status, m.content) for m in messages] == [
        ("user", "answered", "still there?"), ("assistant", "answered", "answered anyway")
    ]


async def test_the_store_reads_the_turns_in_flight_from_the_service(store: SqliteStore) -> None:
    # The SQLite writer commits a write in its caller when no other turn is
    # in flight (group_commit.py): what it reads is the service's own count.
    ai, service, key, session_id = await start_held(store, "counted")
    in_flight = store._writer._turns_in_flight
    assert in_flight is not None and in_flight() == 0
    turn = asyncio.create_task(service.answer_here(key, session_id, "one", None))
    await ai.wait_entered()

    assert in_flight() == 1
    ai.release()
    assert (await turn).reply.content == "counted"
    assert in_flight() == 0


async def test_shutdown_waits_for_a_turn_answered_in_its_callers_task_not_for_the_caller(
    store: SqliteStore,
) -> None:
    ai, service, key, session_id = await start_held(store, "never")
    answered = asyncio.Event()  # never set while the service stops

    async def caller() -> object:
        try:
            return await service.answer_here(key, session_id, "cut off", None)
        finally:
            await answered.wait()  # its client does not read the answer yet

    task = asyncio.create_task(caller())
    await ai.wait_entered()

    await asyncio.wait_for(service.stop(), HANG_TIMEOUT)  # the bound only keeps a failure short

    messages = await stored(store, key, session_id)
    assert [(m.role, m.status) for m in messages] == [("user", "failed")]
    answered.set()
    with pytest.raises(BridgeError):
        await task


async def test_a_turn_answered_in_the_callers_task_can_be_followed(
    store: SqliteStore,
) -> None:
    ai, service, key, session_id = await start_held(store, "followed")
    here = asyncio.create_task(service.answer_here(key, session_id, "who follows?", None))
    await ai.wait_entered()
    [question] = await stored(store, key, session_id)

    events = await service.follow(key, session_id, question.id)
    ai.release()
    followed = [e.name async for e in events.follow()]

    assert followed == ["turn.started", "reply.delta", "turn.completed"]
    assert (await here).reply.content == "followed"
    assert not service._busy()


async def test_a_follower_gets_each_piece_as_the_ai_server_sends_it(store: SqliteStore) -> None:
    rest = Gate()
    rest.hold()

    async def handler(turn: FakeTurn) -> str:
        await turn.delta("Hel")
        await rest.pass_through()
        await turn.delta("lo")
        return "Hello"

    service, key, session_id = await start(store, FakeAIServer(handler))
    turn = await service.begin(key, session_id, "hi", None)
    assert turn.question is not None
    await rest.wait_held()  # the first piece is out, the AI server holds back the rest

    events = await service.follow(key, session_id, turn.question.id)
    assert [(e.name, e.id) for e in events.since(0)] == [("turn.started", None), ("reply.delta", 1)]
    rest.release()
    followed = [e async for e in events.follow()]

    assert [e.name for e in followed] == [
        "turn.started", "reply.delta", "reply.delta", "turn.completed"
    ]
    assert "".join(e.data["text"] for e in followed if e.id is not None) == "Hello"
    assert (await turn.outcome).reply.content == "Hello"


@pytest.mark.parametrize("way", ["send", "answer_here"])
async def test_a_turn_cut_off_by_shutdown_is_stored_as_failed(
    store: SqliteStore, way: str
) -> None:
    # Never released: shutdown cuts the turn off inside the AI server.
    ai, service, key, session_id = await start_held(store, "never")
    turn = asyncio.create_task(getattr(service, way)(key, session_id, "cut off", None))
    await ai.wait_entered()

    await service.stop()
    # A turn answered in the caller's task is answered with its failure, and
    # the task goes on (it was the service's cancel, taken back).
    with pytest.raises(BridgeError) as cut_off:
        await turn
    assert cut_off.value.code == "upstream_unavailable"
    assert not turn.cancelled()

    messages = await stored(store, key, session_id)
    assert [(m.role, m.status) for m in messages] == [("user", "failed")]
    assert len(service.locks) == 0 and service.inflight == 0


async def test_max_tokens_falls_back_to_the_session_setting(store: SqliteStore) -> None:
    ai = FakeAIServer(lambda turn: "ok")
    service, key, session_id = await start(store, ai)
    await service.send(key, session_id, "a", None)
    await service.send(key, session_id, "b", 42)

    assert [call.max_tokens for call in ai.calls] == [100, 42]


def test_recovery_scenario_lists_turns_oldest_first() -> None:
    text = recovery_scenario("Base.", [TranscriptTurn("q1", "a1"), TranscriptTurn("q2", "a2")])

    assert text.startswith("Base.\n")
    assert text.index("User: q1") < text.index("Assistant: a1") < text.index("User: q2")
    assert recovery_scenario("Base.", []) == "Base."


async def test_a_stored_max_tokens_outside_a_narrowed_range_is_moved_into_it(
    store: SqliteStore,
) -> None:
    ai = FakeAIServer(lambda turn: "ok")
    # The session was created with 100; the AI server now accepts 10-50.
    service, key, session_id = await start(store, ai, upstream_max_tokens=TokenRange(10, 50))
    await service.send(key, session_id, "a", None)

    assert [call.max_tokens for call in ai.calls] == [50]


async def test_an_answer_that_cannot_be_stored_leaves_its_question_failed(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def disk_full(*args: object, **kwargs: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    service, key, session_id = await start(store, FakeAIServer(lambda turn: "an answer"))
    monkeypatch.setattr(store, "finish_turn", disk_full)

    with pytest.raises(BridgeError):  # never a bare driver error, never a 500
        await service.send(key, session_id, "hello", None)

    messages = await stored(store, key, session_id)
    assert [(m.role, m.status) for m in messages] == [("user", "failed")]


def test_a_recovery_transcript_keeps_the_newest_turns_that_fit_oldest_first() -> None:
    turns = [TranscriptTurn(f"q{n}", f"a{n}") for n in range(4)]

    assert recent_transcript(turns, 8) == turns[2:]  # two turns of 4 characters
    assert recent_transcript(turns, 10_000) == turns
    assert recent_transcript(turns, 3) == []  # not even the newest fits
    assert recent_transcript(turns, 0) == []
