//! Keeper: keeps each deployment's replicas as declared.
//!
//! Each pass, per deployment (level-triggered: it looks at the deployment
//! and all its instances, never at "what changed"):
//! 1. counts its instances: ready; starting (provisioning, booting,
//!    starting); unhealthy (within `deployment_unhealthy_grace_secs`);
//!    doomed (unhealthy past it); draining (draining, terminating); failed;
//! 2. decides the desired count: the autoscaler's ask (load over ready
//!    replicas / target per replica, rounded up) within the bounds; up at
//!    once, down only once a lower ask has held for `scale_down_delay`
//!    (then to the highest ask seen in that window: no flapping);
//! 3. creates the shortfall (through [`Fleet::create_instances_for`]: the
//!    same checks and persisted intent as any instance) on the first
//!    placement not backing off: a placement where an instance failed
//!    `out_of_capacity` (or for quota) in the last
//!    `deployment_placement_backoff_secs` is skipped, and that fallback is
//!    written on the timeline;
//! 4. replaces failed and doomed replicas: the replacement is created
//!    first (never beyond `max` live), the old one is terminated once
//!    enough replicas are ready (at `max`, a doomed one goes first);
//! 5. scales down extras: not yet ready first, then unhealthy, then the
//!    newest ready ones, through [`Fleet::terminate_because`] (drains);
//! 6. writes the desired count and a readable status.
//!
//! A deployment being deleted: every instance is terminated (drained
//! first), and once none is live the deployment is marked deleted.
//!
//! Every decision is a `deployment_events` row with its reason and a count
//! in `gpufleet_deployment_decisions_total`. What the keeper remembers
//! between passes (when a lower ask began; failures already written) is
//! in memory: a new lease holder starts the scale-down delay again, which
//! only delays a scale-down.

use crate::config::ControlConfig;
use crate::deployments::event;
use crate::driver::{current_fence, Reconciler, TaskName, TaskReport};
use crate::error::ControlError;
use crate::fleet::{CreateInstances, Fleet};
use crate::telemetry::Telemetry;
use crate::traffic::TrafficSlot;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use gpufleet_domain::{
    DeploymentAction, DeploymentId, DeploymentState, FailureReason, InstanceId, InstanceStatus,
    Placement, ReplicaStatus, ScalingMetric,
};
use gpufleet_store::{
    DeploymentRecord, InstanceRecord, NewDeploymentEvent, Outcome, SampleRecord, Store, StoreError,
    TimelineKind,
};
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

pub struct Keeper {
    store: Store,
    fleet: Fleet,
    config: Arc<ControlConfig>,
    telemetry: Arc<Telemetry>,
    traffic: TrafficSlot,
    memory: Mutex<HashMap<DeploymentId, Memory>>,
}

/// What the keeper remembers of one deployment between passes.
#[derive(Debug, Default, Clone)]
struct Memory {
    /// Since when the autoscaler has asked for fewer replicas than desired,
    /// and the highest of those asks.
    lower: Option<(DateTime<Utc>, u32)>,
    /// Failed instances whose failure (fallback, replacement) is written.
    noted: HashSet<InstanceId>,
    /// Whether "no placement has capacity" is written (once per episode).
    blocked: bool,
    /// When requests were last seen in flight to its replicas (activity
    /// for scale to zero besides the routers' `demand_at`).
    active_at: Option<DateTime<Utc>>,
}

/// A deployment's instances by what they mean for it.
#[derive(Debug, Default)]
struct Census<'a> {
    ready: Vec<&'a InstanceRecord>,
    starting: Vec<&'a InstanceRecord>,
    unhealthy: Vec<&'a InstanceRecord>,
    /// Unhealthy past the grace period: to be replaced.
    doomed: Vec<&'a InstanceRecord>,
    draining: Vec<&'a InstanceRecord>,
    /// Failed, with a machine that may still be there: terminated once
    /// the replacement is ready.
    failed: Vec<&'a InstanceRecord>,
    /// Live but on a placement the deployment no longer has (a rolling
    /// update): replaced, then drained once the new ones are ready.
    outdated: Vec<&'a InstanceRecord>,
}

