//! gpufleet's store: the only crate that talks SQL.
//!
//! One [`Store`] over SQLite (a file, the default) or PostgreSQL (a
//! `postgres://` URL), with migrations applied on connect.
//!
//! Invariants:
//! - Lifecycle columns are written only by [`Store::update_instance`], a
//!   compare-and-swap on `generation` (bumped on every write), together with the
//!   timeline events that explain the change, in one transaction.
//! - Heartbeat columns are written only by [`Store::record_heartbeat`] and
//!   [`Store::record_heartbeats`], and only
//!   when the heartbeat's `seq` is above the last applied one: a stale report
//!   never overwrites newer state. It does not bump `generation`.
//! - Secrets are stored as SHA-256 hex digests only.
//! - Metric history has three tiers (raw `samples`/`gpu_samples`, then
//!   `*_1m` and `*_1h` rollups): [`Store::rollup`] fills a tier up to its
//!   watermark, [`Store::enforce_retention`] never deletes rows the next tier
//!   has not rolled up yet, [`Store::metric_series`] and
//!   [`Store::fleet_series`] read any tier with the same bucket arithmetic.

mod agents;
mod api_keys;
mod connect;
mod deployments;
mod figures;
mod idempotency;
mod ingest;
mod instances;
mod rate_shares;
mod replicas;
mod rollup;
mod rows;
mod samples;
mod series;
mod staging;
mod teams;
mod timeline;
mod usage_hourly;

pub use api_keys::{
    ApiKeyId, ApiKeyIdError, ApiKeyRecord, NewApiKey, UsageCounts, UsageDelta, UsageRecord,
    UsageScope,
};
pub use deployments::{DeploymentEvent, DeploymentRecord, NewDeployment, NewDeploymentEvent};
pub use idempotency::{IdempotencyClaim, InsertOnce, KeyUse, IDEMPOTENCY_KEY_TTL};
pub use rate_shares::{RateShare, RATE_SHARE_MAX_AGE};
pub use replicas::{ChangeListener, DbChange, Fence, Lease, LeaseInfo};
pub use rollup::{RetentionReport, RollupReport};
pub use series::{
    FleetNow, FleetPoint, FleetSeries, FleetStatusFigures, GpuPoint, GpuSeries, MetricSeries,
    SystemPoint,
};
pub use staging::{staging_part, IngestSession, STAGING_PARTS};
pub use teams::{
    AccessTokenRecord, AuditEntry, AuditFilter, Membership, NewAuditEntry, ProjectRecord,
    SessionRecord, UserRecord,
};
pub use usage_hourly::{hour_of, HourlyUsage};

