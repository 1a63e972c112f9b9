//! The public JSON shapes of the API. Clients (the CLI, the console) use
//! these same types.

use chrono::{DateTime, Utc};
use gpufleet_domain::{
    Autoscaling, DeploymentAction, DeploymentId, DeploymentState, FailureReason, HumanDuration,
    InstanceId, InstanceStatus, InstanceType, ModelName, Placement, ProjectId, ProviderName,
    ReplicaBounds, Zone,
};
use serde::{Deserialize, Serialize};
use std::net::IpAddr;

pub use crate::spend::{SpendGroupView, SpendSeriesView, SpendTotalView, SpendView};

/// `POST /api/v1/instances` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreateInstancesBody {
    /// The project that will own them (default: `default` for the admin
    /// token, else the caller's only project where they may operate).
    #[serde(default)]
    #[schema(value_type = Option<String>, pattern = "^[a-z0-9][a-z0-9-]{0,38}$")]
    pub project: Option<String>,
    /// Provider name, e.g. `mock`.
    #[schema(value_type = ProviderName)]
    pub provider: String,
    /// Zone; default: the first zone offering the type.
    #[serde(default)]
    #[schema(
        min_length = 1,
        pattern = "[^\\t\\n\\v\\f\\r \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]",
        examples("local-1")
    )]
    pub zone: Option<String>,
    /// Instance type name from `GET /api/v1/providers/{name}/instance-types`.
    #[schema(
        min_length = 1,
        pattern = "[^\\t\\n\\v\\f\\r \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]",
        examples("mock-l4-1")
    )]
    pub instance_type: String,
    /// Model from `GET /api/v1/models`.
    #[schema(value_type = ModelName)]
    pub model: String,
    /// How many instances (default 1; at most the server's
    /// `max_instances_per_request`, the `maximum` here).
    #[serde(default)]
    #[schema(minimum = 1)]
    pub count: Option<u32>,
}

/// A bucket width of `GET /api/v1/instances/{id}/metrics`: one of the
/// allowed steps, written as the server writes them.
pub struct MetricStep;

impl utoipa::PartialSchema for MetricStep {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        let steps = gpufleet_domain::metrics::ALLOWED_STEPS_MS
            .iter()
            .filter_map(|ms| gpufleet_domain::metrics::Step::from_millis(*ms))
            .map(|s| s.to_string());
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .enum_values(Some(steps))
            .into()
    }
}
impl utoipa::ToSchema for MetricStep {}

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
    /// The deployment this instance is a replica of (null: created on its own).
    pub deployment_id: Option<DeploymentId>,
    /// The project that owns it.
    pub project_id: ProjectId,
    /// Its type's price per hour when it was created (null: unknown, an
    /// instance created before prices were kept).
    pub price_per_hour: Option<f64>,
    /// Billable from: when the provider made its machine.
    pub billing_started_at: Option<DateTime<Utc>>,
    /// Billable until: when the provider said the machine is gone (null
    /// while it is billable).
    pub billing_ended_at: Option<DateTime<Utc>>,
    /// What it has cost: billable time (until now while billable) × its
    /// price per hour; null before its machine exists or without a price.
    pub cost_so_far: Option<f64>,
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
    /// Details of the entry (an object), or null when it has none.
    #[schema(value_type = Option<Object>)]
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
    /// History over a window, in aligned buckets: present when the query
    /// gave `from`, `to` or `step`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub series: Option<MetricSeriesView>,
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
            deployment_id: r.deployment_id,
            project_id: r.project_id.clone(),
            price_per_hour: r.price_per_hour,
            billing_started_at: r.billing_started_at,
            billing_ended_at: r.billing_ended_at,
            cost_so_far: gpufleet_control::spend::instance_cost(r, Utc::now()),
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
            series: None,
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

// ---------------------------------------------------------------------------
// Metric history, fleet figures and Prometheus service discovery.

