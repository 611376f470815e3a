"""One store test suite for every backend: SQLite and PostgreSQL pass the same tests.

Each test runs once per backend (``store`` is parametrized), so a behaviour
the bridge relies on cannot exist in one store only. ``backend.open()``
opens a second store on the same database, as a second process or a second
bridge would.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sessionbridge.errors import IdempotencyInProgress
from sessionbridge.records import (
    ApiKey,
    ChatSession,
    ContextMessage,
    IdempotencyStart,
    ResponseRow,
    Usage,
)
from sessionbridge.store import DuplicateKeyName, SessionGone, Store
from sessionbridge.store.schema import apply_migrations
from sessionbridge.store.sqlite import SqliteStore
from tests.doubles import wait_until

RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@dataclass
class Backend:
    """One database and the stores opened on it."""

    name: str
    opener: Callable[[float], Awaitable[Store]]
    opened: list[Store] = field(default_factory=list)

    async def open(self, key_cache_seconds: float = 0.0) -> Store:
        store = await self.opener(key_cache_seconds)
        self.opened.append(store)
        return store


@pytest.fixture(params=["sqlite", "postgresql"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        path = str(tmp_path / "contract.db")
        apply_migrations(path)

        async def open_sqlite(key_cache_seconds: float) -> Store:
            return await SqliteStore.open(path, key_cache_seconds=key_cache_seconds)

        opened = Backend("sqlite", open_sqlite)
    else:
        from sessionbridge.store.postgres import PostgresStore

        dsn: str = request.getfixturevalue("migrated_postgres_dsn")

        async def open_postgres(key_cache_seconds: float) -> Store:
            return await PostgresStore.open(dsn, key_cache_seconds=key_cache_seconds)

        opened = Backend("postgresql", open_postgres)
    yield opened
    for store in reversed(opened.opened):
        await store.close()


@pytest.fixture
async def store(backend: Backend) -> Store:
    return await backend.open()


async def key_and_session(store: Store, name: str = "k") -> tuple[ApiKey, ChatSession]:
    key = await store.create_key(name, f"hash-{name}".encode())
    session = await store.create_session(key.id, "A title", "You are a tutor.", 100)
    return key, session


async def answered_turn(store: Store, session: ChatSession, question: str, answer: str) -> None:
    asked = await store.begin_turn(session.pk, question)
    await store.finish_turn(session.pk, asked.pk, answer, "reused")


# -- API keys ---------------------------------------------------------------------------------


async def test_a_created_key_is_found_by_its_token_hash_and_listed(store: Store) -> None:
    key = await store.create_key("alice", b"h-alice")

    assert key.name == "alice" and key.revoked_at is None
    assert RFC3339_MS.match(key.created_at), key.created_at
    assert await store.key_for_token_hash(b"h-alice") == key
    assert await store.key_for_token_hash(b"h-nobody") is None
    assert await store.list_keys() == [key]


async def test_a_live_name_is_unique_and_a_revoked_name_may_be_issued_again(store: Store) -> None:
    first = await store.create_key("bob", b"h1")
    with pytest.raises(DuplicateKeyName):
        await store.create_key("bob", b"h2")

    assert await store.revoke_key("bob") is True
    assert await store.revoke_key("bob") is False  # no live key of that name is left
    assert await store.revoke_key("nobody") is False
    second = await store.create_key("bob", b"h2")

    keys = await store.list_keys()
    assert [k.id for k in keys] == [first.id, second.id]
    assert keys[0].revoked_at is not None and RFC3339_MS.match(keys[0].revoked_at)
    assert keys[1].revoked_at is None
    assert await store.key_for_token_hash(b"h1") is None
    assert await store.key_for_token_hash(b"h2") == second


async def test_a_revocation_through_the_same_store_is_seen_at_once(backend: Backend) -> None:
    store = await backend.open(key_cache_seconds=60)
    await store.create_key("carol", b"h-carol")
    assert await store.key_for_token_hash(b"h-carol") is not None  # now cached

    await store.revoke_key("carol")

    assert await store.key_for_token_hash(b"h-carol") is None


async def test_a_revocation_elsewhere_is_seen_once_the_cached_key_is_older_than_the_setting(
    backend: Backend,
) -> None:
    cached = await backend.open(key_cache_seconds=0.3)
    other = await backend.open()
    await other.create_key("dave", b"h-dave")
    assert await cached.key_for_token_hash(b"h-dave") is not None

    await other.revoke_key("dave")

    assert await cached.key_for_token_hash(b"h-dave") is not None  # still trusted for a while

    async def forgotten() -> bool:
        return await cached.key_for_token_hash(b"h-dave") is None

    await wait_until(forgotten)  # once the cached entry is older than 0.3 s


async def test_without_a_cache_a_revocation_elsewhere_is_seen_at_once(backend: Backend) -> None:
    uncached = await backend.open(key_cache_seconds=0)
    other = await backend.open()
    await other.create_key("erin", b"h-erin")
    assert await uncached.key_for_token_hash(b"h-erin") is not None

    await other.revoke_key("erin")

    assert await uncached.key_for_token_hash(b"h-erin") is None


async def test_an_unknown_token_is_not_cached_so_a_key_created_elsewhere_works_at_once(
    backend: Backend,
) -> None:
    cached = await backend.open(key_cache_seconds=60)
    other = await backend.open()
    assert await cached.key_for_token_hash(b"h-frank") is None

    key = await other.create_key("frank", b"h-frank")

    assert await cached.key_for_token_hash(b"h-frank") == key


# -- chat sessions ------------------------------------------------------------------------------


async def test_a_created_session_is_read_back_by_its_owner_only(store: Store) -> None:
    key, session = await key_and_session(store)
    stranger = await store.create_key("stranger", b"h-stranger")

    assert session.title == "A title" and session.scenario == "You are a tutor."
    assert session.max_tokens == 100 and session.message_count == 0
    assert session.ai_session_id is None
    assert RFC3339_MS.match(session.created_at) and session.updated_at == session.created_at
    assert await store.get_session(key.id, session.id) == session
    assert await store.get_session(stranger.id, session.id) is None
    assert await store.get_session(key.id, "no-such-id") is None


async def test_a_session_without_a_title_keeps_none(store: Store) -> None:
    key = await store.create_key("k", b"h")
    session = await store.create_session(key.id, None, "s", 10)

    read = await store.get_session(key.id, session.id)
    assert read is not None and read.title is None


async def test_sessions_are_listed_newest_first_a_page_at_a_time_per_key(store: Store) -> None:
    key = await store.create_key("k", b"h")
    other = await store.create_key("other", b"h-other")
    made = [await store.create_session(key.id, f"t{n}", "s", 10) for n in range(5)]
    await store.create_session(other.id, "not mine", "s", 10)

    first_page = await store.list_sessions(key.id, 2, None)
    second_page = await store.list_sessions(key.id, 2, first_page[-1].pk)
    rest = await store.list_sessions(key.id, 10, second_page[-1].pk)

    assert [s.id for s in first_page + second_page + rest] == [s.id for s in reversed(made)]
    assert await store.list_sessions(key.id, 10, made[0].pk) == []


async def test_the_ai_session_id_is_stored_with_the_session(store: Store) -> None:
    key, session = await key_and_session(store)

    await store.set_ai_session(session.pk, "ai-123")

    read = await store.get_session(key.id, session.id)
    assert read is not None and read.ai_session_id == "ai-123"


async def test_deleting_a_session_deletes_its_messages_and_only_its_owner_may(
    store: Store,
) -> None:
    key, session = await key_and_session(store)
    stranger = await store.create_key("stranger", b"h-stranger")
    question = await store.begin_turn(session.pk, "hello")

    assert await store.delete_session(stranger.id, session.id) is False
    assert await store.delete_session(key.id, session.id) is True
    assert await store.delete_session(key.id, session.id) is False

    assert await store.get_session(key.id, session.id) is None
    assert await store.get_message(session.pk, question.pk) is None
    assert await store.list_messages(session.pk, 10, None) == []


# -- turns ----------------------------------------------------------------------------------


async def test_a_question_is_pending_and_its_answer_follows_it_and_answers_it(
    store: Store,
) -> None:
    _key, session = await key_and_session(store)

    question = await store.begin_turn(session.pk, "What is 2+2?")
    assert (question.seq, question.role, question.status) == (1, "user", "pending")
    assert RFC3339_MS.match(question.created_at)
    answer = await store.finish_turn(session.pk, question.pk, "4", "created")

    assert (answer.seq, answer.role, answer.status, answer.content) == (2, "assistant",
                                                                      "answered", "4")
    assert answer.ai_session == "created"
    stored_question = await store.get_message(session.pk, question.pk)
    assert stored_question is not None and stored_question.status == "answered"
    assert await store.answer_to(session.pk, question.seq) == answer
    assert await store.get_message(session.pk, answer.pk) == answer


async def test_messages_advance_the_session_count_and_update_time(store: Store) -> None:
    key, session = await key_and_session(store)
    for n in range(3):
        await answered_turn(store, session, f"q{n}", f"a{n}")
    last = await store.begin_turn(session.pk, "q3")

    read = await store.get_session(key.id, session.id)

    assert read is not None and read.message_count == 7
    assert read.updated_at == last.created_at >= session.created_at
    assert [m.seq for m in await store.list_messages(session.pk, 100, None)] == list(range(1, 8))


async def test_messages_are_listed_in_order_after_a_seq_a_page_at_a_time(store: Store) -> None:
    _key, session = await key_and_session(store)
    for n in range(3):
        await answered_turn(store, session, f"q{n}", f"a{n}")

    page = await store.list_messages(session.pk, 4, None)
    after = await store.list_messages(session.pk, 4, page[-1].seq)

    assert [m.content for m in page] == ["q0", "a0", "q1", "a1"]
    assert [m.content for m in after] == ["q2", "a2"]
    assert [m.role for m in page] == ["user", "assistant"] * 2
    assert all(m.status == "answered" for m in page + after)


async def test_each_message_gets_an_id_of_its_own(store: Store) -> None:
    _key, session = await key_and_session(store)
    for n in range(3):
        await answered_turn(store, session, f"q{n}", f"a{n}")

    ids = [m.id for m in await store.list_messages(session.pk, 100, None)]

    assert len(set(ids)) == 6


async def test_an_answer_keeps_its_usage_and_stream_pieces(store: Store) -> None:
    _key, session = await key_and_session(store)
    question = await store.begin_turn(session.pk, "hi")

    answer = await store.finish_turn(
        session.pk, question.pk, "Hello there", "recovered", usage=Usage(120, 100, 7),
        piece_ends="5,11",
    )

    [_, read] = await store.list_messages(session.pk, 10, None)
    assert read == answer
    assert (read.ai_session, read.usage, read.piece_ends) == ("recovered", Usage(120, 100, 7),
                                                              "5,11")
    assert read.public()["usage"] == {"prompt_tokens": 120, "cached_tokens": 100,
                                      "completion_tokens": 7}


async def test_text_round_trips_exactly(store: Store) -> None:
    _key, session = await key_and_session(store)
    text = "Grüße 😀 — 漢字 \t tabs\nnew lines ' \" \\ %s $1 ?"

    question = await store.begin_turn(session.pk, text)
    await store.finish_turn(session.pk, question.pk, text[::-1], "reused")

    [asked, answered] = await store.list_messages(session.pk, 10, None)
    assert (asked.content, answered.content) == (text, text[::-1])


async def test_a_failed_question_keeps_its_error_and_gets_no_answer(store: Store) -> None:
    key, session = await key_and_session(store)
    question = await store.begin_turn(session.pk, "hello")

    await store.fail_turn(session.pk, question.pk, error_code="upstream_timeout")

    failed = await store.get_message(session.pk, question.pk)
    assert failed is not None and (failed.status, failed.error_code) == (
        "failed", "upstream_timeout")
    assert failed.public()["error"] == "upstream_timeout"
    assert await store.answer_to(session.pk, question.seq) is None
    read = await store.get_session(key.id, session.id)
    assert read is not None and read.message_count == 1


async def test_failing_an_answered_question_changes_nothing(store: Store) -> None:
    _key, session = await key_and_session(store)
    question = await store.begin_turn(session.pk, "hello")
    await store.finish_turn(session.pk, question.pk, "hi", "created")

    await store.fail_turn(session.pk, question.pk, error_code="late")

    read = await store.get_message(session.pk, question.pk)
    assert read is not None and (read.status, read.error_code) == ("answered", None)


async def test_a_failed_last_question_is_retaken_in_place(store: Store) -> None:
    key, session = await key_and_session(store)
    question = await store.begin_turn(session.pk, "hello")
    await store.fail_turn(session.pk, question.pk, error_code="upstream_error")

    retaken = await store.begin_turn(session.pk, "hello", retry_message_pk=question.pk)

    assert (retaken.pk, retaken.id, retaken.seq) == (question.pk, question.id, question.seq)
    assert (retaken.status, retaken.error_code) == ("pending", None)
    answer = await store.finish_turn(session.pk, retaken.pk, "hi", "created")
    assert answer.seq == question.seq + 1
    read = await store.get_session(key.id, session.id)
    assert read is not None and read.message_count == 2


async def test_a_failed_question_with_turns_after_it_moves_to_the_end_when_retaken(
    store: Store,
) -> None:
    key, session = await key_and_session(store)
    failed = await store.begin_turn(session.pk, "first")
    await store.fail_turn(session.pk, failed.pk)
    await answered_turn(store, session, "second", "answer to second")

    retaken = await store.begin_turn(session.pk, "first", retry_message_pk=failed.pk)
    answer = await store.finish_turn(session.pk, retaken.pk, "answer to first", "reused")

    assert (retaken.pk, retaken.seq) == (failed.pk, 4)
    assert answer.seq == 5
    messages = await store.list_messages(session.pk, 10, None)
    assert [(m.seq, m.content, m.status) for m in messages] == [
        (2, "second", "answered"),
        (3, "answer to second", "answered"),
        (4, "first", "answered"),
        (5, "answer to first", "answered"),
    ]
    read = await store.get_session(key.id, session.id)
    assert read is not None and read.message_count == 4


async def test_a_turn_on_a_deleted_session_is_session_gone(store: Store) -> None:
    key, session = await key_and_session(store)
    question = await store.begin_turn(session.pk, "hello")
    await store.delete_session(key.id, session.id)

    with pytest.raises(SessionGone):
        await store.begin_turn(session.pk, "again")
    with pytest.raises(SessionGone):
        await store.finish_turn(session.pk, question.pk, "late answer", "reused")
    with pytest.raises(SessionGone):
        await store.begin_turn(session.pk, "hello", retry_message_pk=question.pk)


async def test_concurrent_messages_on_one_session_get_distinct_consecutive_seqs(
    backend: Backend,
) -> None:
    # The bridge sends one turn at a time per session; the store must still
    # never hand two messages one seq, from one store or two.
    first, second = await backend.open(), await backend.open()
    key, session = await key_and_session(first)

    questions = await asyncio.gather(
        *(store.begin_turn(session.pk, f"q{n}") for n in range(10) for store in (first, second))
    )

    assert sorted(q.seq for q in questions) == list(range(1, 21))
    read = await first.get_session(key.id, session.id)
    assert read is not None and read.message_count == 20


async def test_history_lists_answered_turns_from_a_seq_with_their_usage(store: Store) -> None:
    _key, session = await key_and_session(store)
    await answered_turn(store, session, "q0", "a0")
    failed = await store.begin_turn(session.pk, "lost")
    await store.fail_turn(session.pk, failed.pk)
    question = await store.begin_turn(session.pk, "q1")
    await store.finish_turn(session.pk, question.pk, "a1", "reused", usage=Usage(30, 0, 4))

    history = await store.history(session.pk)
    later = await store.history(session.pk, from_seq=question.seq)

    assert [(t.seq, t.user, t.assistant, t.usage) for t in history] == [
        (1, "q0", "a0", None), (4, "q1", "a1", Usage(30, 0, 4)),
    ]
    assert [t.user for t in later] == ["q1"]


# -- idempotency and crash recovery ---------------------------------------------------------------


async def test_an_idempotent_turn_goes_from_in_progress_to_succeeded(store: Store) -> None:
    key, session = await key_and_session(store)
    start = IdempotencyStart(key.id, "k-1", "fp-1", 1000.0)

    question = await store.begin_turn(session.pk, "hello", idempotency=start)
    running = await store.get_idempotency(key.id, "k-1")
    await store.finish_turn(session.pk, question.pk, "hi", "created", start)
    done = await store.get_idempotency(key.id, "k-1")

    assert running is not None and (running.fingerprint, running.state,
                                    running.user_message_pk) == ("fp-1", "in_progress",
                                                                 question.pk)
    assert done is not None and (done.state, done.ai_session, done.user_message_pk) == (
        "succeeded", "created", question.pk)
    assert await store.get_idempotency(key.id, "k-2") is None


async def test_a_failed_idempotent_turn_is_retaken_on_the_same_question(store: Store) -> None:
    key, session = await key_and_session(store)
    start = IdempotencyStart(key.id, "k-1", "fp-1", 1000.0)
    question = await store.begin_turn(session.pk, "hello", idempotency=start)
    await store.fail_turn(session.pk, question.pk, start, "upstream_error")
    failed = await store.get_idempotency(key.id, "k-1")

    retry = IdempotencyStart(key.id, "k-1", "fp-1", 2000.0)
    retaken = await store.begin_turn(
        session.pk, "hello", retry_message_pk=question.pk, idempotency=retry
    )
    running = await store.get_idempotency(key.id, "k-1")

    assert failed is not None and failed.state == "failed"
    assert retaken.pk == question.pk
    assert running is not None and (running.state, running.user_message_pk) == (
        "in_progress", question.pk)


async def test_idempotency_keys_are_scoped_to_their_api_key(store: Store) -> None:
    key, session = await key_and_session(store)
    other = await store.create_key("other", b"h-other")
    await store.begin_turn(session.pk, "hello", idempotency=IdempotencyStart(key.id, "k", "f", 1.0))

    assert await store.get_idempotency(other.id, "k") is None
    assert await store.get_idempotency(key.id, "k") is not None


async def test_finished_outcomes_are_purged_after_their_time_but_running_ones_are_not(
    store: Store,
) -> None:
    key, session = await key_and_session(store)
    for name, created_at in (("old", 1000.0), ("new", 5000.0)):
        start = IdempotencyStart(key.id, name, "fp", created_at)
        question = await store.begin_turn(session.pk, name, idempotency=start)
        await store.finish_turn(session.pk, question.pk, "a", "created", start)
    await store.begin_turn(
        session.pk, "running", idempotency=IdempotencyStart(key.id, "running", "fp", 1000.0)
    )

    assert await store.purge_idempotency(older_than=2000.0) == 1

    assert await store.get_idempotency(key.id, "old") is None
    assert await store.get_idempotency(key.id, "new") is not None
    assert await store.get_idempotency(key.id, "running") is not None
    assert await store.purge_idempotency(older_than=2000.0) == 0


async def test_deleting_a_session_deletes_its_idempotency_records(store: Store) -> None:
    key, session = await key_and_session(store)
    start = IdempotencyStart(key.id, "k", "fp", 1000.0)
    question = await store.begin_turn(session.pk, "hello", idempotency=start)
    await store.finish_turn(session.pk, question.pk, "hi", "created", start)

    await store.delete_session(key.id, session.id)

    assert await store.get_idempotency(key.id, "k") is None


async def test_turns_cut_off_mid_way_are_failed_at_the_next_start(backend: Backend) -> None:
    store = await backend.open()
    key, session = await key_and_session(store)
    _, other_session = await key_and_session(store, "other")
    await answered_turn(store, session, "done", "answered")
    start = IdempotencyStart(key.id, "k", "fp", 1000.0)
    cut_off = await store.begin_turn(session.pk, "cut off", idempotency=start)
    also_cut_off = await store.begin_turn(other_session.pk, "also cut off")
    await store.close()
    backend.opened.remove(store)

    restarted = await backend.open()
    assert await restarted.fail_pending_turns() == 2

    for session_pk, message_pk in ((session.pk, cut_off.pk), (other_session.pk, also_cut_off.pk)):
        message = await restarted.get_message(session_pk, message_pk)
        assert message is not None and message.status == "failed"
    record = await restarted.get_idempotency(key.id, "k")
    assert record is not None and record.state == "failed"
    statuses = [m.status for m in await restarted.list_messages(session.pk, 10, None)]
    assert statuses == ["answered", "answered", "failed"]
    assert await restarted.fail_pending_turns() == 0


async def test_a_store_answers_its_ping(store: Store) -> None:
    await store.ping()


# -- conversations, chains and responses (the OpenAI face) -------------------------------------


def a_response(key: ApiKey, session: ChatSession, response_id: str = "resp_1") -> ResponseRow:
    """A response to store with its question (its pk is the store's)."""
    return ResponseRow(
        0, response_id, key.id, session.pk, 1_700_000_000,
        "model-x", f"msg_{response_id}", '{"input": "Grüße 😀"}',
    )


async def stored_response(store: Store, key: ApiKey, session: ChatSession) -> ResponseRow:
    """A response stored with its question, read back for its pk."""
    await store.begin_turn(session.pk, "q", response=a_response(key, session))
    read = await store.get_response(key.id, "resp_1")
    assert read is not None
    return read


async def test_a_session_gets_a_new_uuid_and_kind_session_unless_told(store: Store) -> None:
    key, session = await key_and_session(store)

    assert str(uuid.UUID(session.id)) == session.id
    assert (session.kind, session.metadata) == ("session", None)
    assert await store.get_session(key.id, session.id) == session


async def test_a_session_is_created_with_its_id_kind_metadata_and_items_as_answered_messages(
    store: Store,
) -> None:
    key = await store.create_key("k", b"h")
    items = [ContextMessage("user", "Hi 😀"), ContextMessage("assistant", "Hello\r\n"),
             ContextMessage("user", "And?")]

    session = await store.create_session(
        key.id, None, "s", 10, session_id="conv_abc", kind="conversation",
        metadata='{"topic": "tests"}', items=items,
    )

    assert (session.id, session.kind, session.metadata) == (
        "conv_abc", "conversation", '{"topic": "tests"}')
    assert session.message_count == 3 and session.title is None
    assert await store.get_session(key.id, "conv_abc") == session
    assert await store.list_sessions(key.id, 10, None) == [session]
    messages = await store.list_messages(session.pk, 10, None)
    assert [(m.seq, m.role, m.content, m.status) for m in messages] == [
        (1, "user", "Hi 😀", "answered"), (2, "assistant", "Hello\r\n", "answered"),
        (3, "user", "And?", "answered"),
    ]
    assert len({m.id for m in messages}) == 3
    question = await store.begin_turn(session.pk, "next")
    assert question.seq == 4


async def test_the_lease_hands_over_the_session_with_its_kind_and_metadata(store: Store) -> None:
    key = await store.create_key("k", b"h")
    session = await store.create_session(
        key.id, None, "s", 10, kind="conversation", metadata='{"a": "b"}'
    )

    async with store.coordination.turn_lease(session.pk) as lease:
        taken = await lease.take()

    # None where one process serves the database (its cached row is right).
    assert taken is None or taken == session


async def test_metadata_is_replaced(store: Store) -> None:
    key = await store.create_key("k", b"h")
    session = await store.create_session(key.id, None, "s", 10, kind="conversation",
                                         metadata='{"v": 1}')

    await store.set_metadata(session.pk, '{"v": 2, "é": "😀"}')

    read = await store.get_session(key.id, session.id)
    assert read is not None and read.metadata == '{"v": 2, "é": "😀"}'


async def test_a_new_scenario_lets_the_ai_session_go(store: Store) -> None:
    key, session = await key_and_session(store)
    await store.set_ai_session(session.pk, "ai-123")

    await store.set_scenario(session.pk, "You are a pirate.")

    read = await store.get_session(key.id, session.id)
    assert read is not None and (read.scenario, read.ai_session_id) == ("You are a pirate.", None)


async def test_a_fork_copies_the_answered_messages_up_to_a_seq_byte_for_byte_renumbered(
    store: Store,
) -> None:
    key, source = await key_and_session(store)
    text = "Grüße 😀 — 漢字 \t\r\n ' \" \\ %s $1"
    first = await store.begin_turn(source.pk, text)
    await store.finish_turn(source.pk, first.pk, text[::-1], "created", usage=Usage(10, 0, 3),
                            piece_ends="2,5")
    lost = await store.begin_turn(source.pk, "lost")
    await store.fail_turn(source.pk, lost.pk, error_code="upstream_error")
    await store.add_items(source.pk, [ContextMessage("user", "an item")])
    second = await store.begin_turn(source.pk, "second")
    answer = await store.finish_turn(source.pk, second.pk, "answer 2", "reused",
                                     usage=Usage(40, 30, 5))
    await answered_turn(store, source, "beyond", "the fork")

    fork = await store.fork_session(source, answer.seq, "A new scenario", 50)

    assert fork.kind == "chain" and fork.id != source.id and fork.pk != source.pk
    assert str(uuid.UUID(fork.id)) == fork.id
    assert (fork.api_key_id, fork.title, fork.scenario, fork.max_tokens) == (
        key.id, None, "A new scenario", 50)
    assert (fork.ai_session_id, fork.metadata, fork.message_count) == (None, None, 5)
    assert await store.get_session(key.id, fork.id) == fork
    originals = [m for m in await store.list_messages(source.pk, 100, None)
                 if m.seq <= answer.seq and m.status == "answered"]
    copies = await store.list_messages(fork.pk, 100, None)
    assert [m.seq for m in copies] == [1, 2, 3, 4, 5]
    assert [(m.role, m.content, m.status, m.ai_session, m.usage, m.piece_ends)
            for m in copies] == [
        (m.role, m.content, m.status, m.ai_session, m.usage, m.piece_ends) for m in originals]
    assert copies[0].content.encode() == text.encode()
    assert not {m.id for m in copies} & {m.id for m in originals}
    assert len({m.id for m in copies}) == 5
    assert [(t.user, t.assistant, t.usage) for t in await store.history(fork.pk)] == [
        (t.user, t.assistant, t.usage) for t in await store.history(source.pk)][:2]
    assert (await store.begin_turn(fork.pk, "on the fork")).seq == 6
    # The source is as it was.
    assert len(await store.list_messages(source.pk, 100, None)) == 8


async def test_a_fork_of_nothing_answered_is_an_empty_chain(store: Store) -> None:
    _key, source = await key_and_session(store)
    await store.begin_turn(source.pk, "pending")

    fork = await store.fork_session(source, 10, "s", 10)

    assert (fork.kind, fork.message_count) == ("chain", 0)
    assert await store.list_messages(fork.pk, 10, None) == []
    assert (await store.begin_turn(fork.pk, "first")).seq == 1


async def test_items_are_appended_as_answered_messages(store: Store) -> None:
    key, session = await key_and_session(store)
    await answered_turn(store, session, "q", "a")

    added = await store.add_items(
        session.pk, [ContextMessage("user", "u"), ContextMessage("assistant", "a 😀")]
    )

    assert [(m.seq, m.role, m.content, m.status) for m in added] == [
        (3, "user", "u", "answered"), (4, "assistant", "a 😀", "answered")]
    assert all(RFC3339_MS.match(m.created_at) for m in added)
    assert (await store.list_messages(session.pk, 10, 2)) == added
    assert await store.add_items(session.pk, []) == []
    read = await store.get_session(key.id, session.id)
    assert read is not None and read.message_count == 4
    assert (await store.begin_turn(session.pk, "next")).seq == 5


async def test_an_answer_given_as_an_item_leaves_a_failed_question_failed(store: Store) -> None:
    _, session = await key_and_session(store)
    question = await store.begin_turn(session.pk, "lost")
    await store.fail_turn(session.pk, question.pk, error_code="upstream_error")

    await store.add_items(session.pk, [ContextMessage("assistant", "an item")])

    failed = await store.get_message(session.pk, question.pk)
    assert failed is not None and failed.status == "failed"
    # The item stands alone: the failed question is no part of any turn.
    assert [(t.user, t.assistant) for t in await store.history(session.pk)] == [("", "an item")]


async def test_items_for_a_deleted_session_are_session_gone(store: Store) -> None:
    key, session = await key_and_session(store)
    await store.delete_session(key.id, session.id)

    with pytest.raises(SessionGone):
        await store.add_items(session.pk, [ContextMessage("user", "u")])


async def test_a_deleted_message_is_gone_and_counted_out_but_seqs_go_on(store: Store) -> None:
    key, session = await key_and_session(store)
    _, other = await key_and_session(store, "other")
    [first, last] = await store.add_items(
        session.pk, [ContextMessage("user", "one"), ContextMessage("user", "two")]
    )

    assert await store.delete_message(other.pk, last.id) is False
    assert await store.delete_message(session.pk, last.id) is True
    assert await store.delete_message(session.pk, last.id) is False
    assert await store.delete_message(session.pk, "no-such-id") is False

    assert await store.list_messages(session.pk, 10, None) == [first]
    assert await store.get_message_by_id(session.pk, last.id) is None
    read = await store.get_session(key.id, session.id)
    assert read is not None and read.message_count == 1
    assert (await store.begin_turn(session.pk, "three")).seq == 3


async def test_answered_since_lists_answered_messages_of_both_roles_from_a_seq(
    store: Store,
) -> None:
    _key, session = await key_and_session(store)
    await answered_turn(store, session, "q0", "a0")
    lost = await store.begin_turn(session.pk, "lost")
    await store.fail_turn(session.pk, lost.pk)
    await store.add_items(session.pk, [ContextMessage("user", "item")])
    await answered_turn(store, session, "q1", "a1")
    await store.begin_turn(session.pk, "pending")

    since = await store.answered_since(session.pk, 2)

    assert [(m.seq, m.role, m.content) for m in since] == [
        (2, "assistant", "a0"), (4, "user", "item"), (5, "user", "q1"), (6, "assistant", "a1")]
    assert since == [m for m in await store.list_messages(session.pk, 10, None)
                     if m.seq >= 2 and m.status == "answered"]
    assert await store.answered_since(session.pk, 8) == []


async def test_added_since_answer_lists_what_came_after_the_last_answer_of_a_turn(
    store: Store,
) -> None:
    _key, session = await key_and_session(store)
    await answered_turn(store, session, "q0", "a0")
    assert await store.added_since_answer(session.pk, 64) == []
    await store.add_items(
        session.pk, [ContextMessage("user", "item"), ContextMessage("assistant", "given")]
    )
    lost = await store.begin_turn(session.pk, "lost")
    await store.fail_turn(session.pk, lost.pk)

    added = await store.added_since_answer(session.pk, 64)

    assert [(m.seq, m.role, m.content) for m in added] == [
        (3, "user", "item"), (4, "assistant", "given")]
    assert added == [m for m in await store.answered_since(session.pk, 1) if m.seq > 2]
    # No answer of a turn among the last places (seq 4 and 5): everything answered there.
    assert [m.content for m in await store.added_since_answer(session.pk, 2)] == ["given"]
    await answered_turn(store, session, "q1", "a1")
    assert await store.added_since_answer(session.pk, 64) == []


async def test_history_joins_the_user_messages_before_an_answer_into_one_turn(
    store: Store,
) -> None:
    key = await store.create_key("k", b"h")
    session = await store.create_session(key.id, None, "s", 10, items=[
        ContextMessage("user", "u1"), ContextMessage("user", "u2"),
        ContextMessage("assistant", "a1"),
    ])
    lost = await store.begin_turn(session.pk, "lost")
    await store.fail_turn(session.pk, lost.pk)
    question = await store.begin_turn(session.pk, "q")
    await store.finish_turn(session.pk, question.pk, "a", "reused", usage=Usage(9, 0, 1))
    await store.add_items(session.pk, [ContextMessage("user", "loose")])
    await store.begin_turn(session.pk, "pending")

    history = await store.history(session.pk)

    assert [(t.seq, t.user, t.assistant, t.usage) for t in history] == [
        (1, "u1\n\nu2", "a1", None), (5, "q", "a", Usage(9, 0, 1))]
    assert [(t.seq, t.user) for t in await store.history(session.pk, from_seq=5)] == [(5, "q")]


async def test_a_question_is_stored_after_its_context_and_with_its_response(
    store: Store,
) -> None:
    key, session = await key_and_session(store)
    await answered_turn(store, session, "q0", "a0")

    question = await store.begin_turn(
        session.pk, "q1", response=a_response(key, session),
        context=[ContextMessage("user", "c1"), ContextMessage("assistant", "c2")],
    )

    assert (question.seq, question.role, question.content, question.status) == (
        5, "user", "q1", "pending")
    messages = await store.list_messages(session.pk, 10, None)
    assert [(m.seq, m.role, m.content, m.status) for m in messages][2:] == [
        (3, "user", "c1", "answered"), (4, "assistant", "c2", "answered"),
        (5, "user", "q1", "pending")]
    assert messages[-1] == question
    read = await store.get_session(key.id, session.id)
    assert read is not None and read.message_count == 5
    running = await store.get_response(key.id, "resp_1")
    assert running is not None and (running.question, running.answer) == (question, None)
    assert await store.response_for_question(question.pk) == running

    answer = await store.finish_turn(session.pk, question.pk, "a1", "reused")

    done = await store.get_response(key.id, "resp_1")
    assert done is not None and done.answer == answer and not done.incomplete
    assert done.question is not None and done.question.status == "answered"
    assert [(t.seq, t.user, t.assistant) for t in await store.history(session.pk)] == [
        (1, "q0", "a0"), (3, "c1", "c2"), (5, "q1", "a1")]


async def test_a_question_is_stored_with_its_response_without_context(store: Store) -> None:
    key, session = await key_and_session(store)

    question = await store.begin_turn(session.pk, "q", response=a_response(key, session))

    assert question.seq == 1
    read = await store.get_response(key.id, "resp_1")
    assert read is not None and read.question == question


async def test_a_refused_question_stores_no_response(store: Store) -> None:
    key, session = await key_and_session(store)
    other = await store.create_session(key.id, None, "s", 10)
    start = IdempotencyStart(key.id, "k-1", "fp-1", 1000.0)
    await store.begin_turn(session.pk, "q", idempotency=start)

    with pytest.raises(IdempotencyInProgress):
        await store.begin_turn(
            other.pk, "q", idempotency=start, response=a_response(key, other, "resp_refused")
        )

    assert await store.get_response(key.id, "resp_refused") is None
    assert await store.list_messages(other.pk, 10, None) == []


async def test_an_idempotent_question_with_context_is_recorded_and_refused_while_running(
    store: Store,
) -> None:
    key, session = await key_and_session(store)
    other = await store.create_session(key.id, None, "s", 10)
    start = IdempotencyStart(key.id, "k-1", "fp-1", 1000.0)

    question = await store.begin_turn(
        session.pk, "q", idempotency=start, context=[ContextMessage("user", "c")]
    )
    with pytest.raises(IdempotencyInProgress):
        await store.begin_turn(
            other.pk, "q", idempotency=start, context=[ContextMessage("user", "c")]
        )

    record = await store.get_idempotency(key.id, "k-1")
    assert record is not None and (record.state, record.user_message_pk) == (
        "in_progress", question.pk)
    assert [m.content for m in await store.list_messages(session.pk, 10, None)] == ["c", "q"]
    # The refused request stored nothing.
    assert await store.list_messages(other.pk, 10, None) == []
    read = await store.get_session(key.id, other.id)
    assert read is not None and read.message_count == 0


async def test_failing_a_question_fails_the_context_it_brought(store: Store) -> None:
    _key, session = await key_and_session(store)
    await answered_turn(store, session, "q0", "a0")
    question = await store.begin_turn(
        session.pk, "q", context=[ContextMessage("user", "c1"), ContextMessage("user", "c2")]
    )

    await store.fail_turn(session.pk, question.pk, error_code="upstream_error", context_count=2)

    messages = await store.list_messages(session.pk, 10, None)
    assert [(m.content, m.status) for m in messages] == [
        ("q0", "answered"), ("a0", "answered"), ("c1", "failed"), ("c2", "failed"),
        ("q", "failed")]
    assert messages[-1].error_code == "upstream_error"
    await answered_turn(store, session, "q1", "a1")
    assert [(t.seq, t.user, t.assistant) for t in await store.history(session.pk)] == [
        (1, "q0", "a0"), (6, "q1", "a1")]
    assert [m.content for m in await store.answered_since(session.pk, 1)] == [
        "q0", "a0", "q1", "a1"]


async def test_failing_an_answered_question_leaves_its_context_alone(store: Store) -> None:
    _key, session = await key_and_session(store)
    question = await store.begin_turn(session.pk, "q", context=[ContextMessage("user", "c")])
    await store.finish_turn(session.pk, question.pk, "a", "created")

    await store.fail_turn(session.pk, question.pk, context_count=1)

    assert [m.status for m in await store.list_messages(session.pk, 10, None)] == [
        "answered"] * 3


async def test_an_answer_cut_by_its_token_limit_makes_its_response_incomplete(
    store: Store,
) -> None:
    key, session = await key_and_session(store)
    question = await store.begin_turn(
        session.pk, "long", response=a_response(key, session, "resp_cut")
    )
    await store.finish_turn(session.pk, question.pk, "partial", "created", truncated=True)
    question = await store.begin_turn(
        session.pk, "short", response=a_response(key, session, "resp_whole")
    )
    await store.finish_turn(session.pk, question.pk, "whole", "reused")

    read_cut = await store.get_response(key.id, "resp_cut")
    read_whole = await store.get_response(key.id, "resp_whole")

    assert read_cut is not None and read_cut.incomplete
    assert read_cut.answer is not None and read_cut.answer.content == "partial"
    assert read_whole is not None and not read_whole.incomplete


async def test_a_response_is_stored_and_read_back_by_its_owner_only(store: Store) -> None:
    key, session = await key_and_session(store)
    stranger = await store.create_key("stranger", b"h-stranger")

    question = await store.begin_turn(session.pk, "q", response=a_response(key, session))
    await store.fail_turn(session.pk, question.pk)
    await store.begin_turn(session.pk, "q2", response=a_response(key, session, "resp_2"))

    read = await store.get_response(key.id, "resp_1")
    assert read is not None and read.pk > 0 and read.session_pk == session.pk
    assert (read.body, read.created_at, read.model, read.output_message_id) == (
        '{"input": "Grüße 😀"}', 1_700_000_000, "model-x", "msg_resp_1")
    assert (read.continued, read.incomplete, read.answer) == (False, False, None)
    assert read.question is not None and read.question.pk == question.pk
    second = await store.get_response(key.id, "resp_2")
    assert second is not None and second.pk not in (0, read.pk)
    assert await store.get_response(stranger.id, "resp_1") is None
    assert await store.get_response(key.id, "resp_nothing") is None
    assert await store.response_for_question(123456) is None


async def test_a_response_with_a_failed_question_has_no_answer(store: Store) -> None:
    key, session = await key_and_session(store)
    question = await store.begin_turn(session.pk, "q", response=a_response(key, session))

    await store.fail_turn(session.pk, question.pk, error_code="upstream_timeout")

    read = await store.get_response(key.id, "resp_1")
    assert read is not None and read.answer is None
    assert read.question is not None and (read.question.status, read.question.error_code) == (
        "failed", "upstream_timeout")


async def test_a_response_is_deleted_by_its_owner_only(store: Store) -> None:
    key, session = await key_and_session(store)
    stranger = await store.create_key("stranger", b"h-stranger")
    await store.begin_turn(session.pk, "q", response=a_response(key, session))

    assert await store.delete_response(stranger.id, "resp_1") is False
    assert await store.delete_response(key.id, "resp_1") is True
    assert await store.delete_response(key.id, "resp_1") is False

    assert await store.get_response(key.id, "resp_1") is None


async def test_deleting_a_session_deletes_its_responses(store: Store) -> None:
    key, session = await key_and_session(store)
    await store.begin_turn(session.pk, "q", response=a_response(key, session))

    await store.delete_session(key.id, session.id)

    assert await store.get_response(key.id, "resp_1") is None


async def test_a_response_is_continued_by_one_claim_at_a_time(store: Store) -> None:
    key, session = await key_and_session(store)
    response = await stored_response(store, key, session)

    assert await store.claim_continuation(response.pk) is True
    assert await store.claim_continuation(response.pk) is False
    read = await store.get_response(key.id, "resp_1")
    assert read is not None and read.continued

    await store.release_continuation(response.pk)

    read = await store.get_response(key.id, "resp_1")
    assert read is not None and not read.continued
    assert await store.claim_continuation(response.pk) is True


async def test_concurrent_claims_of_a_continuation_give_it_to_one(backend: Backend) -> None:
    first, second = await backend.open(), await backend.open()
    key, session = await key_and_session(first)
    response = await stored_response(first, key, session)

    claims = await asyncio.gather(
        *(store.claim_continuation(response.pk) for _ in range(5) for store in (first, second))
    )

    assert sorted(claims) == [False] * 9 + [True]


async def test_an_idempotent_result_is_kept_once_per_key_and_purged_with_age(
    store: Store,
) -> None:
    key, _ = await key_and_session(store)
    assert await store.get_result(key.id, "k1") is None

    assert await store.put_result(key.id, "k1", "fp", '{"id": "conv_1"}')
    assert not await store.put_result(key.id, "k1", "other", '{"id": "conv_2"}')

    assert await store.get_result(key.id, "k1") == ("fp", '{"id": "conv_1"}')
    assert await store.purge_idempotency(older_than=time.time() - 3600) == 0
    assert await store.purge_idempotency(older_than=time.time() + 3600) == 1
    assert await store.get_result(key.id, "k1") is None