use chrono::{DateTime, Utc};
use gpufleet_domain::{
    DeploymentId, FailureReason, InstanceId, InstanceStatus, Milestones, ModelName, ProjectId,
    ProviderInstanceId, ProviderName,
};
use gpufleet_proto::EngineStatus;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL is neither `sqlite:`/a path nor `postgres://`.
    #[error("unsupported database URL {url:?}: use a sqlite: URL or a postgres:// URL")]
    UnsupportedUrl { url: String },
    #[error("could not connect to the database")]
    Connect(#[source] sqlx::Error),
    #[error("database migration failed")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error("database query failed")]
    Query(#[from] sqlx::Error),
    /// A compare-and-swap update lost: someone else changed the row first.
    #[error("instance {id} was changed concurrently (expected generation {expected})")]
    Conflict { id: InstanceId, expected: i64 },
    #[error("instance {id} not found")]
    NotFound { id: InstanceId },
    /// A compare-and-swap update of a deployment lost.
    #[error("deployment {id} was changed concurrently (expected generation {expected})")]
    DeploymentConflict { id: DeploymentId, expected: i64 },
    #[error("deployment {id} not found")]
    DeploymentNotFound { id: DeploymentId },
    /// Another deployment (not deleted) has this name.
    #[error("a deployment named {name:?} exists")]
    NameTaken { name: String },
    /// A write made under a lease that is no longer held (it expired or
    /// changed hands): nothing was written.
    #[error("lease {lease} is no longer held by this replica")]
    Fenced { lease: String },
    /// Only PostgreSQL can do this (e.g. listen for other replicas' changes).
    #[error("{what} needs PostgreSQL")]
    NeedsPostgres { what: &'static str },
    /// A row holds a value the code cannot read (e.g. an unknown status).
    #[error("corrupt row: {what}")]
    Corrupt { what: String },
    /// A metrics request the store will not run (e.g. too many points, a
    /// rollup of the raw tier).
    #[error("invalid metrics query: {what}")]
    InvalidQuery { what: String },
}

impl StoreError {
    /// The store was closed ([`Store::close`]): the process is shutting down.
    pub fn is_closed(&self) -> bool {
        matches!(self, StoreError::Query(sqlx::Error::PoolClosed))
    }
}

/// Which engine is behind the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// An instance as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub id: InstanceId,
    pub provider: ProviderName,
    pub zone: String,
    pub instance_type: String,
    pub model: ModelName,
    pub status: InstanceStatus,
    /// Why it failed, when `status` is `failed` (kept after archive).
    pub status_reason: Option<FailureReason>,
    /// Human-readable detail of the last status change or error.
    pub status_message: Option<String>,
    pub milestones: Milestones,
    /// Generated once when the provision intent is persisted; reused on every retry.
    pub idempotency_key: String,
    pub provider_instance_id: Option<ProviderInstanceId>,
    pub ip: Option<IpAddr>,
    /// Bumped on every lifecycle write (compare-and-swap token).
    pub generation: i64,
    /// Provider create attempts so far, and when the next may happen.
    pub provision_attempts: i32,
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// Past this, an instance still starting up fails with startup_timeout.
    pub startup_deadline_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub status_changed_at: DateTime<Utc>,
    pub ready_at: Option<DateTime<Utc>>,
    pub terminate_requested_at: Option<DateTime<Utc>>,
    pub terminated_at: Option<DateTime<Utc>>,
    /// When cleanup of a failed instance began (its machine is being deleted);
    /// late-heartbeat recovery is no longer possible after this.
    pub cleanup_started_at: Option<DateTime<Utc>>,
    /// When the provider confirmed the failed instance's machine gone.
    pub cleaned_up_at: Option<DateTime<Utc>>,
    /// Heartbeat columns (written only by `record_heartbeat`).
    pub last_heartbeat_seq: Option<i64>,
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    pub engine_status: Option<EngineStatus>,
    /// The engine's TLS certificate (PEM) reported by a cloud instance's
    /// agent; the router reaches that engine over mutual TLS trusting it
    /// alone. `None` for machines on this host (plain HTTP on loopback).
    #[serde(default)]
    pub engine_cert_pem: Option<String>,
    /// The deployment this instance is a replica of (`None`: created on its own).
    #[serde(default)]
    pub deployment_id: Option<DeploymentId>,
    /// Extra engine arguments it was started with (a deployment's).
    #[serde(default)]
    pub engine_args: Option<Vec<String>>,
    /// The project that owns it.
    #[serde(default = "ProjectId::default_project")]
    pub project_id: ProjectId,
    /// Its type's price per hour when it was created (`None`: unknown,
    /// e.g. created before prices were kept).
    #[serde(default)]
    pub price_per_hour: Option<f64>,
    /// Billable from: the provider made the machine.
    #[serde(default)]
    pub billing_started_at: Option<DateTime<Utc>>,
    /// Billable until: the provider said the machine is gone.
    #[serde(default)]
    pub billing_ended_at: Option<DateTime<Utc>>,
}

/// A new instance, with its provision intent.
#[derive(Debug, Clone, PartialEq)]
pub struct NewInstance {
    pub id: InstanceId,
    pub provider: ProviderName,
    pub zone: String,
    pub instance_type: String,
    pub model: ModelName,
    pub idempotency_key: String,
    /// SHA-256 hex of the one-time bootstrap secret.
    pub bootstrap_secret_hash: String,
    pub startup_deadline_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    /// The deployment it is a replica of.
    pub deployment_id: Option<DeploymentId>,
    /// Extra engine arguments (a deployment's `engine_args`).
    pub engine_args: Option<Vec<String>>,
    /// The project that owns it.
    pub project_id: ProjectId,
    /// Its type's price per hour now.
    pub price_per_hour: Option<f64>,
}

/// What to list.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InstanceFilter {
    /// Only these statuses (empty: all but archived, unless `include_archived`).
    pub statuses: Vec<InstanceStatus>,
    pub include_archived: bool,
    pub provider: Option<ProviderName>,
    /// Only instances of these projects (`None`: every project).
    pub projects: Option<Vec<ProjectId>>,
    pub limit: Option<i64>,
}

