//! The reconcilers. Each is a small struct with `activate()`: it lists the
//! instances it cares about, does one bounded batch of idempotent work and
//! reports counts and errors. The next activation is the retry.
//!
//! | reconciler | looks at | does |
//! |---|---|---|
//! | [`Provisioner`] | `provisioning` | provider create (intent = the persisted record + idempotency key), bounded retries with backoff |
//! | [`BootWatcher`] | `booting`, startup deadlines | IP discovery ("no IP yet" is waiting), `startup_timeout` |
//! | [`Health`] | `starting`, `ready`, `unhealthy` | readiness probes, heartbeat freshness, `agent_lost`, provider-deleted |
//! | [`Terminator`] | `draining`, `terminating` | drain, provider delete until confirmed gone |
//! | [`FailedCleanup`] | `failed` past the grace period | delete the machine so nothing is left running |
//! | [`OrphanReaper`] | the providers' machines tagged with our cluster | delete machines no live instance owns |
//! | [`MetricsRollup`] | metric history | raw → 1-minute → 1-hour rollups, retention per tier |
//! | [`Keeper`] | deployments and their instances | replicas to the desired count (autoscaled within bounds), placement fallback, replacement of failed/unhealthy replicas, deletion |

mod boot;
mod cleanup;
pub mod deployments;
mod health;
mod orphans;
mod provisioner;
mod rollup;
mod terminator;

pub use boot::BootWatcher;
pub use cleanup::FailedCleanup;
pub use deployments::Keeper;
pub use health::Health;
pub use orphans::OrphanReaper;
pub use provisioner::Provisioner;
pub use rollup::MetricsRollup;
pub use terminator::Terminator;

use crate::driver::TaskReport;
use crate::lifecycle::{ApplyError, Lifecycle};
use crate::timeline;
use crate::timeline::EntryExt;
use chrono::Utc;
use gpufleet_domain::{InstanceId, InstanceStatus, LifecycleEvent};
use gpufleet_providers::ProviderError;
use gpufleet_store::{
    InstanceFilter, InstanceRecord, NewTimelineEvent, Outcome, Store, TimelineKind,
};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Provider calls in flight at once within one activation.
pub(crate) const CONCURRENCY: usize = 16;

/// Instances whose provider create call is in flight in this process: the
/// provisioner marks them, the terminator, failed-instance cleanup and the
/// orphan reaper leave them alone. Cheap to clone.
#[derive(Clone, Default)]
pub(crate) struct Creating(Arc<Mutex<HashSet<InstanceId>>>);

impl Creating {
    pub(crate) fn mark(&self, id: InstanceId, on: bool) {
        let mut set = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if on {
            set.insert(id);
        } else {
            set.remove(&id);
        }
    }

    pub(crate) fn contains(&self, id: InstanceId) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&id)
    }
}

pub(crate) async fn instances_in(
    store: &Store,
    statuses: &[InstanceStatus],
    report: &mut TaskReport,
) -> Vec<InstanceRecord> {
    let filter = InstanceFilter {
        statuses: statuses.to_vec(),
        include_archived: false,
        provider: None,
        projects: None,
        // Every one: a cap here would starve the oldest instances whenever
        // more than the cap share these statuses (the list is newest first).
        limit: None,
    };
    match store.list_instances(&filter).await {
        Ok(list) => {
            report.examined += list.len() as u32;
            list
        }
        Err(e) => {
            tracing::warn!(error = %e, "listing instances failed");
            report.error(format!("listing instances: {e}"));
            Vec::new()
        }
    }
}

/// A provider-call timeline entry.
pub(crate) fn call_entry(
    rec: &InstanceRecord,
    action: &str,
    started: Instant,
    result: Result<String, &ProviderError>,
) -> NewTimelineEvent {
    let ms = started.elapsed().as_millis() as i64;
    match result {
        Ok(msg) => timeline::entry(
            rec.id,
            Utc::now(),
            TimelineKind::ProviderCall,
            action,
            Outcome::Success,
            msg,
        )
        .duration(ms),
        Err(e) => timeline::entry(
            rec.id,
            Utc::now(),
            TimelineKind::ProviderCall,
            action,
            Outcome::Failed,
            e.to_string(),
        )
        .duration(ms)
        .error_code(e.code()),
    }
}

/// Apply an event, folding the outcome into the report. Returns the new
/// record when applied.
pub(crate) async fn apply(
    lifecycle: &Lifecycle,
    report: &mut TaskReport,
    rec: &InstanceRecord,
    event: LifecycleEvent,
    message: &str,
    extra: Vec<NewTimelineEvent>,
    mutate: impl FnOnce(&mut InstanceRecord),
) -> Option<InstanceRecord> {
    match lifecycle.apply(rec, event, message, extra, mutate).await {
        Ok(next) => {
            report.acted += 1;
            Some(next)
        }
        // Someone else changed it first: the next activation sees the new state.
        Err(ApplyError::Conflict) => None,
        // The lease changed hands while this replica was slow: the new
        // holder acts.
        Err(ApplyError::Fenced(lease)) => {
            tracing::warn!(instance_id = %rec.id, lease, "write refused: lease lost");
            None
        }
        Err(e) => {
            tracing::warn!(instance_id = %rec.id, error = %e, "applying {} failed", event.name());
            report.error(format!("{}: {e}", rec.id));
            None
        }
    }
}

/// Run `work` on each item, at most `limit` at once, and fold their reports
/// into `report`.
pub(crate) async fn fan_out<T, F, Fut>(
    report: &mut TaskReport,
    items: Vec<T>,
    limit: usize,
    work: F,
) where
    F: FnMut(T) -> Fut,
    Fut: std::future::Future<Output = TaskReport>,
{
    use futures::StreamExt;
    let reports: Vec<TaskReport> = futures::stream::iter(items)
        .map(work)
        .buffer_unordered(limit)
        .collect()
        .await;
    for r in reports {
        report.acted += r.acted;
        report.errors.extend(r.errors);
    }
}

/// Append entries, folding errors into the report.
pub(crate) async fn note(store: &Store, report: &mut TaskReport, entries: Vec<NewTimelineEvent>) {
    if let Err(e) = store.append_events(&entries).await {
        report.error(format!("appending timeline: {e}"));
    }
}

/// Exponential backoff for attempt `n` (1-based).
pub(crate) fn backoff_ms(base: u64, max: u64, attempt: u32) -> u64 {
    let shift = attempt.saturating_sub(1).min(20);
    base.saturating_mul(1u64 << shift).min(max)
}

#[cfg(test)]
mod tests {
    use super::backoff_ms;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff_ms(100, 1000, 1), 100);
        assert_eq!(backoff_ms(100, 1000, 2), 200);
        assert_eq!(backoff_ms(100, 1000, 4), 800);
        assert_eq!(backoff_ms(100, 1000, 5), 1000);
        assert_eq!(backoff_ms(100, 1000, 60), 1000);
    }
}
