//! The public JSON shapes of the API. Clients (the CLI, the console) use
//! these same types.

use chrono::{DateTime, Utc};
use gpufleet_domain::{FailureReason, InstanceId, InstanceStatus, InstanceType, Zone};
use serde::{Deserialize, Serialize};
use std::net::IpAddr;

/// `POST /api/v1/instances` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreateInstancesBody {
    /// Provider name, e.g. `mock`.
    pub provider: String,
    /// Zone; default: the first zone offering the type.
    #[serde(default)]
    pub zone: Option<String>,
    /// Instance type name from `GET /api/v1/providers/{name}/instance-types`.
    pub instance_type: String,
    /// Model from `GET /api/v1/models`.
    pub model: String,
    /// How many instances (default 1).
    #[serde(default)]
    pub count: Option<u32>,
}

/// An instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InstanceView {
    pub id: InstanceId,
    pub status: InstanceStatus,
    /// Why it failed, when `status` is `failed`.
    pub status_reason: Option<FailureReason>,
    /// Detail of the last status change or error.
    pub status_message: Option<String>,
    /// 0–100: progress of the current journey (to ready, or to terminated).
    pub progress: u8,
    pub provider: String,
    pub zone: String,
    pub instance_type: String,
    pub model: String,
    #[schema(value_type = Option<String>)]
    pub ip: Option<IpAddr>,
    pub provider_instance_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub ready_at: Option<DateTime<Utc>>,
    pub terminated_at: Option<DateTime<Utc>>,
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    /// Increases on every lifecycle change.
    pub generation: i64,
}

/// `POST /api/v1/instances` answer (202).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreatedInstances {
    pub instances: Vec<InstanceView>,
}

/// `GET /api/v1/instances` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InstanceList {
    pub instances: Vec<InstanceView>,
}

/// One timeline entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TimelineEntryView {
    pub id: i64,
    pub at: DateTime<Utc>,
    /// transition, provider_call, probe, agent, user, note
    pub kind: String,
    /// e.g. `provider.create`, `status.change`
    pub action: String,
    /// in_progress, success, failed, waiting, info
    pub outcome: String,
    pub from_status: Option<InstanceStatus>,
    pub to_status: Option<InstanceStatus>,
    pub duration_ms: Option<i64>,
    pub error_code: Option<String>,
    pub message: String,
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
}

/// `GET /api/v1/instances/{id}/events` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Timeline {
    pub instance_id: InstanceId,
    pub events: Vec<TimelineEntryView>,
}

/// One sample (one heartbeat's figures).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SampleView {
    pub at: DateTime<Utc>,
    pub seq: i64,
    pub system: gpufleet_proto::SystemSample,
    pub gpu_source: gpufleet_proto::GpuSource,
    pub gpus: Vec<gpufleet_proto::GpuSample>,
    pub engine: gpufleet_proto::EngineSample,
}

/// `GET /api/v1/instances/{id}/metrics` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InstanceMetrics {
    pub instance_id: InstanceId,
    /// The newest sample, if any.
    pub latest: Option<SampleView>,
    /// Recent samples, oldest first.
    pub samples: Vec<SampleView>,
}

/// `GET /api/v1/providers` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProviderView {
    pub name: String,
    pub zones: Vec<Zone>,
    pub instance_type_count: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProviderList {
    pub providers: Vec<ProviderView>,
}

/// `GET /api/v1/providers/{name}/instance-types` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InstanceTypeList {
    pub provider: String,
    pub instance_types: Vec<InstanceType>,
}

/// `GET /api/v1/models` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModelView {
    pub name: String,
    pub description: String,
    pub min_vram_mib: u64,
    /// Instances of this model that are ready now.
    pub ready_instances: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModelList {
    pub models: Vec<ModelView>,
}

/// Error body: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `invalid_request`, `not_found`, `conflict`, `unauthorized`.
    pub code: String,
    /// Human-readable; names the offending field for bad input.
    pub message: String,
    /// The offending field, for bad input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

// ---------------------------------------------------------------------------
// Conversions from the store's records. The only place that decides how a
// stored value is shown.

impl From<&gpufleet_store::InstanceRecord> for InstanceView {
    fn from(r: &gpufleet_store::InstanceRecord) -> Self {
        InstanceView {
            id: r.id,
            status: r.status,
            status_reason: r.status_reason,
            status_message: r.status_message.clone(),
            progress: gpufleet_domain::progress(r.status, r.milestones),
            provider: r.provider.to_string(),
            zone: r.zone.clone(),
            instance_type: r.instance_type.clone(),
            model: r.model.to_string(),
            ip: r.ip,
            provider_instance_id: r.provider_instance_id.as_ref().map(|p| p.to_string()),
            created_at: r.created_at,
            updated_at: r.updated_at,
            ready_at: r.ready_at,
            terminated_at: r.terminated_at,
            last_heartbeat_at: r.last_heartbeat_at,
            generation: r.generation,
        }
    }
}

impl InstanceList {
    pub fn from_records(records: &[gpufleet_store::InstanceRecord]) -> Self {
        InstanceList {
            instances: records.iter().map(InstanceView::from).collect(),
        }
    }
}

impl From<&gpufleet_store::TimelineEvent> for TimelineEntryView {
    fn from(t: &gpufleet_store::TimelineEvent) -> Self {
        let e = &t.event;
        TimelineEntryView {
            id: t.id,
            at: e.at,
            kind: e.kind.as_str().to_string(),
            action: e.action.clone(),
            outcome: e.outcome.as_str().to_string(),
            from_status: e.from_status,
            to_status: e.to_status,
            duration_ms: e.duration_ms,
            error_code: e.error_code.clone(),
            message: e.message.clone(),
            metadata: e.metadata.clone(),
        }
    }
}

impl From<&gpufleet_store::SampleRecord> for SampleView {
    fn from(s: &gpufleet_store::SampleRecord) -> Self {
        SampleView {
            at: s.at,
            seq: s.seq,
            system: s.system.clone(),
            gpu_source: s.gpu_source,
            gpus: s.gpus.clone(),
            engine: s.engine.clone(),
        }
    }
}

impl InstanceMetrics {
    /// From samples as the store returns them, newest first.
    pub fn from_newest_first(
        instance_id: InstanceId,
        newest_first: &[gpufleet_store::SampleRecord],
    ) -> Self {
        let latest = newest_first.first().map(SampleView::from);
        let samples = newest_first.iter().rev().map(SampleView::from).collect();
        InstanceMetrics {
            instance_id,
            latest,
            samples,
        }
    }
}

/// `GET /api/v1/system/tasks` answer.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TaskList {
    pub tasks: Vec<gpufleet_control::TaskStatus>,
}

/// `GET /healthz` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Health {
    /// Always `ok` when the process serves requests.
    pub status: String,
}
