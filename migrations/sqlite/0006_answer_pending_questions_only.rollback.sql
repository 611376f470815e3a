DROP TRIGGER messages_answer_question;
CREATE TRIGGER messages_answer_question AFTER INSERT ON messages WHEN NEW.role = 'assistant'
BEGIN
    UPDATE messages
       SET status = 'answered'
     WHERE session_pk = NEW.session_pk AND seq = NEW.seq - 1 AND role = 'user';
END;