/// Kind of timeline entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimelineKind {
    /// A status transition.
    Transition,
    /// A call to the provider (with duration).
    ProviderCall,
    /// A probe or heartbeat observation.
    Probe,
    /// Something the agent reported.
    Agent,
    /// A user action through the API.
    User,
    /// Anything else worth a line.
    Note,
}

/// Outcome of a timeline entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    InProgress,
    Success,
    Failed,
    /// Not a failure: e.g. "no IP yet, waiting".
    Waiting,
    Info,
}

/// A timeline entry to append.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewTimelineEvent {
    pub instance_id: InstanceId,
    pub at: DateTime<Utc>,
    pub kind: TimelineKind,
    /// Dotted action name, e.g. `provider.create`, `status.change`, `agent.engine_exited`.
    pub action: String,
    pub outcome: Outcome,
    pub from_status: Option<InstanceStatus>,
    pub to_status: Option<InstanceStatus>,
    pub duration_ms: Option<i64>,
    /// Stable error code, e.g. `retryable`, `startup_timeout`.
    pub error_code: Option<String>,
    pub message: String,
    /// Free-form JSON details (attempt numbers, IPs, ...).
    pub metadata: serde_json::Value,
}

/// A stored timeline entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimelineEvent {
    /// Increasing per store.
    pub id: i64,
    #[serde(flatten)]
    pub event: NewTimelineEvent,
}

/// One heartbeat's figures as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleRecord {
    pub instance_id: InstanceId,
    pub seq: i64,
    pub at: DateTime<Utc>,
    pub system: gpufleet_proto::SystemSample,
    pub gpu_source: gpufleet_proto::GpuSource,
    pub gpus: Vec<gpufleet_proto::GpuSample>,
    pub engine: gpufleet_proto::EngineSample,
}

/// Result of recording a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeartbeatOutcome {
    /// Newer than anything seen: heartbeat columns updated, sample stored.
    Applied,
    /// `seq` not above the last applied one: nothing written.
    Stale,
    /// Only from [`Store::record_heartbeats`]: no such instance; nothing written.
    /// ([`Store::record_heartbeat`] answers `StoreError::NotFound` instead.)
    UnknownInstance,
    /// Only from [`Store::record_heartbeats`]: a value that cannot be stored
    /// (a seq or byte count above the BIGINT range, a NaN or infinite
    /// figure); nothing written. ([`Store::record_heartbeat`] answers an error.)
    Invalid,
}

/// Result of an agent registration attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterOutcome {
    /// The secret matched and was consumed; the token hash is stored.
    Registered,
    /// No such instance, wrong secret, or the secret was already used.
    Rejected,
}

impl TimelineKind {
    pub const ALL: [TimelineKind; 6] = [
        Self::Transition,
        Self::ProviderCall,
        Self::Probe,
        Self::Agent,
        Self::User,
        Self::Note,
    ];

    /// The stored (and serialised) name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Transition => "transition",
            Self::ProviderCall => "provider_call",
            Self::Probe => "probe",
            Self::Agent => "agent",
            Self::User => "user",
            Self::Note => "note",
        }
    }
}

