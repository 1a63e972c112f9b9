//! Providers: where machines come from.
//!
//! A [`Provider`] creates, inspects, lists and deletes machines and describes
//! what it sells. Every call returns a typed [`ProviderError`] so the control
//! plane can tell "try again" from "give up" from "no capacity" from "gone".
//!
//! Contract every implementation keeps:
//! - `create` is idempotent on `CreateRequest::idempotency_key`: a second call
//!   with the same key returns the machine the first one made, never a new one.
//! - every machine carries the request's tags, and `list` filters by tags, so
//!   orphans can be found by listing.
//! - `get` of a machine that no longer exists is `Err(NotFound)`;
//!   `terminate` of one is `Ok(())` (idempotent).

pub mod cloudinit;
pub mod fault;
pub mod mock;
pub mod remote;
pub mod scaleway;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use gpufleet_domain::{InstanceId, InstanceType, ProviderInstanceId, ProviderName, Zone};
use gpufleet_proto::{AgentBootstrap, EngineSpec};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

/// Tag keys gpufleet puts on every machine.
pub mod tags {
    /// The control plane's cluster id (one per database).
    pub const CLUSTER: &str = "gpufleet-cluster";
    /// gpufleet's instance id.
    pub const INSTANCE: &str = "gpufleet-instance";
}

/// What can go wrong in a provider call.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProviderError {
    /// Temporary: network trouble, rate limit, 5xx. Retry later with the same request.
    #[error("provider temporarily failed: {message}")]
    Retryable {
        message: String,
        /// How long the provider asked to wait first (its `Retry-After`).
        retry_after_secs: Option<u64>,
    },
    /// Will fail again however often it is retried.
    #[error("provider refused: {message}")]
    Permanent { message: String },
    /// No stock of this type in this zone right now.
    #[error("provider is out of capacity: {message}")]
    OutOfCapacity { message: String },
    /// The machine does not exist (any more).
    #[error("machine {id} not found at the provider")]
    NotFound { id: ProviderInstanceId },
    /// The request names something the provider does not offer.
    #[error("invalid {field}: {message}")]
    InvalidRequest {
        field: &'static str,
        message: String,
    },
}

impl ProviderError {
    /// A `Retryable` error, with the provider's `Retry-After` hint if any.
    pub fn retryable_after(message: impl Into<String>, retry_after_secs: Option<u64>) -> Self {
        Self::Retryable {
            message: message.into(),
            retry_after_secs,
        }
    }
    /// A `Retryable` error without a hint.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self::retryable_after(message, None)
    }
    /// How long the provider asked to wait before the next try (its
    /// `Retry-After`), for a `Retryable` error that carries one. A caller's
    /// backoff should wait at least this long.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            Self::Retryable {
                retry_after_secs: Some(s),
                ..
            } => Some(std::time::Duration::from_secs(*s)),
            _ => None,
        }
    }
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Retryable { .. })
    }
    /// Short stable code for timelines and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Retryable { .. } => "retryable",
            Self::Permanent { .. } => "permanent",
            Self::OutOfCapacity { .. } => "out_of_capacity",
            Self::NotFound { .. } => "not_found",
            Self::InvalidRequest { .. } => "invalid_request",
        }
    }
}

/// Ask for one machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateRequest {
    pub instance_id: InstanceId,
    /// Generated once when the intent is persisted; reused on every retry.
    pub idempotency_key: String,
    pub zone: String,
    pub instance_type: String,
    /// At least [`tags::CLUSTER`] and [`tags::INSTANCE`].
    pub tags: BTreeMap<String, String>,
    /// What the machine needs to start its agent (cloud-init user data on clouds).
    pub bootstrap: AgentBootstrap,
    /// Size of the model's weights in MiB as the model list knows it (0:
    /// unknown); clouds size the model-cache volume from it.
    pub model_size_mib: u64,
    /// No earlier call with this idempotency key can have reached the
    /// provider (the first attempt, persisted before the call): a provider
    /// may skip looking for what an earlier attempt made.
    pub first_attempt: bool,
}

