//! Terminator: drains, then deletes machines of instances in `terminating`
//! until the provider confirms they are gone → `terminated`.

use super::Creating;
use super::{apply, call_entry, fan_out, instances_in, note, CONCURRENCY};
use crate::driver::{Reconciler, TaskName, TaskReport, Waker};
use crate::lifecycle::Lifecycle;
use crate::traffic::TrafficSlot;

use crate::timeline;
use async_trait::async_trait;
use chrono::Utc;
use gpufleet_domain::{InstanceId, InstanceStatus, LifecycleEvent};
use gpufleet_providers::{tags, Provider, ProviderError, ProviderRegistry};
use gpufleet_store::{InstanceRecord, Outcome, Store, TimelineKind};
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub struct Terminator {
    store: Store,
    lifecycle: Lifecycle,
    providers: ProviderRegistry,
    waker: Waker,
    /// `drain_timeout_secs`: the longest a drain waits for requests in flight.
    drain_timeout: chrono::Duration,
    cluster_id: String,
    creating: Creating,
    /// Requests in flight per instance (the router), once one is set.
    traffic: TrafficSlot,
    /// Instances whose delete request this process already sent (timeline once).
    requested: Mutex<HashSet<InstanceId>>,
}

/// Outcome of deleting whatever machines an instance owns.
pub(crate) enum Deletion {
    /// The provider confirmed nothing is left.
    Gone,
    /// Delete requested; not confirmed yet.
    Pending,
}

impl Terminator {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        lifecycle: Lifecycle,
        providers: ProviderRegistry,
        waker: Waker,
        drain_timeout: chrono::Duration,
        cluster_id: String,
        creating: Creating,
        traffic: TrafficSlot,
    ) -> Self {
        Self {
            store: lifecycle.store().clone(),
            lifecycle,
            providers,
            waker,
            drain_timeout,
            cluster_id,
            creating,
            traffic,
            requested: Mutex::new(HashSet::new()),
        }
    }

    async fn drain(&self, rec: InstanceRecord) -> TaskReport {
        let mut report = TaskReport::default();
        let deadline = rec.status_changed_at + self.drain_timeout;
        let in_flight = match self.traffic.in_flight(rec.id) {
            // The router's own count: exact and current.
            Some(n) => n as f64,
            None => match self.store.recent_samples(rec.id, 1).await {
                Ok(s) => s
                    .first()
                    .map(|s| s.engine.requests_running + s.engine.requests_waiting)
                    .unwrap_or(0.0),
                Err(e) => {
                    report.error(format!("{}: {e}", rec.id));
                    return report;
                }
            },
        };
        let why = if in_flight <= 0.0 {
            "no requests in flight".to_string()
        } else if Utc::now() >= deadline {
            format!("drain deadline passed with {in_flight} requests in flight")
        } else {
            return report;
        };
        apply(
            &self.lifecycle,
            &mut report,
            &rec,
            LifecycleEvent::DrainComplete,
            &format!("drained: {why}"),
            vec![],
            |_| {},
        )
        .await;
        report
    }

    async fn terminate(&self, rec: InstanceRecord) -> TaskReport {
        let mut report = TaskReport::default();
        if self.creating.contains(rec.id) {
            // A create call is in flight; its machine id lands first.
            return report;
        }
        let Some(provider) = self.providers.get(&rec.provider).cloned() else {
            report.error(format!(
                "{}: provider {} not configured",
                rec.id, rec.provider
            ));
            return report;
        };
        let first = self
            .requested
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(rec.id);
        match delete_machines(
            &self.store,
            &self.cluster_id,
            &provider,
            &rec,
            first,
            &mut report,
        )
        .await
        {
            Deletion::Gone => {
                if let Some(_next) = apply(
                    &self.lifecycle,
                    &mut report,
                    &rec,
                    LifecycleEvent::ProviderConfirmedGone,
                    "terminated: the provider confirmed the machine is gone",
                    vec![],
                    |_| {},
                )
                .await
                {
                    if let Err(e) = self.store.revoke_tokens(rec.id, Utc::now()).await {
                        report.error(format!("{}: revoking tokens: {e}", rec.id));
                    }
                    self.requested
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&rec.id);
                }
            }
            Deletion::Pending => {}
        }
        report
    }
}

