-- gpufleet initial schema (SQLite). Keep in step with migrations/postgres.
-- Conventions: ids and enums TEXT (domain as_str/FromStr), timestamps BIGINT
-- Unix milliseconds, booleans BIGINT 0/1, JSON TEXT, floats DOUBLE PRECISION.

CREATE TABLE meta (
    key   TEXT NOT NULL PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE instances (
    id                          TEXT NOT NULL PRIMARY KEY,
    provider                    TEXT NOT NULL,
    zone                        TEXT NOT NULL,
    instance_type               TEXT NOT NULL,
    model                       TEXT NOT NULL,
    status                      TEXT NOT NULL,
    status_reason               TEXT,
    status_message              TEXT,
    milestone_provider_created  BIGINT NOT NULL DEFAULT 0,
    milestone_ip_assigned       BIGINT NOT NULL DEFAULT 0,
    milestone_agent_registered  BIGINT NOT NULL DEFAULT 0,
    milestone_engine_started    BIGINT NOT NULL DEFAULT 0,
    idempotency_key             TEXT NOT NULL UNIQUE,
    provider_instance_id        TEXT,
    ip                          TEXT,
    generation                  BIGINT NOT NULL,
    provision_attempts          BIGINT NOT NULL DEFAULT 0,
    next_attempt_at             BIGINT,
    startup_deadline_at         BIGINT NOT NULL,
    created_at                  BIGINT NOT NULL,
    updated_at                  BIGINT NOT NULL,
    status_changed_at           BIGINT NOT NULL,
    ready_at                    BIGINT,
    terminate_requested_at      BIGINT,
    terminated_at               BIGINT,
    cleanup_started_at          BIGINT,
    cleaned_up_at               BIGINT,
    last_heartbeat_seq          BIGINT,
    last_heartbeat_at           BIGINT,
    engine_status               TEXT,
    -- SHA-256 hex of the one-time bootstrap secret; NULL once consumed.
    bootstrap_secret_hash       TEXT
);
CREATE INDEX instances_by_status ON instances (status);
CREATE INDEX instances_by_created ON instances (created_at, id);

CREATE TABLE instance_events (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    instance_id  TEXT NOT NULL REFERENCES instances (id),
    at           BIGINT NOT NULL,
    kind         TEXT NOT NULL,
    action       TEXT NOT NULL,
    outcome      TEXT NOT NULL,
    from_status  TEXT,
    to_status    TEXT,
    duration_ms  BIGINT,
    error_code   TEXT,
    message      TEXT NOT NULL,
    metadata     TEXT NOT NULL
);
CREATE INDEX instance_events_by_instance ON instance_events (instance_id, id);

CREATE TABLE agent_tokens (
    -- SHA-256 hex of the agent token; the primary key is the lookup index.
    token_hash   TEXT NOT NULL PRIMARY KEY,
    instance_id  TEXT NOT NULL REFERENCES instances (id),
    created_at   BIGINT NOT NULL,
    revoked_at   BIGINT
);
CREATE INDEX agent_tokens_by_instance ON agent_tokens (instance_id);

CREATE TABLE samples (
    instance_id       TEXT NOT NULL REFERENCES instances (id),
    seq               BIGINT NOT NULL,
    -- When the control plane received the heartbeat (its clock).
    at                BIGINT NOT NULL,
    -- When the agent sent it (the agent's clock).
    sent_at           BIGINT NOT NULL,
    cpu_pct           DOUBLE PRECISION NOT NULL,
    load1             DOUBLE PRECISION NOT NULL,
    load5             DOUBLE PRECISION NOT NULL,
    load15            DOUBLE PRECISION NOT NULL,
    mem_used_bytes    BIGINT NOT NULL,
    mem_total_bytes   BIGINT NOT NULL,
    disk_used_bytes   BIGINT NOT NULL,
    disk_total_bytes  BIGINT NOT NULL,
    net_rx_bps        DOUBLE PRECISION NOT NULL,
    net_tx_bps        DOUBLE PRECISION NOT NULL,
    gpu_source        TEXT NOT NULL,
    engine_status     TEXT NOT NULL,
    requests_running  DOUBLE PRECISION NOT NULL,
    requests_waiting  DOUBLE PRECISION NOT NULL,
    engine_restarts   BIGINT NOT NULL,
    PRIMARY KEY (instance_id, seq)
);
CREATE INDEX samples_by_instance_at ON samples (instance_id, at);

CREATE TABLE gpu_samples (
    instance_id    TEXT NOT NULL,
    seq            BIGINT NOT NULL,
    at             BIGINT NOT NULL,
    gpu_index      BIGINT NOT NULL,
    name           TEXT NOT NULL,
    uuid           TEXT,
    util_pct       DOUBLE PRECISION NOT NULL,
    mem_used_mib   BIGINT NOT NULL,
    mem_total_mib  BIGINT NOT NULL,
    temp_c         DOUBLE PRECISION NOT NULL,
    power_w        DOUBLE PRECISION NOT NULL,
    power_limit_w  DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (instance_id, seq, gpu_index),
    FOREIGN KEY (instance_id, seq) REFERENCES samples (instance_id, seq) ON DELETE CASCADE
);
CREATE INDEX gpu_samples_by_instance_at ON gpu_samples (instance_id, at);
