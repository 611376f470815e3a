-- depends: 0004_responses
-- As the SQLite migration 0007: the first answer of an idempotent request that
-- is not a turn (creating a conversation, adding items), given to its retries.
CREATE TABLE idempotent_results (
    api_key_id   bigint      NOT NULL REFERENCES api_keys (id),
    key          text        NOT NULL,
    fingerprint  text        NOT NULL,
    body         text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (api_key_id, key)
);
CREATE INDEX idempotent_results_by_age ON idempotent_results (created_at);
