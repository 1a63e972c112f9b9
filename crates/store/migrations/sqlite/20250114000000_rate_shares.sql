-- Requests and tokens per minute across replicas: each replica's router
-- writes, about every second, what each limited API key used through it in
-- the trailing 60 s, and admits a request only while its own count plus the
-- other replicas' stays under the key's limit. Keep in step with
-- migrations/postgres.
CREATE TABLE rate_shares (
    -- The router process (one row per replica and key).
    replica     TEXT NOT NULL,
    key_id      TEXT NOT NULL,
    -- Admitted in the trailing 60 s as of updated_at.
    requests    BIGINT NOT NULL,
    -- Used and reserved in the trailing 60 s as of updated_at.
    tokens      BIGINT NOT NULL,
    -- Milliseconds since the epoch, on the database's clock.
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (replica, key_id)
);
CREATE INDEX rate_shares_key ON rate_shares (key_id);
