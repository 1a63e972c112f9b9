//! Orphan reaper: lists every provider's machines tagged with this cluster and
//! deletes those that no live instance owns (unknown instance, or one already
//! terminated, archived or cleaned up) — the last line against leaked machines.
//! Other billable resources so tagged (public IPs, volumes) are deleted the
//! same way once they have looked orphaned for `orphan_grace_secs` (a create
//! in progress makes them before its machine).

use super::Creating;
use crate::driver::{Reconciler, TaskName, TaskReport};
use crate::timeline;
use async_trait::async_trait;
use chrono::Utc;
use gpufleet_domain::{InstanceId, InstanceStatus};
use gpufleet_providers::{tags, ProviderRegistry, ResourceKind};
use gpufleet_store::{InstanceRecord, Outcome, Store, TimelineKind};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct OrphanReaper {
    store: Store,
    providers: ProviderRegistry,
    /// `orphan_grace_secs`: how long a resource must look orphaned.
    grace: Duration,
    cluster_id: String,
    creating: Creating,
    /// When each resource (provider, kind, id) was first seen orphaned.
    suspects: Mutex<HashMap<(String, ResourceKind, String), Instant>>,
}

impl OrphanReaper {
    pub(crate) fn new(
        store: Store,
        providers: ProviderRegistry,
        grace: Duration,
        cluster_id: String,
        creating: Creating,
    ) -> Self {
        Self {
            store,
            providers,
            grace,
            cluster_id,
            creating,
            suspects: Mutex::new(HashMap::new()),
        }
    }

    /// Whether the instance named by `tags` is gone (or was never known).
    async fn owner_gone(
        &self,
        tags: &BTreeMap<String, String>,
    ) -> Result<(Option<InstanceRecord>, bool), String> {
        let owner = tags
            .get(tags::INSTANCE)
            .and_then(|s| s.parse::<InstanceId>().ok());
        let rec = match owner {
            Some(id) => self
                .store
                .get_instance(id)
                .await
                .map_err(|e| format!("{id}: {e}"))?,
            None => None,
        };
        let gone = match &rec {
            None => true,
            Some(r) => {
                (r.status.is_terminal()
                    || (r.status == InstanceStatus::Failed && r.cleaned_up_at.is_some()))
                    && !self.creating.contains(r.id)
            }
        };
        Ok((rec, gone))
    }

    /// Deletes resources that have looked orphaned past the grace period.
    async fn reap_resources(
        &self,
        name: &str,
        provider: &dyn gpufleet_providers::Provider,
        filter: &BTreeMap<String, String>,
        report: &mut TaskReport,
    ) {
        let resources = match provider.list_resources(filter).await {
            Ok(r) => r,
            Err(e) => {
                report.error(format!("{name}: list resources: {e}"));
                return;
            }
        };
        let grace = self.grace;
        let mut seen = HashSet::new();
        for r in resources {
            report.examined += 1;
            let (owner, gone) = match self.owner_gone(&r.tags).await {
                Ok(v) => v,
                Err(e) => {
                    report.error(e);
                    continue;
                }
            };
            if !gone {
                continue;
            }
            let key = (name.to_string(), r.kind, r.id.clone());
            seen.insert(key.clone());
            let first = *self
                .suspects
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(key.clone())
                .or_insert_with(Instant::now);
            if first.elapsed() < grace {
                continue;
            }
            tracing::warn!(provider = %name, kind = ?r.kind, id = %r.id, "deleting orphaned resource");
            match provider.delete_resource(&r).await {
                Ok(()) => {
                    report.acted += 1;
                    self.suspects
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&key);
                    if let Some(owner) = owner {
                        let e = timeline::entry(
                            owner.id,
                            Utc::now(),
                            TimelineKind::ProviderCall,
                            "orphan.delete_resource",
                            Outcome::Success,
                            format!(
                                "deleted orphaned {:?} {} tagged with this instance",
                                r.kind, r.id
                            ),
                        );
                        let _ = self.store.append_events(&[e]).await;
                    }
                }
                Err(e) => report.error(format!(
                    "{name}: delete orphaned {:?} {}: {e}",
                    r.kind, r.id
                )),
            }
        }
        // Forget suspects that are gone or owned again.
        self.suspects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| k.0 != name || seen.contains(k));
    }
}

#[async_trait]
impl Reconciler for OrphanReaper {
    fn name(&self) -> TaskName {
        TaskName::OrphanReaper
    }

    async fn activate(&self) -> TaskReport {
        let mut report = TaskReport::default();
        let mut filter = BTreeMap::new();
        filter.insert(tags::CLUSTER.to_string(), self.cluster_id.clone());
        for (name, provider) in self.providers.iter() {
            self.reap_resources(name.as_str(), provider.as_ref(), &filter, &mut report)
                .await;
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
                    Some(id) => match self.store.get_instance(id).await {
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
                if !orphan
                    || owner_rec
                        .as_ref()
                        .is_some_and(|r| self.creating.contains(r.id))
                {
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
                            let _ = self.store.append_events(&[e]).await;
                        }
                    }
                    Err(e) => report.error(format!("{name}: terminate orphan {}: {e}", m.id)),
                }
            }
        }
        report
    }
}
