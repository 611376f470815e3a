"""Filling a database with many stored sessions and messages, fast, for the scale runs.

Going through the API would take longer than the whole benchmark may, so rows
are inserted directly into a database migrated by the bridge's own
migrations, in the shape the bridge writes them (answered question and answer
pairs, consecutive seq numbers, counters on the session). The seeded sessions
have no AI session yet: a turn on one of them creates its AI session.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from procs import create_key

from sessionbridge.store.schema import apply_migrations

SCENARIO = "You are a patient guide to a small harbour town."
QUESTION = "Which way to the lighthouse from the market square, please?"
ANSWER = "Follow the quay past the fish market; the lighthouse is at the end of the pier."
NOW = "2025-01-01T00:00:00.000Z"

# Generated inside SQLite: ten times faster than executemany over Python tuples.
# Odd seq numbers are questions, even ones their answers, as the bridge stores them.
_MESSAGES_SQL = """
INSERT INTO messages (id, session_pk, seq, role, content, status, created_at)
WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < :last)
SELECT printf('seed-%09d-%05d', session_pk, seq), session_pk, seq,
       CASE WHEN seq % 2 = 1 THEN 'user' ELSE 'assistant' END,
       CASE WHEN seq % 2 = 1 THEN :question ELSE :answer END,
       'answered', :now
FROM (SELECT :first_pk + i / :per_session AS session_pk, i % :per_session + 1 AS seq FROM n)
"""


@dataclass(frozen=True)
class SeededDb:
    path: Path
    token: str
    session_ids: list[str]
    messages: int
    seconds: float

    @property
    def size_mb(self) -> float:
        return self.path.stat().st_size / 1e6


def seed(path: Path, sessions: int, messages_per_session: int) -> SeededDb:
    """A migrated database with one API key and ``sessions`` x ``messages_per_session`` rows."""
    started = time.monotonic()
    apply_migrations(str(path))
    token = create_key(path)
    session_ids = [str(uuid.uuid4()) for _ in range(sessions)]
    db = sqlite3.connect(path, isolation_level=None)
    try:
        # Only this process writes, and a crash just means seeding again: no
        # journal while filling (WAL would write every page twice), WAL after,
        # as the bridge runs it.
        db.execute("PRAGMA journal_mode=OFF")
        db.execute("PRAGMA synchronous=OFF")
        db.execute("PRAGMA cache_size=-262144")
        db.execute("PRAGMA foreign_keys=OFF")
        (key_id,) = db.execute("SELECT id FROM api_keys WHERE name = 'bench'").fetchone()
        (max_pk,) = db.execute("SELECT coalesce(max(pk), 0) FROM chat_sessions").fetchone()
        first_pk = max_pk + 1
        db.execute("BEGIN")
        # Messages before their sessions (foreign keys are not enforced on this
        # connection): triggers that keep a session's counters then find no
        # session to update, and the counters are written once, below, whether
        # the schema keeps them by trigger or the bridge by hand.
        if sessions and messages_per_session:
            db.execute(_MESSAGES_SQL, {
                "last": sessions * messages_per_session - 1, "per_session": messages_per_session,
                "first_pk": first_pk, "question": QUESTION, "answer": ANSWER, "now": NOW,
            })
        db.executemany(
            "INSERT INTO chat_sessions (pk, id, api_key_id, title, scenario, max_tokens,"
            " ai_session_id, message_count, last_seq, created_at, updated_at)"
            " VALUES (?, ?, ?, NULL, ?, 256, NULL, ?, ?, ?, ?)",
            (
                (first_pk + i, sid, key_id, SCENARIO, messages_per_session,
                 messages_per_session, NOW, NOW)
                for i, sid in enumerate(session_ids)
            ),
        )
        db.execute("COMMIT")
        db.execute("PRAGMA journal_mode=WAL")
        (count,) = db.execute("SELECT count(*) FROM messages").fetchone()
    finally:
        db.close()
    return SeededDb(path, token, session_ids, count, time.monotonic() - started)