/// One instance's history over `[from, to)`. Every series has one value per
/// entry of `timestamps` (`null` where the bucket holds no sample), so they
/// plot as they are. Averages over each bucket unless named `_max`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MetricSeriesView {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// Bucket width actually used, e.g. `5s`, `1m` (the tier's resolution
    /// when coarser than the step asked for).
    pub step: String,
    /// Where the figures came from: `raw`, `minute` or `hour`.
    pub tier: String,
    /// Bucket starts (`floor(t / step) * step`), ascending.
    pub timestamps: Vec<DateTime<Utc>>,
    /// Heartbeats behind each bucket (0: none).
    pub samples: Vec<i64>,
    pub cpu_pct: Vec<Option<f64>>,
    pub cpu_pct_max: Vec<Option<f64>>,
    pub load1: Vec<Option<f64>>,
    /// Host memory used, percent of total.
    pub mem_pct: Vec<Option<f64>>,
    /// Disk used (the agent's data filesystem), percent of total.
    pub disk_pct: Vec<Option<f64>>,
    pub net_rx_bps: Vec<Option<f64>>,
    pub net_tx_bps: Vec<Option<f64>>,
    pub requests_running: Vec<Option<f64>>,
    pub requests_waiting: Vec<Option<f64>>,
    /// KV-cache usage, 0–1.
    pub kv_cache_usage: Vec<Option<f64>>,
    pub kv_cache_usage_max: Vec<Option<f64>>,
    pub prompt_tokens_per_s: Vec<Option<f64>>,
    pub generation_tokens_per_s: Vec<Option<f64>>,
    /// Mean time to first token, in seconds.
    pub ttft_s: Vec<Option<f64>>,
    pub ttft_s_max: Vec<Option<f64>>,
    /// One entry per GPU index, ascending.
    pub gpus: Vec<GpuSeriesView>,
}

/// One GPU's history, aligned with [`MetricSeriesView::timestamps`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GpuSeriesView {
    pub index: u32,
    pub util_pct: Vec<Option<f64>>,
    pub util_pct_max: Vec<Option<f64>>,
    pub vram_used_mib: Vec<Option<f64>>,
    pub vram_total_mib: Vec<Option<f64>>,
    pub temp_c: Vec<Option<f64>>,
    pub temp_c_max: Vec<Option<f64>>,
    pub power_w: Vec<Option<f64>>,
    pub power_w_max: Vec<Option<f64>>,
    pub power_limit_w: Vec<Option<f64>>,
}

fn pct(used: f64, total: f64) -> Option<f64> {
    (total > 0.0).then(|| used / total * 100.0)
}

/// Bucket starts covering `[from, to)` in steps of `step_ms`.
fn bucket_starts(from: DateTime<Utc>, to: DateTime<Utc>, step_ms: i64) -> Vec<i64> {
    let step_ms = step_ms.max(1);
    let end = to.timestamp_millis();
    let mut b = from.timestamp_millis().div_euclid(step_ms) * step_ms;
    let mut out = Vec::new();
    while b < end {
        out.push(b);
        b += step_ms;
    }
    out
}

fn ms_time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// Places values at their bucket's index.
struct Aligner {
    start: i64,
    step: i64,
    len: usize,
}

impl Aligner {
    fn index(&self, bucket: DateTime<Utc>) -> Option<usize> {
        let off = bucket.timestamp_millis() - self.start;
        if off < 0 || off % self.step != 0 {
            return None;
        }
        let i = (off / self.step) as usize;
        (i < self.len).then_some(i)
    }
    fn empty(&self) -> Vec<Option<f64>> {
        vec![None; self.len]
    }
}

