//! The control plane's core.
//!
//! - [`Fleet`]: the commands (create, terminate, archive, agent registration,
//!   heartbeat ingestion). Commands only *record intent* in the store and wake
//!   the reconcilers; they never call a provider inline.
//! - [`reconcilers`]: small level-triggered workers of one shape (see
//!   [`driver::Reconciler`]) that look at the whole store, do one bounded batch
//!   of idempotent work (provider calls preceded by persisted intent) and
//!   report a typed status.
//! - [`driver`]: runs each reconciler periodically and on demand, never twice
//!   at once, and keeps its last status for `GET /api/v1/system/tasks`.
//! - [`bus`]: instance changes broadcast to subscribers (the SSE stream).

pub mod bus;
pub mod config;
pub mod driver;
pub mod error;
pub mod fleet;
pub mod history;
mod ingest;
pub mod metered;
pub mod reconcilers;
pub mod secrets;
pub mod telemetry;
pub mod timeline;
pub mod traffic;
pub mod validate;

pub use bus::{ChangeKind, InstanceChange, KeyChange};
pub use config::{ControlConfig, EngineConfig, IngestConfig, ModelSpec, SecretEnv};
pub use driver::{TaskReport, TaskStatus};
pub use error::ControlError;
pub use fleet::{CreateInstances, Fleet};
pub use traffic::TrafficSource;
