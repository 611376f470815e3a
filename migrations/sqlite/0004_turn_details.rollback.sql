ALTER TABLE messages DROP COLUMN piece_ends;
ALTER TABLE messages DROP COLUMN error_code;
ALTER TABLE messages DROP COLUMN completion_tokens;
ALTER TABLE messages DROP COLUMN cached_tokens;
ALTER TABLE messages DROP COLUMN prompt_tokens;
ALTER TABLE messages DROP COLUMN ai_session;
