//! The agents' side of the control plane: registration (bootstrap secret →
//! per-instance token), agent authentication (token → instance, through the
//! hot cache), heartbeat ingestion (validation, the batching writer, then the
//! post-heartbeat logic: late recovery, the engine milestone, wakes), the
//! engine's secret environment and certificate, and agent events.
//!
//! Writes go through [`Lifecycle`]; reconcilers are woken through the
//! [`Waker`]. The heartbeat writer and the caches live in [`crate::ingest`].

use crate::catalog::Catalogs;
use crate::config::ControlConfig;
use crate::driver::{TaskName, Waker};
use crate::error::ControlError;
use crate::ingest::{GpuCounts, HeartbeatWriter, HotCache, TOKEN_TTL};
use crate::lifecycle::{ApplyError, Lifecycle};
use crate::secrets;
use crate::telemetry::Telemetry;
use crate::timeline::{self, EntryExt};
use crate::validate::{validate_heartbeat, GpuCountContext};
use chrono::{DateTime, Utc};
use gpufleet_domain::{InstanceId, InstanceStatus, LifecycleEvent};
use gpufleet_proto::{
    AgentEvent, AgentEventKind, EngineCert, EngineEnv, EngineStatus, EngineTlsGrant, Heartbeat,
    HeartbeatAck, RegisterRequest, RegisterResponse,
};
use gpufleet_store::{
    HeartbeatOutcome, InstanceRecord, Outcome, RegisterOutcome, Store, TimelineKind,
};
use std::sync::Arc;

/// Agent registration, authentication and heartbeats. Cheap to clone.
#[derive(Clone)]
pub struct AgentService {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    lifecycle: Lifecycle,
    catalogs: Catalogs,
    waker: Waker,
    config: Arc<ControlConfig>,
    /// Prometheus metrics recorded as things happen.
    telemetry: Arc<Telemetry>,
    /// The batching heartbeat writer.
    writer: HeartbeatWriter,
    /// What heartbeat validation knows of each instance's GPU count.
    gpu_counts: GpuCounts,
    /// Verified agent tokens and published instance records, for the heartbeat path.
    hot: Arc<HotCache>,
}

impl AgentService {
    /// Start the heartbeat writer (on its own thread) and the hot cache's
    /// follower of the bus. Needs a Tokio runtime.
    pub fn new(
        lifecycle: Lifecycle,
        catalogs: Catalogs,
        waker: Waker,
        config: Arc<ControlConfig>,
        telemetry: Arc<Telemetry>,
    ) -> Self {
        let store = lifecycle.store().clone();
        let writer = HeartbeatWriter::spawn(store.clone(), &config.ingest, telemetry.clone());
        let hot = Arc::new(HotCache::default());
        hot.clone().follow(lifecycle.subscribe());
        Self {
            inner: Arc::new(Inner {
                store,
                lifecycle,
                catalogs,
                waker,
                config,
                telemetry,
                writer,
                gpu_counts: GpuCounts::default(),
                hot,
            }),
        }
    }

    /// Stop ingesting heartbeats: those queued are written, staged samples
    /// moved to the indexed tables, the writer's connection closed. Later
    /// heartbeats are answered `Unavailable`. Call once the HTTP server has
    /// stopped and before closing the store.
    pub async fn stop_ingest(&self) {
        self.inner.writer.stop().await;
    }

    fn store(&self) -> &Store {
        &self.inner.store
    }
    fn telemetry(&self) -> &Telemetry {
        &self.inner.telemetry
    }
    fn writer(&self) -> &HeartbeatWriter {
        &self.inner.writer
    }
    fn gpu_counts(&self) -> &GpuCounts {
        &self.inner.gpu_counts
    }
    fn hot(&self) -> &HotCache {
        &self.inner.hot
    }

    /// Trade the one-time bootstrap secret for a per-instance token.
    pub async fn register_agent(
        &self,
        req: RegisterRequest,
    ) -> Result<RegisterResponse, ControlError> {
        let reject = || ControlError::Unauthorized {
            message: "bootstrap secret rejected: unknown instance, wrong secret, or already used"
                .into(),
        };
        let token = secrets::generate("gft_");
        let now = Utc::now();
        let outcome = self
            .inner
            .store
            .register_agent(
                req.instance_id,
                &secrets::digest(&req.bootstrap_secret),
                &secrets::digest(&token),
                now,
            )
            .await?;
        if outcome == RegisterOutcome::Rejected {
            tracing::warn!(instance_id = %req.instance_id, "agent registration rejected");
            return Err(reject());
        }
        let note = timeline::entry(
            req.instance_id,
            now,
            TimelineKind::Agent,
            "agent.registered",
            Outcome::Success,
            format!(
                "agent {} registered from {}",
                req.agent_version, req.hostname
            ),
        );
        self.inner
            .lifecycle
            .update_with_retry(req.instance_id, vec![note], |r| {
                r.milestones.agent_registered = true;
                true
            })
            .await?;
        Ok(RegisterResponse {
            token,
            heartbeat_interval_ms: self.inner.config.heartbeat_interval_ms,
            canary_interval_ms: self.inner.config.canary_interval_ms,
            canary_timeout_ms: self.inner.config.canary_timeout_ms,
        })
    }