impl fmt::Display for TimelineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no [`TimelineKind`] or [`Outcome`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {value:?}")]
pub struct UnknownName {
    pub what: &'static str,
    pub value: String,
}

impl FromStr for TimelineKind {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownName {
                what: "timeline kind",
                value: s.to_string(),
            })
    }
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [
        Self::InProgress,
        Self::Success,
        Self::Failed,
        Self::Waiting,
        Self::Info,
    ];

    /// The stored (and serialised) name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InProgress => "in_progress",
            Self::Success => "success",
            Self::Failed => "failed",
            Self::Waiting => "waiting",
            Self::Info => "info",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Outcome {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|o| o.as_str() == s)
            .ok_or_else(|| UnknownName {
                what: "timeline outcome",
                value: s.to_string(),
            })
    }
}

/// The database.
///
/// Why `sqlx::AnyPool` rather than one pool type per engine: every query is
/// written once, with `$N` placeholders (SQLite's sqlx driver maps `$N` to the
/// N-th argument, so the same text runs on both engines), and the schema uses
/// only types the Any driver carries both ways: TEXT, BIGINT and DOUBLE
/// PRECISION. Booleans are stored as BIGINT 0/1 because Any does not decode a
/// SQLite integer as `bool`. Engine differences live in the migrations
/// (autoincrement ids) and in [`Store::connect`] (pool and pragma settings).
#[derive(Clone)]
pub struct Store {
    pool: sqlx::AnyPool,
    backend: Backend,
    /// The PostgreSQL URL, for the change listener's own connection.
    pg_url: Option<std::sync::Arc<str>>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl Store {
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// How a write transaction begins. On SQLite it takes the write lock up
    /// front (`BEGIN IMMEDIATE`): a deferred transaction that reads first
    /// fails with `SQLITE_BUSY` when it upgrades after another writer committed.
    fn begin_write_sql(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "BEGIN IMMEDIATE",
            Backend::Postgres => "BEGIN",
        }
    }

    /// A transaction that will write ([`Store::begin_write_sql`]).
    pub(crate) async fn begin_write(
        &self,
    ) -> Result<sqlx::Transaction<'static, sqlx::Any>, StoreError> {
        Ok(self.pool.begin_with(self.begin_write_sql()).await?)
    }

    /// [`Store::begin_write`] on a connection of the caller's.
    pub(crate) async fn begin_write_on<'c>(
        &self,
        conn: &'c mut sqlx::AnyConnection,
    ) -> Result<sqlx::Transaction<'c, sqlx::Any>, StoreError> {
        use sqlx::Connection;
        Ok(conn.begin_with(self.begin_write_sql()).await?)
    }

    /// Close every connection; the store is unusable afterwards. Waits for
    /// connections in use to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// This database's cluster id, generated on first use and stable after;
    /// tagged on every provider machine.
    pub async fn cluster_id(&self) -> Result<String, StoreError> {
        let candidate = uuid::Uuid::new_v4().simple().to_string();
        sqlx::query(
            "INSERT INTO meta (key, value) VALUES ('cluster_id', $1) \
             ON CONFLICT (key) DO NOTHING",
        )
        .bind(candidate)
        .execute(&self.pool)
        .await?;
        let id: String = sqlx::query_scalar("SELECT value FROM meta WHERE key = 'cluster_id'")
            .fetch_one(&self.pool)
            .await?;
        Ok(id)
    }

    /// A random server-side key, generated on first use and stable after,
    /// from which the control plane derives per-instance bootstrap secrets
    /// (so only their digests are stored). Never leaves the control plane.
    pub async fn secret_key(&self) -> Result<String, StoreError> {
        let candidate = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        sqlx::query(
            "INSERT INTO meta (key, value) VALUES ('secret_key', $1) \
             ON CONFLICT (key) DO NOTHING",
        )
        .bind(candidate)
        .execute(&self.pool)
        .await?;
        let key: String = sqlx::query_scalar("SELECT value FROM meta WHERE key = 'secret_key'")
            .fetch_one(&self.pool)
            .await?;
        Ok(key)
    }
}
