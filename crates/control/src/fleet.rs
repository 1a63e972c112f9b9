//! The Fleet: commands on instances. Each command validates, records intent
//! through the [`Lifecycle`] write path (which publishes the change) and
//! wakes the reconciler that acts on it. No command calls a provider to
//! change anything: reconcilers do that. Built by [`crate::wiring`].

use crate::bus::InstanceChange;
use crate::catalog::Catalogs;
use crate::config::ControlConfig;
use crate::driver::{TaskName, Waker};
use crate::error::ControlError;
use crate::lifecycle::{ApplyError, Lifecycle, CAS_RETRIES};
use crate::secrets::{self, BootstrapKey};
use crate::timeline;
use crate::traffic::{TrafficSlot, TrafficSource};
use chrono::Utc;
use gpufleet_domain::{
    DeploymentId, InstanceId, InstanceStatus, LifecycleEvent, ModelName, ProjectId, ProviderName,
};
use gpufleet_store::{
    IdempotencyClaim, InsertOnce, InstanceFilter, InstanceRecord, NewInstance, Outcome,
    SampleRecord, Store, TimelineEvent, TimelineKind,
};
use std::sync::Arc;
use tokio::sync::broadcast;

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

/// What [`Fleet::create_instances_once`] answers.
#[derive(Debug, Clone)]
pub struct CreatedOnce {
    pub instances: Vec<InstanceRecord>,
    /// An earlier request with the same key made them.
    pub replayed: bool,
}

/// The control plane's command side. Cheap to clone.
#[derive(Clone)]
pub struct Fleet {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    /// The write path every instance change goes through.
    lifecycle: Lifecycle,
    catalogs: Catalogs,
    config: Arc<ControlConfig>,
    waker: Waker,
    cluster_id: String,
    /// Derives each instance's bootstrap secret (only its digest is stored).
    bootstrap: BootstrapKey,
    /// Requests in flight per instance (the router), once one is set.
    traffic: TrafficSlot,
    telemetry: Arc<crate::telemetry::Telemetry>,
}