    /// The instance an agent token belongs to; `Unauthorized` if none.
    pub async fn authenticate_agent(&self, token: &str) -> Result<InstanceId, ControlError> {
        self.agent_for_token(&secrets::digest(token))
            .await?
            .ok_or_else(|| ControlError::Unauthorized {
                message: "unknown or revoked agent token".into(),
            })
    }

    /// Apply a heartbeat from the agent of `agent` (authenticated). `Forbidden`
    /// if the heartbeat names another instance; `InvalidHeartbeat` (nothing
    /// stored) for impossible figures ([`crate::validate::validate_heartbeat`]);
    /// `Unavailable` when the batching writer's queue is full.
    pub async fn ingest_heartbeat(
        &self,
        agent: InstanceId,
        mut hb: Heartbeat,
    ) -> Result<HeartbeatAck, ControlError> {
        if hb.instance_id != agent {
            return Err(ControlError::Forbidden {
                message: format!(
                    "this agent token belongs to {agent}, not {}",
                    hb.instance_id
                ),
            });
        }
        let now = Utc::now();
        let outcome = self.write_heartbeat(agent, &mut hb, now).await?;
        let applied = outcome == HeartbeatOutcome::Applied;
        if applied {
            self.after_heartbeat(agent, &hb, now).await?;
        }
        Ok(HeartbeatAck {
            applied,
            heartbeat_interval_ms: self.inner.config.heartbeat_interval_ms,
            canary_interval_ms: self.inner.config.canary_interval_ms,
            canary_timeout_ms: self.inner.config.canary_timeout_ms,
        })
    }

    async fn after_heartbeat(
        &self,
        id: InstanceId,
        hb: &Heartbeat,
        now: DateTime<Utc>,
    ) -> Result<(), ControlError> {
        if self.routine_heartbeat(id, hb) {
            return Ok(());
        }
        let rec = self.inner.lifecycle.get(id).await?;
        self.hot().remember(&rec);
        // Late-heartbeat recovery: failed for startup_timeout, cleanup not begun.
        if rec.status == InstanceStatus::Failed
            && rec.status_reason == Some(gpufleet_domain::FailureReason::StartupTimeout)
            && rec.cleanup_started_at.is_none()
        {
            let deadline =
                now + chrono::Duration::seconds(self.inner.config.startup_timeout_secs as i64);
            let note = timeline::entry(
                id,
                now,
                TimelineKind::Probe,
                "agent.late_heartbeat",
                Outcome::Success,
                "agent heartbeat arrived after the startup timeout, before cleanup: recovering",
            );
            match self
                .inner
                .lifecycle
                .apply(
                    &rec,
                    LifecycleEvent::AgentRecovered,
                    "agent recovered after startup timeout",
                    vec![note],
                    |r| {
                        r.status_reason = None;
                        r.startup_deadline_at = deadline;
                    },
                )
                .await
            {
                Ok(_)
                | Err(ApplyError::Conflict)
                | Err(ApplyError::Fenced(_))
                | Err(ApplyError::Invalid(_)) => {}
                Err(ApplyError::Store(e)) => return Err(e.into()),
            }
            self.inner.waker.wake(TaskName::Health);
            return Ok(());
        }
        let engine_up = matches!(
            hb.engine.status,
            EngineStatus::Starting | EngineStatus::Ready
        );
        if engine_up && !rec.milestones.engine_started && !rec.status.is_terminal() {
            self.inner
                .lifecycle
                .update_with_retry(id, vec![], |r| {
                    let changed = !r.milestones.engine_started;
                    r.milestones.engine_started = true;
                    changed
                })
                .await?;
        }
        if wakes_health(&rec, hb) {
            self.inner.waker.wake(TaskName::Health);
        }
        if rec.status == InstanceStatus::Booting {
            self.inner.waker.wake(TaskName::BootWatcher);
        }
        Ok(())
    }

