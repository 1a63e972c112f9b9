//! Boot watcher: discovers the IP of machines in `booting` ("no IP yet" is
//! recorded once as waiting, not as a failure) and fails instances that miss
//! their startup deadline.

use super::{apply, call_entry, fan_out, instances_in, note, CONCURRENCY};
use crate::driver::{Reconciler, TaskName, TaskReport, Waker};
use crate::lifecycle::Lifecycle;

use crate::timeline::{self, EntryExt};
use async_trait::async_trait;
use chrono::Utc;
use gpufleet_domain::{FailureReason, InstanceId, InstanceStatus, LifecycleEvent};
use gpufleet_providers::{ProviderError, ProviderRegistry};
use gpufleet_store::{InstanceRecord, Outcome, Store, TimelineKind};
use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Instant;

pub struct BootWatcher {
    store: Store,
    lifecycle: Lifecycle,
    providers: ProviderRegistry,
    waker: Waker,
    /// `startup_timeout_secs`, for the failure message.
    startup_timeout_secs: u64,
    /// Instances whose "waiting for an IP" is already on the timeline.
    waiting_noted: Mutex<HashSet<InstanceId>>,
}

impl BootWatcher {
    pub(crate) fn new(
        lifecycle: Lifecycle,
        providers: ProviderRegistry,
        waker: Waker,
        startup_timeout_secs: u64,
    ) -> Self {
        Self {
            store: lifecycle.store().clone(),
            lifecycle,
            providers,
            waker,
            startup_timeout_secs,
            waiting_noted: Mutex::new(HashSet::new()),
        }
    }

    fn first_wait(&self, id: InstanceId) -> bool {
        self.waiting_noted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id)
    }

    async fn watch(&self, rec: InstanceRecord) -> TaskReport {
        let mut report = TaskReport::default();
        let (Some(provider), Some(mid)) = (
            self.providers.get(&rec.provider).cloned(),
            rec.provider_instance_id.clone(),
        ) else {
            return report;
        };
        let started = Instant::now();
        match provider.get(&mid).await {
            Ok(m) => match m.ip {
                Some(ip) => {
                    let entry = call_entry(
                        &rec,
                        "provider.get",
                        started,
                        Ok(format!("machine {mid} has IP {ip}")),
                    );
                    apply(
                        &self.lifecycle,
                        &mut report,
                        &rec,
                        LifecycleEvent::IpAssigned,
                        &format!("IP {ip} assigned"),
                        vec![entry],
                        |r| {
                            r.ip = Some(ip);
                            r.milestones.ip_assigned = true;
                        },
                    )
                    .await;
                    self.waker.wake(TaskName::Health);
                }
                None => {
                    if self.first_wait(rec.id) {
                        let e = timeline::entry(
                            rec.id,
                            Utc::now(),
                            TimelineKind::ProviderCall,
                            "provider.get",
                            Outcome::Waiting,
                            format!("machine {mid} has no IP yet; waiting"),
                        )
                        .duration(started.elapsed().as_millis() as i64);
                        note(&self.store, &mut report, vec![e]).await;
                    }
                }
            },
            Err(e @ ProviderError::NotFound { .. }) => {
                let entry = call_entry(&rec, "provider.get", started, Err(&e));
                apply(
                    &self.lifecycle,
                    &mut report,
                    &rec,
                    LifecycleEvent::Fail(FailureReason::ProviderDeleted),
                    &format!("machine {mid} disappeared while booting"),
                    vec![entry],
                    |_| {},
                )
                .await;
            }
            Err(e) => {
                report.error(format!("{}: get: {e}", rec.id));
                let entry = call_entry(&rec, "provider.get", started, Err(&e));
                note(&self.store, &mut report, vec![entry]).await;
            }
        }
        report
    }
}

#[async_trait]
impl Reconciler for BootWatcher {
    fn name(&self) -> TaskName {
        TaskName::BootWatcher
    }

    async fn activate(&self) -> TaskReport {
        let mut report = TaskReport::default();
        let now = Utc::now();
        let live = instances_in(&self.store, &InstanceStatus::STARTING_UP, &mut report).await;
        let mut booting = Vec::new();
        for rec in live {
            if rec.startup_deadline_at <= now {
                let secs = (now - rec.created_at).num_seconds();
                apply(
                    &self.lifecycle,
                    &mut report,
                    &rec,
                    LifecycleEvent::Fail(FailureReason::StartupTimeout),
                    &format!(
                        "not ready {secs} s after creation (startup timeout {} s)",
                        self.startup_timeout_secs
                    ),
                    vec![],
                    |_| {},
                )
                .await;
            } else if rec.status == InstanceStatus::Booting {
                booting.push(rec);
            }
        }
        fan_out(&mut report, booting, CONCURRENCY, |rec| self.watch(rec)).await;
        report
    }
}
