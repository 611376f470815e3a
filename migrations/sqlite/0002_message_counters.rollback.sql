DROP TRIGGER messages_answer_question;
DROP TRIGGER messages_advance_session;