    /// The secret environment of the engine of `agent`'s instance (e.g.
    /// `HF_TOKEN`), asked for over its authenticated channel.
    pub async fn engine_env(&self, agent: InstanceId) -> Result<EngineEnv, ControlError> {
        let rec = self
            .inner
            .store
            .get_instance(agent)
            .await?
            .ok_or_else(|| ControlError::not_found("instance", agent))?;
        if rec.status.is_terminal() {
            return Err(ControlError::not_found("instance", agent));
        }
        // Engines off this host serve mutual TLS to the router alone.
        let remote = self
            .inner
            .catalogs
            .provider(&rec.provider)
            .is_some_and(|p| !p.machines_on_this_host());
        let engine_tls = match &self.inner.config.engine_client_ca_pem {
            Some(ca) if remote => Some(EngineTlsGrant {
                client_ca_pem: ca.clone(),
            }),
            _ => None,
        };
        Ok(EngineEnv {
            env: self.inner.config.engine.secret_env.0.clone(),
            engine_tls,
        })
    }

    /// Keep the certificate the engine of `agent`'s instance serves (the
    /// router trusts it alone for that engine). Published on the bus.
    pub async fn record_engine_cert(
        &self,
        agent: InstanceId,
        cert: EngineCert,
    ) -> Result<(), ControlError> {
        let pem = cert.cert_pem;
        if !pem.contains("-----BEGIN CERTIFICATE-----") || pem.len() > 64 * 1024 {
            return Err(ControlError::invalid("cert_pem", "not a PEM certificate"));
        }
        let rec = self.inner.lifecycle.get(agent).await?;
        if rec.status.is_terminal() {
            return Err(ControlError::not_found("instance", agent));
        }
        let e = timeline::entry(
            agent,
            Utc::now(),
            TimelineKind::Agent,
            "agent.engine_cert",
            Outcome::Info,
            "the engine's TLS certificate was reported".to_string(),
        );
        self.inner
            .lifecycle
            .update_with_retry(agent, vec![e], |r| {
                if r.engine_cert_pem.as_deref() == Some(pem.as_str()) {
                    return false;
                }
                r.engine_cert_pem = Some(pem.clone());
                true
            })
            .await?;
        Ok(())
    }

    /// Put an agent-reported event on the instance's timeline.
    pub async fn record_agent_event(
        &self,
        agent: InstanceId,
        ev: AgentEvent,
    ) -> Result<(), ControlError> {
        let (action, outcome) = match ev.kind {
            AgentEventKind::AgentStarted => ("agent.started", Outcome::Info),
            AgentEventKind::EngineStarted => ("agent.engine_started", Outcome::Success),
            AgentEventKind::EngineReady => ("agent.engine_ready", Outcome::Success),
            AgentEventKind::EngineExited => ("agent.engine_exited", Outcome::Failed),
            AgentEventKind::EngineRestarting => ("agent.engine_restarting", Outcome::InProgress),
            AgentEventKind::GpuFault => ("agent.gpu_fault", Outcome::Failed),
            AgentEventKind::GpuRecovered => ("agent.gpu_recovered", Outcome::Success),
            AgentEventKind::EngineCanaryFailed => ("agent.engine_canary_failed", Outcome::Failed),
            AgentEventKind::EngineCanaryPassed => ("agent.engine_canary_passed", Outcome::Success),
        };
        let mut e = timeline::entry(
            agent,
            ev.at,
            TimelineKind::Agent,
            action,
            outcome,
            ev.message,
        );
        match ev.kind {
            AgentEventKind::EngineExited => e = e.error_code("engine_exited"),
            AgentEventKind::GpuFault => e = e.error_code("gpu_fault"),
            AgentEventKind::EngineCanaryFailed => e = e.error_code("engine_canary"),
            _ => {}
        }
        self.inner.store.append_events(&[e]).await?;
        if ev.kind == AgentEventKind::EngineReady {
            // Probe now rather than at the next period.
            self.inner.waker.wake(TaskName::Health);
        }
        Ok(())
    }

    /// Validate `hb` (see [`validate_heartbeat`]) and write it through the
    /// batching writer.
    async fn write_heartbeat(
        &self,
        id: InstanceId,
        hb: &mut Heartbeat,
        received_at: DateTime<Utc>,
    ) -> Result<HeartbeatOutcome, ControlError> {
        let telemetry = self.telemetry();
        telemetry.observe_lag(hb.sent_at, received_at);
        let ctx = self.gpu_context(id).await?;
        if let Err(e) = validate_heartbeat(hb, ctx) {
            telemetry.heartbeat("rejected");
            tracing::debug!(instance_id = %id, field = %e.field, "heartbeat rejected: {}", e.message);
            return Err(e.into());
        }
        let outcome = match self.writer().write(hb.clone(), received_at).await {
            Ok(o) => o,
            Err(e) => {
                telemetry.heartbeat("unavailable");
                return Err(e);
            }
        };
        telemetry.heartbeat(match outcome {
            HeartbeatOutcome::Applied => "applied",
            HeartbeatOutcome::Stale => "stale",
            HeartbeatOutcome::UnknownInstance | HeartbeatOutcome::Invalid => "rejected",
        });
        match outcome {
            HeartbeatOutcome::Applied => {
                self.gpu_counts().put(
                    id,
                    GpuCountContext {
                        previous: Some(hb.gpus.len()),
                        ..ctx
                    },
                );
            }
            HeartbeatOutcome::UnknownInstance => {
                return Err(ControlError::not_found("instance", id));
            }
            // Validation lets nothing through that the store cannot hold.
            HeartbeatOutcome::Invalid => {
                return Err(ControlError::invalid(
                    "heartbeat",
                    "holds a value that cannot be stored",
                ));
            }
            HeartbeatOutcome::Stale => {}
        }
        Ok(outcome)
    }

