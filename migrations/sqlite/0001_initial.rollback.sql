DROP TABLE idempotency_keys;
DROP TABLE messages;
DROP TABLE chat_sessions;
DROP TABLE api_keys;
