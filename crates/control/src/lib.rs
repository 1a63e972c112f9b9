//! The control plane's core.
//!
//! - [`wiring`]: builds everything below over a store and the providers
//!   ([`ControlPlane`]); what `gpufleet up` calls.
//! - [`Fleet`]: the commands on instances (create, terminate, archive,
//!   reads). Commands only *record intent* in the store and wake the
//!   reconcilers; they never call a provider inline.
//! - [`Deployments`]: the commands on deployments (a model's serving
//!   declared once); the [`reconcilers::Keeper`] keeps their replicas.
//! - [`agents::AgentService`]: agent registration, token authentication,
//!   heartbeat ingestion (with [`validate`] and the batching writer in
//!   `ingest`), the engine's environment and certificate, agent events.
//! - [`lifecycle::Lifecycle`]: the one write path for instance records
//!   (compare-and-swap, timeline entries in the same transaction, publish on
//!   the [`bus`] after the commit), used by all of the above.
//! - [`reconcilers`]: small level-triggered workers of one shape (see
//!   [`driver::Reconciler`]) that look at the whole store, do one bounded batch
//!   of idempotent work (provider calls preceded by persisted intent) and
//!   report a typed status.
//! - [`driver`]: runs each reconciler periodically and when woken through a
//!   [`Waker`] (by [`TaskName`]), never twice at once, and keeps its last
//!   status for `GET /api/v1/system/tasks`.
//! - [`catalog`], [`history`], [`telemetry`]: reads (the providers' catalogs
//!   and models; metric history; Prometheus metrics).

pub mod accounts;
pub mod agents;
pub mod bus;
pub mod catalog;
pub mod config;
pub mod deployments;
pub mod driver;
pub mod error;
pub mod fleet;
pub mod history;
mod ingest;
pub mod lifecycle;
pub mod metered;
pub mod reconcilers;
pub mod secrets;
pub mod spend;
pub mod telemetry;
pub mod timeline;
pub mod traffic;
pub mod validate;
pub mod wiring;

pub use accounts::Accounts;
pub use agents::AgentService;
pub use bus::{ChangeKind, InstanceChange, KeyChange};
pub use catalog::Catalogs;
pub use config::{ControlConfig, EngineConfig, IngestConfig, ModelSpec, SecretEnv};
pub use deployments::{CreateDeployment, DeploymentPatch, Deployments};
pub use driver::{TaskName, TaskReport, TaskStatus, Tasks, Waker};
pub use error::ControlError;
pub use fleet::{CreateInstances, CreatedOnce, Fleet};
pub use history::History;
pub use spend::Spend;
pub use traffic::TrafficSource;
pub use wiring::ControlPlane;