impl From<&gpufleet_store::MetricSeries> for MetricSeriesView {
    fn from(m: &gpufleet_store::MetricSeries) -> Self {
        let step = m.step.as_millis();
        let starts = bucket_starts(m.from, m.to, step);
        let a = Aligner {
            start: starts.first().copied().unwrap_or(0),
            step,
            len: starts.len(),
        };
        let mut v = MetricSeriesView {
            from: m.from,
            to: m.to,
            step: m.step.to_string(),
            tier: m.tier.as_str().to_string(),
            timestamps: starts.iter().map(|b| ms_time(*b)).collect(),
            samples: vec![0; a.len],
            cpu_pct: a.empty(),
            cpu_pct_max: a.empty(),
            load1: a.empty(),
            mem_pct: a.empty(),
            disk_pct: a.empty(),
            net_rx_bps: a.empty(),
            net_tx_bps: a.empty(),
            requests_running: a.empty(),
            requests_waiting: a.empty(),
            kv_cache_usage: a.empty(),
            kv_cache_usage_max: a.empty(),
            prompt_tokens_per_s: a.empty(),
            generation_tokens_per_s: a.empty(),
            ttft_s: a.empty(),
            ttft_s_max: a.empty(),
            gpus: Vec::new(),
        };
        for p in &m.points {
            let Some(i) = a.index(p.bucket) else { continue };
            v.samples[i] = p.samples;
            v.cpu_pct[i] = Some(p.cpu_pct_avg);
            v.cpu_pct_max[i] = Some(p.cpu_pct_max);
            v.load1[i] = Some(p.load1_avg);
            v.mem_pct[i] = pct(p.mem_used_bytes_avg, p.mem_total_bytes);
            v.disk_pct[i] = pct(p.disk_used_bytes_avg, p.disk_total_bytes);
            v.net_rx_bps[i] = Some(p.net_rx_bps_avg);
            v.net_tx_bps[i] = Some(p.net_tx_bps_avg);
            v.requests_running[i] = Some(p.requests_running_avg);
            v.requests_waiting[i] = Some(p.requests_waiting_avg);
            v.kv_cache_usage[i] = p.kv_cache_usage_avg;
            v.kv_cache_usage_max[i] = p.kv_cache_usage_max;
            v.prompt_tokens_per_s[i] = p.prompt_tokens_per_s_avg;
            v.generation_tokens_per_s[i] = p.generation_tokens_per_s_avg;
            v.ttft_s[i] = p.ttft_mean_s_avg;
            v.ttft_s_max[i] = p.ttft_mean_s_max;
        }
        for g in &m.gpus {
            let mut s = GpuSeriesView {
                index: g.gpu_index,
                util_pct: a.empty(),
                util_pct_max: a.empty(),
                vram_used_mib: a.empty(),
                vram_total_mib: a.empty(),
                temp_c: a.empty(),
                temp_c_max: a.empty(),
                power_w: a.empty(),
                power_w_max: a.empty(),
                power_limit_w: a.empty(),
            };
            for p in &g.points {
                let Some(i) = a.index(p.bucket) else { continue };
                s.util_pct[i] = p.util_pct_avg;
                s.util_pct_max[i] = p.util_pct_max;
                s.vram_used_mib[i] = Some(p.mem_used_mib_avg);
                s.vram_total_mib[i] = Some(p.mem_total_mib);
                s.temp_c[i] = p.temp_c_avg;
                s.temp_c_max[i] = p.temp_c_max;
                s.power_w[i] = p.power_w_avg;
                s.power_w_max[i] = p.power_w_max;
                s.power_limit_w[i] = p.power_limit_w;
            }
            v.gpus.push(s);
        }
        v
    }
}

/// `GET /api/v1/metrics/fleet` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FleetMetricsView {
    pub now: FleetNowView,
    pub series: FleetSeriesView,
}

/// The fleet now: non-terminal instances by status, the GPUs of those with
/// a fresh heartbeat, and what the billable instances cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FleetNowView {
    /// Heartbeats at or after this count as fresh.
    pub fresh_after: DateTime<Utc>,
    pub instances: i64,
    pub reporting_instances: i64,
    pub gpus: i64,
    pub mean_gpu_util_pct: Option<f64>,
    pub vram_used_mib: f64,
    pub vram_total_mib: f64,
    pub power_w: f64,
    pub power_limit_w: f64,
    /// Every non-terminal status, zeros included.
    pub by_status: Vec<FleetStatusView>,
    /// Instances being paid for (failed ones until their machine is cleaned up).
    pub billable_instances: i64,
    /// What they cost per hour, per currency, from the providers' catalogs.
    pub price_per_hour: Vec<PriceView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FleetStatusView {
    pub status: InstanceStatus,
    pub instances: i64,
    pub reporting_instances: i64,
    pub gpus: i64,
    pub mean_gpu_util_pct: Option<f64>,
    pub vram_used_mib: f64,
    pub vram_total_mib: f64,
    pub power_w: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PriceView {
    pub currency: String,
    pub amount: f64,
}

/// Fleet totals over the window, aligned like [`MetricSeriesView`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FleetSeriesView {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub step: String,
    pub tier: String,
    pub timestamps: Vec<DateTime<Utc>>,
    /// Instances with a GPU sample in the bucket.
    pub instances: Vec<Option<i64>>,
    pub gpus: Vec<Option<i64>>,
    pub mean_gpu_util_pct: Vec<Option<f64>>,
    pub vram_used_mib: Vec<Option<f64>>,
    pub vram_total_mib: Vec<Option<f64>>,
    pub power_w: Vec<Option<f64>>,
}

