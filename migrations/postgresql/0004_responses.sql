-- depends: 0003_several_bridges
-- As the SQLite migration 0005: a session may be a conversation or a chain
-- of responses, with a conversation's metadata; every response is a row
-- whose question, once stored, is a message of its session.
ALTER TABLE chat_sessions
    ADD COLUMN kind text NOT NULL DEFAULT 'session'
        CHECK (kind IN ('session', 'conversation', 'chain')),
    ADD COLUMN metadata text;                          -- JSON object, a conversation's

CREATE TABLE responses (
    pk                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id                 text    NOT NULL UNIQUE,        -- resp_…
    api_key_id         bigint  NOT NULL REFERENCES api_keys (id),
    session_pk         bigint  REFERENCES chat_sessions (pk) ON DELETE CASCADE,
    question_pk        bigint  REFERENCES messages (pk) ON DELETE SET NULL,
    created_at         bigint  NOT NULL,               -- unix seconds
    model              text    NOT NULL,
    output_message_id  text    NOT NULL,               -- msg_…, named before the reply
    body               text    NOT NULL,               -- JSON: what the request asked
    continued          boolean NOT NULL DEFAULT false, -- a later response went on in its line
    incomplete         boolean NOT NULL DEFAULT false  -- the reply was cut by max_output_tokens
);
CREATE INDEX responses_by_question ON responses (question_pk);
CREATE INDEX responses_by_session ON responses (session_pk);
