//! Reading metric history: one instance's series, the fleet now and over a
//! window, and the Prometheus service-discovery targets. The limits every
//! client shares live in [`gpufleet_domain::metrics`].

use crate::catalog::Catalogs;
use crate::config::ControlConfig;
use crate::ControlError;
use chrono::{DateTime, Utc};
use gpufleet_domain::metrics::{validate_window, MetricsError, Step, Tier};
use gpufleet_domain::{InstanceId, InstanceStatus, ModelName, ProjectId, ProviderName};
use gpufleet_store::{FleetNow, FleetSeries, InstanceFilter, MetricSeries, Store};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

/// The query parameter a [`MetricsError`] is about.
pub fn metrics_error_field(e: &MetricsError) -> &'static str {
    match e {
        MetricsError::BadStep(_)
        | MetricsError::StepNotAllowed(_)
        | MetricsError::TooManyPoints { .. } => "step",
        MetricsError::EmptyWindow { .. } => "to",
        MetricsError::WindowTooShort { .. } | MetricsError::WindowTooLong { .. } => "from",
    }
}

fn invalid(e: MetricsError) -> ControlError {
    ControlError::invalid(metrics_error_field(&e), e.to_string())
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

/// The fleet now and over a window.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetMetrics {
    pub now: FleetNow,
    pub series: FleetSeries,
    /// Instances in billable states (failed ones until their machine is cleaned up).
    pub billable_instances: i64,
    /// What those cost per hour, by currency, from the providers' catalogs.
    pub price_per_hour: Vec<(String, f64)>,
}

/// One Prometheus scrape target: an agent of a ready instance.
#[derive(Debug, Clone, PartialEq)]
pub struct ScrapeTarget {
    pub address: SocketAddr,
    pub instance_id: InstanceId,
    pub provider: ProviderName,
    pub instance_type: String,
    pub model: ModelName,
}

/// Reads metric history and what the fleet looks like now. Cheap to clone.
#[derive(Clone)]
pub struct History {
    store: Store,
    /// The providers' catalogs price billable instances.
    catalogs: Catalogs,
    config: Arc<ControlConfig>,
}

impl History {
    pub(crate) fn new(store: Store, catalogs: Catalogs, config: Arc<ControlConfig>) -> Self {
        Self {
            store,
            catalogs,
            config,
        }
    }

    fn store(&self) -> &Store {
        &self.store
    }
    fn config(&self) -> &ControlConfig {
        &self.config
    }
    async fn get_instance(&self, id: InstanceId) -> Result<(), ControlError> {
        self.store
            .get_instance(id)
            .await?
            .map(|_| ())
            .ok_or_else(|| ControlError::not_found("instance", id))
    }

    /// One instance's history over `[from, to)`, in buckets of `step`
    /// (default: the finest step that fits, [`Step::for_window`]), read from
    /// the tier [`Tier::for_query`] picks. `InvalidInput` naming `from`, `to`
    /// or `step` when the window breaks the shared limits.
    pub async fn metric_series(
        &self,
        id: InstanceId,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        step: Option<Step>,
    ) -> Result<MetricSeries, ControlError> {
        let (f, t) = (ms(from), ms(to));
        let step = step.unwrap_or_else(|| Step::for_window(t - f));
        validate_window(f, t, step).map_err(invalid)?;
        self.get_instance(id).await?;
        let tier = Tier::for_query(step, f, ms(Utc::now()), &self.config().retention);
        Ok(self.store().metric_series(id, from, to, step, tier).await?)
    }

