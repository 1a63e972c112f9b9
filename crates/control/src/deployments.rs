//! Deployments: commands (create, list, get, patch, delete, timeline).
//! A command validates (the spec's own rules, then the catalogs: provider,
//! zone, machine type, model, VRAM), records the deployment in the store
//! with its timeline entry and wakes the keeper
//! ([`crate::reconcilers::deployments::Keeper`]), which creates, replaces,
//! scales and deletes its instances. No command touches an instance.

use crate::catalog::Catalogs;
use crate::driver::{TaskName, Waker};
use crate::error::ControlError;
use crate::lifecycle::CAS_RETRIES;
use crate::telemetry::Telemetry;
use chrono::Utc;
use gpufleet_domain::deployment::validate_deployment_name;
use gpufleet_domain::{
    Autoscaling, DeploymentAction, DeploymentId, DeploymentSpec, DeploymentState, HumanDuration,
    ModelName, Placement, ProjectId, ReplicaBounds, SpecError,
};
use gpufleet_store::{
    DeploymentEvent, DeploymentRecord, InstanceRecord, NewDeployment, NewDeploymentEvent, Outcome,
    Store, StoreError,
};
use std::sync::Arc;

/// A create request, parsed at the edge.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateDeployment {
    /// The project that owns it.
    pub project: ProjectId,
    pub name: String,
    pub model: ModelName,
    pub spec: DeploymentSpec,
}

/// What a PATCH may change. `None`: unchanged. New `placements` or
/// `engine_args` start a rolling update.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeploymentPatch {
    pub name: Option<String>,
    pub replicas: Option<ReplicaBounds>,
    pub autoscaling: Option<Autoscaling>,
    /// `Some(None)`: remove it.
    pub scale_to_zero_after: Option<Option<HumanDuration>>,
    pub placements: Option<Vec<Placement>>,
    pub engine_args: Option<Option<Vec<String>>>,
}

/// The deployment commands. Cheap to clone.
#[derive(Clone)]
pub struct Deployments {
    store: Store,
    catalogs: Catalogs,
    waker: Waker,
    telemetry: Arc<Telemetry>,
}

/// A timeline entry for a deployment.
pub(crate) fn event(
    id: DeploymentId,
    action: DeploymentAction,
    outcome: Outcome,
    message: impl Into<String>,
    metadata: serde_json::Value,
) -> NewDeploymentEvent {
    NewDeploymentEvent {
        deployment_id: id,
        at: Utc::now(),
        action,
        outcome,
        message: message.into(),
        metadata,
    }
}

fn store_error(e: StoreError) -> ControlError {
    match e {
        StoreError::NameTaken { name } => ControlError::Conflict {
            message: format!(
                "a deployment named {name:?} exists; choose another name or delete that one first"
            ),
        },
        StoreError::DeploymentNotFound { id } => ControlError::not_found("deployment", id),
        e => ControlError::Store(e),
    }
}

impl Deployments {
    pub(crate) fn new(
        store: Store,
        catalogs: Catalogs,
        waker: Waker,
        telemetry: Arc<Telemetry>,
    ) -> Self {
        Self {
            store,
            catalogs,
            waker,
            telemetry,
        }
    }

