-- depends: 0002_turn_details
-- Several bridges on one database (contract §8).
--
-- bridges: every running bridge, alive while it renews alive_until (every
-- third of SESSIONBRIDGE_TURN_LEASE); one renewal covers all it holds.
--
-- chat_sessions.turn_owner / turn_ticket: the bridge whose turn holds the
-- session now, and that turn's ticket. A session whose owner is no longer
-- alive is free, and whoever takes it fails the dead turn's pending question.
--
-- turn_tickets: a message's place in its session's line, taken when it
-- arrives, so that messages are answered in arrival order whichever bridge
-- got them. A ticket of a bridge that is no longer alive does not count.
--
-- turn_relay: the events of a running turn that a bridge other than its own
-- is following (written only while someone follows), rung with NOTIFY.

CREATE TABLE bridges (
    id           text        PRIMARY KEY,
    started_at   timestamptz NOT NULL DEFAULT now(),
    alive_until  timestamptz NOT NULL
);

ALTER TABLE chat_sessions
    ADD COLUMN turn_owner   text,
    ADD COLUMN turn_ticket  bigint;
-- The sweep for dead owners looks only at sessions held now.
CREATE INDEX chat_sessions_held ON chat_sessions (turn_owner) WHERE turn_owner IS NOT NULL;

-- No foreign key to chat_sessions: a ticket outlives nothing (its turn drops
-- it, the sweep drops a dead bridge's), and a turn on a session deleted
-- meanwhile is refused when it stores its question.
CREATE TABLE turn_tickets (
    ticket      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    session_pk  bigint NOT NULL,
    owner       text   NOT NULL
);
CREATE INDEX turn_tickets_by_session ON turn_tickets (session_pk, ticket);
CREATE INDEX turn_tickets_by_owner ON turn_tickets (owner);

CREATE TABLE turn_relay (
    question_pk  bigint  NOT NULL REFERENCES messages (pk) ON DELETE CASCADE,
    n            integer NOT NULL,   -- the event's place in its turn's log, from 1 (turn.started)
    event        text    NOT NULL,
    data         text    NOT NULL,   -- the event's data as JSON
    delta_id     integer,
    PRIMARY KEY (question_pk, n)
);