    /// The instance an agent token belongs to: from the cache (verified in
    /// the last [`TOKEN_TTL`]), else from the store.
    async fn agent_for_token(&self, digest: &str) -> Result<Option<InstanceId>, ControlError> {
        let hot = self.hot();
        if let Some((id, at)) = hot.tokens().get(digest) {
            if at.elapsed() < TOKEN_TTL {
                return Ok(Some(*id));
            }
        }
        let found = self.store().instance_for_token(digest).await?;
        if let Some(id) = found {
            // Not for an instance whose tokens are being revoked.
            let ending = hot.records().get(&id).is_some_and(|r| {
                r.status.is_terminal()
                    || r.status == InstanceStatus::Terminating
                    || r.cleanup_started_at.is_some()
            });
            if !ending {
                hot.tokens()
                    .insert(digest.to_string(), (id, std::time::Instant::now()));
            }
        }
        Ok(found)
    }

    /// Whether the post-heartbeat logic has nothing to do for `hb`, judged
    /// from the instance's last published record (no store read).
    fn routine_heartbeat(&self, id: InstanceId, hb: &Heartbeat) -> bool {
        self.hot()
            .records()
            .get(&id)
            .is_some_and(|rec| routine(rec, hb))
    }

    /// The instance's catalog GPU count and last GPU count, read once and
    /// then kept up to date in memory.
    async fn gpu_context(&self, id: InstanceId) -> Result<GpuCountContext, ControlError> {
        if let Some(ctx) = self.gpu_counts().get(id) {
            return Ok(ctx);
        }
        let rec = self.inner.lifecycle.get(id).await?;
        let catalog = match self.inner.catalogs.provider(&rec.provider) {
            Some(p) => match p.catalog().await {
                Ok(c) => c.instance_type(&rec.instance_type).map(|t| t.gpu.count),
                // Not worth refusing heartbeats over; the next miss asks again.
                Err(_) => return self.previous_only(id).await,
            },
            None => None,
        };
        let previous = self
            .store()
            .recent_samples(id, 1)
            .await?
            .first()
            .map(|s| s.gpus.len());
        let ctx = GpuCountContext { catalog, previous };
        self.gpu_counts().put(id, ctx);
        Ok(ctx)
    }

    async fn previous_only(&self, id: InstanceId) -> Result<GpuCountContext, ControlError> {
        let previous = self
            .store()
            .recent_samples(id, 1)
            .await?
            .first()
            .map(|s| s.gpus.len());
        Ok(GpuCountContext {
            catalog: None,
            previous,
        })
    }
}

/// Nothing in the post-heartbeat logic applies to `rec` for `hb`
/// (see `after_heartbeat`): not a startup-timeout failure awaiting recovery,
/// engine milestone already recorded, nothing to wake.
fn routine(rec: &InstanceRecord, hb: &Heartbeat) -> bool {
    let recoverable = rec.status == InstanceStatus::Failed
        && rec.status_reason == Some(gpufleet_domain::FailureReason::StartupTimeout)
        && rec.cleanup_started_at.is_none();
    let engine_up = matches!(
        hb.engine.status,
        EngineStatus::Starting | EngineStatus::Ready
    );
    let milestone = engine_up && !rec.milestones.engine_started && !rec.status.is_terminal();
    !recoverable && !milestone && !wakes_health(rec, hb) && rec.status != InstanceStatus::Booting
}

/// Whether `hb` may change what Health decides for `rec`, so Health runs
/// now rather than at its next period: an engine ready while the instance
/// is starting or unhealthy (unless its canary fails), or a failing canary
/// while it is ready. (`rec` may be the last published record: heartbeats
/// change no generation, so its canary is never read from it.)
fn wakes_health(rec: &InstanceRecord, hb: &Heartbeat) -> bool {
    let canary_fails = hb.engine.canary.as_ref().is_some_and(|c| !c.ok);
    match rec.status {
        InstanceStatus::Starting => hb.engine.status == EngineStatus::Ready,
        InstanceStatus::Unhealthy => hb.engine.status == EngineStatus::Ready && !canary_fails,
        InstanceStatus::Ready => canary_fails,
        _ => false,
    }
}