impl<'a> Census<'a> {
    /// Take out of the counts the live replicas on placements not in
    /// `placements`, or started with other engine arguments.
    fn split_outdated(&mut self, placements: &[Placement], engine_args: &Option<Vec<String>>) {
        for list in [
            &mut self.ready,
            &mut self.starting,
            &mut self.unhealthy,
            &mut self.doomed,
        ] {
            let (keep, old): (Vec<&'a InstanceRecord>, Vec<&'a InstanceRecord>) =
                std::mem::take(list).into_iter().partition(|r| {
                    placements.contains(&placement_of(r))
                        && args_of(&r.engine_args) == args_of(engine_args)
                });
            *list = keep;
            self.outdated.extend(old);
        }
    }

    fn of(instances: &'a [InstanceRecord], now: DateTime<Utc>, grace: chrono::Duration) -> Self {
        let mut c = Census::default();
        for r in instances {
            match r.status {
                InstanceStatus::Ready => c.ready.push(r),
                InstanceStatus::Provisioning
                | InstanceStatus::Booting
                | InstanceStatus::Starting => c.starting.push(r),
                InstanceStatus::Unhealthy if now - r.status_changed_at > grace => c.doomed.push(r),
                InstanceStatus::Unhealthy => c.unhealthy.push(r),
                InstanceStatus::Draining | InstanceStatus::Terminating => c.draining.push(r),
                InstanceStatus::Failed
                    if r.provider_instance_id.is_some()
                        && r.cleanup_started_at.is_none()
                        && r.terminate_requested_at.is_none() =>
                {
                    c.failed.push(r)
                }
                _ => {}
            }
        }
        c
    }

    /// Replicas that count toward the desired number.
    fn healthy(&self) -> usize {
        self.ready.len() + self.starting.len() + self.unhealthy.len()
    }

    /// Replicas holding a machine that is not on its way out.
    fn live(&self) -> usize {
        self.healthy() + self.doomed.len()
    }
}

/// Whether an instance failed for lack of capacity or quota where it was placed.
fn capacity_failure(r: &InstanceRecord) -> bool {
    r.status == InstanceStatus::Failed
        && (r.status_reason == Some(FailureReason::OutOfCapacity)
            || (r.status_reason == Some(FailureReason::ProvisionFailed)
                && r.status_message
                    .as_deref()
                    .is_some_and(|m| m.to_ascii_lowercase().contains("quota"))))
}

/// Engine arguments, none and empty alike.
fn args_of(a: &Option<Vec<String>>) -> &[String] {
    a.as_deref().unwrap_or(&[])
}

fn placement_of(r: &InstanceRecord) -> Placement {
    Placement {
        provider: r.provider.clone(),
        zone: r.zone.clone(),
        instance_type: r.instance_type.clone(),
    }
}

impl Keeper {
    pub(crate) fn new(
        fleet: Fleet,
        config: Arc<ControlConfig>,
        telemetry: Arc<Telemetry>,
        traffic: TrafficSlot,
    ) -> Self {
        Self {
            store: fleet.store().clone(),
            fleet,
            config,
            telemetry,
            traffic,
            memory: Mutex::new(HashMap::new()),
        }
    }

    fn memory(&self, id: DeploymentId) -> Memory {
        self.memory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
            .unwrap_or_default()
    }

