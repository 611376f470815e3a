-- depends: 0001_initial
-- Keep a session's counters and its questions' status with the messages
-- themselves, so that storing a message is one statement (one commit) on the
-- hot path and the counters can never drift from the rows they count.

-- Every stored message advances its session's sequence, count and update time.
CREATE TRIGGER messages_advance_session AFTER INSERT ON messages
BEGIN
    UPDATE chat_sessions
       SET last_seq = max(last_seq, NEW.seq),
           message_count = message_count + 1,
           updated_at = NEW.created_at
     WHERE pk = NEW.session_pk;
END;

-- An answer is stored right after its question: storing it answers the question.
CREATE TRIGGER messages_answer_question AFTER INSERT ON messages WHEN NEW.role = 'assistant'
BEGIN
    UPDATE messages
       SET status = 'answered'
     WHERE session_pk = NEW.session_pk AND seq = NEW.seq - 1 AND role = 'user';
END;
