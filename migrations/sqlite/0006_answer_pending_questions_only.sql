-- depends: 0005_responses
-- Storing an answer answers the pending question right before it, and only
-- that: an assistant message stored as context (an item a client added)
-- after a failed question must leave that question failed.
DROP TRIGGER messages_answer_question;
CREATE TRIGGER messages_answer_question AFTER INSERT ON messages WHEN NEW.role = 'assistant'
BEGIN
    UPDATE messages
       SET status = 'answered'
     WHERE session_pk = NEW.session_pk AND seq = NEW.seq - 1 AND role = 'user'
       AND status = 'pending';
END;
