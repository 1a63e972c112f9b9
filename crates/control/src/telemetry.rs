//! The control plane's Prometheus metrics.
//!
//! Counters and histograms recorded as things happen (heartbeats, provider
//! calls; the reconcilers' own live in [`crate::driver::Tasks`]) sit in one
//! registry; figures read from the store (instances by status, each
//! instance's latest GPU readings) are gathered when scraped. Encoding uses
//! `prometheus-client`, which writes OpenMetrics; [`to_prometheus_text`]
//! turns that into the classic text format (0.0.4) that every Prometheus and
//! `promtool check metrics` read.
//!
//! Names follow Prometheus conventions: a `gpufleet_` prefix, base units
//! (seconds, bytes, watts, celsius) in the name, `_total` on counters.

use crate::ControlError;
use chrono::{DateTime, Utc};
use gpufleet_domain::{InstanceId, InstanceStatus};
use gpufleet_store::{InstanceFilter, SampleRecord, Store};
use prometheus_client::encoding::text::encode_registry;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicU64;

/// A float gauge.
pub type FloatGauge = Gauge<f64, AtomicU64>;
/// A histogram family whose histograms share fixed buckets.
pub type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Escape a label value for the text formats (`prometheus-client` writes
/// label values as given).
pub fn label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub action: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeploymentLabels {
    deployment_id: String,
    name: String,
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstanceCostLabels {
    instance_id: String,
    project: String,
    provider: String,
    instance_type: String,
    model: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProjectLabels {
    project: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderOpLabels {
    pub provider: String,
    pub op: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderErrorLabels {
    pub provider: String,
    pub op: &'static str,
    pub code: &'static str,
}

fn lag_histogram() -> Histogram {
    // 1 ms .. ~65 s.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 17,
    ))
}

fn call_histogram() -> Histogram {
    // 1 ms .. ~33 s.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 16,
    ))
}

fn batch_histogram() -> Histogram {
    Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0])
}

/// Metrics recorded as things happen.
#[derive(Debug)]
pub struct Telemetry {
    registry: Registry,
    /// now − `sent_at` of each heartbeat received.
    pub heartbeat_lag: Histogram,
    /// Heartbeats by outcome: applied, stale, rejected, overloaded, failed.
    pub heartbeats: Family<OutcomeLabels, Counter>,
    /// Heartbeats per write transaction.
    pub ingest_batch_size: Histogram,
    /// Duration of moving staged heartbeats to the indexed tables.
    pub ingest_compaction_seconds: Histogram,
    pub provider_call_duration: HistogramFamily<ProviderOpLabels>,
    pub provider_call_errors: Family<ProviderErrorLabels, Counter>,
    /// Deployment decisions by action (scale_up, replace, fallback, ...).
    pub deployment_decisions: Family<DecisionLabels, Counter>,
}

