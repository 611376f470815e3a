-- The first schema: API keys, chat sessions with their AI session id, messages,
-- and the outcomes of idempotent requests.

CREATE TABLE api_keys (
    id          INTEGER PRIMARY KEY,
    name        TEXT    NOT NULL,
    token_hash  BLOB    NOT NULL UNIQUE,   -- sha256 of the token; the token itself is never stored
    created_at  TEXT    NOT NULL,
    revoked_at  TEXT
);
-- A name is unique among live keys; a revoked name may be issued again.
CREATE UNIQUE INDEX api_keys_live_name ON api_keys (name) WHERE revoked_at IS NULL;

CREATE TABLE chat_sessions (
    pk             INTEGER PRIMARY KEY,
    id             TEXT    NOT NULL UNIQUE,
    api_key_id     INTEGER NOT NULL REFERENCES api_keys (id),
    title          TEXT,
    scenario       TEXT    NOT NULL,
    max_tokens     INTEGER NOT NULL,
    ai_session_id  TEXT,                   -- a credential of the AI server; never shown to clients
    message_count  INTEGER NOT NULL DEFAULT 0,
    last_seq       INTEGER NOT NULL DEFAULT 0,
    created_at     TEXT    NOT NULL,
    updated_at     TEXT    NOT NULL
);
CREATE INDEX chat_sessions_by_key ON chat_sessions (api_key_id, pk);

CREATE TABLE messages (
    pk          INTEGER PRIMARY KEY,
    id          TEXT    NOT NULL UNIQUE,
    session_pk  INTEGER NOT NULL REFERENCES chat_sessions (pk) ON DELETE CASCADE,
    seq         INTEGER NOT NULL,
    role        TEXT    NOT NULL CHECK (role IN ('user', 'assistant')),
    content     TEXT    NOT NULL,
    status      TEXT    NOT NULL CHECK (status IN ('pending', 'answered', 'failed')),
    created_at  TEXT    NOT NULL,
    UNIQUE (session_pk, seq)
);
-- Crash recovery looks for turns left pending.
CREATE INDEX messages_pending ON messages (status) WHERE status = 'pending';

CREATE TABLE idempotency_keys (
    api_key_id       INTEGER NOT NULL REFERENCES api_keys (id),
    key              TEXT    NOT NULL,
    fingerprint      TEXT    NOT NULL,     -- sha256 of the session id and the request body
    session_pk       INTEGER NOT NULL REFERENCES chat_sessions (pk) ON DELETE CASCADE,
    user_message_pk  INTEGER REFERENCES messages (pk) ON DELETE CASCADE,
    state            TEXT    NOT NULL CHECK (state IN ('in_progress', 'succeeded', 'failed')),
    ai_session       TEXT,                 -- created, reused or recovered: replayed with the stored messages
    created_at       REAL    NOT NULL,     -- unix time, for expiry
    PRIMARY KEY (api_key_id, key)
);
CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);
