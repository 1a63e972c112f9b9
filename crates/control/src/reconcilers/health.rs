//! Health: readiness probes of the agents' `/readyz` and heartbeat freshness.
//!
//! - `starting`: a passing probe → `ready`.
//!
//! A probe passes only when the answer proves it comes from the instance's
//! own agent: it carries a fresh challenge, which the agent answers with an
//! HMAC keyed by its token's digest (`gpufleet_proto::identity`). Another
//! fleet's agent on the same address, or a stranger on a reused cloud IP,
//! fails it, and the instance never turns `ready` on their word.
//! - `ready`: heartbeat older than `missed_heartbeats_unhealthy` intervals, or
//!   that many failed probes in a row → `unhealthy`. While its heartbeats
//!   are fresh and report the engine ready, and its last probe passed, a
//!   ready instance is probed only every `ready_probe_interval_ms` (a fleet
//!   of a thousand would otherwise be probed a thousand times a second).
//! - `ready` whose latest fresh heartbeat says the engine canary failed (a
//!   real one-token completion the agent sends every `canary_interval_ms`:
//!   a hung engine can still answer `/health` and `/readyz`) → `unhealthy`,
//!   the canary's reason on the timeline.
//! - `unhealthy`: fresh heartbeat, a canary that does not fail (passes, or
//!   is not reported: off, or the engine just restarted) and a passing
//!   probe → `ready`; silent for
//!   `agent_lost_after_secs` → `failed` (agent_lost); machine gone at the
//!   provider → `failed` (provider_deleted).

use super::{apply, call_entry, fan_out, instances_in, CONCURRENCY};
use crate::config::ControlConfig;
use crate::driver::{Reconciler, TaskName, TaskReport};
use crate::lifecycle::Lifecycle;

use crate::timeline;
use crate::timeline::EntryExt;
use async_trait::async_trait;
use chrono::Utc;
use gpufleet_domain::{FailureReason, InstanceId, InstanceStatus, LifecycleEvent};
use gpufleet_proto::{identity, CanarySample, Readiness};
use gpufleet_providers::{ProviderError, ProviderRegistry};
use gpufleet_store::{InstanceRecord, Outcome, Store, TimelineKind};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub struct Health {
    store: Store,
    lifecycle: Lifecycle,
    providers: ProviderRegistry,
    config: Arc<ControlConfig>,
    /// Probes the agents (timeout: `probe_timeout_ms`).
    http: reqwest::Client,
    /// Consecutive failed probes per ready instance.
    failures: Mutex<HashMap<InstanceId, u32>>,
    /// When each ready instance last passed a probe.
    passed: Mutex<HashMap<InstanceId, Instant>>,
    /// Token digests of each probed instance's agent, read from the store
    /// when missing or when a proof matches none of them.
    digests: Mutex<HashMap<InstanceId, Vec<String>>>,
}

enum Probe {
    Ready,
    NotReady(String),
}

