DROP TABLE responses;
ALTER TABLE chat_sessions DROP COLUMN metadata;
ALTER TABLE chat_sessions DROP COLUMN kind;