/// Delete the machine(s) of `rec`: its recorded machine, or — if none was
/// recorded but a create may have happened — any machine tagged with its id.
/// `note_request` puts the delete request on the timeline.
pub(crate) async fn delete_machines(
    store: &Store,
    cluster_id: &str,
    provider: &Arc<dyn Provider>,
    rec: &InstanceRecord,
    note_request: bool,
    report: &mut TaskReport,
) -> Deletion {
    let machines = match &rec.provider_instance_id {
        Some(id) => vec![id.clone()],
        None if rec.provision_attempts == 0 => return Deletion::Gone,
        None => {
            let mut t = BTreeMap::new();
            t.insert(tags::CLUSTER.to_string(), cluster_id.to_string());
            t.insert(tags::INSTANCE.to_string(), rec.id.to_string());
            let started = Instant::now();
            match provider.list(&t).await {
                Ok(list) => {
                    let ids: Vec<_> = list.into_iter().map(|m| m.id).collect();
                    if note_request {
                        let e = call_entry(
                            rec,
                            "provider.list",
                            started,
                            Ok(format!(
                                "{} machine(s) tagged with this instance",
                                ids.len()
                            )),
                        );
                        note(store, report, vec![e]).await;
                    }
                    ids
                }
                Err(e) => {
                    report.error(format!("{}: list: {e}", rec.id));
                    let entry = call_entry(rec, "provider.list", started, Err(&e));
                    note(store, report, vec![entry]).await;
                    return Deletion::Pending;
                }
            }
        }
    };
    let mut all_gone = true;
    for mid in machines {
        let started = Instant::now();
        match provider.terminate(&mid).await {
            Ok(()) => {
                if note_request {
                    let e = call_entry(
                        rec,
                        "provider.terminate",
                        started,
                        Ok(format!("deletion of {mid} requested")),
                    );
                    note(store, report, vec![e]).await;
                }
            }
            Err(e) => {
                all_gone = false;
                report.error(format!("{}: terminate {mid}: {e}", rec.id));
                let entry = call_entry(rec, "provider.terminate", started, Err(&e));
                note(store, report, vec![entry]).await;
                continue;
            }
        }
        let started = Instant::now();
        match provider.get(&mid).await {
            Err(ProviderError::NotFound { .. }) => {
                let e = timeline::entry(
                    rec.id,
                    Utc::now(),
                    TimelineKind::ProviderCall,
                    "provider.get",
                    Outcome::Success,
                    format!("machine {mid} is gone"),
                );
                let e =
                    crate::timeline::EntryExt::duration(e, started.elapsed().as_millis() as i64);
                note(store, report, vec![e]).await;
            }
            Ok(_) => all_gone = false,
            Err(e) => {
                all_gone = false;
                report.error(format!("{}: get {mid}: {e}", rec.id));
            }
        }
    }
    if all_gone {
        Deletion::Gone
    } else {
        Deletion::Pending
    }
}

#[async_trait]
impl Reconciler for Terminator {
    fn name(&self) -> TaskName {
        TaskName::Terminator
    }

    async fn activate(&self) -> TaskReport {
        let mut report = TaskReport::default();
        let list = instances_in(
            &self.store,
            &[InstanceStatus::Draining, InstanceStatus::Terminating],
            &mut report,
        )
        .await;
        fan_out(&mut report, list, CONCURRENCY, |rec| async move {
            match rec.status {
                InstanceStatus::Draining => self.drain(rec).await,
                _ => self.terminate(rec).await,
            }
        })
        .await;
        let again = report.acted > 0;
        if again {
            // A drained instance can be deleted right away.
            self.waker.wake(TaskName::Terminator);
        }
        report
    }
}
