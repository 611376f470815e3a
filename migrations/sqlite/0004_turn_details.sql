-- depends: 0003_drop_pending_index
-- What a turn reports beyond its text: how it got its AI session, the AI
-- server's token usage (OpenAI-compatible servers), why a question failed,
-- and where a streamed answer's pieces ended (a resumed stream replays them).
ALTER TABLE messages ADD COLUMN ai_session TEXT;
ALTER TABLE messages ADD COLUMN prompt_tokens INTEGER;
ALTER TABLE messages ADD COLUMN cached_tokens INTEGER;
ALTER TABLE messages ADD COLUMN completion_tokens INTEGER;
ALTER TABLE messages ADD COLUMN error_code TEXT;
ALTER TABLE messages ADD COLUMN piece_ends TEXT;