impl Fleet {
    // Its one caller is `wiring`, which hands each part what it uses.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        lifecycle: Lifecycle,
        catalogs: Catalogs,
        config: Arc<ControlConfig>,
        waker: Waker,
        cluster_id: String,
        bootstrap: BootstrapKey,
        traffic: TrafficSlot,
        telemetry: Arc<crate::telemetry::Telemetry>,
    ) -> Self {
        Fleet {
            inner: Arc::new(Inner {
                store: lifecycle.store().clone(),
                lifecycle,
                catalogs,
                config,
                waker,
                cluster_id,
                bootstrap,
                traffic,
                telemetry,
            }),
        }
    }

    /// Let draining wait for the requests `source` counts in flight (rather
    /// than for the engine's last reported running and waiting requests).
    pub fn set_traffic_source(&self, source: Arc<dyn TrafficSource>) {
        self.inner.traffic.set(source);
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

    /// Instance changes as they happen.
    pub fn subscribe(&self) -> broadcast::Receiver<InstanceChange> {
        self.inner.lifecycle.subscribe()
    }

    pub(crate) fn bus(&self) -> &crate::bus::Bus {
        self.inner.lifecycle.bus()
    }

    /// API key changes (revocations), from every replica.
    pub fn subscribe_keys(&self) -> broadcast::Receiver<crate::bus::KeyChange> {
        self.bus().subscribe_keys()
    }

    /// Tell this replica's caches that the key with this digest changed
    /// (other replicas hear it from the database).
    pub fn api_key_changed(&self, key_hash: &str) {
        self.bus()
            .publish_key(crate::bus::KeyChange::Key(key_hash.to_string()));
    }

    /// Record `count` instances in `provisioning` with their provision intent;
    /// the provisioner does the provider calls.
    pub async fn create_instances(
        &self,
        req: CreateInstances,
    ) -> Result<Vec<InstanceRecord>, ControlError> {
        self.create_instances_in(ProjectId::default_project(), req)
            .await
    }

    /// [`Fleet::create_instances`] owned by `project`.
    pub async fn create_instances_in(
        &self,
        project: ProjectId,
        req: CreateInstances,
    ) -> Result<Vec<InstanceRecord>, ControlError> {
        self.create_instances_for(req, project, None, None).await
    }

    /// [`Fleet::create_instances_in`] at most once per idempotency `key`
    /// (the client's `Idempotency-Key`; per project, remembered for
    /// [`gpufleet_store::IDEMPOTENCY_KEY_TTL`]): a retry of a request that
    /// was recorded, whether or not its answer reached the client, gets the
    /// instances the first made, as they are now (`replayed`), never a
    /// second batch. The same key with another request is refused.
    pub async fn create_instances_once(
        &self,
        project: ProjectId,
        req: CreateInstances,
        key: String,
    ) -> Result<CreatedOnce, ControlError> {
        let claim = IdempotencyClaim {
            scope: "instances.create",
            project: project.clone(),
            request_digest: secrets::digest(&format!(
                "provider={}\nzone={:?}\ninstance_type={}\nmodel={}\ncount={}",
                req.provider, req.zone, req.instance_type, req.model, req.count
            )),
            key,
        };
        // A retry is answered from the key alone: it needs neither the
        // provider's catalog nor the model list to be as they were.
        let used = match self.inner.store.idempotency_key_use(&claim).await? {
            Some(used) => used,
            None => {
                let new = self.plan_instances(req, project, None, None).await?;
                match self.inner.lifecycle.insert_once(&new, &claim).await? {
                    InsertOnce::Inserted(created) => {
                        self.created(&created);
                        return Ok(CreatedOnce {
                            instances: created,
                            replayed: false,
                        });
                    }
                    InsertOnce::Used(used) => used,
                }
            }
        };
        if !used.same_request {
            return Err(ControlError::IdempotencyKeyReused { key: claim.key });
        }
        let mut instances = Vec::with_capacity(used.ids.len());
        for id in used.ids {
            instances.push(self.get_instance(id).await?);
        }
        tracing::info!(key = %claim.key, count = instances.len(), "create replayed for its idempotency key");
        Ok(CreatedOnce {
            instances,
            replayed: true,
        })
    }

    /// [`Fleet::create_instances`] for the replicas of a deployment: the
    /// same checks and the same persisted intent, with the deployment's id
    /// on each instance.
    pub async fn create_instances_for(
        &self,
        req: CreateInstances,
        project: ProjectId,
        deployment_id: Option<DeploymentId>,
        engine_args: Option<Vec<String>>,
    ) -> Result<Vec<InstanceRecord>, ControlError> {
        let new = self
            .plan_instances(req, project, deployment_id, engine_args)
            .await?;
        let created = self.inner.lifecycle.insert(&new).await?;
        self.created(&created);
        Ok(created)
    }

    /// Log what was created and wake the provisioner.
    fn created(&self, created: &[InstanceRecord]) {
        for rec in created {
            tracing::info!(instance_id = %rec.id, provider = %rec.provider, instance_type = %rec.instance_type, deployment_id = ?rec.deployment_id, "instance created");
        }
        self.inner.waker.wake(TaskName::Provisioner);
    }

    /// Check `req` against the catalogs and the models; the instances to
    /// record.
    async fn plan_instances(
        &self,
        req: CreateInstances,
        project: ProjectId,
        deployment_id: Option<DeploymentId>,
        engine_args: Option<Vec<String>>,
    ) -> Result<Vec<NewInstance>, ControlError> {
        let cfg = &self.inner.config;
        let provider = self.inner.catalogs.provider(&req.provider).ok_or_else(|| {
            let known: Vec<_> = self
                .inner
                .catalogs
                .provider_names()
                .iter()
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
                    bootstrap_secret_hash: secrets::digest(&self.inner.bootstrap.secret(id)),
                    startup_deadline_at: deadline,
                    created_at: now,
                    deployment_id,
                    engine_args: engine_args.clone(),
                    project_id: project.clone(),
                    price_per_hour: Some(itype.price_per_hour),
                }
            })
            .collect();
        Ok(new)
    }

    pub async fn get_instance(&self, id: InstanceId) -> Result<InstanceRecord, ControlError> {
        self.inner.lifecycle.get(id).await
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
        self.terminate_because(
            id,
            TimelineKind::User,
            "user.terminate",
            "termination requested",
        )
        .await
    }

    /// [`Fleet::terminate_instance`] with the reason on the instance's
    /// timeline as `action` (e.g. a deployment scaling down).
    pub async fn terminate_because(
        &self,
        id: InstanceId,
        kind: TimelineKind,
        action: &str,
        reason: &str,
    ) -> Result<InstanceRecord, ControlError> {
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
            let user = timeline::entry(id, now, kind, action, Outcome::Success, reason);
            match self
                .inner
                .lifecycle
                .apply(
                    &rec,
                    LifecycleEvent::TerminateRequested,
                    reason,
                    vec![user],
                    |r| {
                        r.terminate_requested_at = Some(now);
                    },
                )
                .await
            {
                Ok(next) => {
                    self.inner.waker.wake(TaskName::Terminator);
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
                .inner
                .lifecycle
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

    /// A request wants `model`, which has no ready replica: move its
    /// deployments' demand forward (any replica's keeper sees it) and wake
    /// this replica's keeper. Returns whether a deployment serves it.
    pub async fn note_demand(&self, model: &str) -> Result<bool, ControlError> {
        let moved = self
            .inner
            .store
            .note_model_demand(model, Utc::now())
            .await?;
        if moved > 0 {
            self.inner.waker.wake(TaskName::Deployments);
        }
        Ok(moved > 0 || self.inner.store.model_has_deployment(model).await?)
    }

    /// [`Self::note_demand`] for the deployments of `project` only (a
    /// request's key reaches its own project's replicas alone).
    pub async fn note_demand_in(
        &self,
        project: &ProjectId,
        model: &str,
    ) -> Result<bool, ControlError> {
        let store = &self.inner.store;
        let moved = store
            .note_project_model_demand(project, model, Utc::now())
            .await?;
        if moved > 0 {
            self.inner.waker.wake(TaskName::Deployments);
        }
        Ok(moved > 0 || store.project_model_has_deployment(project, model).await?)
    }

    /// The router holds requests for `model` (`Hold`) or releases them
    /// (`Release`): on the timeline of its active deployments and in
    /// `gpufleet_deployment_decisions_total`.
    pub async fn note_hold(
        &self,
        model: &str,
        action: gpufleet_domain::DeploymentAction,
        message: String,
        metadata: serde_json::Value,
    ) -> Result<(), ControlError> {
        self.note_hold_in(None, model, action, message, metadata)
            .await
    }

    /// [`Self::note_hold`] on the deployments of `project` only (`None`: all).
    pub async fn note_hold_in(
        &self,
        project: Option<&ProjectId>,
        model: &str,
        action: gpufleet_domain::DeploymentAction,
        message: String,
        metadata: serde_json::Value,
    ) -> Result<(), ControlError> {
        let store = &self.inner.store;
        let events: Vec<gpufleet_store::NewDeploymentEvent> = store
            .list_deployments(false)
            .await?
            .into_iter()
            .filter(|d| {
                d.model.as_str() == model
                    && d.state == gpufleet_domain::DeploymentState::Active
                    && project.is_none_or(|p| *p == d.project_id)
            })
            .map(|d| {
                crate::deployments::event(
                    d.id,
                    action,
                    gpufleet_store::Outcome::Info,
                    message.clone(),
                    metadata.clone(),
                )
            })
            .collect();
        if events.is_empty() {
            return Ok(());
        }
        store.append_deployment_events(&events).await?;
        for _ in &events {
            self.inner.telemetry.deployment_decision(action);
        }
        Ok(())
    }

    /// Write what the router did about an instance (a stall, its circuit
    /// opening or closing, a stream continued elsewhere, a hedge) on its
    /// timeline. `action` is e.g. `router.ejected`; no status changes.
    pub async fn note_routing(
        &self,
        id: InstanceId,
        action: &str,
        outcome: gpufleet_store::Outcome,
        message: String,
        metadata: serde_json::Value,
    ) -> Result<(), ControlError> {
        use crate::timeline::EntryExt as _;
        let e = crate::timeline::entry(
            id,
            chrono::Utc::now(),
            gpufleet_store::TimelineKind::Note,
            action,
            outcome,
            message,
        )
        .meta(metadata);
        Ok(self.inner.store.append_events(&[e]).await?)
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
}