    fn remember(&self, id: DeploymentId, m: Memory) {
        self.memory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, m);
    }

    fn decided(&self, events: &mut Vec<NewDeploymentEvent>, e: NewDeploymentEvent) {
        tracing::info!(deployment_id = %e.deployment_id, action = %e.action, "{}", e.message);
        self.telemetry.deployment_decision(e.action);
        events.push(e);
    }

    /// The autoscaled figure summed over the ready replicas; `None` with no
    /// ready replica (nothing to measure).
    fn load(
        &self,
        metric: ScalingMetric,
        ready: &[&InstanceRecord],
        samples: &HashMap<InstanceId, SampleRecord>,
    ) -> Option<f64> {
        if ready.is_empty() {
            return None;
        }
        let total = ready
            .iter()
            .map(|r| {
                let s = samples.get(&r.id).map(|s| &s.engine);
                match metric {
                    ScalingMetric::RequestsInFlight => match self.traffic.in_flight(r.id) {
                        Some(n) => n as f64,
                        None => s.map_or(0.0, |e| e.requests_running + e.requests_waiting),
                    },
                    ScalingMetric::QueueLength => s.map_or(0.0, |e| e.requests_waiting),
                    ScalingMetric::KvCacheUsage => s.and_then(|e| e.kv_cache_usage).unwrap_or(0.0),
                    ScalingMetric::TokensPerSecond => {
                        s.and_then(|e| e.generation_tokens_per_s).unwrap_or(0.0)
                    }
                }
            })
            .sum();
        Some(total)
    }

    async fn keep_active(
        &self,
        d: &DeploymentRecord,
        instances: &[InstanceRecord],
        samples: &HashMap<InstanceId, SampleRecord>,
        report: &mut TaskReport,
    ) -> Result<(), ControlError> {
        let now = Utc::now();
        let spec = &d.spec;
        let grace = chrono::Duration::seconds(self.config.deployment_unhealthy_grace_secs as i64);
        let mut c = Census::of(instances, now, grace);
        c.split_outdated(&spec.placements, &spec.engine_args);
        let mut mem = self.memory(d.id);
        let mut events = Vec::new();
        let mut conditions = Vec::new();

        // 2. The desired count.
        let before = d.desired_replicas;
        // Scale to zero: idle for `scale_to_zero_after` (no request wanted
        // the model, none in flight) → 0, whatever the bounds; at zero, a
        // request's demand → back to the bounds at once.
        let in_flight: u64 = c
            .ready
            .iter()
            .chain(&c.starting)
            .map(|r| self.traffic.in_flight(r.id).unwrap_or(0))
            .sum();
        let idle_after = spec
            .scale_to_zero_after
            .map(|a| chrono::Duration::seconds(a.as_secs() as i64));
        if in_flight > 0 {
            mem.active_at = Some(now);
        }
        let last_demand = [d.demand_at, mem.active_at]
            .into_iter()
            .flatten()
            .fold(d.created_at, DateTime::max);
        let idle = idle_after.is_some_and(|a| in_flight == 0 && now - last_demand >= a);
        let at_zero = idle_after.is_some() && before == 0;
        if at_zero && idle {
            mem.lower = None;
            conditions.push(format!(
                "scaled to zero: no request since {}; the next one wakes it",
                last_demand.format("%Y-%m-%d %H:%M:%S UTC")
            ));
        } else if at_zero {
            let to = spec.clamp(1);
            self.decided(
                &mut events,
                event(
                    d.id,
                    DeploymentAction::DesiredChanged,
                    Outcome::Success,
                    format!(
                        "desired 0 → {to}: a request arrived at {} (scale from zero)",
                        last_demand.format("%H:%M:%S")
                    ),
                    json!({ "from": 0, "to": to, "reason": "scale_from_zero" }),
                ),
            );
        } else if idle {
            // Not at zero yet: go there.
            mem.lower = None;
            self.decided(
                &mut events,
                event(
                    d.id,
                    DeploymentAction::DesiredChanged,
                    Outcome::Success,
                    format!(
                        "desired {before} → 0: no request for {} (scale to zero)",
                        spec.scale_to_zero_after
                            .map(|a| a.to_string())
                            .unwrap_or_default()
                    ),
                    json!({ "from": before, "to": 0, "reason": "scale_to_zero" }),
                ),
            );
        }
        let current = if at_zero {
            spec.clamp(1)
        } else {
            spec.clamp(d.desired_replicas)
        };
        let a = spec.autoscaling;
        let load = self.load(a.metric, &c.ready, samples);
        let asked = load.map_or(current, |total| spec.clamp(a.replicas_for(total)));
        let figures = |total: Option<f64>| match total {
            Some(t) => format!(
                "{} {t:.1} over {} ready (target {} per replica)",
                a.metric,
                c.ready.len(),
                a.target_per_replica
            ),
            None => "no ready replica to measure".to_string(),
        };
        let mut desired = current;
        if current != before && !at_zero {
            self.decided(
                &mut events,
                event(
                    d.id,
                    DeploymentAction::DesiredChanged,
                    Outcome::Success,
                    format!(
                        "desired {before} → {current}: replicas must be {} to {}",
                        spec.replicas.min, spec.replicas.max
                    ),
                    json!({ "from": before, "to": current, "reason": "bounds" }),
                ),
            );
        }
        if asked > current {
            mem.lower = None;
            desired = asked;
            self.decided(
                &mut events,
                event(
                    d.id,
                    DeploymentAction::DesiredChanged,
                    Outcome::Success,
                    format!("desired {current} → {asked}: {}", figures(load)),
                    json!({ "from": current, "to": asked, "metric": a.metric, "load": load, "reason": "scale_up" }),
                ),
            );
        } else if asked < current {
            let (since, peak) = match mem.lower {
                Some((since, peak)) => (since, peak.max(asked)),
                None => (now, asked),
            };
            let delay = chrono::Duration::seconds(a.scale_down_delay.as_secs() as i64);
            if now - since >= delay {
                mem.lower = None;
                desired = peak;
                self.decided(
                    &mut events,
                    event(
                        d.id,
                        DeploymentAction::DesiredChanged,
                        Outcome::Success,
                        format!(
                            "desired {current} → {peak}: load below target for {} ({})",
                            a.scale_down_delay,
                            figures(load)
                        ),
                        json!({ "from": current, "to": peak, "metric": a.metric, "load": load, "reason": "scale_down" }),
                    ),
                );
            } else {
                mem.lower = Some((since, peak));
                conditions.push(format!(
                    "load would need {peak}; scaling down after {} of lower load",
                    a.scale_down_delay
                ));
            }
        } else {
            mem.lower = None;
        }

        if idle {
            // Scaled to zero: nothing is created; every replica drains below.
            desired = 0;
        }

        // Placements backing off after capacity failures; fallbacks written once.
        let backoff =
            chrono::Duration::seconds(self.config.deployment_placement_backoff_secs as i64);
        let mut backing_off: HashSet<Placement> = HashSet::new();
        for r in instances.iter().filter(|r| capacity_failure(r)) {
            if now - r.status_changed_at < backoff {
                backing_off.insert(placement_of(r));
            }
        }
        let usable: Vec<&Placement> = spec
            .placements
            .iter()
            .filter(|p| !backing_off.contains(*p))
            .collect();
        for r in instances.iter().filter(|r| capacity_failure(r)) {
            if mem.noted.contains(&r.id) || now - r.status_changed_at >= backoff {
                continue;
            }
            mem.noted.insert(r.id);
            let from = placement_of(r);
            let (message, next) = match usable.first() {
                Some(p) => (
                    format!(
                        "{} failed for lack of capacity in {}: trying {} (placement {} backs off for {}s)",
                        r.id,
                        from,
                        p,
                        from.zone,
                        backoff.num_seconds()
                    ),
                    Some(p.to_string()),
                ),
                None => (
                    format!(
                        "{} failed for lack of capacity in {}: no other placement has capacity; retrying after the back-off",
                        r.id, from
                    ),
                    None,
                ),
            };
            self.decided(
                &mut events,
                event(
                    d.id,
                    DeploymentAction::Fallback,
                    Outcome::Waiting,
                    message,
                    json!({ "instance_id": r.id, "from": from.to_string(), "to": next, "reason": r.status_reason }),
                ),
            );
        }

        // 3 and 4: create the shortfall, replacements included.
        let max = spec.replicas.max as usize;
        let mut healthy = c.healthy();
        let mut live = c.live();
        let mut doomed: Vec<&InstanceRecord> = c.doomed.clone();
        doomed.sort_by_key(|r| r.status_changed_at);
        let mut removed: HashSet<InstanceId> = HashSet::new();
        let want = desired as usize;
        if healthy < want {
            let need = want - healthy;
            // At max with a replica to replace: the doomed one goes first.
            while live + need > max && !doomed.is_empty() && live >= max {
                let old = doomed.remove(0);
                self.terminate(
                    d,
                    old,
                    DeploymentAction::Replace,
                    format!(
                        "{} unhealthy for over {}s; at max ({max}) replicas, so it is removed before its replacement starts",
                        old.id,
                        grace.num_seconds()
                    ),
                    &mut events,
                    report,
                )
                .await;
                removed.insert(old.id);
                live -= 1;
            }
            // During a rolling update, one replica above max at most.
            let surge = usize::from(!c.outdated.is_empty());
            let n = need.min((max + surge).saturating_sub(live + c.outdated.len()));
            if n > 0 {
                match usable.first() {
                    Some(p) => {
                        let replacing: Vec<String> = c
                            .failed
                            .iter()
                            .chain(doomed.iter())
                            .map(|r| r.id.to_string())
                            .collect();
                        let (action, why) = if replacing.is_empty() {
                            (
                                DeploymentAction::ScaleUp,
                                format!("{healthy} of {want} replicas"),
                            )
                        } else {
                            (
                                DeploymentAction::Replace,
                                format!("replacing {}", replacing.join(", ")),
                            )
                        };
                        let req = CreateInstances {
                            provider: p.provider.clone(),
                            zone: Some(p.zone.clone()),
                            instance_type: p.instance_type.clone(),
                            model: d.model.clone(),
                            count: n as u32,
                        };
                        match self
                            .fleet
                            .create_instances_for(
                                req,
                                d.project_id.clone(),
                                Some(d.id),
                                spec.engine_args.clone(),
                            )
                            .await
                        {
                            Ok(created) => {
                                report.acted += created.len() as u32;
                                healthy += created.len();
                                mem.blocked = false;
                                let ids: Vec<String> =
                                    created.iter().map(|r| r.id.to_string()).collect();
                                self.decided(
                                    &mut events,
                                    event(
                                        d.id,
                                        action,
                                        Outcome::Success,
                                        format!(
                                            "{why}: starting {} in {p} ({})",
                                            created.len(),
                                            ids.join(", ")
                                        ),
                                        json!({ "instances": ids, "placement": p.to_string(), "replacing": replacing }),
                                    ),
                                );
                            }
                            Err(e) => {
                                report.error(format!("{}: creating replicas: {e}", d.id));
                                self.decided(
                                    &mut events,
                                    event(
                                        d.id,
                                        DeploymentAction::Blocked,
                                        Outcome::Failed,
                                        format!("could not start replicas in {p}: {e}"),
                                        json!({ "placement": p.to_string() }),
                                    ),
                                );
                            }
                        }
                    }
                    None => {
                        conditions.push(format!(
                            "{need} waiting for capacity: every placement failed for lack of capacity in the last {}s",
                            backoff.num_seconds()
                        ));
                        if !mem.blocked {
                            mem.blocked = true;
                            self.decided(
                                &mut events,
                                event(
                                    d.id,
                                    DeploymentAction::Blocked,
                                    Outcome::Waiting,
                                    format!(
                                        "{need} replica(s) wanted, but every placement is out of capacity; retrying in up to {}s",
                                        backoff.num_seconds()
                                    ),
                                    json!({ "wanted": need }),
                                ),
                            );
                        }
                    }
                }
            } else {
                conditions.push(format!(
                    "{need} more wanted but {max} (max) replicas are live"
                ));
            }
        }

        // 5. Extras: not yet ready first, then unhealthy, then the newest ready.
        if healthy > want {
            let mut order: Vec<&InstanceRecord> = Vec::new();
            for group in [&c.starting, &c.unhealthy, &c.ready] {
                let mut g = group.clone();
                g.sort_by_key(|r| std::cmp::Reverse((r.created_at, r.id)));
                order.extend(g);
            }
            for old in order.into_iter().take(healthy - want) {
                self.terminate(
                    d,
                    old,
                    DeploymentAction::ScaleDown,
                    format!(
                        "{} replicas wanted, {healthy} running: removing {} ({})",
                        want, old.id, old.status
                    ),
                    &mut events,
                    report,
                )
                .await;
                removed.insert(old.id);
            }
        }

        // Rolling update: an old replica stays only while the new ones
        // ready fall short of the desired count (not-ready ones go first).
        if !c.outdated.is_empty() {
            let keep = want.saturating_sub(c.ready.len());
            let mut order = c.outdated.clone();
            order.sort_by_key(|r| (r.status == InstanceStatus::Ready, r.created_at, r.id));
            let ready_old = order
                .iter()
                .filter(|r| r.status == InstanceStatus::Ready)
                .count();
            let go = order.len().saturating_sub(keep.min(ready_old));
            for old in order.into_iter().take(go) {
                self.terminate(
                    d,
                    old,
                    DeploymentAction::Replace,
                    format!(
                        "rolling update: {} (on {}, engine args {:?}) is not what is declared now; {} of {want} new replicas ready, so it is drained",
                        old.id,
                        placement_of(old),
                        args_of(&old.engine_args),
                        c.ready.len()
                    ),
                    &mut events,
                    report,
                )
                .await;
                removed.insert(old.id);
            }
            let left = c.outdated.len() - go;
            if left > 0 {
                conditions.push(format!(
                    "rolling update: {} of {want} new replicas ready; {left} old one(s) still serving",
                    c.ready.len()
                ));
            }
        }

        // 4 (end): once enough replicas are ready, the replaced ones go.
        if c.ready.len() >= want {
            for old in c.failed.iter().chain(doomed.iter()) {
                if removed.contains(&old.id) {
                    continue;
                }
                let why = match old.status {
                    InstanceStatus::Failed => format!(
                        "failed ({})",
                        old.status_reason.map_or("unknown", |r| r.as_str())
                    ),
                    _ => format!("unhealthy for over {}s", grace.num_seconds()),
                };
                self.terminate(
                    d,
                    old,
                    DeploymentAction::Replace,
                    format!(
                        "{} {why}: its replacement is ready, so it is removed",
                        old.id
                    ),
                    &mut events,
                    report,
                )
                .await;
            }
        } else {
            for old in c.failed.iter().chain(doomed.iter()) {
                if !removed.contains(&old.id) {
                    conditions.push(format!("replacing {} ({})", old.id, old.status));
                }
            }
        }

        // 6. Status.
        let status = status_of(&c, desired, &conditions);
        self.write(d, desired, status, events, report).await;
        // Forget failures no longer in the back-off window.
        mem.noted.retain(|id| {
            instances
                .iter()
                .any(|r| r.id == *id && now - r.status_changed_at < backoff)
        });
        self.remember(d.id, mem);
        Ok(())
    }

    async fn terminate(
        &self,
        d: &DeploymentRecord,
        old: &InstanceRecord,
        action: DeploymentAction,
        message: String,
        events: &mut Vec<NewDeploymentEvent>,
        report: &mut TaskReport,
    ) {
        let instance_action = match action {
            DeploymentAction::ScaleDown => "deployment.scale_down",
            DeploymentAction::Replace => "deployment.replace",
            _ => "deployment.delete",
        };
        match self
            .fleet
            .terminate_because(old.id, TimelineKind::Note, instance_action, &message)
            .await
        {
            Ok(_) => {
                report.acted += 1;
                self.decided(
                    events,
                    event(
                        d.id,
                        action,
                        Outcome::Success,
                        message,
                        json!({ "instance_id": old.id }),
                    ),
                );
            }
            Err(e) => report.error(format!("{}: terminating {}: {e}", d.id, old.id)),
        }
    }

    async fn keep_deleting(
        &self,
        d: &DeploymentRecord,
        instances: &[InstanceRecord],
        report: &mut TaskReport,
    ) -> Result<(), ControlError> {
        let mut events = Vec::new();
        let mut left = 0u32;
        for r in instances {
            let live = match r.status {
                InstanceStatus::Provisioning
                | InstanceStatus::Booting
                | InstanceStatus::Starting
                | InstanceStatus::Ready
                | InstanceStatus::Unhealthy => true,
                InstanceStatus::Failed => {
                    r.provider_instance_id.is_some() && r.cleaned_up_at.is_none()
                }
                _ => false,
            };
            let going = matches!(
                r.status,
                InstanceStatus::Draining | InstanceStatus::Terminating
            );
            if going {
                left += 1;
            } else if live {
                left += 1;
                if r.status != InstanceStatus::Failed || r.cleanup_started_at.is_none() {
                    self.terminate(
                        d,
                        r,
                        DeploymentAction::ScaleDown,
                        format!("deployment deleted: removing {} ({})", r.id, r.status),
                        &mut events,
                        report,
                    )
                    .await;
                }
            }
        }
        let c = Census::of(instances, Utc::now(), chrono::Duration::MAX);
        let mut status = status_of(&c, 0, &[]);
        if left == 0 {
            let now = Utc::now();
            let mut next = d.clone();
            next.state = DeploymentState::Deleted;
            next.deleted_at = Some(now);
            next.updated_at = now;
            next.desired_replicas = 0;
            status.summary = "deleted: every instance terminated".into();
            next.status = status;
            self.decided(
                &mut events,
                event(
                    d.id,
                    DeploymentAction::Deleted,
                    Outcome::Success,
                    "every instance is terminated: deployment deleted",
                    serde_json::Value::Null,
                ),
            );
            self.save(&next, events, report).await;
        } else {
            status.summary = format!("deleting: {left} instance(s) draining or terminating");
            self.write(d, 0, status, events, report).await;
        }
        Ok(())
    }

    /// Write the desired count, status and timeline entries (when any changed).
    async fn write(
        &self,
        d: &DeploymentRecord,
        desired: u32,
        status: ReplicaStatus,
        events: Vec<NewDeploymentEvent>,
        report: &mut TaskReport,
    ) {
        if desired == d.desired_replicas && status == d.status && events.is_empty() {
            return;
        }
        let mut next = d.clone();
        next.desired_replicas = desired;
        next.status = status;
        next.updated_at = Utc::now();
        self.save(&next, events, report).await;
    }

    async fn save(
        &self,
        next: &DeploymentRecord,
        events: Vec<NewDeploymentEvent>,
        report: &mut TaskReport,
    ) {
        let fence = current_fence();
        match self
            .store
            .update_deployment(next, &events, fence.as_ref())
            .await
        {
            Ok(_) => {}
            // Changed meanwhile (a PATCH): the next pass sees it. The
            // entries still tell what was done.
            Err(StoreError::DeploymentConflict { .. }) => {
                if let Err(e) = self.store.append_deployment_events(&events).await {
                    report.error(format!("{}: timeline: {e}", next.id));
                }
            }
            Err(StoreError::Fenced { lease }) => {
                tracing::warn!(deployment_id = %next.id, lease, "write refused: lease lost");
            }
            Err(e) => report.error(format!("{}: {e}", next.id)),
        }
    }
}

