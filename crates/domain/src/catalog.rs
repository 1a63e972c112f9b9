//! What a provider offers: zones and instance types.

use serde::{Deserialize, Serialize};

/// A provider zone, e.g. `fr-par-2` or `local-1`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Zone {
    /// Zone name as the provider spells it.
    pub name: String,
    /// Human-readable place, e.g. "Paris 2".
    pub description: String,
}

/// The GPUs of an instance type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GpuSpec {
    /// Model name as NVML reports it, e.g. "NVIDIA L4".
    pub model: String,
    /// Number of GPUs.
    pub count: u32,
    /// Memory of one GPU, in MiB.
    pub vram_mib: u64,
    /// Board power limit of one GPU, in watts.
    pub power_limit_w: f64,
}

/// A machine shape a provider sells.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InstanceType {
    /// Provider's name for the type, e.g. "L4-1-24G".
    pub name: String,
    pub gpu: GpuSpec,
    pub vcpus: u32,
    pub ram_mib: u64,
    /// Price per hour in the provider's currency.
    pub price_per_hour: f64,
    /// ISO 4217 currency code, e.g. "EUR".
    pub currency: String,
    /// Zones in which the type is offered.
    pub zones: Vec<String>,
}
