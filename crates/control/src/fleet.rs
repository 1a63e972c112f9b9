//! The Fleet: commands on instances. Each command validates, records intent in
//! the store, publishes the change and wakes the reconciler that acts on it.
//! No command calls a provider to change anything: reconcilers do that.

use crate::bus::{Bus, ChangeKind, InstanceChange};
use crate::config::{ControlConfig, ModelSpec};
use crate::driver::{Reconciler, TaskStatus, Tasks};
use crate::error::ControlError;
use crate::reconcilers;
use crate::secrets;
use crate::timeline::{self, EntryExt};
use chrono::{DateTime, Utc};
use gpufleet_domain::{
    transition, InstanceId, InstanceStatus, LifecycleEvent, ModelName, ProviderName,
};
use gpufleet_proto::{
    AgentEvent, AgentEventKind, EngineCert, EngineEnv, EngineStatus, EngineTlsGrant, Heartbeat,
    HeartbeatAck, RegisterRequest, RegisterResponse,
};
use gpufleet_providers::{Catalog, Provider, ProviderRegistry};
use gpufleet_store::{
    HeartbeatOutcome, InstanceFilter, InstanceRecord, NewInstance, NewTimelineEvent, Outcome,
    RegisterOutcome, SampleRecord, Store, StoreError, TimelineEvent, TimelineKind,
};
use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// A validated create request.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateInstances {
    pub provider: ProviderName,
    /// `None`: the first zone offering the type.
    pub zone: Option<String>,
    pub instance_type: String,
    pub model: ModelName,
    pub count: u32,
}

/// The control plane's command side. Cheap to clone.
#[derive(Clone)]
pub struct Fleet {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub store: Store,
    pub providers: ProviderRegistry,
    pub config: ControlConfig,
    pub bus: Bus,
    pub tasks: Tasks,
    pub cluster_id: String,
    /// Key from which each instance's bootstrap secret is derived, so the
    /// store keeps only digests and a retried create hands out the same secret.
    pub bootstrap_key: String,
    /// Instances whose provider create call is in flight in this process.
    pub creating: Mutex<HashSet<InstanceId>>,
    pub http: reqwest::Client,
    /// Prometheus metrics recorded as things happen.
    pub telemetry: Arc<crate::telemetry::Telemetry>,
    /// The batching heartbeat writer.
    pub writer: crate::ingest::HeartbeatWriter,
    /// What heartbeat validation knows of each instance's GPU count.
    pub gpu_counts: crate::ingest::GpuCounts,
    /// Verified agent tokens and published instance records, for the heartbeat path.
    pub hot: Arc<crate::ingest::HotCache>,
    /// Requests in flight per instance (the router), when one is set.
    pub traffic: RwLock<Option<Arc<dyn crate::TrafficSource>>>,
}

/// Names of the reconcilers, for waking them.
pub(crate) mod task {
    pub const PROVISIONER: &str = "provisioner";
    pub const BOOT_WATCHER: &str = "boot_watcher";
    pub const HEALTH: &str = "health";
    pub const TERMINATOR: &str = "terminator";
    pub const FAILED_CLEANUP: &str = "failed_cleanup";
    pub const ORPHANS: &str = "orphan_reaper";
    pub const METRICS_ROLLUP: &str = "metrics_rollup";
}

/// How many times a command retries a compare-and-swap that lost a race.
const CAS_RETRIES: usize = 8;

