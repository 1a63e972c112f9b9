//! Errors of the control plane's commands, shaped for the HTTP edge to map.

use gpufleet_providers::ProviderError;
use gpufleet_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Bad input: names the offending field.
    #[error("invalid {field}: {message}")]
    InvalidInput {
        field: &'static str,
        message: String,
    },
    /// A deployment spec that cannot be served; names the field by its path
    /// (e.g. `placements[1].instance_type`).
    #[error(transparent)]
    InvalidSpec(#[from] gpufleet_domain::SpecError),
    /// The thing asked for does not exist.
    #[error("{what} {id} not found")]
    NotFound { what: &'static str, id: String },
    /// The request is valid but the instance's state forbids it.
    #[error("{message}")]
    Conflict { message: String },
    /// Missing or wrong credentials.
    #[error("{message}")]
    Unauthorized { message: String },
    /// Valid credentials, but not for this resource.
    #[error("{message}")]
    Forbidden { message: String },
    /// An idempotency key used before, within its lifetime, with another
    /// request.
    #[error("idempotency key {key:?} was used with a different request; use a new key for a new request")]
    IdempotencyKeyReused { key: String },
    /// A provider could not answer right now.
    #[error("provider {provider} is unavailable")]
    ProviderUnavailable {
        provider: String,
        #[source]
        source: ProviderError,
    },
    #[error("storage failure")]
    Store(#[from] StoreError),
    /// A heartbeat with impossible figures; names the field (e.g. `gpus[0].util_pct`).
    #[error(transparent)]
    InvalidHeartbeat(#[from] crate::validate::HeartbeatRejected),
    /// Overloaded or briefly unable to serve (e.g. the heartbeat queue is
    /// full); the client should retry.
    #[error("{message}")]
    Unavailable { message: String },
}

impl ControlError {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidInput {
            field,
            message: message.into(),
        }
    }
    pub fn not_found(what: &'static str, id: impl ToString) -> Self {
        Self::NotFound {
            what,
            id: id.to_string(),
        }
    }
}