impl From<&gpufleet_control::history::FleetMetrics> for FleetMetricsView {
    fn from(f: &gpufleet_control::history::FleetMetrics) -> Self {
        let n = &f.now;
        let now = FleetNowView {
            fresh_after: n.fresh_after,
            instances: n.instances,
            reporting_instances: n.reporting_instances,
            gpus: n.gpus,
            mean_gpu_util_pct: n.mean_gpu_util_pct,
            vram_used_mib: n.vram_used_mib,
            vram_total_mib: n.vram_total_mib,
            power_w: n.power_w,
            power_limit_w: n.power_limit_w,
            by_status: n
                .by_status
                .iter()
                .map(|s| FleetStatusView {
                    status: s.status,
                    instances: s.instances,
                    reporting_instances: s.reporting_instances,
                    gpus: s.gpus,
                    mean_gpu_util_pct: s.mean_gpu_util_pct,
                    vram_used_mib: s.vram_used_mib,
                    vram_total_mib: s.vram_total_mib,
                    power_w: s.power_w,
                })
                .collect(),
            billable_instances: f.billable_instances,
            price_per_hour: f
                .price_per_hour
                .iter()
                .map(|(currency, amount)| PriceView {
                    currency: currency.clone(),
                    amount: *amount,
                })
                .collect(),
        };
        let s = &f.series;
        let step = s.step.as_millis();
        let starts = bucket_starts(s.from, s.to, step);
        let a = Aligner {
            start: starts.first().copied().unwrap_or(0),
            step,
            len: starts.len(),
        };
        let mut series = FleetSeriesView {
            from: s.from,
            to: s.to,
            step: s.step.to_string(),
            tier: s.tier.as_str().to_string(),
            timestamps: starts.iter().map(|b| ms_time(*b)).collect(),
            instances: vec![None; a.len],
            gpus: vec![None; a.len],
            mean_gpu_util_pct: a.empty(),
            vram_used_mib: a.empty(),
            vram_total_mib: a.empty(),
            power_w: a.empty(),
        };
        for p in &s.points {
            let Some(i) = a.index(p.bucket) else { continue };
            series.instances[i] = Some(p.instances);
            series.gpus[i] = Some(p.gpus);
            series.mean_gpu_util_pct[i] = p.mean_gpu_util_pct;
            series.vram_used_mib[i] = Some(p.vram_used_mib);
            series.vram_total_mib[i] = Some(p.vram_total_mib);
            series.power_w[i] = p.power_w;
        }
        FleetMetricsView { now, series }
    }
}

/// One entry of `GET /api/v1/prometheus/targets` (Prometheus HTTP service
/// discovery): an agent of a ready instance and its labels
/// (`gpufleet_instance_id`, `gpufleet_provider`, `gpufleet_instance_type`,
/// `gpufleet_model`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ScrapeTargetGroup {
    /// `ip:agent_port`.
    pub targets: Vec<String>,
    pub labels: std::collections::BTreeMap<String, String>,
}

impl From<&gpufleet_control::history::ScrapeTarget> for ScrapeTargetGroup {
    fn from(t: &gpufleet_control::history::ScrapeTarget) -> Self {
        let labels = [
            ("gpufleet_instance_id", t.instance_id.to_string()),
            ("gpufleet_provider", t.provider.to_string()),
            ("gpufleet_instance_type", t.instance_type.clone()),
            ("gpufleet_model", t.model.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        ScrapeTargetGroup {
            targets: vec![t.address.to_string()],
            labels,
        }
    }
}

#[cfg(test)]
mod metric_view_tests {
    use super::*;

    #[test]
    fn buckets_cover_the_window() {
        let t = |ms| ms_time(ms);
        assert_eq!(bucket_starts(t(0), t(60_000), 5_000).len(), 12);
        assert_eq!(bucket_starts(t(1), t(60_001), 5_000).len(), 13);
        let a = Aligner {
            start: 0,
            step: 5_000,
            len: 12,
        };
        assert_eq!(a.index(t(10_000)), Some(2));
        assert_eq!(a.index(t(60_000)), None);
        assert_eq!(a.index(t(10_001)), None);
    }
}

/// `POST /api/v1/deployments` body: a model's serving, declared once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateDeploymentBody {
    /// The project that will own it (default: `default` for the admin
    /// token, else the caller's only project where they may operate).
    #[serde(default)]
    #[schema(value_type = Option<String>, pattern = "^[a-z0-9][a-z0-9-]{0,38}$")]
    pub project: Option<String>,
    /// 1–63 lowercase letters, digits and `-`; unique among deployments not deleted.
    #[schema(example = "qwen-7b", pattern = "^[a-z0-9][a-z0-9-]{0,62}$")]
    pub name: String,
    #[schema(value_type = ModelName)]
    pub model: String,
    /// Ordered fallback list: replicas go to the first placement with
    /// capacity; one out of capacity or quota is skipped for a while.
    #[schema(min_items = 1)]
    pub placements: Vec<Placement>,
    pub replicas: ReplicaBounds,
    /// Default: requests in flight, 16 per replica, scale down after 5m.
    #[serde(default)]
    pub autoscaling: Option<Autoscaling>,
    /// Kept with the spec (scale to zero is not acted upon yet).
    #[serde(default)]
    pub scale_to_zero_after: Option<HumanDuration>,
    /// Extra engine arguments, kept with the spec.
    #[serde(default)]
    pub engine_args: Option<Vec<String>>,
}

/// `PATCH /api/v1/deployments/{id}` body: what to change. Replica bounds,
/// autoscaling, the scale-to-zero delay and the name apply at once; new
/// `placements` or `engine_args` start a rolling update (replicas with the
/// new ones come up, then the old ones drain).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchDeploymentBody {
    #[serde(default)]
    #[schema(pattern = "^[a-z0-9][a-z0-9-]{0,62}$")]
    pub name: Option<String>,
    #[serde(default)]
    pub replicas: Option<ReplicaBounds>,
    #[serde(default)]
    pub autoscaling: Option<Autoscaling>,
    #[serde(default)]
    pub scale_to_zero_after: Option<HumanDuration>,
    #[serde(default)]
    pub placements: Option<Vec<Placement>>,
    #[serde(default)]
    pub engine_args: Option<Vec<String>>,
}

