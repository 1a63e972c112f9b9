-- Idempotency keys of create requests (the Idempotency-Key header): a
-- client that retries a create it got no answer to, with the same key,
-- gets what the first request made instead of a second batch of paid
-- machines. Written in the transaction that inserts what it names; kept
-- for a day. Keep in step with migrations/postgres.
CREATE TABLE idempotency_keys (
    -- What the key was used for, e.g. `instances.create`.
    scope           TEXT NOT NULL,
    project_id      TEXT NOT NULL,
    key             TEXT NOT NULL,
    -- SHA-256 (hex) of the request as the control plane read it: the same
    -- key with another request is refused, never replayed.
    request_digest  TEXT NOT NULL,
    -- JSON array of the ids the request made.
    resource_ids    TEXT NOT NULL,
    -- Milliseconds since the epoch, on the database's clock.
    created_at      BIGINT NOT NULL,
    PRIMARY KEY (scope, project_id, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
