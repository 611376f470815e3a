"""The PostgreSQL store's columns and the fragments of its one-statement writes.

A message and its session's counters are written by one statement whose
data-modifying WITH clauses update the session row (advancing ``last_seq``),
insert the message at that seq and, for an answer, mark its question
answered. Updating the session row first also takes its row lock, which
orders concurrent writers to one session, whichever bridge they run in.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg

from ...records import Message, ResponseRow, Usage


def ts(column: str) -> str:
    """A timestamptz column as the bridge's RFC 3339 text (UTC, milliseconds)."""
    return f"""to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')"""


KEY_COLUMNS = f"id, name, {ts('created_at')}, {ts('revoked_at')}"
SESSION_COLUMNS = (
    "pk, id, api_key_id, title, scenario, max_tokens, ai_session_id, message_count,"
    f" {ts('created_at')}, {ts('updated_at')}, kind, metadata"
)


def message_columns(table: str = "") -> str:
    """A message's columns in ``Message`` order, of ``table`` (an alias) if given."""
    t = f"{table}." if table else ""
    return (
        f"{t}pk, {t}id, {t}seq, {t}role, {t}content, {t}status, {ts(t + 'created_at')},"
        f" {t}ai_session, {t}prompt_tokens, {t}cached_tokens, {t}completion_tokens,"
        f" {t}error_code, {t}piece_ends"
    )


MESSAGE_COLUMNS = message_columns()
RESPONSE_COLUMNS = (
    "r.pk, r.id, r.api_key_id, r.session_pk, r.created_at, r.model, r.output_message_id,"
    " r.body, r.continued, r.incomplete"
)


def usage(prompt: int | None, cached: int | None, completion: int | None) -> Usage | None:
    if prompt is None or completion is None:
        return None
    return Usage(prompt, cached or 0, completion)


def message(row: Iterable[Any]) -> Message:
    pk, id_, seq, role, content, status, created_at, kind, prompt, cached, completion, \
        error_code, piece_ends = row
    return Message(
        pk, id_, seq, role, content, status, created_at, kind,
        usage(prompt, cached, completion), error_code, piece_ends,
    )


def response(row: asyncpg.Record) -> ResponseRow:
    """A response read with ``RESPONSE_COLUMNS`` then its question's and its answer's columns."""
    columns = list(row)
    width = len(columns[10:]) // 2
    question_columns, answer_columns = columns[10:10 + width], columns[10 + width:]
    pk, id_, api_key_id, session_pk, created_at, model, output_id, body, continued, \
        incomplete = columns[:10]
    return ResponseRow(
        pk, id_, api_key_id, session_pk, created_at, model, output_id, body, continued,
        incomplete,
        None if question_columns[0] is None else message(question_columns),
        None if answer_columns[0] is None else message(answer_columns),
    )


def message_arrays(drafts: Sequence[Message]) -> list[list[Any]]:
    """Messages to store as the column arrays ``insert_messages`` takes (pk and seq ignored)."""
    return [
        [d.id for d in drafts],
        [d.role for d in drafts],
        [d.content for d in drafts],
        [d.status for d in drafts],
        [d.ai_session for d in drafts],
        [None if d.usage is None else d.usage.prompt_tokens for d in drafts],
        [None if d.usage is None else d.usage.cached_tokens for d in drafts],
        [None if d.usage is None else d.usage.completion_tokens for d in drafts],
        [d.piece_ends for d in drafts],
    ]


def insert_messages(base: str, first: int) -> str:
    """Store several messages in one statement, in order, after the seq ``after_seq``.

    ``base`` names the WITH clause giving the one session row: ``pk`` and
    ``after_seq`` (the seq the first message follows); the messages are
    ``message_arrays``, parameters ``$first`` to ``$first + 8``. Returns the
    stored rows' pk, seq and created_at (in no promised order).
    """
    p = [f"${first + n}" for n in range(9)]
    return f"""
    INSERT INTO messages (id, session_pk, seq, role, content, status, created_at, ai_session,
                          prompt_tokens, cached_tokens, completion_tokens, piece_ends)
    SELECT m.id, b.pk, b.after_seq + m.n, m.role, m.content, m.status, now(), m.ai_session,
           m.prompt_tokens, m.cached_tokens, m.completion_tokens, m.piece_ends
      FROM {base} AS b,
           unnest({p[0]}::text[], {p[1]}::text[], {p[2]}::text[], {p[3]}::text[],
                  {p[4]}::text[], {p[5]}::integer[], {p[6]}::integer[], {p[7]}::integer[],
                  {p[8]}::text[])
           WITH ORDINALITY AS m(id, role, content, status, ai_session, prompt_tokens,
                                cached_tokens, completion_tokens, piece_ends, n)
 RETURNING pk, seq, {ts('created_at')}"""


