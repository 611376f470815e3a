CREATE INDEX messages_pending ON messages (status) WHERE status = 'pending';