/// A machine's state as the provider reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MachineState {
    /// Accepted, not running yet.
    Pending,
    Running,
    Stopping,
    Stopped,
}

/// A machine as the provider sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    pub id: ProviderInstanceId,
    pub state: MachineState,
    /// `None` while the provider has not assigned one yet (normal while booting).
    pub ip: Option<IpAddr>,
    pub zone: String,
    pub instance_type: String,
    pub tags: BTreeMap<String, String>,
    pub created_at: DateTime<Utc>,
}

/// What a provider sells.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Catalog {
    pub zones: Vec<Zone>,
    pub instance_types: Vec<InstanceType>,
}

impl Catalog {
    pub fn instance_type(&self, name: &str) -> Option<&InstanceType> {
        self.instance_types.iter().find(|t| t.name == name)
    }
}

/// What kind of billable resource, besides machines, a provider made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResourceKind {
    /// A public IP address.
    Ip,
    /// A block volume.
    Volume,
}

/// A billable resource other than a machine (a public IP, a volume), as the
/// provider lists it for the orphan reaper.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resource {
    pub kind: ResourceKind,
    /// The provider's id for it.
    pub id: String,
    pub zone: String,
    pub tags: BTreeMap<String, String>,
    /// The machine it is attached to, if any.
    pub attached_to: Option<ProviderInstanceId>,
    pub created_at: DateTime<Utc>,
}

/// A place machines come from.
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// The name instances refer to, e.g. `mock`.
    fn name(&self) -> &ProviderName;
    /// Create a machine, or return the one already made for this idempotency key.
    async fn create(&self, req: &CreateRequest) -> Result<Machine, ProviderError>;
    /// Current state and IP of a machine.
    async fn get(&self, id: &ProviderInstanceId) -> Result<Machine, ProviderError>;
    /// Ask for deletion. Idempotent: `Ok(())` if it is already gone. The
    /// machine may linger (state `Stopping`) until `get` returns `NotFound`.
    async fn terminate(&self, id: &ProviderInstanceId) -> Result<(), ProviderError>;
    /// Every existing machine carrying all of `tags`.
    async fn list(&self, tags: &BTreeMap<String, String>) -> Result<Vec<Machine>, ProviderError>;
    /// Zones and instance types.
    async fn catalog(&self) -> Result<Catalog, ProviderError>;
    /// Whether machines run on this very host (the Mock provider): their
    /// agents reach the control plane where it listens, not at its public URL.
    fn machines_on_this_host(&self) -> bool {
        false
    }
    /// The engine this provider's machines run, when it differs from the
    /// control plane's default (clouds run vLLM in a container).
    fn engine(&self) -> Option<EngineSpec> {
        None
    }
    /// Billable resources other than machines (IPs, volumes) carrying all of
    /// `tags`, attached or not. Providers that make none list none.
    async fn list_resources(
        &self,
        _tags: &BTreeMap<String, String>,
    ) -> Result<Vec<Resource>, ProviderError> {
        Ok(Vec::new())
    }
    /// Delete one such resource. Idempotent: `Ok(())` if it is already gone.
    async fn delete_resource(&self, _resource: &Resource) -> Result<(), ProviderError> {
        Ok(())
    }
}

/// Providers by name.
#[derive(Clone, Default)]
pub struct ProviderRegistry {
    providers: BTreeMap<ProviderName, Arc<dyn Provider>>,
}

impl ProviderRegistry {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn register(&mut self, provider: Arc<dyn Provider>) {
        self.providers.insert(provider.name().clone(), provider);
    }
    pub fn get(&self, name: &ProviderName) -> Option<&Arc<dyn Provider>> {
        self.providers.get(name)
    }
    pub fn names(&self) -> impl Iterator<Item = &ProviderName> {
        self.providers.keys()
    }
    pub fn iter(&self) -> impl Iterator<Item = (&ProviderName, &Arc<dyn Provider>)> {
        self.providers.iter()
    }
}
