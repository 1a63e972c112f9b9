//! Orphan reaper: lists every provider's machines tagged with this cluster and
//! deletes those that no live instance owns (unknown instance, or one already
//! terminated, archived or cleaned up) — the last line against leaked machines.

use crate::driver::{Reconciler, TaskReport};
use crate::fleet::{task, Fleet};
use crate::timeline;
use async_trait::async_trait;
use chrono::Utc;
use gpufleet_domain::{InstanceId, InstanceStatus};
use gpufleet_providers::tags;
use gpufleet_store::{Outcome, TimelineKind};
use std::collections::BTreeMap;

pub struct OrphanReaper {
    fleet: Fleet,
}

impl OrphanReaper {
    pub fn new(fleet: Fleet) -> Self {
        Self { fleet }
    }
}

#[async_trait]
impl Reconciler for OrphanReaper {
    fn name(&self) -> &'static str {
        task::ORPHANS
    }

    async fn activate(&self) -> TaskReport {
        let mut report = TaskReport::default();
        let fleet = &self.fleet;
        let mut filter = BTreeMap::new();
        filter.insert(tags::CLUSTER.to_string(), fleet.cluster_id().to_string());
        for (name, provider) in fleet.inner.providers.iter() {
            let machines = match provider.list(&filter).await {
                Ok(m) => m,
                Err(e) => {
                    report.error(format!("{name}: list: {e}"));
                    continue;
                }
            };
            for m in machines {
                report.examined += 1;
                let owner = m
                    .tags
                    .get(tags::INSTANCE)
                    .and_then(|s| s.parse::<InstanceId>().ok());
                let owner_rec = match owner {
                    Some(id) => match fleet.store().get_instance(id).await {
                        Ok(r) => r,
                        Err(e) => {
                            report.error(format!("{id}: {e}"));
                            continue;
                        }
                    },
                    None => None,
                };
                let orphan = match &owner_rec {
                    None => true,
                    Some(r) => {
                        r.status.is_terminal()
                            || (r.status == InstanceStatus::Failed && r.cleaned_up_at.is_some())
                            // Owned by an instance that recorded another machine.
                            || r.provider_instance_id.as_ref().is_some_and(|id| *id != m.id)
                    }
                };
                if !orphan || owner_rec.as_ref().is_some_and(|r| fleet.is_creating(r.id)) {
                    continue;
                }
                tracing::warn!(provider = %name, machine = %m.id, instance_id = ?owner, "deleting orphaned machine");
                match provider.terminate(&m.id).await {
                    Ok(()) => {
                        report.acted += 1;
                        if let Some(r) = owner_rec {
                            let e = timeline::entry(
                                r.id,
                                Utc::now(),
                                TimelineKind::ProviderCall,
                                "orphan.terminate",
                                Outcome::Success,
                                format!(
                                    "deleted orphaned machine {} tagged with this instance",
                                    m.id
                                ),
                            );
                            let _ = fleet.store().append_events(&[e]).await;
                        }
                    }
                    Err(e) => report.error(format!("{name}: terminate orphan {}: {e}", m.id)),
                }
            }
        }
        report
    }
}
