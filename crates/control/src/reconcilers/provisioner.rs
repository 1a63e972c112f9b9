//! Provisioner: calls the provider's create for instances in `provisioning`.
//!
//! The intent (the instance row with its idempotency key) was persisted when
//! the instance was created. Before each call the attempt number and the
//! earliest next attempt are persisted too, so a crash mid-call leads to a
//! retry with the same idempotency key — the provider returns the machine it
//! already made instead of a second one.

use super::Creating;
use super::{apply, backoff_ms, call_entry, fan_out, instances_in, note, CONCURRENCY};
use crate::catalog::Catalogs;
use crate::config::ControlConfig;
use crate::driver::{Reconciler, TaskName, TaskReport, Waker};
use crate::lifecycle::Lifecycle;
use crate::secrets::BootstrapKey;

use crate::timeline::{self, EntryExt};
use async_trait::async_trait;
use chrono::Utc;
use gpufleet_domain::{FailureReason, InstanceStatus, LifecycleEvent};
use gpufleet_proto::AgentBootstrap;
use gpufleet_providers::{tags, CreateRequest, ProviderError};
use gpufleet_store::{InstanceRecord, Outcome, Store, TimelineKind};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

pub struct Provisioner {
    store: Store,
    lifecycle: Lifecycle,
    /// The providers, and the models' sizes.
    catalogs: Catalogs,
    waker: Waker,
    config: Arc<ControlConfig>,
    cluster_id: String,
    bootstrap: BootstrapKey,
    creating: Creating,
}

