DROP TABLE turn_relay;
DROP TABLE turn_tickets;
DROP INDEX chat_sessions_held;
ALTER TABLE chat_sessions DROP COLUMN turn_ticket, DROP COLUMN turn_owner;
DROP TABLE bridges;
