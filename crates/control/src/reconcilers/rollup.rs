//! Metric history upkeep: roll raw samples up into 1-minute rows and those
//! into 1-hour rows, then delete what is past each tier's retention. The
//! store keeps watermarks, so each activation resumes where the last one
//! stopped; a lagging rollup never loses history (retention waits for it).

use crate::driver::{Reconciler, TaskName, TaskReport};
use async_trait::async_trait;
use chrono::Utc;
use gpufleet_domain::metrics::{RetentionConfig, Tier};
use gpufleet_store::Store;

/// Buckets still being written are left alone: rollups stop this far before now.
pub const ROLLUP_DELAY: chrono::Duration = chrono::Duration::seconds(10);
/// Rollup calls per tier per activation (each is bounded by the store).
const MAX_CALLS_PER_TIER: u32 = 64;

pub struct MetricsRollup {
    store: Store,
    retention: RetentionConfig,
}

impl MetricsRollup {
    pub(crate) fn new(store: Store, retention: RetentionConfig) -> Self {
        Self { store, retention }
    }
}

#[async_trait]
impl Reconciler for MetricsRollup {
    fn name(&self) -> TaskName {
        TaskName::MetricsRollup
    }

    async fn activate(&self) -> TaskReport {
        let mut report = TaskReport::default();
        let store = &self.store;
        let now = Utc::now();
        let up_to = now - ROLLUP_DELAY;
        // Minutes first: hours are built from them.
        for tier in [Tier::Minute, Tier::Hour] {
            for _ in 0..MAX_CALLS_PER_TIER {
                match store.rollup(tier, up_to).await {
                    Ok(r) => {
                        report.examined += 1;
                        report.acted += u32::try_from(r.rows).unwrap_or(u32::MAX);
                        if r.caught_up {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%tier, error = &e as &dyn std::error::Error, "metrics rollup failed");
                        report.error(format!("rollup of the {tier} tier: {e}"));
                        break;
                    }
                }
            }
        }
        match store.enforce_retention(&self.retention, now).await {
            Ok(r) => {
                let deleted = r.raw_samples
                    + r.raw_gpu_samples
                    + r.minute_samples
                    + r.minute_gpu_samples
                    + r.hour_samples
                    + r.hour_gpu_samples;
                report.acted = report
                    .acted
                    .saturating_add(u32::try_from(deleted).unwrap_or(u32::MAX));
            }
            Err(e) => {
                tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    "enforcing metric retention failed"
                );
                report.error(format!("retention: {e}"));
            }
        }
        report
    }
}