impl Health {
    pub(crate) fn new(
        lifecycle: Lifecycle,
        providers: ProviderRegistry,
        config: Arc<ControlConfig>,
        http: reqwest::Client,
    ) -> Self {
        Self {
            store: lifecycle.store().clone(),
            lifecycle,
            providers,
            config,
            http,
            failures: Mutex::new(HashMap::new()),
            passed: Mutex::new(HashMap::new()),
            digests: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `proof` answers `challenge` for one of `id`'s agent tokens.
    async fn proven(&self, id: InstanceId, challenge: &str, proof: &str) -> Result<bool, String> {
        let matches = |digests: &[String]| {
            digests.iter().any(|d| {
                crate::secrets::constant_time_eq(
                    &identity::readiness_proof(d, id, challenge),
                    proof,
                )
            })
        };
        let cached = self.cached_digests(id);
        if cached.as_deref().is_some_and(matches) {
            return Ok(true);
        }
        let fresh = self
            .store
            .agent_token_digests(id)
            .await
            .map_err(|e| format!("cannot read the agent's token: {e}"))?;
        let ok = matches(&fresh);
        self.digests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, fresh);
        Ok(ok)
    }

    fn cached_digests(&self, id: InstanceId) -> Option<Vec<String>> {
        self.digests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    async fn probe(&self, rec: &InstanceRecord) -> Probe {
        let Some(ip) = rec.ip else {
            return Probe::NotReady("no IP".into());
        };
        let addr = std::net::SocketAddr::new(ip, self.config.agent_port);
        let challenge = crate::secrets::generate("");
        let url = format!(
            "http://{addr}/readyz?{}={challenge}",
            identity::CHALLENGE_PARAM
        );
        let resp = match self.http.get(&url).send().await {
            Ok(r) => r,
            Err(e) if e.is_timeout() => return Probe::NotReady("readyz timed out".into()),
            Err(e) if e.is_connect() => return Probe::NotReady("agent not reachable".into()),
            Err(_) => return Probe::NotReady("readyz request failed".into()),
        };
        let status = resp.status();
        let Ok(answer) = resp.json::<Readiness>().await else {
            return Probe::NotReady(format!(
                "readyz at {addr} answered {status} without a readiness document: not this instance's agent"
            ));
        };
        if answer.instance_id != rec.id {
            return Probe::NotReady(format!(
                "the agent at {addr} belongs to instance {}, not this one",
                answer.instance_id
            ));
        }
        let Some(proof) = answer.proof.as_deref() else {
            return Probe::NotReady("the agent has no token yet: not registered".into());
        };
        match self.proven(rec.id, &challenge, proof).await {
            Ok(true) => {}
            Ok(false) => {
                return Probe::NotReady(format!(
                    "the agent at {addr} failed the identity challenge: not this instance's agent"
                ))
            }
            Err(reason) => return Probe::NotReady(reason),
        }
        if status.is_success() && answer.ready {
            Probe::Ready
        } else {
            Probe::NotReady(match answer.reason {
                Some(reason) => format!("readyz answered {status}: {reason}"),
                None => format!("readyz answered {status}"),
            })
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

    /// `canary`: the engine canary of the instance's latest heartbeat.
    async fn check(&self, rec: InstanceRecord, canary: Option<CanarySample>) -> TaskReport {
        let mut report = TaskReport::default();
        let cfg = &self.config;
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
                        &self.lifecycle,
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
                if let Some(failed) = canary.as_ref().filter(|c| fresh && !c.ok) {
                    // The engine does not answer a real request: out of
                    // the router's pool now, whatever /readyz says.
                    let why = canary_failure(failed);
                    let mut e = timeline::entry(
                        rec.id,
                        now,
                        TimelineKind::Probe,
                        "health.canary",
                        Outcome::Failed,
                        why.clone(),
                    )
                    .error_code("engine_canary");
                    if let Some(ms) = failed.latency_ms {
                        e = e.duration(ms as i64);
                    }
                    apply(
                        &self.lifecycle,
                        &mut report,
                        &rec,
                        LifecycleEvent::HeartbeatsMissed,
                        &format!("unhealthy: {why}"),
                        vec![e],
                        |_| {},
                    )
                    .await;
                    return report;
                }
                let every = std::time::Duration::from_millis(cfg.ready_probe_interval_ms);
                let recently_passed = self
                    .passed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&rec.id)
                    .is_some_and(|t| t.elapsed() < every);
                let probe = if fresh
                    && recently_passed
                    && rec.engine_status == Some(gpufleet_proto::EngineStatus::Ready)
                {
                    // The agent vouches for the engine and passed a probe
                    // lately: nothing to ask it yet.
                    Probe::Ready
                } else {
                    let probe = self.probe(&rec).await;
                    let mut passed = self.passed.lock().unwrap_or_else(|p| p.into_inner());
                    match probe {
                        Probe::Ready => passed.insert(rec.id, Instant::now()),
                        Probe::NotReady(_) => passed.remove(&rec.id),
                    };
                    probe
                };
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
                        &self.lifecycle,
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
                let canary_fails = canary.as_ref().is_some_and(|c| !c.ok);
                if fresh && canary_fails {
                    // Stays out of the pool until the canary passes again.
                } else if fresh {
                    if let Probe::Ready = self.probe(&rec).await {
                        self.count_failure(rec.id, false);
                        let (action, what, message) = match canary.as_ref().filter(|_| {
                            rec.status_message
                                .as_deref()
                                .is_some_and(|m| m.contains(CANARY_FAILED))
                        }) {
                            Some(passed) => (
                                "health.canary",
                                match passed.latency_ms {
                                    Some(ms) => format!(
                                        "engine canary passes again (answered in {ms:.0} ms) and readiness probe passed"
                                    ),
                                    None => "engine canary passes again and readiness probe passed"
                                        .to_string(),
                                },
                                "healthy again: engine canary passes",
                            ),
                            None => (
                                "health.check",
                                "heartbeats resumed and readiness probe passed".to_string(),
                                "healthy again",
                            ),
                        };
                        let e = timeline::entry(
                            rec.id,
                            now,
                            TimelineKind::Probe,
                            action,
                            Outcome::Success,
                            what,
                        );
                        apply(
                            &self.lifecycle,
                            &mut report,
                            &rec,
                            LifecycleEvent::HealthRestored,
                            message,
                            vec![e],
                            |_| {},
                        )
                        .await;
                    }
                } else if now - silent_since
                    > chrono::Duration::seconds(cfg.agent_lost_after_secs as i64)
                {
                    apply(
                        &self.lifecycle,
                        &mut report,
                        &rec,
                        LifecycleEvent::Fail(FailureReason::AgentLost),
                        &format!("agent silent for more than {} s", cfg.agent_lost_after_secs),
                        vec![],
                        |_| {},
                    )
                    .await;
                } else if let (Some(p), Some(mid)) = (
                    self.providers.get(&rec.provider).cloned(),
                    rec.provider_instance_id.clone(),
                ) {
                    let started = Instant::now();
                    if let Err(e @ ProviderError::NotFound { .. }) = p.get(&mid).await {
                        let entry = call_entry(&rec, "provider.get", started, Err(&e));
                        apply(
                            &self.lifecycle,
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

/// How a canary failure begins on the timeline and in the status message.
const CANARY_FAILED: &str = "engine canary failed";

/// Why the instance leaves the pool, e.g. `engine canary failed: no answer
/// within 10 s (3 checks in a row)`.
fn canary_failure(c: &CanarySample) -> String {
    let reason = c.error.as_deref().unwrap_or("no reason given");
    match c.consecutive_failures {
        n if n > 1 => format!("{CANARY_FAILED}: {reason} ({n} checks in a row)"),
        _ => format!("{CANARY_FAILED}: {reason}"),
    }
}

#[async_trait]
impl Reconciler for Health {
    fn name(&self) -> TaskName {
        TaskName::Health
    }

    async fn activate(&self) -> TaskReport {
        let mut report = TaskReport::default();
        let list = instances_in(
            &self.store,
            &[
                InstanceStatus::Starting,
                InstanceStatus::Ready,
                InstanceStatus::Unhealthy,
            ],
            &mut report,
        )
        .await;
        let live: std::collections::HashSet<InstanceId> = list.iter().map(|r| r.id).collect();
        self.digests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|id, _| live.contains(id));
        self.passed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|id, _| live.contains(id));
        // One read for every instance's latest canary.
        let canaries = match self
            .store
            .engine_canaries(&[InstanceStatus::Ready, InstanceStatus::Unhealthy])
            .await
        {
            Ok(c) => c,
            Err(e) => {
                report.error(format!("cannot read the engine canaries: {e}"));
                return report;
            }
        };
        fan_out(&mut report, list, CONCURRENCY * 2, |rec| {
            let canary = canaries.get(&rec.id).cloned();
            self.check(rec, canary)
        })
        .await;
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(error: Option<&str>, n: u32) -> CanarySample {
        CanarySample {
            ok: false,
            checked_at: Utc::now(),
            latency_ms: None,
            error: error.map(String::from),
            consecutive_failures: n,
        }
    }

    #[test]
    fn the_canary_failure_names_its_reason() {
        assert_eq!(
            canary_failure(&failed(Some("no answer within 10 s"), 1)),
            "engine canary failed: no answer within 10 s"
        );
        assert_eq!(
            canary_failure(&failed(Some("HTTP 500: boom"), 4)),
            "engine canary failed: HTTP 500: boom (4 checks in a row)"
        );
        assert_eq!(
            canary_failure(&failed(None, 0)),
            "engine canary failed: no reason given"
        );
    }
}
