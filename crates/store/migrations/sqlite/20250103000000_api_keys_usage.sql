-- API keys of the OpenAI-compatible endpoint, and usage counters per key and
-- per instance. Keep in step with migrations/postgres.

CREATE TABLE api_keys (
    id          TEXT NOT NULL PRIMARY KEY,
    name        TEXT NOT NULL,
    -- SHA-256 hex of the secret; the secret itself is never stored.
    key_hash    TEXT NOT NULL UNIQUE,
    -- JSON array of model names the key may use; NULL: every model.
    models      TEXT,
    created_at  BIGINT NOT NULL,
    revoked_at  BIGINT
);

-- Running totals. scope: 'key' (subject = api key id) or 'instance'
-- (subject = instance id). Added to by the router's periodic flush.
CREATE TABLE usage_counters (
    scope              TEXT NOT NULL,
    subject            TEXT NOT NULL,
    requests           BIGINT NOT NULL DEFAULT 0,
    errors             BIGINT NOT NULL DEFAULT 0,
    prompt_tokens      BIGINT NOT NULL DEFAULT 0,
    completion_tokens  BIGINT NOT NULL DEFAULT 0,
    updated_at         BIGINT NOT NULL,
    PRIMARY KEY (scope, subject)
);