impl Fleet {
    /// Build the fleet over a connected store and the providers.
    pub async fn new(
        store: Store,
        providers: ProviderRegistry,
        config: ControlConfig,
    ) -> Result<Fleet, ControlError> {
        let cluster_id = store.cluster_id().await?;
        let bootstrap_key = store.secret_key().await?;
        let tasks = Tasks::default().with_leases(crate::driver::Leases {
            store: store.clone(),
            holder: crate::driver::Leases::holder_name(),
            ttl: Duration::from_millis(config.lease_ttl_ms.max(100)),
        });
        let telemetry = Arc::new(crate::telemetry::Telemetry::new(&tasks));
        let providers = crate::metered::MeteredProvider::wrap_all(&providers, &telemetry);
        let writer =
            crate::ingest::HeartbeatWriter::spawn(store.clone(), &config.ingest, telemetry.clone());
        let bus = Bus::new(4096);
        let hot = Arc::new(crate::ingest::HotCache::default());
        hot.clone().follow(bus.subscribe());
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.probe_timeout_ms))
            .build()
            .map_err(|e| ControlError::invalid("probe_timeout_ms", e.to_string()))?;
        Ok(Fleet {
            inner: Arc::new(Inner {
                store,
                providers,
                config,
                bus,
                tasks,
                cluster_id,
                bootstrap_key,
                creating: Mutex::new(HashSet::new()),
                http,
                traffic: RwLock::new(None),
                telemetry,
                writer,
                gpu_counts: Default::default(),
                hot,
            }),
        })
    }

    /// Start the reconcilers; they stop when `shutdown` is cancelled (the
    /// returned handle completes once each finished its activation in hand).
    pub fn start(&self, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        let period = Duration::from_millis(self.inner.config.reconcile_interval_ms.max(10));
        let list: Vec<(Arc<dyn Reconciler>, Duration)> = vec![
            (
                Arc::new(reconcilers::Provisioner::new(self.clone())),
                period,
            ),
            (
                Arc::new(reconcilers::BootWatcher::new(self.clone())),
                period,
            ),
            (Arc::new(reconcilers::Health::new(self.clone())), period),
            (Arc::new(reconcilers::Terminator::new(self.clone())), period),
            (
                Arc::new(reconcilers::FailedCleanup::new(self.clone())),
                period,
            ),
            (
                Arc::new(reconcilers::OrphanReaper::new(self.clone())),
                period * 10,
            ),
            (
                Arc::new(reconcilers::MetricsRollup::new(self.clone())),
                Duration::from_millis(self.inner.config.metrics_rollup_interval_ms.max(10)),
            ),
        ];
        self.inner.tasks.spawn_all(list, shutdown)
    }

    /// Stop ingesting heartbeats: those queued are written, staged samples
    /// moved to the indexed tables, the writer's connection closed. Later
    /// heartbeats are answered `Unavailable`. Call once the HTTP server has
    /// stopped and before closing the store.
    pub async fn stop_ingest(&self) {
        self.inner.writer.stop().await;
    }

    /// Let draining wait for the requests `source` counts in flight (rather
    /// than for the engine's last reported running and waiting requests).
    pub fn set_traffic_source(&self, source: Arc<dyn crate::TrafficSource>) {
        *self
            .inner
            .traffic
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(source);
    }

    /// Requests in flight to `id` per the traffic source; `None` without one.
    pub(crate) fn traffic_in_flight(&self, id: InstanceId) -> Option<u64> {
        self.inner
            .traffic
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|t| t.in_flight(id))
    }

    pub fn config(&self) -> &ControlConfig {
        &self.inner.config
    }
    pub fn store(&self) -> &Store {
        &self.inner.store
    }
    pub fn cluster_id(&self) -> &str {
        &self.inner.cluster_id
    }
    pub(crate) fn tasks(&self) -> &Tasks {
        &self.inner.tasks
    }
    pub(crate) fn telemetry(&self) -> &crate::telemetry::Telemetry {
        &self.inner.telemetry
    }
    pub(crate) fn writer(&self) -> &crate::ingest::HeartbeatWriter {
        &self.inner.writer
    }
    pub(crate) fn gpu_counts(&self) -> &crate::ingest::GpuCounts {
        &self.inner.gpu_counts
    }
    pub(crate) fn hot(&self) -> &crate::ingest::HotCache {
        &self.inner.hot
    }

    pub(crate) fn provider(&self, name: &ProviderName) -> Option<&Arc<dyn Provider>> {
        self.inner.providers.get(name)
    }

    /// The one-time secret handed to the instance's agent.
    pub(crate) fn bootstrap_secret(&self, id: InstanceId) -> String {
        use hmac::{Mac, SimpleHmac};
        use sha2::Sha256;
        let mut mac =
            <SimpleHmac<Sha256> as Mac>::new_from_slice(self.inner.bootstrap_key.as_bytes())
                .expect("HMAC takes keys of any length");
        mac.update(id.to_string().as_bytes());
        format!("gfb_{}", hex::encode(mac.finalize().into_bytes()))
    }

    /// Record `count` instances in `provisioning` with their provision intent;
    /// the provisioner does the provider calls.
    pub async fn create_instances(
        &self,
        req: CreateInstances,
    ) -> Result<Vec<InstanceRecord>, ControlError> {
        let cfg = &self.inner.config;
        let provider = self.provider(&req.provider).ok_or_else(|| {
            let known: Vec<_> = self
                .inner
                .providers
                .names()
                .map(|n| n.to_string())
                .collect();
            ControlError::invalid(
                "provider",
                format!(
                    "unknown provider {:?}; available: {}",
                    req.provider.as_str(),
                    known.join(", ")
                ),
            )
        })?;
        if req.count == 0 || req.count > cfg.max_instances_per_request {
            return Err(ControlError::invalid(
                "count",
                format!("must be between 1 and {}", cfg.max_instances_per_request),
            ));
        }
        let catalog =
            provider
                .catalog()
                .await
                .map_err(|source| ControlError::ProviderUnavailable {
                    provider: req.provider.to_string(),
                    source,
                })?;
        let Some(itype) = catalog.instance_type(&req.instance_type) else {
            let known: Vec<_> = catalog
                .instance_types
                .iter()
                .map(|t| t.name.as_str())
                .collect();
            return Err(ControlError::invalid(
                "instance_type",
                format!(
                    "unknown instance type {:?} for provider {}; available: {}",
                    req.instance_type,
                    req.provider,
                    known.join(", ")
                ),
            ));
        };
        let zone = match &req.zone {
            Some(z) if itype.zones.iter().any(|t| t == z) => z.clone(),
            Some(z) => {
                return Err(ControlError::invalid(
                    "zone",
                    format!(
                        "instance type {} is not offered in zone {:?}; zones: {}",
                        itype.name,
                        z,
                        itype.zones.join(", ")
                    ),
                ))
            }
            None => itype.zones.first().cloned().ok_or_else(|| {
                ControlError::invalid(
                    "instance_type",
                    format!("{} is offered in no zone", itype.name),
                )
            })?,
        };
        let Some(model) = cfg.models.iter().find(|m| m.name == req.model) else {
            let known: Vec<_> = cfg.models.iter().map(|m| m.name.as_str()).collect();
            return Err(ControlError::invalid(
                "model",
                format!(
                    "unknown model {:?}; available: {}",
                    req.model.as_str(),
                    known.join(", ")
                ),
            ));
        };
        let vram = itype.gpu.vram_mib * u64::from(itype.gpu.count);
        if model.min_vram_mib > vram {
            return Err(ControlError::invalid(
                "model",
                format!(
                    "{} needs {} MiB of GPU memory; {} has {} MiB",
                    model.name, model.min_vram_mib, itype.name, vram
                ),
            ));
        }

        let now = Utc::now();
        let deadline = now + chrono::Duration::seconds(cfg.startup_timeout_secs as i64);
        let new: Vec<NewInstance> = (0..req.count)
            .map(|_| {
                let id = InstanceId::new();
                NewInstance {
                    id,
                    provider: req.provider.clone(),
                    zone: zone.clone(),
                    instance_type: itype.name.clone(),
                    model: req.model.clone(),
                    idempotency_key: uuid::Uuid::new_v4().to_string(),
                    bootstrap_secret_hash: secrets::digest(&self.bootstrap_secret(id)),
                    startup_deadline_at: deadline,
                    created_at: now,
                }
            })
            .collect();
        let created = self.inner.store.insert_instances(&new).await?;
        for rec in &created {
            tracing::info!(instance_id = %rec.id, provider = %rec.provider, instance_type = %rec.instance_type, "instance created");
            self.inner.bus.publish(ChangeKind::Created, rec.clone());
        }
        self.inner.tasks.wake(task::PROVISIONER);
        Ok(created)
    }

    pub async fn get_instance(&self, id: InstanceId) -> Result<InstanceRecord, ControlError> {
        self.inner
            .store
            .get_instance(id)
            .await?
            .ok_or_else(|| ControlError::not_found("instance", id))
    }

    pub async fn list_instances(
        &self,
        filter: &InstanceFilter,
    ) -> Result<Vec<InstanceRecord>, ControlError> {
        Ok(self.inner.store.list_instances(filter).await?)
    }

    /// Ask for termination. Idempotent: an instance already draining,
    /// terminating, terminated or archived is returned as it is.
    pub async fn terminate_instance(&self, id: InstanceId) -> Result<InstanceRecord, ControlError> {
        for _ in 0..CAS_RETRIES {
            let rec = self.get_instance(id).await?;
            if matches!(
                rec.status,
                InstanceStatus::Draining
                    | InstanceStatus::Terminating
                    | InstanceStatus::Terminated
                    | InstanceStatus::Archived
            ) {
                return Ok(rec);
            }
            let now = Utc::now();
            let user = timeline::entry(
                id,
                now,
                TimelineKind::User,
                "user.terminate",
                Outcome::Success,
                "termination requested",
            );
            match self
                .apply(
                    &rec,
                    LifecycleEvent::TerminateRequested,
                    "termination requested",
                    vec![user],
                    |r| {
                        r.terminate_requested_at = Some(now);
                    },
                )
                .await
            {
                Ok(next) => {
                    self.inner.tasks.wake(task::TERMINATOR);
                    return Ok(next);
                }
                Err(ApplyError::Conflict | ApplyError::Fenced(_)) => continue,
                Err(ApplyError::Invalid(e)) => {
                    return Err(ControlError::Conflict {
                        message: e.to_string(),
                    })
                }
                Err(ApplyError::Store(e)) => return Err(e.into()),
            }
        }
        Err(ControlError::Conflict {
            message: format!("instance {id} is changing too fast; retry"),
        })
    }

    /// Archive a terminated instance, or a failed one whose machine is cleaned
    /// up; `Conflict` otherwise.
    pub async fn archive_instance(&self, id: InstanceId) -> Result<InstanceRecord, ControlError> {
        for _ in 0..CAS_RETRIES {
            let rec = self.get_instance(id).await?;
            match rec.status {
                InstanceStatus::Archived => return Ok(rec),
                InstanceStatus::Terminated => {}
                InstanceStatus::Failed if rec.cleaned_up_at.is_some() => {}
                InstanceStatus::Failed => {
                    return Err(ControlError::Conflict {
                        message: format!(
                            "instance {id} failed but its machine is not cleaned up yet; terminate it or wait for cleanup"
                        ),
                    })
                }
                other => {
                    return Err(ControlError::Conflict {
                        message: format!(
                            "instance {id} is {other}; only terminated or cleaned-up failed instances can be archived (terminate it first)"
                        ),
                    })
                }
            }
            let user = timeline::entry(
                id,
                Utc::now(),
                TimelineKind::User,
                "user.archive",
                Outcome::Success,
                "archived",
            );
            match self
                .apply(
                    &rec,
                    LifecycleEvent::Archive,
                    "archived",
                    vec![user],
                    |_| {},
                )
                .await
            {
                Ok(next) => return Ok(next),
                Err(ApplyError::Conflict | ApplyError::Fenced(_)) => continue,
                Err(ApplyError::Invalid(e)) => {
                    return Err(ControlError::Conflict {
                        message: e.to_string(),
                    })
                }
                Err(ApplyError::Store(e)) => return Err(e.into()),
            }
        }
        Err(ControlError::Conflict {
            message: format!("instance {id} is changing too fast; retry"),
        })
    }

    /// The instance's timeline, oldest first.
    pub async fn instance_events(
        &self,
        id: InstanceId,
        after_id: Option<i64>,
        limit: i64,
    ) -> Result<Vec<TimelineEvent>, ControlError> {
        self.get_instance(id).await?;
        Ok(self.inner.store.list_events(id, after_id, limit).await?)
    }

    /// The instance's most recent samples, newest first.
    pub async fn instance_samples(
        &self,
        id: InstanceId,
        limit: i64,
    ) -> Result<Vec<SampleRecord>, ControlError> {
        self.get_instance(id).await?;
        Ok(self.inner.store.recent_samples(id, limit).await?)
    }

    pub fn provider_names(&self) -> Vec<ProviderName> {
        self.inner.providers.names().cloned().collect()
    }

    /// A provider's catalog. `NotFound` for an unknown provider name.
    pub async fn catalog(&self, provider: &str) -> Result<Catalog, ControlError> {
        let p = provider
            .parse::<ProviderName>()
            .ok()
            .and_then(|n| self.provider(&n).cloned())
            .ok_or_else(|| ControlError::not_found("provider", provider))?;
        p.catalog()
            .await
            .map_err(|source| ControlError::ProviderUnavailable {
                provider: provider.to_string(),
                source,
            })
    }

    pub fn models(&self) -> &[ModelSpec] {
        &self.inner.config.models
    }

    /// The memory a model's weights need, in MiB (0: unknown).
    pub(crate) fn model_size_mib(&self, model: &ModelName) -> u64 {
        self.models()
            .iter()
            .find(|m| m.name == *model)
            .map_or(0, |m| m.min_vram_mib)
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
        self.update_with_retry(req.instance_id, vec![note], |r| {
            r.milestones.agent_registered = true;
            true
        })
        .await?;
        Ok(RegisterResponse {
            token,
            heartbeat_interval_ms: self.inner.config.heartbeat_interval_ms,
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
        let rec = self.get_instance(id).await?;
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
            self.inner.tasks.wake(task::HEALTH);
            return Ok(());
        }
        let engine_up = matches!(
            hb.engine.status,
            EngineStatus::Starting | EngineStatus::Ready
        );
        if engine_up && !rec.milestones.engine_started && !rec.status.is_terminal() {
            self.update_with_retry(id, vec![], |r| {
                let changed = !r.milestones.engine_started;
                r.milestones.engine_started = true;
                changed
            })
            .await?;
        }
        if hb.engine.status == EngineStatus::Ready
            && matches!(
                rec.status,
                InstanceStatus::Starting | InstanceStatus::Unhealthy
            )
        {
            self.inner.tasks.wake(task::HEALTH);
        }
        if rec.status == InstanceStatus::Booting {
            self.inner.tasks.wake(task::BOOT_WATCHER);
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

    /// Whether `provider`'s machines run on another host (their engines are
    /// reached over mutual TLS). Unknown providers count as remote.
    pub fn provider_is_remote(&self, provider: &ProviderName) -> bool {
        self.provider(provider)
            .is_none_or(|p| !p.machines_on_this_host())
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
        let rec = self.get_instance(agent).await?;
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
        self.update_with_retry(agent, vec![e], |r| {
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
            _ => {}
        }
        self.inner.store.append_events(&[e]).await?;
        if ev.kind == AgentEventKind::EngineReady {
            // Probe now rather than at the next period.
            self.inner.tasks.wake(task::HEALTH);
        }
        Ok(())
    }

    /// Instance changes as they happen.
    pub fn subscribe(&self) -> broadcast::Receiver<InstanceChange> {
        self.inner.bus.subscribe()
    }

    /// API key changes (revocations), from every replica.
    pub fn subscribe_keys(&self) -> broadcast::Receiver<crate::bus::KeyChange> {
        self.inner.bus.subscribe_keys()
    }

    /// Tell this replica's caches that the key with this digest changed
    /// (other replicas hear it from the database).
    pub fn api_key_changed(&self, key_hash: &str) {
        self.inner
            .bus
            .publish_key(crate::bus::KeyChange::Key(key_hash.to_string()));
    }

    /// Publish the changes other replicas commit to the same PostgreSQL
    /// database on this replica's bus, until `stop` (nothing to do on
    /// SQLite, which serves one replica).
    pub async fn follow_replicas(&self, stop: CancellationToken) -> Result<(), ControlError> {
        crate::bus::follow_database(
            self.inner.store.clone(),
            self.inner.bus.clone(),
            self.inner.tasks.clone(),
            stop,
        )
        .await?;
        Ok(())
    }

    /// This replica's name in the leases table.
    pub fn replica_name(&self) -> &str {
        self.inner.tasks.holder().unwrap_or("local")
    }

    /// Last status of every reconciler.
    pub fn task_statuses(&self) -> Vec<TaskStatus> {
        self.inner.tasks.statuses()
    }

    /// Apply a lifecycle event to `rec` (as last read): check the transition,
    /// let `mutate` adjust other fields, write with compare-and-swap together
    /// with the transition entry and `extra` entries, then publish.
    pub(crate) async fn apply(
        &self,
        rec: &InstanceRecord,
        event: LifecycleEvent,
        message: &str,
        extra: Vec<NewTimelineEvent>,
        mutate: impl FnOnce(&mut InstanceRecord),
    ) -> Result<InstanceRecord, ApplyError> {
        let to = transition(rec.status, event).map_err(ApplyError::Invalid)?;
        let now = Utc::now();
        let mut next = rec.clone();
        next.status = to;
        next.status_changed_at = now;
        next.updated_at = now;
        next.status_message = Some(message.to_string());
        match event {
            LifecycleEvent::Fail(reason) => next.status_reason = Some(reason),
            LifecycleEvent::EngineReady | LifecycleEvent::HealthRestored => {
                next.status_reason = None;
                if next.ready_at.is_none() {
                    next.ready_at = Some(now);
                }
            }
            LifecycleEvent::ProviderConfirmedGone => next.terminated_at = Some(now),
            _ => {}
        }
        mutate(&mut next);
        let mut t = timeline::transition(rec.id, now, rec.status, to, message);
        if let LifecycleEvent::Fail(reason) = event {
            t = t.error_code(reason.as_str());
            t.outcome = Outcome::Failed;
        }
        let mut events = extra;
        events.push(t);
        let fence = crate::driver::current_fence();
        let stored = match self
            .inner
            .store
            .update_instance_fenced(&next, &events, fence.as_ref())
            .await
        {
            Ok(s) => s,
            Err(StoreError::Conflict { .. }) => return Err(ApplyError::Conflict),
            Err(StoreError::Fenced { lease }) => return Err(ApplyError::Fenced(lease)),
            Err(e) => return Err(ApplyError::Store(e)),
        };
        tracing::info!(instance_id = %rec.id, from = %rec.status, to = %to, "{message}");
        self.inner.bus.publish(ChangeKind::Updated, stored.clone());
        Ok(stored)
    }

    /// Change non-status fields with compare-and-swap, re-reading on conflict.
    /// `mutate` returns false when there is nothing to change.
    pub(crate) async fn update_with_retry(
        &self,
        id: InstanceId,
        events: Vec<NewTimelineEvent>,
        mutate: impl Fn(&mut InstanceRecord) -> bool,
    ) -> Result<InstanceRecord, ControlError> {
        for _ in 0..CAS_RETRIES {
            let rec = self.get_instance(id).await?;
            let mut next = rec.clone();
            if !mutate(&mut next) {
                if !events.is_empty() {
                    self.inner.store.append_events(&events).await?;
                }
                return Ok(rec);
            }
            next.updated_at = Utc::now();
            let fence = crate::driver::current_fence();
            match self
                .inner
                .store
                .update_instance_fenced(&next, &events, fence.as_ref())
                .await
            {
                Ok(stored) => {
                    self.inner.bus.publish(ChangeKind::Updated, stored.clone());
                    return Ok(stored);
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ControlError::Conflict {
            message: format!("instance {id} is changing too fast; retry"),
        })
    }

    pub(crate) fn mark_creating(&self, id: InstanceId, on: bool) {
        let mut set = self
            .inner
            .creating
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if on {
            set.insert(id);
        } else {
            set.remove(&id);
        }
    }

    pub(crate) fn is_creating(&self, id: InstanceId) -> bool {
        self.inner
            .creating
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&id)
    }
}

/// Why [`Fleet::apply`] did not apply.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApplyError {
    #[error("the instance changed concurrently")]
    Conflict,
    /// The reconciler's lease changed hands: another replica acts now.
    #[error("lease {0} was lost; another replica acts")]
    Fenced(String),
    #[error(transparent)]
    Invalid(gpufleet_domain::InvalidTransition),
    #[error(transparent)]
    Store(StoreError),
}
