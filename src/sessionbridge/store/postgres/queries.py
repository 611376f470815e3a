"""The PostgreSQL store's columns and the fragments of its one-statement writes.

A message and its session's counters are written by one statement whose
data-modifying WITH clauses update the session row (advancing ``last_seq``),
insert the message at that seq and, for an answer, mark its question
answered. Updating the session row first also takes its row lock, which
orders concurrent writers to one session, whichever bridge they run in.
"""

from __future__ import annotations

import asyncpg

from ...records import Message, Usage


def ts(column: str) -> str:
    """A timestamptz column as the bridge's RFC 3339 text (UTC, milliseconds)."""
    return f"""to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')"""


KEY_COLUMNS = f"id, name, {ts('created_at')}, {ts('revoked_at')}"
SESSION_COLUMNS = (
    "pk, id, api_key_id, title, scenario, max_tokens, ai_session_id, message_count,"
    f" {ts('created_at')}, {ts('updated_at')}"
)
MESSAGE_COLUMNS = (
    f"pk, id, seq, role, content, status, {ts('created_at')}, ai_session,"
    " prompt_tokens, cached_tokens, completion_tokens, error_code, piece_ends"
)


def usage(prompt: int | None, cached: int | None, completion: int | None) -> Usage | None:
    if prompt is None or completion is None:
        return None
    return Usage(prompt, cached or 0, completion)


def message(row: asyncpg.Record) -> Message:
    pk, id_, seq, role, content, status, created_at, kind, prompt, cached, completion, \
        error_code, piece_ends = row
    return Message(
        pk, id_, seq, role, content, status, created_at, kind,
        usage(prompt, cached, completion), error_code, piece_ends,
    )


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