/// Replicas as the keeper last saw them, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeploymentStatusView {
    /// What the keeper decided: autoscaled, within the bounds.
    pub desired: u32,
    pub ready: u32,
    /// Provisioning, booting or starting.
    pub starting: u32,
    pub unhealthy: u32,
    pub draining: u32,
    /// One line, e.g. "2 of 3 ready; 1 starting in fr-par-2".
    pub summary: String,
    /// One line each: waiting for capacity, replacing, scaling down later...
    pub conditions: Vec<String>,
}

/// A deployment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeploymentView {
    pub id: DeploymentId,
    /// The project that owns it.
    #[schema(value_type = String)]
    pub project_id: gpufleet_domain::ProjectId,
    pub name: String,
    #[schema(value_type = ModelName)]
    pub model: String,
    pub state: DeploymentState,
    pub placements: Vec<Placement>,
    pub replicas: ReplicaBounds,
    pub autoscaling: Autoscaling,
    pub scale_to_zero_after: Option<HumanDuration>,
    pub engine_args: Option<Vec<String>>,
    pub status: DeploymentStatusView,
    /// Increases on every change.
    pub generation: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub delete_requested_at: Option<DateTime<Utc>>,
    pub deleted_at: Option<DateTime<Utc>>,
    /// Its instances (archived ones left out); only in `GET /api/v1/deployments/{id}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<Vec<InstanceView>>,
}

impl From<&gpufleet_store::DeploymentRecord> for DeploymentView {
    fn from(d: &gpufleet_store::DeploymentRecord) -> Self {
        DeploymentView {
            id: d.id,
            project_id: d.project_id.clone(),
            name: d.name.clone(),
            model: d.model.to_string(),
            state: d.state,
            placements: d.spec.placements.clone(),
            replicas: d.spec.replicas,
            autoscaling: d.spec.autoscaling,
            scale_to_zero_after: d.spec.scale_to_zero_after,
            engine_args: d.spec.engine_args.clone(),
            status: DeploymentStatusView {
                desired: d.desired_replicas,
                ready: d.status.ready,
                starting: d.status.starting,
                unhealthy: d.status.unhealthy,
                draining: d.status.draining,
                summary: d.status.summary.clone(),
                conditions: d.status.conditions.clone(),
            },
            generation: d.generation,
            created_at: d.created_at,
            updated_at: d.updated_at,
            delete_requested_at: d.delete_requested_at,
            deleted_at: d.deleted_at,
            instances: None,
        }
    }
}

/// `GET /api/v1/deployments` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeploymentList {
    pub deployments: Vec<DeploymentView>,
}

/// One entry of a deployment's timeline: a decision and its reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeploymentEventView {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub action: DeploymentAction,
    /// in_progress, success, failed, waiting, info
    pub outcome: String,
    pub message: String,
    /// Details (instance ids, placements, figures), or null.
    #[schema(value_type = Option<Object>)]
    pub metadata: serde_json::Value,
}

impl From<&gpufleet_store::DeploymentEvent> for DeploymentEventView {
    fn from(e: &gpufleet_store::DeploymentEvent) -> Self {
        DeploymentEventView {
            id: e.id,
            at: e.event.at,
            action: e.event.action,
            outcome: e.event.outcome.to_string(),
            message: e.event.message.clone(),
            metadata: e.event.metadata.clone(),
        }
    }
}

/// `GET /api/v1/deployments/{id}/events` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeploymentTimeline {
    pub deployment_id: DeploymentId,
    pub events: Vec<DeploymentEventView>,
}
