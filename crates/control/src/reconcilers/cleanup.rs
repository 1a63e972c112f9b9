//! Failed-instance cleanup: after the grace period (during which a late agent
//! may still bring a startup_timeout instance back), delete the machine of a
//! failed instance so nothing is left running. The instance stays `failed`
//! (with its reason) and becomes archivable once the provider confirms.

use super::terminator::{delete_machines, Deletion};
use super::{fan_out, instances_in, Creating, CONCURRENCY};
use crate::lifecycle::Lifecycle;

use crate::driver::{Reconciler, TaskName, TaskReport};
use crate::timeline;
use async_trait::async_trait;
use chrono::Utc;
use gpufleet_domain::InstanceStatus;
use gpufleet_providers::ProviderRegistry;
use gpufleet_store::{InstanceRecord, Outcome, Store, TimelineKind};

pub struct FailedCleanup {
    store: Store,
    lifecycle: Lifecycle,
    providers: ProviderRegistry,
    /// `failed_cleanup_grace_secs`: how long a late agent may still recover it.
    grace: chrono::Duration,
    cluster_id: String,
    creating: Creating,
}

impl FailedCleanup {
    pub(crate) fn new(
        lifecycle: Lifecycle,
        providers: ProviderRegistry,
        grace: chrono::Duration,
        cluster_id: String,
        creating: Creating,
    ) -> Self {
        Self {
            store: lifecycle.store().clone(),
            lifecycle,
            providers,
            grace,
            cluster_id,
            creating,
        }
    }

    async fn clean(&self, rec: InstanceRecord) -> TaskReport {
        let mut report = TaskReport::default();
        let grace = self.grace;
        if rec.cleaned_up_at.is_some()
            || Utc::now() < rec.status_changed_at + grace
            || self.creating.contains(rec.id)
        {
            return report;
        }
        let Some(provider) = self.providers.get(&rec.provider).cloned() else {
            report.error(format!(
                "{}: provider {} not configured",
                rec.id, rec.provider
            ));
            return report;
        };
        // Persist the intent first: from here on no late recovery.
        let rec = if rec.cleanup_started_at.is_none() {
            let e = timeline::entry(
                rec.id,
                Utc::now(),
                TimelineKind::Note,
                "cleanup.start",
                Outcome::InProgress,
                "grace period over: deleting the failed instance's machine",
            );
            match self
                .lifecycle
                .update_with_retry(rec.id, vec![e], |r| {
                    let changed =
                        r.cleanup_started_at.is_none() && r.status == InstanceStatus::Failed;
                    if changed {
                        r.cleanup_started_at = Some(Utc::now());
                    }
                    changed
                })
                .await
            {
                Ok(r) if r.status == InstanceStatus::Failed => r,
                Ok(_) => return report,
                Err(e) => {
                    report.error(format!("{}: {e}", rec.id));
                    return report;
                }
            }
        } else {
            rec
        };
        if let Deletion::Gone = delete_machines(
            &self.store,
            &self.cluster_id,
            &provider,
            &rec,
            true,
            &mut report,
        )
        .await
        {
            let e = timeline::entry(
                rec.id,
                Utc::now(),
                TimelineKind::Note,
                "cleanup.done",
                Outcome::Success,
                "the failed instance's machine is gone; it can be archived",
            );
            match self
                .lifecycle
                .update_with_retry(rec.id, vec![e], |r| {
                    let changed = r.cleaned_up_at.is_none();
                    r.cleaned_up_at = Some(Utc::now());
                    changed
                })
                .await
            {
                Ok(_) => {
                    report.acted += 1;
                    let _ = self.store.revoke_tokens(rec.id, Utc::now()).await;
                }
                Err(e) => report.error(format!("{}: {e}", rec.id)),
            }
        }
        report
    }
}

#[async_trait]
impl Reconciler for FailedCleanup {
    fn name(&self) -> TaskName {
        TaskName::FailedCleanup
    }

    async fn activate(&self) -> TaskReport {
        let mut report = TaskReport::default();
        let list: Vec<_> = instances_in(&self.store, &[InstanceStatus::Failed], &mut report)
            .await
            .into_iter()
            .filter(|r| r.cleaned_up_at.is_none())
            .collect();
        fan_out(&mut report, list, CONCURRENCY, |rec| self.clean(rec)).await;
        report
    }
}
