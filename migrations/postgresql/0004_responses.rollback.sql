DROP TABLE responses;
ALTER TABLE chat_sessions DROP COLUMN metadata, DROP COLUMN kind;
