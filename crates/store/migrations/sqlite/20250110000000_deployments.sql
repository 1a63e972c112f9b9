-- Deployments: a model's serving declared once (placements, replica bounds,
-- autoscaling); the deployment keeper creates, replaces and scales its
-- instances. Keep in step with migrations/postgres.
CREATE TABLE deployments (
    id                   TEXT NOT NULL PRIMARY KEY,
    name                 TEXT NOT NULL,
    model                TEXT NOT NULL,
    -- JSON of gpufleet_domain::DeploymentSpec.
    spec                 TEXT NOT NULL,
    -- gpufleet_domain::DeploymentState: active, deleting, deleted.
    state                TEXT NOT NULL,
    -- Bumped on every write (compare-and-swap token).
    generation           BIGINT NOT NULL,
    -- What the keeper last decided (bounds and autoscaling applied).
    desired_replicas     BIGINT NOT NULL,
    -- JSON of gpufleet_domain::ReplicaStatus: counts and readable conditions.
    status               TEXT NOT NULL,
    created_at           BIGINT NOT NULL,
    updated_at           BIGINT NOT NULL,
    delete_requested_at  BIGINT,
    deleted_at           BIGINT
);
-- A name is unique among deployments not deleted.
CREATE UNIQUE INDEX deployments_live_name ON deployments (name) WHERE deleted_at IS NULL;

-- A deployment's timeline: every decision with its reason.
CREATE TABLE deployment_events (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    deployment_id  TEXT NOT NULL REFERENCES deployments (id),
    at             BIGINT NOT NULL,
    action         TEXT NOT NULL,
    outcome        TEXT NOT NULL,
    message        TEXT NOT NULL,
    metadata       TEXT NOT NULL
);
CREATE INDEX deployment_events_by_deployment ON deployment_events (deployment_id, id);

-- The deployment an instance serves (NULL: created on its own).
ALTER TABLE instances ADD COLUMN deployment_id TEXT REFERENCES deployments (id);
CREATE INDEX instances_by_deployment ON instances (deployment_id);
