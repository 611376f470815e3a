-- depends: 0001_initial
-- As the SQLite migration 0004: what a turn reports beyond its text: how it
-- got its AI session, the AI server's token usage, why a question failed,
-- and where a streamed answer's pieces ended (a resumed stream replays them).
ALTER TABLE messages
    ADD COLUMN ai_session         text,
    ADD COLUMN prompt_tokens      integer,
    ADD COLUMN cached_tokens      integer,
    ADD COLUMN completion_tokens  integer,
    ADD COLUMN error_code         text,
    ADD COLUMN piece_ends         text;