    /// Check a spec against itself and the catalogs: each placement's
    /// provider, machine type and zone exist, and the model fits the type's
    /// GPU memory (when both are known). The error names the field path.
    pub async fn validate(
        &self,
        model: &ModelName,
        spec: &DeploymentSpec,
    ) -> Result<(), ControlError> {
        spec.validate()?;
        let Some(m) = self.catalogs.models().iter().find(|m| m.name == *model) else {
            let known: Vec<_> = self
                .catalogs
                .models()
                .iter()
                .map(|m| m.name.as_str())
                .collect();
            return Err(SpecError::new(
                "model",
                format!(
                    "unknown model {:?}; available: {}",
                    model.as_str(),
                    known.join(", ")
                ),
            )
            .into());
        };
        for (i, p) in spec.placements.iter().enumerate() {
            let Some(provider) = self.catalogs.provider(&p.provider) else {
                let known: Vec<_> = self
                    .catalogs
                    .provider_names()
                    .iter()
                    .map(|n| n.to_string())
                    .collect();
                return Err(SpecError::new(
                    format!("placements[{i}].provider"),
                    format!(
                        "unknown provider {:?}; available: {}",
                        p.provider.as_str(),
                        known.join(", ")
                    ),
                )
                .into());
            };
            let catalog =
                provider
                    .catalog()
                    .await
                    .map_err(|source| ControlError::ProviderUnavailable {
                        provider: p.provider.to_string(),
                        source,
                    })?;
            let Some(itype) = catalog.instance_type(&p.instance_type) else {
                let known: Vec<_> = catalog
                    .instance_types
                    .iter()
                    .map(|t| t.name.as_str())
                    .collect();
                return Err(SpecError::new(
                    format!("placements[{i}].instance_type"),
                    format!(
                        "unknown instance type {:?} for provider {}; available: {}",
                        p.instance_type,
                        p.provider,
                        known.join(", ")
                    ),
                )
                .into());
            };
            if !itype.zones.contains(&p.zone) {
                return Err(SpecError::new(
                    format!("placements[{i}].zone"),
                    format!(
                        "instance type {} is not offered in zone {:?}; zones: {}",
                        itype.name,
                        p.zone,
                        itype.zones.join(", ")
                    ),
                )
                .into());
            }
            let vram = itype.gpu.vram_mib * u64::from(itype.gpu.count);
            if m.min_vram_mib > 0 && vram > 0 && m.min_vram_mib > vram {
                return Err(SpecError::new(
                    format!("placements[{i}].instance_type"),
                    format!(
                        "{} needs {} MiB of GPU memory; {} has {} MiB",
                        m.name, m.min_vram_mib, itype.name, vram
                    ),
                )
                .into());
            }
        }
        Ok(())
    }

    /// Record a deployment; the keeper starts its replicas.
    pub async fn create(&self, req: CreateDeployment) -> Result<DeploymentRecord, ControlError> {
        validate_deployment_name(&req.name)?;
        self.validate(&req.model, &req.spec).await?;
        let id = DeploymentId::new();
        let n = NewDeployment {
            id,
            name: req.name.clone(),
            model: req.model.clone(),
            desired_replicas: req.spec.replicas.min.max(1).min(req.spec.replicas.max),
            spec: req.spec,
            created_at: Utc::now(),
            project_id: req.project.clone(),
        };
        let created = event(
            id,
            DeploymentAction::Created,
            Outcome::Success,
            format!(
                "deployment {} of {} created: {} to {} replicas on {}",
                n.name,
                n.model,
                n.spec.replicas.min,
                n.spec.replicas.max,
                n.spec
                    .placements
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join(", then ")
            ),
            serde_json::to_value(&n.spec).unwrap_or_default(),
        );
        let rec = self
            .store
            .insert_deployment(&n, &[created])
            .await
            .map_err(store_error)?;
        self.telemetry
            .deployment_decision(DeploymentAction::Created);
        tracing::info!(deployment_id = %rec.id, name = %rec.name, "deployment created");
        self.waker.wake(TaskName::Deployments);
        Ok(rec)
    }

    pub async fn get(&self, id: DeploymentId) -> Result<DeploymentRecord, ControlError> {
        self.store
            .get_deployment(id)
            .await?
            .ok_or_else(|| ControlError::not_found("deployment", id))
    }

    /// Oldest first; deleted ones only with `include_deleted`.
    pub async fn list(&self, include_deleted: bool) -> Result<Vec<DeploymentRecord>, ControlError> {
        Ok(self.store.list_deployments(include_deleted).await?)
    }

    /// The deployment's instances (archived ones left out), oldest first.
    pub async fn instances(&self, id: DeploymentId) -> Result<Vec<InstanceRecord>, ControlError> {
        self.get(id).await?;
        Ok(self.store.list_deployment_instances(id).await?)
    }

    /// The deployment's timeline, oldest first.
    pub async fn events(
        &self,
        id: DeploymentId,
        after_id: Option<i64>,
        limit: i64,
    ) -> Result<Vec<DeploymentEvent>, ControlError> {
        self.get(id).await?;
        Ok(self
            .store
            .list_deployment_events(id, after_id, limit)
            .await?)
    }

