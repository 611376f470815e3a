-- depends: 0006_answer_pending_questions_only
-- The first answer of an idempotent request that is not a turn (creating a
-- conversation, adding items): a retry with the same key gets it again.
CREATE TABLE idempotent_results (
    api_key_id   INTEGER NOT NULL REFERENCES api_keys (id),
    key          TEXT    NOT NULL,
    fingerprint  TEXT    NOT NULL,      -- sha256 of the request as sent
    body         TEXT    NOT NULL,      -- the answer, JSON
    created_at   REAL    NOT NULL,      -- unix time, for expiry
    PRIMARY KEY (api_key_id, key)
);
CREATE INDEX idempotent_results_by_age ON idempotent_results (created_at);