impl Provisioner {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        lifecycle: Lifecycle,
        catalogs: Catalogs,
        waker: Waker,
        config: Arc<ControlConfig>,
        cluster_id: String,
        bootstrap: BootstrapKey,
        creating: Creating,
    ) -> Self {
        Self {
            store: lifecycle.store().clone(),
            lifecycle,
            catalogs,
            waker,
            config,
            cluster_id,
            bootstrap,
            creating,
        }
    }

    async fn provision(&self, rec: InstanceRecord) -> TaskReport {
        let mut report = TaskReport::default();
        let cfg = &self.config;
        let Some(provider) = self.catalogs.provider(&rec.provider).cloned() else {
            apply(
                &self.lifecycle,
                &mut report,
                &rec,
                LifecycleEvent::Fail(FailureReason::ProvisionFailed),
                &format!("provider {} is not configured", rec.provider),
                vec![],
                |_| {},
            )
            .await;
            return report;
        };
        let catalog = match provider.catalog().await {
            Ok(c) => c,
            Err(e) => {
                report.error(format!("{}: catalog: {e}", rec.id));
                return report;
            }
        };
        let Some(itype) = catalog.instance_type(&rec.instance_type).cloned() else {
            apply(
                &self.lifecycle,
                &mut report,
                &rec,
                LifecycleEvent::Fail(FailureReason::ProvisionFailed),
                &format!("instance type {} is no longer offered", rec.instance_type),
                vec![],
                |_| {},
            )
            .await;
            return report;
        };

        // Persist the attempt before the call.
        let attempt = rec.provision_attempts + 1;
        let wait = backoff_ms(
            cfg.provision_backoff_base_ms,
            cfg.provision_backoff_max_ms,
            attempt as u32,
        );
        let mut pending = rec.clone();
        pending.provision_attempts = attempt;
        pending.next_attempt_at = Some(Utc::now() + chrono::Duration::milliseconds(wait as i64));
        pending.updated_at = Utc::now();
        let intent = timeline::entry(
            rec.id,
            Utc::now(),
            TimelineKind::ProviderCall,
            "provider.create",
            Outcome::InProgress,
            format!(
                "creating {} in {} (attempt {attempt})",
                rec.instance_type, rec.zone
            ),
        )
        .meta(serde_json::json!({ "attempt": attempt, "idempotency_key": rec.idempotency_key }));
        let rec = match self.lifecycle.save(&pending, &[intent]).await {
            Ok(r) => r,
            // Fenced: this replica lost the provisioner's lease; it calls nothing.
            Err(
                gpufleet_store::StoreError::Conflict { .. }
                | gpufleet_store::StoreError::Fenced { .. },
            ) => return report,
            Err(e) => {
                report.error(format!("{}: {e}", rec.id));
                return report;
            }
        };

        let mut tag_map = BTreeMap::new();
        tag_map.insert(tags::CLUSTER.to_string(), self.cluster_id.clone());
        tag_map.insert(tags::INSTANCE.to_string(), rec.id.to_string());
        // Machines on this host reach the control plane where it listens;
        // cloud machines at its public URL, pinning its certificate.
        let (control_url, ca_pem) = if provider.machines_on_this_host() || cfg.public_url.is_empty()
        {
            (cfg.agent_control_url.as_str(), None)
        } else {
            (cfg.public_url.as_str(), cfg.public_ca_pem.clone())
        };
        let req = CreateRequest {
            instance_id: rec.id,
            idempotency_key: rec.idempotency_key.clone(),
            zone: rec.zone.clone(),
            instance_type: rec.instance_type.clone(),
            tags: tag_map,
            bootstrap: AgentBootstrap {
                instance_id: rec.id,
                control_plane_url: control_url.to_string(),
                bootstrap_secret: self.bootstrap.secret(rec.id),
                model: rec.model.clone(),
                agent_port: cfg.agent_port,
                engine: provider.engine().unwrap_or_else(|| cfg.engine.spec()),
                gpu: itype.gpu.clone(),
                control_plane_ca_pem: ca_pem,
                engine_args: rec.engine_args.clone().unwrap_or_default(),
            },
            model_size_mib: self.catalogs.model_size_mib(&rec.model),
            first_attempt: attempt == 1,
        };
        self.creating.mark(rec.id, true);
        let started = Instant::now();
        let result = provider.create(&req).await;
        match result {
            Ok(machine) => {
                let entry = call_entry(
                    &rec,
                    "provider.create",
                    started,
                    Ok(format!("created machine {}", machine.id)),
                );
                let applied = apply(
                    &self.lifecycle,
                    &mut report,
                    &rec,
                    LifecycleEvent::ProviderCreated,
                    &format!("provider created machine {}", machine.id),
                    vec![entry.clone()],
                    |r| {
                        r.provider_instance_id = Some(machine.id.clone());
                        r.milestones.provider_created = true;
                        r.next_attempt_at = None;
                    },
                )
                .await;
                if applied.is_none() {
                    // The instance moved on meanwhile (e.g. terminate): still
                    // record the machine so the terminator deletes it.
                    let id = machine.id.clone();
                    if let Err(e) = self
                        .lifecycle
                        .update_with_retry(rec.id, vec![entry], move |r| {
                            let changed = r.provider_instance_id.is_none();
                            r.provider_instance_id = Some(id.clone());
                            r.milestones.provider_created = true;
                            changed
                        })
                        .await
                    {
                        report.error(format!("{}: recording machine: {e}", rec.id));
                    }
                }
                self.waker.wake(TaskName::BootWatcher);
            }
            Err(e) => {
                let entry = call_entry(&rec, "provider.create", started, Err(&e));
                tracing::warn!(instance_id = %rec.id, attempt, error = %e, "provider create failed");
                report.error(format!("{}: create: {e}", rec.id));
                let fail = match &e {
                    ProviderError::Retryable { .. }
                        if attempt < cfg.provision_max_attempts as i32 =>
                    {
                        None
                    }
                    ProviderError::Retryable { .. } => Some(FailureReason::ProvisionFailed),
                    ProviderError::OutOfCapacity { .. } => Some(FailureReason::OutOfCapacity),
                    _ => Some(FailureReason::ProvisionFailed),
                };
                match fail {
                    // The provider asked for a longer wait than the backoff's.
                    None if e
                        .retry_after()
                        .is_some_and(|d| Some(Utc::now() + d) > rec.next_attempt_at) =>
                    {
                        let wait = e.retry_after().unwrap_or_default();
                        let mut later = rec.clone();
                        later.next_attempt_at = Some(Utc::now() + wait);
                        later.updated_at = Utc::now();
                        let note_entry = timeline::entry(
                            rec.id,
                            Utc::now(),
                            TimelineKind::Note,
                            "provider.retry_after",
                            Outcome::Waiting,
                            format!(
                                "the provider asked to wait {} s before the next attempt",
                                wait.as_secs()
                            ),
                        );
                        if let Err(e) = self.lifecycle.save(&later, &[entry, note_entry]).await {
                            report.error(format!("{}: {e}", rec.id));
                        }
                    }
                    None => note(&self.store, &mut report, vec![entry]).await,
                    Some(reason) => {
                        apply(
                            &self.lifecycle,
                            &mut report,
                            &rec,
                            LifecycleEvent::Fail(reason),
                            &format!("provisioning failed after {attempt} attempt(s): {e}"),
                            vec![entry],
                            |_| {},
                        )
                        .await;
                    }
                }
            }
        }
        self.creating.mark(rec.id, false);
        report
    }
}

#[async_trait]
impl Reconciler for Provisioner {
    fn name(&self) -> TaskName {
        TaskName::Provisioner
    }

    async fn activate(&self) -> TaskReport {
        let mut report = TaskReport::default();
        let now = Utc::now();
        let due: Vec<_> = instances_in(&self.store, &[InstanceStatus::Provisioning], &mut report)
            .await
            .into_iter()
            .filter(|r| r.next_attempt_at.is_none_or(|t| t <= now))
            .collect();
        fan_out(&mut report, due, CONCURRENCY, |rec| self.provision(rec)).await;
        report
    }
}