    /// Change the name, replica bounds, autoscaling, scale-to-zero delay, or
    /// placements (a rolling update: see the keeper).
    pub async fn patch(
        &self,
        id: DeploymentId,
        patch: DeploymentPatch,
    ) -> Result<DeploymentRecord, ControlError> {
        for _ in 0..CAS_RETRIES {
            let rec = self.get(id).await?;
            if rec.state != DeploymentState::Active {
                return Err(ControlError::Conflict {
                    message: format!(
                        "deployment {id} is {}; only an active deployment can be changed",
                        rec.state
                    ),
                });
            }
            let mut next = rec.clone();
            let mut changed = Vec::new();
            if let Some(name) = &patch.name {
                validate_deployment_name(name)?;
                if *name != next.name {
                    changed.push(format!("name {} → {}", next.name, name));
                    next.name = name.clone();
                }
            }
            if let Some(p) = &patch.placements {
                if *p != next.spec.placements {
                    // A rolling update: the keeper starts replicas on the
                    // new placements and drains the old ones as they come.
                    let mut spec = next.spec.clone();
                    spec.placements = p.clone();
                    self.validate(&next.model, &spec).await?;
                    changed.push(format!(
                        "placements → {} (rolling update)",
                        p.iter()
                            .map(|x| x.to_string())
                            .collect::<Vec<_>>()
                            .join(", then ")
                    ));
                    next.spec.placements = p.clone();
                }
            }
            if let Some(a) = &patch.engine_args {
                if *a != next.spec.engine_args {
                    changed.push(format!(
                        "engine_args → {:?} (rolling update)",
                        a.as_deref().unwrap_or(&[])
                    ));
                    next.spec.engine_args = a.clone();
                }
            }
            if let Some(r) = patch.replicas {
                if r != next.spec.replicas {
                    changed.push(format!(
                        "replicas {}..{} → {}..{}",
                        next.spec.replicas.min, next.spec.replicas.max, r.min, r.max
                    ));
                    next.spec.replicas = r;
                }
            }
            if let Some(a) = patch.autoscaling {
                if a != next.spec.autoscaling {
                    changed.push(format!(
                        "autoscaling {} target {} per replica, scale-down delay {}",
                        a.metric, a.target_per_replica, a.scale_down_delay
                    ));
                    next.spec.autoscaling = a;
                }
            }
            if let Some(z) = patch.scale_to_zero_after {
                if z != next.spec.scale_to_zero_after {
                    changed.push(match z {
                        Some(d) => format!("scale_to_zero_after {d}"),
                        None => "scale_to_zero_after removed".to_string(),
                    });
                    next.spec.scale_to_zero_after = z;
                }
            }
            if changed.is_empty() {
                return Ok(rec);
            }
            next.spec.validate()?;
            next.updated_at = Utc::now();
            let e = event(
                id,
                DeploymentAction::Updated,
                Outcome::Success,
                format!("updated: {}", changed.join("; ")),
                serde_json::to_value(&next.spec).unwrap_or_default(),
            );
            match self.store.update_deployment(&next, &[e], None).await {
                Ok(stored) => {
                    self.telemetry
                        .deployment_decision(DeploymentAction::Updated);
                    self.waker.wake(TaskName::Deployments);
                    return Ok(stored);
                }
                Err(StoreError::DeploymentConflict { .. }) => continue,
                Err(e) => return Err(store_error(e)),
            }
        }
        Err(ControlError::Conflict {
            message: format!("deployment {id} is changing too fast; retry"),
        })
    }

    /// Ask for deletion: the keeper drains, then terminates, every instance,
    /// then marks the deployment deleted. Idempotent.
    pub async fn delete(&self, id: DeploymentId) -> Result<DeploymentRecord, ControlError> {
        for _ in 0..CAS_RETRIES {
            let rec = self.get(id).await?;
            if rec.state != DeploymentState::Active {
                return Ok(rec);
            }
            let now = Utc::now();
            let mut next = rec.clone();
            next.state = DeploymentState::Deleting;
            next.delete_requested_at = Some(now);
            next.updated_at = now;
            let e = event(
                id,
                DeploymentAction::DeleteRequested,
                Outcome::Success,
                "deletion requested: its instances drain, then terminate",
                serde_json::Value::Null,
            );
            match self.store.update_deployment(&next, &[e], None).await {
                Ok(stored) => {
                    self.telemetry
                        .deployment_decision(DeploymentAction::DeleteRequested);
                    self.waker.wake(TaskName::Deployments);
                    return Ok(stored);
                }
                Err(StoreError::DeploymentConflict { .. }) => continue,
                Err(e) => return Err(store_error(e)),
            }
        }
        Err(ControlError::Conflict {
            message: format!("deployment {id} is changing too fast; retry"),
        })
    }
}