# The session's next messages (several at once): $1 session pk, $2 how many,
# $3 the ticket of the lease this store holds on the session (NULL: none),
# $4-$12 the messages (``message_arrays``). No row: the session is gone or
# the lease lost.
STORE_MESSAGES = """
WITH advanced AS (
    UPDATE chat_sessions
       SET last_seq = last_seq + $2::integer, message_count = message_count + $2::integer,
           updated_at = now()
     WHERE pk = $1 AND ($3::bigint IS NULL OR turn_ticket = $3)
 RETURNING pk, last_seq - $2::integer AS after_seq
)""" + insert_messages("advanced", 4)

# A new session with its first messages: $1 id, $2 api key id, $3 title,
# $4 scenario, $5 max_tokens, $6 kind, $7 metadata, $8 how many messages,
# $9-$17 the messages (``message_arrays``).
CREATE_SESSION = f"""
WITH made AS (
    INSERT INTO chat_sessions (id, api_key_id, title, scenario, max_tokens, kind, metadata,
                               message_count, last_seq)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8::integer, $8::integer)
 RETURNING pk, 0 AS after_seq, created_at
), stored AS ({insert_messages("made", 9)}
) SELECT pk, {ts('created_at')} FROM made"""

# A response with its question and that question's answer (if answered);
# the caller adds the WHERE clause on ``r``.
SELECT_RESPONSE = f"""
SELECT {RESPONSE_COLUMNS}, {message_columns('q')}, {message_columns('a')}
  FROM responses AS r
  LEFT JOIN messages AS q ON q.pk = r.question_pk AND q.session_pk = r.session_pk
  LEFT JOIN messages AS a ON q.status = 'answered' AND a.session_pk = q.session_pk
                         AND a.seq = q.seq + 1 AND a.role = 'assistant'"""


# The session's next message, in one statement: $1 session pk, $2 message id,
# $3 role, $4 content, $5 status, $6 ai_session, $7-$9 usage, $10 piece_ends,
# $11 the ticket of the lease this store holds on the session (NULL: none),
# which must still be the session's: a bridge cut off from the database past
# its lease has lost the session to another and must not write into it.
# No row from `stored` means the session is gone, the lease lost, or {guard}.
STORE_MESSAGE = """
WITH advanced AS (
    UPDATE chat_sessions
       SET last_seq = last_seq + 1, message_count = message_count + 1, updated_at = now()
     WHERE pk = $1 AND ($11::bigint IS NULL OR turn_ticket = $11){guard}
 RETURNING pk, last_seq, updated_at
), stored AS (
    INSERT INTO messages (id, session_pk, seq, role, content, status, created_at, ai_session,
                          prompt_tokens, cached_tokens, completion_tokens, piece_ends)
    SELECT $2::text, pk, last_seq, $3::text, $4::text, $5::text, updated_at, $6::text,
           $7::integer, $8::integer, $9::integer, $10::text
      FROM advanced
 RETURNING pk, seq, created_at
)"""
STORED = f" SELECT pk, seq, {ts('created_at')} FROM stored"

# A new idempotent request stores its question only while no other request
# holds the key (two bridges starting the same key at once): $12 api key id, $13 key.
KEY_FREE = """
       AND NOT EXISTS (SELECT 1 FROM idempotency_keys
                        WHERE api_key_id = $12::bigint AND key = $13::text AND state <> 'failed')"""

# $12 api key id, $13 key, $14 fingerprint, $15 unix time.
RECORD_IDEMPOTENCY = """, recorded AS (
    INSERT INTO idempotency_keys (api_key_id, key, fingerprint, session_pk, user_message_pk,
                                  state, created_at)
    SELECT $12::bigint, $13::text, $14::text, $1, pk, 'in_progress', to_timestamp($15)
      FROM stored
        ON CONFLICT (api_key_id, key)
        DO UPDATE SET state = 'in_progress', user_message_pk = excluded.user_message_pk
)"""

# An answer is stored right after its question: storing it answers the question.
ANSWER_QUESTION = """, answered AS (
    UPDATE messages SET status = 'answered'
      FROM stored
     WHERE messages.session_pk = $1 AND messages.seq = stored.seq - 1
       AND messages.role = 'user'
)"""

# $12 api key id, $13 key; the AI session kind is $6.
IDEMPOTENCY_SUCCEEDED = """, settled AS (
    UPDATE idempotency_keys SET state = 'succeeded', ai_session = $6::text
      FROM stored
     WHERE api_key_id = $12::bigint AND key = $13::text
)"""

# A truncated answer: its response is incomplete ({question} the parameter
# holding the question's pk); only when the answer was stored.
RESPONSE_INCOMPLETE = """, cut AS (
    UPDATE responses SET incomplete = true
      FROM stored
     WHERE responses.question_pk = ${question}::bigint
)"""
