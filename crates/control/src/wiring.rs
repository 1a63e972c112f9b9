//! Builds the control plane: the one place that knows how the parts fit.
//!
//! Over a connected store and the configured providers it makes the
//! telemetry, the providers wrapped in [`MeteredProvider`], the bus and the
//! [`Lifecycle`] write path over it, the [`AgentService`], the [`Fleet`]
//! commands, the read sides ([`Catalogs`], [`History`], [`Spend`]) and the reconcilers,
//! each given only what it uses. `gpufleet up` (and the test harnesses)
//! build a [`ControlPlane`], [`ControlPlane::start`] its reconcilers and hand
//! its parts to the HTTP edge and the router.

use crate::agents::AgentService;
use crate::bus::Bus;
use crate::catalog::Catalogs;
use crate::config::ControlConfig;
use crate::deployments::Deployments;
use crate::driver::TaskName;
use crate::driver::{Reconciler, Tasks};
use crate::error::ControlError;
use crate::fleet::Fleet;
use crate::history::History;
use crate::lifecycle::Lifecycle;
use crate::metered::MeteredProvider;
use crate::reconcilers::{self, Creating};
use crate::secrets::BootstrapKey;
use crate::spend::Spend;
use crate::telemetry::Telemetry;
use crate::traffic::TrafficSlot;
use gpufleet_providers::ProviderRegistry;
use gpufleet_store::Store;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The parts of a built control plane. Each is a cheap-to-clone handle.
pub struct ControlPlane {
    pub store: Store,
    /// Users, projects, roles, sessions, tokens, the audit log.
    pub accounts: crate::accounts::Accounts,
    /// Commands on instances.
    pub fleet: Fleet,
    /// Commands on deployments.
    pub deployments: Deployments,
    /// Agent registration, authentication and heartbeats.
    pub agents: AgentService,
    /// The providers (metered) and the model list.
    pub catalogs: Catalogs,
    /// Metric history and fleet figures.
    pub history: History,
    /// Spend reports (cost per instance, project, model, ...).
    pub spend: Spend,
    /// Prometheus metrics recorded as things happen.
    pub telemetry: Arc<Telemetry>,
    /// The reconcilers' driver: their statuses.
    pub tasks: Tasks,
    reconcilers: Vec<(Arc<dyn Reconciler>, Duration)>,
}