/// The readable status: counts, one summary line and the conditions.
fn status_of(c: &Census<'_>, desired: u32, extra: &[String]) -> ReplicaStatus {
    let zones = |v: &[&InstanceRecord]| {
        let mut z: Vec<&str> = v.iter().map(|r| r.zone.as_str()).collect();
        z.sort();
        z.dedup();
        z.join(", ")
    };
    let mut conditions = Vec::new();
    if !c.starting.is_empty() {
        conditions.push(format!(
            "{} starting in {}",
            c.starting.len(),
            zones(&c.starting)
        ));
    }
    let unhealthy = c.unhealthy.len() + c.doomed.len();
    if unhealthy > 0 {
        let all: Vec<&InstanceRecord> =
            c.unhealthy.iter().chain(c.doomed.iter()).copied().collect();
        conditions.push(format!("{unhealthy} unhealthy in {}", zones(&all)));
    }
    if !c.draining.is_empty() {
        conditions.push(format!("{} draining", c.draining.len()));
    }
    conditions.extend(extra.iter().cloned());
    let mut summary = format!("{} of {desired} ready", c.ready.len());
    if !conditions.is_empty() {
        summary.push_str("; ");
        summary.push_str(&conditions.join("; "));
    }
    ReplicaStatus {
        ready: c.ready.len() as u32,
        starting: c.starting.len() as u32,
        unhealthy: unhealthy as u32,
        draining: c.draining.len() as u32,
        summary,
        conditions,
    }
}

