-- Teams: projects own instances, deployments, API keys and their usage;
-- users hold a role per project; sessions (console) and personal access
-- tokens (CLI, API) sign them in; the audit log records every change. Key
-- limits and budgets; what instances cost (billable intervals and the price
-- when created) and usage per hour for spend. Keep in step with
-- migrations/postgres.
CREATE TABLE projects (
    id          TEXT NOT NULL PRIMARY KEY,
    created_at  BIGINT NOT NULL
);
INSERT INTO projects (id, created_at) VALUES ('default', 0);

CREATE TABLE users (
    id             TEXT NOT NULL PRIMARY KEY,
    -- Lower-case.
    email          TEXT NOT NULL UNIQUE,
    display_name   TEXT NOT NULL,
    -- argon2id PHC string; NULL: no password (single sign-on only).
    password_hash  TEXT,
    oidc_issuer    TEXT,
    oidc_subject   TEXT,
    created_at     BIGINT NOT NULL,
    disabled_at    BIGINT,
    UNIQUE (oidc_issuer, oidc_subject)
);

CREATE TABLE project_members (
    project_id  TEXT NOT NULL REFERENCES projects (id),
    user_id     TEXT NOT NULL REFERENCES users (id),
    -- gpufleet_domain::Role: admin, operator, viewer.
    role        TEXT NOT NULL,
    granted_at  BIGINT NOT NULL,
    granted_by  TEXT NOT NULL,
    PRIMARY KEY (project_id, user_id)
);
CREATE INDEX project_members_by_user ON project_members (user_id);

-- Console sessions; the cookie's secret and the CSRF token are stored as
-- SHA-256 digests only.
CREATE TABLE sessions (
    token_hash    TEXT NOT NULL PRIMARY KEY,
    user_id       TEXT NOT NULL REFERENCES users (id),
    csrf_hash     TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    expires_at    BIGINT NOT NULL,
    last_seen_at  BIGINT NOT NULL
);
CREATE INDEX sessions_by_user ON sessions (user_id);

CREATE TABLE access_tokens (
    id            TEXT NOT NULL PRIMARY KEY,
    user_id       TEXT NOT NULL REFERENCES users (id),
    name          TEXT NOT NULL,
    token_hash    TEXT NOT NULL UNIQUE,
    created_at    BIGINT NOT NULL,
    expires_at    BIGINT,
    last_used_at  BIGINT,
    revoked_at    BIGINT
);
CREATE INDEX access_tokens_by_user ON access_tokens (user_id);

CREATE TABLE audit_log (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    at           BIGINT NOT NULL,
    -- gpufleet_domain::ActorKind: admin, user, anonymous.
    actor_kind   TEXT NOT NULL,
    actor_id     TEXT,
    actor_name   TEXT NOT NULL,
    -- e.g. instance.create, api_key.revoke, member.grant, auth.sign_in.
    action       TEXT NOT NULL,
    target_kind  TEXT NOT NULL,
    target_id    TEXT,
    project_id   TEXT,
    -- gpufleet_domain::AuditOutcome: success, denied, failure.
    outcome      TEXT NOT NULL,
    status       BIGINT NOT NULL,
    message      TEXT NOT NULL,
    source_ip    TEXT
);
CREATE INDEX audit_log_by_at ON audit_log (at);
CREATE INDEX audit_log_by_project ON audit_log (project_id, id);

ALTER TABLE instances ADD COLUMN project_id TEXT NOT NULL DEFAULT 'default';
CREATE INDEX instances_by_project ON instances (project_id);
ALTER TABLE deployments ADD COLUMN project_id TEXT NOT NULL DEFAULT 'default';
-- A name is unique among a project's deployments not deleted.
DROP INDEX deployments_live_name;
CREATE UNIQUE INDEX deployments_live_name ON deployments (project_id, name) WHERE deleted_at IS NULL;
ALTER TABLE api_keys ADD COLUMN project_id TEXT NOT NULL DEFAULT 'default';
CREATE INDEX api_keys_by_project ON api_keys (project_id);

-- Limits of a key: requests and tokens per minute, and a budget per
-- calendar month (UTC) in the currency of the instance prices. NULL: none.
ALTER TABLE api_keys ADD COLUMN rpm BIGINT;
ALTER TABLE api_keys ADD COLUMN tpm BIGINT;
ALTER TABLE api_keys ADD COLUMN monthly_budget DOUBLE PRECISION;

-- What an instance costs: its type's price per hour when it was created,
-- and its billable interval (from the provider making the machine to the
-- provider saying it is gone, or failed-instance cleanup finishing).
ALTER TABLE instances ADD COLUMN price_per_hour DOUBLE PRECISION;
ALTER TABLE instances ADD COLUMN billing_started_at BIGINT;
ALTER TABLE instances ADD COLUMN billing_ended_at BIGINT;

-- Usage per hour, per (key, instance): added to by the routers' flushes.
-- key_id '' : no key. deployment_id '' : none. cost: what the key is
-- charged for these tokens (the model's token prices).
CREATE TABLE usage_hourly (
    hour               BIGINT NOT NULL,
    key_id             TEXT NOT NULL,
    instance_id        TEXT NOT NULL,
    project_id         TEXT NOT NULL,
    model              TEXT NOT NULL,
    deployment_id      TEXT NOT NULL,
    requests           BIGINT NOT NULL DEFAULT 0,
    errors             BIGINT NOT NULL DEFAULT 0,
    prompt_tokens      BIGINT NOT NULL DEFAULT 0,
    completion_tokens  BIGINT NOT NULL DEFAULT 0,
    cost               DOUBLE PRECISION NOT NULL DEFAULT 0,
    PRIMARY KEY (hour, key_id, instance_id)
);
CREATE INDEX usage_hourly_by_key ON usage_hourly (key_id, hour);
CREATE INDEX usage_hourly_by_project ON usage_hourly (project_id, hour);