    /// The fleet now (instances by status; GPUs of fresh heartbeats; price
    /// per hour of billable instances) and fleet totals over the last
    /// `window_ms` (validated like any metrics window); of the instances of
    /// `projects` only, when given.
    pub async fn fleet_metrics(
        &self,
        window_ms: i64,
        projects: Option<Vec<ProjectId>>,
    ) -> Result<FleetMetrics, ControlError> {
        let now = Utc::now();
        let step = Step::for_window(window_ms);
        let to_ms = ms(now);
        let from_ms = to_ms.saturating_sub(window_ms);
        validate_window(from_ms, to_ms, step).map_err(|e| {
            let field = match e {
                MetricsError::WindowTooShort { .. } | MetricsError::WindowTooLong { .. } => {
                    "window"
                }
                ref other => metrics_error_field(other),
            };
            ControlError::invalid(field, e.to_string())
        })?;
        let from = DateTime::from_timestamp_millis(from_ms)
            .ok_or_else(|| ControlError::invalid("window", "out of range"))?;
        let cfg = self.config();
        let fresh_ms = cfg
            .heartbeat_interval_ms
            .saturating_mul(u64::from(cfg.missed_heartbeats_unhealthy.max(1)));
        let fresh_after = now - chrono::Duration::milliseconds(fresh_ms as i64);
        let store = self.store();
        let fleet_now = store.fleet_now(fresh_after, projects.as_deref()).await?;
        let tier = Tier::for_query(step, from_ms, to_ms, &cfg.retention);
        let series = store
            .fleet_series(from, now, step, tier, projects.as_deref())
            .await?;

        let billable = store
            .list_instances(&InstanceFilter {
                statuses: InstanceStatus::BILLABLE.to_vec(),
                projects,
                ..InstanceFilter::default()
            })
            .await?;
        let billable: Vec<_> = billable
            .into_iter()
            .filter(|r| !(r.status == InstanceStatus::Failed && r.cleaned_up_at.is_some()))
            .collect();
        let mut catalogs = BTreeMap::new();
        let mut price: BTreeMap<String, f64> = BTreeMap::new();
        for r in &billable {
            if !catalogs.contains_key(&r.provider) {
                let catalog = match self.catalogs.provider(&r.provider) {
                    Some(p) => p.catalog().await.ok(),
                    None => None,
                };
                catalogs.insert(r.provider.clone(), catalog);
            }
            let Some(Some(catalog)) = catalogs.get(&r.provider) else {
                continue;
            };
            if let Some(t) = catalog.instance_type(&r.instance_type) {
                *price.entry(t.currency.clone()).or_default() += t.price_per_hour;
            }
        }
        Ok(FleetMetrics {
            now: fleet_now,
            series,
            billable_instances: billable.len() as i64,
            price_per_hour: price.into_iter().collect(),
        })
    }

    /// The agents of ready instances, for Prometheus HTTP service discovery.
    pub async fn scrape_targets(&self) -> Result<Vec<ScrapeTarget>, ControlError> {
        let ready = self
            .store()
            .list_instances(&InstanceFilter {
                statuses: vec![InstanceStatus::Ready],
                ..InstanceFilter::default()
            })
            .await?;
        let port = self.config().agent_port;
        Ok(ready
            .into_iter()
            .filter_map(|r| {
                Some(ScrapeTarget {
                    address: SocketAddr::new(r.ip?, port),
                    instance_id: r.id,
                    provider: r.provider,
                    instance_type: r.instance_type,
                    model: r.model,
                })
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_errors_name_their_parameter() {
        use gpufleet_domain::metrics::{parse_step, MAX_WINDOW_MS};
        let now = 1_750_000_000_000;
        let e = validate_window(now, now, Step::MIN).unwrap_err();
        assert_eq!(metrics_error_field(&e), "to");
        let e = validate_window(now - 1000, now, Step::MIN).unwrap_err();
        assert_eq!(metrics_error_field(&e), "from");
        let e = validate_window(now - MAX_WINDOW_MS - 1, now, Step::HOUR).unwrap_err();
        assert_eq!(metrics_error_field(&e), "from");
        let e = validate_window(now - 86_400_000, now, Step::MIN).unwrap_err();
        assert_eq!(metrics_error_field(&e), "step");
        assert_eq!(metrics_error_field(&parse_step("7s").unwrap_err()), "step");
    }
}
