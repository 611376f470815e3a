-- depends: 0004_turn_details
-- The OpenAI face (docs/openai-api.md): a session may be a conversation or a
-- chain of responses, with a conversation's metadata; every response is a
-- row whose question, once stored, is a message of its session.
ALTER TABLE chat_sessions ADD COLUMN kind TEXT NOT NULL DEFAULT 'session'
    CHECK (kind IN ('session', 'conversation', 'chain'));
ALTER TABLE chat_sessions ADD COLUMN metadata TEXT;   -- JSON object, a conversation's

CREATE TABLE responses (
    pk                 INTEGER PRIMARY KEY,
    id                 TEXT    NOT NULL UNIQUE,            -- resp_…
    api_key_id         INTEGER NOT NULL REFERENCES api_keys (id),
    session_pk         INTEGER REFERENCES chat_sessions (pk) ON DELETE CASCADE,
    question_pk        INTEGER REFERENCES messages (pk) ON DELETE SET NULL,
    created_at         INTEGER NOT NULL,                   -- unix seconds
    model              TEXT    NOT NULL,
    output_message_id  TEXT    NOT NULL,                   -- msg_…, named before the reply
    body               TEXT    NOT NULL,                   -- JSON: what the request asked
    continued          INTEGER NOT NULL DEFAULT 0,         -- a later response went on in its line
    incomplete         INTEGER NOT NULL DEFAULT 0          -- the reply was cut by max_output_tokens
);
CREATE INDEX responses_by_question ON responses (question_pk);
CREATE INDEX responses_by_session ON responses (session_pk);