impl Telemetry {
    /// A registry with the control plane's metrics, the reconcilers' from `tasks` included.
    pub fn new(tasks: &crate::driver::Tasks) -> Telemetry {
        let mut registry = Registry::default();
        let heartbeat_lag = lag_histogram();
        registry.register_with_unit(
            "gpufleet_heartbeat_lag",
            "Time from an agent sending a heartbeat to the control plane receiving it",
            Unit::Seconds,
            heartbeat_lag.clone(),
        );
        let heartbeats = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "gpufleet_heartbeats",
            "Heartbeats received, by outcome (applied, stale, rejected, overloaded, failed)",
            heartbeats.clone(),
        );
        let ingest_batch_size = batch_histogram();
        registry.register(
            "gpufleet_heartbeat_batch_size",
            "Heartbeats written per store transaction",
            ingest_batch_size.clone(),
        );
        let ingest_compaction_seconds =
            Histogram::new([0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]);
        registry.register_with_unit(
            "gpufleet_heartbeat_compaction_duration",
            "Time to move staged heartbeat samples to the indexed sample tables",
            Unit::Seconds,
            ingest_compaction_seconds.clone(),
        );
        let provider_call_duration: HistogramFamily<ProviderOpLabels> =
            Family::new_with_constructor(call_histogram);
        registry.register_with_unit(
            "gpufleet_provider_call_duration",
            "Duration of provider API calls, by provider and operation",
            Unit::Seconds,
            provider_call_duration.clone(),
        );
        let provider_call_errors = Family::<ProviderErrorLabels, Counter>::default();
        registry.register(
            "gpufleet_provider_call_errors",
            "Failed provider API calls, by provider, operation and error code",
            provider_call_errors.clone(),
        );
        let deployment_decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "gpufleet_deployment_decisions",
            "Decisions about deployments, by action (scale_up, scale_down, replace, fallback, ...)",
            deployment_decisions.clone(),
        );
        let t = tasks.metrics();
        registry.register(
            "gpufleet_reconciler_runs",
            "Reconciler activations",
            t.runs.clone(),
        );
        registry.register(
            "gpufleet_reconciler_errors",
            "Errors reported by reconciler activations",
            t.errors.clone(),
        );
        registry.register_with_unit(
            "gpufleet_reconciler_duration",
            "Duration of reconciler activations",
            Unit::Seconds,
            t.duration.clone(),
        );
        Telemetry {
            registry,
            heartbeat_lag,
            heartbeats,
            ingest_batch_size,
            ingest_compaction_seconds,
            provider_call_duration,
            provider_call_errors,
            deployment_decisions,
        }
    }

    /// Count one deployment decision.
    pub fn deployment_decision(&self, action: gpufleet_domain::DeploymentAction) {
        self.deployment_decisions
            .get_or_create(&DecisionLabels {
                action: action.as_str(),
            })
            .inc();
    }

    pub(crate) fn heartbeat(&self, outcome: &'static str) {
        self.heartbeats
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub(crate) fn observe_lag(&self, sent_at: DateTime<Utc>, received_at: DateTime<Utc>) {
        let secs = (received_at - sent_at)
            .num_microseconds()
            .unwrap_or(i64::MAX) as f64
            / 1e6;
        // A clock ahead of ours counts as no lag.
        self.heartbeat_lag.observe(secs.max(0.0));
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstanceCountLabels {
    status: &'static str,
    provider: String,
    instance_type: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstanceLabels {
    instance_id: String,
    provider: String,
    instance_type: String,
    model: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GpuLabels {
    instance_id: String,
    provider: String,
    instance_type: String,
    model: String,
    gpu: String,
}

/// Instances whose latest heartbeat is exported per instance.
const REPORTING: [InstanceStatus; 5] = [
    InstanceStatus::Starting,
    InstanceStatus::Ready,
    InstanceStatus::Unhealthy,
    InstanceStatus::Draining,
    InstanceStatus::Failed,
];
/// Most instances exported per scrape.
const MAX_EXPORTED_INSTANCES: i64 = 2_000;

impl Telemetry {
    /// The control plane's metrics in OpenMetrics text, without the final
    /// `# EOF` (so the HTTP edge can append its own): what was recorded, and
    /// instances and their latest figures read from `store` now.
    pub async fn encode_metrics(
        &self,
        store: &Store,
        out: &mut String,
    ) -> Result<(), ControlError> {
        encode_registry(out, &self.registry).map_err(|_| encode_error())?;

        let mut scrape = Registry::default();
        let instances = store
            .list_instances(&InstanceFilter {
                include_archived: false,
                ..InstanceFilter::default()
            })
            .await?;
        let counts = Family::<InstanceCountLabels, Gauge>::default();
        let mut by_key: BTreeMap<(String, String, &'static str), i64> = BTreeMap::new();
        for r in &instances {
            *by_key
                .entry((
                    r.provider.to_string(),
                    r.instance_type.clone(),
                    r.status.as_str(),
                ))
                .or_default() += 1;
        }
        for ((provider, instance_type, status), n) in by_key {
            counts
                .get_or_create(&InstanceCountLabels {
                    status,
                    provider: label(&provider),
                    instance_type: label(&instance_type),
                })
                .set(n);
        }
        scrape.register(
            "gpufleet_instances",
            "Instances by status, provider and instance type (archived ones excluded)",
            counts,
        );

        let age = Family::<InstanceLabels, FloatGauge>::default();
        let running = Family::<InstanceLabels, FloatGauge>::default();
        let waiting = Family::<InstanceLabels, FloatGauge>::default();
        let util = Family::<GpuLabels, FloatGauge>::default();
        let vram_used = Family::<GpuLabels, FloatGauge>::default();
        let vram_total = Family::<GpuLabels, FloatGauge>::default();
        let temp = Family::<GpuLabels, FloatGauge>::default();
        let power = Family::<GpuLabels, FloatGauge>::default();
        let power_limit = Family::<GpuLabels, FloatGauge>::default();
        let now = Utc::now();
        // Each reporting instance's latest sample, in one read.
        let mut latest: HashMap<InstanceId, SampleRecord> = store
            .latest_samples(&REPORTING)
            .await?
            .into_iter()
            .map(|s| (s.instance_id, s))
            .collect();
        let reporting = instances
            .iter()
            .filter(|r| REPORTING.contains(&r.status) && r.last_heartbeat_seq.is_some())
            .take(MAX_EXPORTED_INSTANCES as usize);
        for r in reporting {
            let Some(s) = latest.remove(&r.id) else {
                continue;
            };
            let il = InstanceLabels {
                instance_id: r.id.to_string(),
                provider: label(r.provider.as_str()),
                instance_type: label(&r.instance_type),
                model: label(r.model.as_str()),
            };
            let secs = (now - s.at).num_milliseconds().max(0) as f64 / 1e3;
            age.get_or_create(&il).set(secs);
            running.get_or_create(&il).set(s.engine.requests_running);
            waiting.get_or_create(&il).set(s.engine.requests_waiting);
            for g in &s.gpus {
                let gl = GpuLabels {
                    instance_id: il.instance_id.clone(),
                    provider: il.provider.clone(),
                    instance_type: il.instance_type.clone(),
                    model: il.model.clone(),
                    gpu: g.index.to_string(),
                };
                const MIB: f64 = 1024.0 * 1024.0;
                // Unknown figures are left out, never exported as 0.
                if let Some(v) = g.util_pct {
                    util.get_or_create(&gl).set(v);
                }
                vram_used
                    .get_or_create(&gl)
                    .set(g.mem_used_mib as f64 * MIB);
                vram_total
                    .get_or_create(&gl)
                    .set(g.mem_total_mib as f64 * MIB);
                if let Some(v) = g.temp_c {
                    temp.get_or_create(&gl).set(v);
                }
                if let Some(v) = g.power_w {
                    power.get_or_create(&gl).set(v);
                }
                if let Some(v) = g.power_limit_w {
                    power_limit.get_or_create(&gl).set(v);
                }
            }
        }
        scrape.register_with_unit(
            "gpufleet_instance_heartbeat_age",
            "Time since the instance's latest stored heartbeat",
            Unit::Seconds,
            age,
        );
        scrape.register(
            "gpufleet_instance_requests_running",
            "Requests the instance's engine is running (latest heartbeat)",
            running,
        );
        scrape.register(
            "gpufleet_instance_requests_waiting",
            "Requests waiting in the instance's engine (latest heartbeat)",
            waiting,
        );
        scrape.register(
            "gpufleet_instance_gpu_utilization_percent",
            "GPU utilisation, 0-100 (latest heartbeat)",
            util,
        );
        scrape.register_with_unit(
            "gpufleet_instance_gpu_memory_used",
            "GPU memory used (latest heartbeat)",
            Unit::Bytes,
            vram_used,
        );
        scrape.register_with_unit(
            "gpufleet_instance_gpu_memory_total",
            "GPU memory in total (latest heartbeat)",
            Unit::Bytes,
            vram_total,
        );
        scrape.register_with_unit(
            "gpufleet_instance_gpu_temperature",
            "GPU temperature (latest heartbeat)",
            Unit::Celsius,
            temp,
        );
        scrape.register_with_unit(
            "gpufleet_instance_gpu_power",
            "GPU power draw (latest heartbeat)",
            Unit::Other("watts".into()),
            power,
        );
        scrape.register_with_unit(
            "gpufleet_instance_gpu_power_limit",
            "GPU power limit (latest heartbeat)",
            Unit::Other("watts".into()),
            power_limit,
        );
        let replicas = Family::<DeploymentLabels, Gauge>::default();
        for d in store.list_deployments(false).await? {
            let st = &d.status;
            for (state, n) in [
                ("desired", d.desired_replicas),
                ("ready", st.ready),
                ("starting", st.starting),
                ("unhealthy", st.unhealthy),
                ("draining", st.draining),
            ] {
                replicas
                    .get_or_create(&DeploymentLabels {
                        deployment_id: d.id.to_string(),
                        name: label(&d.name),
                        state,
                    })
                    .set(i64::from(n));
            }
        }
        scrape.register(
            "gpufleet_deployment_replicas",
            "Replicas of each deployment: desired (what the keeper decided), ready, starting, unhealthy, draining",
            replicas,
        );
        self.spend_metrics(store, &mut scrape, now).await?;
        encode_registry(out, &scrape).map_err(|_| encode_error())?;
        Ok(())
    }
}

impl Telemetry {
    /// Spend gauges: the price per hour of each instance billable now, the
    /// month-to-date cost per project and the cost per million tokens per
    /// model over the trailing 24 h ([`crate::spend::Spend::gauges`]).
    async fn spend_metrics(
        &self,
        store: &Store,
        scrape: &mut Registry,
        now: DateTime<Utc>,
    ) -> Result<(), ControlError> {
        let g = crate::spend::Spend::new(store.clone()).gauges(now).await?;
        let per_hour = Family::<InstanceCostLabels, FloatGauge>::default();
        for (r, price) in g.billable_now.iter().take(MAX_EXPORTED_INSTANCES as usize) {
            per_hour
                .get_or_create(&InstanceCostLabels {
                    instance_id: r.id.to_string(),
                    project: label(r.project_id.as_str()),
                    provider: label(r.provider.as_str()),
                    instance_type: label(&r.instance_type),
                    model: label(r.model.as_str()),
                })
                .set(*price);
        }
        scrape.register(
            "gpufleet_instance_cost_per_hour",
            "Price per hour of each instance billable now (the price it was created at)",
            per_hour,
        );
        let month = Family::<ProjectLabels, FloatGauge>::default();
        for (project, cost) in &g.month_to_date {
            month
                .get_or_create(&ProjectLabels {
                    project: label(project.as_str()),
                })
                .set(*cost);
        }
        scrape.register(
            "gpufleet_spend_month_to_date",
            "Cost of each project's instances since the start of the UTC month",
            month,
        );
        let cpm = Family::<ModelLabels, FloatGauge>::default();
        for (model, cost) in &g.model_cost_per_million_tokens {
            cpm.get_or_create(&ModelLabels {
                model: label(model.as_str()),
            })
            .set(*cost);
        }
        scrape.register(
            "gpufleet_model_cost_per_million_tokens",
            "GPU spend per million tokens served, per model, over the trailing 24 hours",
            cpm,
        );
        Ok(())
    }
}

fn encode_error() -> ControlError {
    ControlError::Unavailable {
        message: "metrics could not be encoded".into(),
    }
}

/// Turn OpenMetrics text (as `prometheus-client` writes it) into the
/// classic Prometheus text format 0.0.4: counter families are named with
/// their `_total` suffix in `# HELP`/`# TYPE`, and `# UNIT` and `# EOF`
/// lines (unknown to that format) are dropped.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let rewritten = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        match rewritten {
            Some(l) => out.push_str(l.trim_end()),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_becomes_classic_text() {
        let om = "# HELP a_runs Runs.\n# TYPE a_runs counter\na_runs_total{t=\"x\"} 1\n\
                  # HELP d_seconds D.\n# TYPE d_seconds histogram\n# UNIT d_seconds seconds\n\
                  d_seconds_sum 0.5\n# EOF\n";
        let text = to_prometheus_text(om);
        assert_eq!(
            text,
            "# HELP a_runs_total Runs.\n# TYPE a_runs_total counter\na_runs_total{t=\"x\"} 1\n\
             # HELP d_seconds D.\n# TYPE d_seconds histogram\nd_seconds_sum 0.5\n"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(label("meta-llama/Llama-3.1-8B"), "meta-llama/Llama-3.1-8B");
    }
}
