-- depends: 0002_message_counters
-- The partial index on pending messages cost two index writes per turn (the
-- question enters it, then leaves it when answered) to speed up a query that
-- runs once per start. A pending question is always the last message of its
-- session, so crash recovery finds them through chat_sessions.last_seq instead.
DROP INDEX messages_pending;
