-- Leases for background work (see migrations/postgres). SQLite serves one
-- replica (`gpufleet up` holds a lock next to the database file), so the
-- lease is always its own; the same code runs on both.
-- Keep in step with migrations/postgres.
CREATE TABLE leases (
    name        TEXT NOT NULL PRIMARY KEY,
    holder      TEXT NOT NULL,
    token       BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL
);

CREATE INDEX instances_updated_at ON instances (updated_at);

-- See migrations/postgres: a bootstrap secret works until the first heartbeat.
ALTER TABLE instances ADD COLUMN bootstrap_used_at BIGINT;
