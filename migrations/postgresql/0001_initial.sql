-- The schema of migrations/0001-0003 (SQLite) in PostgreSQL's own types:
-- API keys, chat sessions with their AI session id, messages, and the
-- outcomes of idempotent requests.
--
-- Unlike the SQLite schema there are no triggers: the store advances a
-- session's counters and marks a question answered in the same statement
-- that stores a message (data-modifying WITH clauses), and taking the
-- session row for that update is what orders concurrent writers to one
-- session, whichever bridge they run in.
--
-- Times are timestamptz, taken from the database's clock so that bridges on
-- several machines agree; the store formats them as RFC 3339 in UTC.

CREATE TABLE api_keys (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text        NOT NULL,
    token_hash  bytea       NOT NULL UNIQUE,   -- sha256 of the token; the token itself is never stored
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
-- A name is unique among live keys; a revoked name may be issued again.
CREATE UNIQUE INDEX api_keys_live_name ON api_keys (name) WHERE revoked_at IS NULL;

CREATE TABLE chat_sessions (
    pk             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id             text        NOT NULL UNIQUE,
    api_key_id     bigint      NOT NULL REFERENCES api_keys (id),
    title          text,
    scenario       text        NOT NULL,
    max_tokens     integer     NOT NULL,
    ai_session_id  text,                      -- a credential of the AI server; never shown to clients
    message_count  integer     NOT NULL DEFAULT 0,
    last_seq       integer     NOT NULL DEFAULT 0,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX chat_sessions_by_key ON chat_sessions (api_key_id, pk);

CREATE TABLE messages (
    pk          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id          text        NOT NULL UNIQUE,
    session_pk  bigint      NOT NULL REFERENCES chat_sessions (pk) ON DELETE CASCADE,
    seq         integer     NOT NULL,
    role        text        NOT NULL CHECK (role IN ('user', 'assistant')),
    content     text        NOT NULL,
    status      text        NOT NULL CHECK (status IN ('pending', 'answered', 'failed')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (session_pk, seq)
);
-- No index on pending messages (see the SQLite migration 0003): a pending
-- question is always its session's last message, found through last_seq.

CREATE TABLE idempotency_keys (
    api_key_id       bigint      NOT NULL REFERENCES api_keys (id),
    key              text        NOT NULL,
    fingerprint      text        NOT NULL,    -- sha256 of the session id and the request body
    session_pk       bigint      NOT NULL REFERENCES chat_sessions (pk) ON DELETE CASCADE,
    user_message_pk  bigint      REFERENCES messages (pk) ON DELETE CASCADE,
    state            text        NOT NULL CHECK (state IN ('in_progress', 'succeeded', 'failed')),
    ai_session       text,                    -- created, reused or recovered: replayed with the stored messages
    created_at       timestamptz NOT NULL,    -- for expiry
    PRIMARY KEY (api_key_id, key)
);
CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);
-- Deleting a session or a message looks up the rows that refer to it.
CREATE INDEX idempotency_keys_by_session ON idempotency_keys (session_pk);
CREATE INDEX idempotency_keys_by_message ON idempotency_keys (user_message_pk);
