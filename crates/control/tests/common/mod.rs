//! Test support: the in-memory provider and a control plane over a fresh
//! database (`gpufleet_test_support`: SQLite, or PostgreSQL with
//! `GPUFLEET_TEST_DATABASE=postgres`).

#![allow(dead_code)]

use gpufleet_control::{
    AgentService, ControlConfig, ControlPlane, Deployments, Fleet, History, Tasks,
};
use gpufleet_domain::{InstanceId, InstanceStatus};
use gpufleet_providers::{Catalog, Provider, ProviderRegistry};
use gpufleet_store::{InstanceRecord, Store};
pub use gpufleet_test_support::db::TestDb;
pub use gpufleet_test_support::provider::FakeProvider;
use gpufleet_test_support::provider::{l4_type, zone};
use gpufleet_test_support::wait::wait_for;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The provider the tests create on: `mem`, one zone `z1`, one type `mem-1`;
/// each machine gets its own address in 127.99.0.0/16, where nothing answers.
pub fn memory_provider() -> Arc<FakeProvider> {
    let catalog = Catalog {
        zones: vec![zone("z1", "memory")],
        instance_types: vec![l4_type("mem-1", 23_034, 49_152, &["z1"])],
    };
    Arc::new(FakeProvider::new("mem", catalog))
}

pub fn fast_config() -> ControlConfig {
    ControlConfig {
        agent_control_url: "http://127.0.0.1:9".into(),
        heartbeat_interval_ms: 200,
        reconcile_interval_ms: 20,
        provision_backoff_base_ms: 10,
        provision_backoff_max_ms: 40,
        probe_timeout_ms: 200,
        failed_cleanup_grace_secs: 3600,
        ..ControlConfig::default()
    }
}

pub struct Harness {
    pub fleet: Fleet,
    pub deployments: Deployments,
    pub agents: AgentService,
    pub history: History,
    pub spend: gpufleet_control::Spend,
    pub tasks: Tasks,
    pub stop: CancellationToken,
    /// Dropped after `drop` stops the reconcilers.
    pub db: TestDb,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub async fn start(provider: Arc<dyn Provider>, config: ControlConfig) -> Harness {
    let db = TestDb::fresh().await;
    let store = Store::connect(db.url()).await.unwrap();
    let mut reg = ProviderRegistry::new();
    reg.register(provider);
    let control = ControlPlane::build(store, reg, config).await.unwrap();
    let stop = CancellationToken::new();
    control.start(stop.clone());
    Harness {
        fleet: control.fleet,
        deployments: control.deployments,
        agents: control.agents,
        history: control.history,
        spend: control.spend,
        tasks: control.tasks,
        stop,
        db,
    }
}

/// Poll `f` until it returns `Some`, failing after `secs`.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    wait_for(what, Duration::from_secs(secs), f).await
}

pub async fn wait_status(fleet: &Fleet, id: InstanceId, want: InstanceStatus) -> InstanceRecord {
    eventually(15, &format!("{id} to be {want}"), || async {
        let r = fleet.get_instance(id).await.unwrap();
        (r.status == want).then_some(r)
    })
    .await
}
