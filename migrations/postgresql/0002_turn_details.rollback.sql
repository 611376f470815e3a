ALTER TABLE messages
    DROP COLUMN piece_ends,
    DROP COLUMN error_code,
    DROP COLUMN completion_tokens,
    DROP COLUMN cached_tokens,
    DROP COLUMN prompt_tokens,
    DROP COLUMN ai_session;