impl ControlPlane {
    /// Build every part over a connected store and the providers. Starts
    /// the heartbeat writer (needs a Tokio runtime); the reconcilers start
    /// at [`ControlPlane::start`].
    pub async fn build(
        store: Store,
        providers: ProviderRegistry,
        config: ControlConfig,
    ) -> Result<ControlPlane, ControlError> {
        config.validate()?;
        let cluster_id = store.cluster_id().await?;
        let secret_key = store.secret_key().await?;
        let bootstrap = BootstrapKey::new(secret_key.clone());
        let config = Arc::new(config);
        let tasks = Tasks::default().with_leases(crate::driver::Leases {
            store: store.clone(),
            holder: crate::driver::Leases::holder_name(),
            ttl: Duration::from_millis(config.lease_ttl_ms.max(100)),
        });
        let waker = tasks.waker();
        let telemetry = Arc::new(Telemetry::new(&tasks));
        let providers = MeteredProvider::wrap_all(&providers, &telemetry);
        let catalogs = Catalogs::new(providers.clone(), config.models.clone());
        let lifecycle = Lifecycle::new(store.clone(), Bus::new(4096));
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.probe_timeout_ms))
            .build()
            .map_err(|e| ControlError::invalid("probe_timeout_ms", e.to_string()))?;
        let agents = AgentService::new(
            lifecycle.clone(),
            catalogs.clone(),
            waker.clone(),
            config.clone(),
            telemetry.clone(),
        );
        let traffic = TrafficSlot::default();
        let fleet = Fleet::new(
            lifecycle.clone(),
            catalogs.clone(),
            config.clone(),
            waker.clone(),
            cluster_id.clone(),
            bootstrap.clone(),
            traffic.clone(),
            telemetry.clone(),
        );
        let deployments = Deployments::new(
            store.clone(),
            catalogs.clone(),
            waker.clone(),
            telemetry.clone(),
        );
        let history = History::new(store.clone(), catalogs.clone(), config.clone());
        let spend = Spend::new(store.clone()).with_catalogs(catalogs.clone());

        let creating = Creating::default();
        let period = Duration::from_millis(config.reconcile_interval_ms.max(10));
        let reconcilers: Vec<(Arc<dyn Reconciler>, Duration)> = vec![
            (
                Arc::new(reconcilers::Provisioner::new(
                    lifecycle.clone(),
                    catalogs.clone(),
                    waker.clone(),
                    config.clone(),
                    cluster_id.clone(),
                    bootstrap,
                    creating.clone(),
                )),
                period,
            ),
            (
                Arc::new(reconcilers::BootWatcher::new(
                    lifecycle.clone(),
                    providers.clone(),
                    waker.clone(),
                    config.startup_timeout_secs,
                )),
                period,
            ),
            (
                Arc::new(reconcilers::Health::new(
                    lifecycle.clone(),
                    providers.clone(),
                    config.clone(),
                    http,
                )),
                period,
            ),
            (
                Arc::new(reconcilers::Terminator::new(
                    lifecycle.clone(),
                    providers.clone(),
                    waker,
                    chrono::Duration::seconds(config.drain_timeout_secs as i64),
                    cluster_id.clone(),
                    creating.clone(),
                    traffic.clone(),
                )),
                period,
            ),
            (
                Arc::new(reconcilers::FailedCleanup::new(
                    lifecycle,
                    providers.clone(),
                    chrono::Duration::seconds(config.failed_cleanup_grace_secs as i64),
                    cluster_id.clone(),
                    creating.clone(),
                )),
                period,
            ),
            (
                Arc::new(reconcilers::OrphanReaper::new(
                    store.clone(),
                    providers,
                    Duration::from_secs(config.orphan_grace_secs),
                    cluster_id,
                    creating,
                )),
                period * 10,
            ),
            (
                Arc::new(reconcilers::MetricsRollup::new(
                    store.clone(),
                    config.retention,
                )),
                Duration::from_millis(config.metrics_rollup_interval_ms.max(10)),
            ),
            (
                Arc::new(reconcilers::Keeper::new(
                    fleet.clone(),
                    config.clone(),
                    telemetry.clone(),
                    traffic,
                )),
                period,
            ),
        ];
        let accounts = crate::accounts::Accounts::new(
            store.clone(),
            std::time::Duration::from_secs(12 * 3600),
            &secret_key,
        );
        Ok(ControlPlane {
            accounts,
            store,
            fleet,
            deployments,
            agents,
            catalogs,
            history,
            spend,
            telemetry,
            tasks,
            reconcilers,
        })
    }

    /// Start the reconcilers; they stop when `shutdown` is cancelled (the
    /// returned handle completes once each finished its activation in hand).
    pub fn start(&self, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        // The keeper acts when a deployment's instance changes (on any replica).
        let mut changes = self.fleet.subscribe();
        let waker = self.tasks.waker();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    change = changes.recv() => match change {
                        Ok(c) if c.instance.deployment_id.is_some() => waker.wake(TaskName::Deployments),
                        Ok(_) => {}
                        Err(RecvError::Lagged(_)) => waker.wake(TaskName::Deployments),
                        Err(RecvError::Closed) => break,
                    },
                }
            }
        });
        self.tasks.spawn_all(self.reconcilers.clone(), shutdown)
    }

    /// Publish the changes other replicas commit to the same PostgreSQL
    /// database on this replica's bus, until `stop` (nothing to do on
    /// SQLite, which serves one replica). Call before [`Self::start`].
    pub async fn follow_replicas(&self, stop: CancellationToken) -> Result<(), ControlError> {
        crate::bus::follow_database(
            self.store.clone(),
            self.fleet.bus().clone(),
            self.tasks.waker(),
            stop,
        )
        .await?;
        Ok(())
    }

    /// This replica's name in the leases table.
    pub fn replica_name(&self) -> &str {
        self.tasks.holder().unwrap_or("local")
    }
}