#[async_trait]
impl Reconciler for Keeper {
    fn name(&self) -> TaskName {
        TaskName::Deployments
    }

    async fn activate(&self) -> TaskReport {
        let mut report = TaskReport::default();
        let deployments = match self.store.list_deployments(false).await {
            Ok(d) => d,
            Err(e) => {
                report.error(format!("listing deployments: {e}"));
                return report;
            }
        };
        // The engines' latest figures, once per pass, when an autoscaler needs them.
        let mut samples: HashMap<InstanceId, SampleRecord> = HashMap::new();
        if deployments
            .iter()
            .any(|d| d.state == DeploymentState::Active)
        {
            match self.store.latest_samples(&[InstanceStatus::Ready]).await {
                Ok(list) => samples = list.into_iter().map(|s| (s.instance_id, s)).collect(),
                Err(e) => report.error(format!("latest samples: {e}")),
            }
        }
        for d in &deployments {
            report.examined += 1;
            let instances = match self.store.list_deployment_instances(d.id).await {
                Ok(i) => i,
                Err(e) => {
                    report.error(format!("{}: listing instances: {e}", d.id));
                    continue;
                }
            };
            let result = match d.state {
                DeploymentState::Active => {
                    self.keep_active(d, &instances, &samples, &mut report).await
                }
                DeploymentState::Deleting => self.keep_deleting(d, &instances, &mut report).await,
                DeploymentState::Deleted => Ok(()),
            };
            if let Err(e) = result {
                report.error(format!("{}: {e}", d.id));
            }
        }
        let keep: HashSet<DeploymentId> = deployments.iter().map(|d| d.id).collect();
        self.memory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|id, _| keep.contains(id));
        report
    }
}
