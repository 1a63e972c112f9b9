//! Health: readiness probes of the agents' `/readyz` and heartbeat freshness.
//!
//! - `starting`: a passing probe → `ready`.
//! - `ready`: heartbeat older than `missed_heartbeats_unhealthy` intervals, or
//!   that many failed probes in a row → `unhealthy`.
//! - `unhealthy`: fresh heartbeat and a passing probe → `ready`; silent for
//!   `agent_lost_after_secs` → `failed` (agent_lost); machine gone at the
//!   provider → `failed` (provider_deleted).

use super::{apply, call_entry, fan_out, instances_in, CONCURRENCY};
use crate::driver::{Reconciler, TaskReport};
use crate::fleet::{task, Fleet};
use crate::timeline;
use crate::timeline::EntryExt;
use async_trait::async_trait;
use chrono::Utc;
use gpufleet_domain::{FailureReason, InstanceId, InstanceStatus, LifecycleEvent};
use gpufleet_providers::ProviderError;
use gpufleet_store::{InstanceRecord, Outcome, TimelineKind};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

pub struct Health {
    fleet: Fleet,
    /// Consecutive failed probes per ready instance.
    failures: Mutex<HashMap<InstanceId, u32>>,
}

enum Probe {
    Ready,
    NotReady(String),
}

impl Health {
    pub fn new(fleet: Fleet) -> Self {
        Self {
            fleet,
            failures: Mutex::new(HashMap::new()),
        }
    }

    async fn probe(&self, rec: &InstanceRecord) -> Probe {
        let Some(ip) = rec.ip else {
            return Probe::NotReady("no IP".into());
        };
        let url = format!(
            "http://{}/readyz",
            std::net::SocketAddr::new(ip, self.fleet.config().agent_port)
        );
        match self.fleet.inner.http.get(&url).send().await {
            Ok(r) if r.status().is_success() => Probe::Ready,
            Ok(r) => Probe::NotReady(format!("readyz answered {}", r.status())),
            Err(e) if e.is_timeout() => Probe::NotReady("readyz timed out".into()),
            Err(e) if e.is_connect() => Probe::NotReady("agent not reachable".into()),
            Err(_) => Probe::NotReady("readyz request failed".into()),
        }
    }

    fn count_failure(&self, id: InstanceId, failed: bool) -> u32 {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if failed {
            let n = f.entry(id).or_insert(0);
            *n += 1;
            *n
        } else {
            f.remove(&id);
            0
        }
    }

    async fn check(&self, rec: InstanceRecord) -> TaskReport {
        let mut report = TaskReport::default();
        let fleet = &self.fleet;
        let cfg = fleet.config();
        let now = Utc::now();
        let stale_after = chrono::Duration::milliseconds(
            (cfg.heartbeat_interval_ms * u64::from(cfg.missed_heartbeats_unhealthy.max(1))) as i64,
        );
        let fresh = rec
            .last_heartbeat_at
            .is_some_and(|t| now - t <= stale_after);
        match rec.status {
            InstanceStatus::Starting => {
                let started = Instant::now();
                if let Probe::Ready = self.probe(&rec).await {
                    let e = timeline::entry(
                        rec.id,
                        Utc::now(),
                        TimelineKind::Probe,
                        "probe.readyz",
                        Outcome::Success,
                        "engine serves the model",
                    )
                    .duration(started.elapsed().as_millis() as i64);
                    apply(
                        fleet,
                        &mut report,
                        &rec,
                        LifecycleEvent::EngineReady,
                        "ready: engine serves the model",
                        vec![e],
                        |r| r.milestones.engine_started = true,
                    )
                    .await;
                }
            }
            InstanceStatus::Ready => {
                // Freshness counts from the later of the last heartbeat and
                // the moment it became ready.
                let last_sign = rec
                    .last_heartbeat_at
                    .unwrap_or(rec.status_changed_at)
                    .max(rec.status_changed_at);
                let fresh = now - last_sign <= stale_after;
                let probe = self.probe(&rec).await;
                let failed = matches!(probe, Probe::NotReady(_));
                let n = self.count_failure(rec.id, failed);
                let why = if !fresh {
                    let age = rec
                        .last_heartbeat_at
                        .map(|t| (now - t).num_milliseconds() as f64 / 1000.0);
                    Some(match age {
                        Some(a) => format!("no heartbeat for {a:.1} s"),
                        None => "no heartbeat yet".to_string(),
                    })
                } else if n >= cfg.missed_heartbeats_unhealthy.max(1) {
                    match probe {
                        Probe::NotReady(reason) => {
                            Some(format!("{n} readiness probes failed: {reason}"))
                        }
                        Probe::Ready => None,
                    }
                } else {
                    None
                };
                if let Some(why) = why {
                    let e = timeline::entry(
                        rec.id,
                        now,
                        TimelineKind::Probe,
                        "health.check",
                        Outcome::Failed,
                        why.clone(),
                    )
                    .error_code("unhealthy");
                    apply(
                        fleet,
                        &mut report,
                        &rec,
                        LifecycleEvent::HeartbeatsMissed,
                        &format!("unhealthy: {why}"),
                        vec![e],
                        |_| {},
                    )
                    .await;
                }
            }
            InstanceStatus::Unhealthy => {
                let silent_since = rec
                    .last_heartbeat_at
                    .unwrap_or(rec.status_changed_at)
                    .max(rec.status_changed_at);
                if fresh {
                    if let Probe::Ready = self.probe(&rec).await {
                        self.count_failure(rec.id, false);
                        let e = timeline::entry(
                            rec.id,
                            now,
                            TimelineKind::Probe,
                            "health.check",
                            Outcome::Success,
                            "heartbeats resumed and readiness probe passed",
                        );
                        apply(
                            fleet,
                            &mut report,
                            &rec,
                            LifecycleEvent::HealthRestored,
                            "healthy again",
                            vec![e],
                            |_| {},
                        )
                        .await;
                    }
                } else if now - silent_since
                    > chrono::Duration::seconds(cfg.agent_lost_after_secs as i64)
                {
                    apply(
                        fleet,
                        &mut report,
                        &rec,
                        LifecycleEvent::Fail(FailureReason::AgentLost),
                        &format!("agent silent for more than {} s", cfg.agent_lost_after_secs),
                        vec![],
                        |_| {},
                    )
                    .await;
                } else if let (Some(p), Some(mid)) = (
                    fleet.provider(&rec.provider).cloned(),
                    rec.provider_instance_id.clone(),
                ) {
                    let started = Instant::now();
                    if let Err(e @ ProviderError::NotFound { .. }) = p.get(&mid).await {
                        let entry = call_entry(&rec, "provider.get", started, Err(&e));
                        apply(
                            fleet,
                            &mut report,
                            &rec,
                            LifecycleEvent::Fail(FailureReason::ProviderDeleted),
                            &format!("machine {mid} no longer exists at the provider"),
                            vec![entry],
                            |_| {},
                        )
                        .await;
                    }
                }
            }
            _ => {}
        }
        report
    }
}

#[async_trait]
impl Reconciler for Health {
    fn name(&self) -> &'static str {
        task::HEALTH
    }

    async fn activate(&self) -> TaskReport {
        let mut report = TaskReport::default();
        let list = instances_in(
            &self.fleet,
            &[
                InstanceStatus::Starting,
                InstanceStatus::Ready,
                InstanceStatus::Unhealthy,
            ],
            &mut report,
        )
        .await;
        fan_out(&mut report, list, CONCURRENCY * 2, |rec| self.check(rec)).await;
        report
    }
}
