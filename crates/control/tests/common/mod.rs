//! Test support: an in-memory provider (no processes) and a control plane
//! over a temporary SQLite store.

#![allow(dead_code)]

use async_trait::async_trait;
use chrono::Utc;
use gpufleet_control::{AgentService, ControlConfig, ControlPlane, Fleet, History, Tasks};
use gpufleet_domain::{
    GpuSpec, InstanceId, InstanceStatus, InstanceType, ProviderInstanceId, ProviderName, Zone,
};
use gpufleet_providers::{
    Catalog, CreateRequest, Machine, MachineState, Provider, ProviderError, ProviderRegistry,
};
use gpufleet_store::{InstanceRecord, Store};
use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Default)]
pub struct MemState {
    pub machines: BTreeMap<ProviderInstanceId, Machine>,
    pub by_key: BTreeMap<String, ProviderInstanceId>,
    pub create_keys: Vec<String>,
    pub requests: Vec<CreateRequest>,
    pub next: u32,
}

/// A provider whose machines exist only in memory and get an IP at once.
pub struct MemoryProvider {
    name: ProviderName,
    pub state: Mutex<MemState>,
}

impl MemoryProvider {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            name: "mem".parse().unwrap(),
            state: Mutex::new(MemState::default()),
        })
    }
    pub fn machine_count(&self) -> usize {
        self.state.lock().unwrap().machines.len()
    }
    pub fn request_for(&self, id: InstanceId) -> Option<CreateRequest> {
        self.state
            .lock()
            .unwrap()
            .requests
            .iter()
            .find(|r| r.instance_id == id)
            .cloned()
    }
    /// Put a machine there behind gpufleet's back.
    pub fn insert_foreign(&self, tags: BTreeMap<String, String>) -> ProviderInstanceId {
        let mut st = self.state.lock().unwrap();
        st.next += 1;
        let id = ProviderInstanceId::new(format!("mem-{}", st.next));
        let m = machine(&id, st.next, tags, "z1", "mem-1");
        st.machines.insert(id.clone(), m);
        id
    }
}

fn machine(
    id: &ProviderInstanceId,
    n: u32,
    tags: BTreeMap<String, String>,
    zone: &str,
    t: &str,
) -> Machine {
    Machine {
        id: id.clone(),
        state: MachineState::Running,
        ip: Some(IpAddr::V4(Ipv4Addr::new(
            127,
            99,
            (n / 250) as u8,
            (n % 250 + 1) as u8,
        ))),
        zone: zone.into(),
        instance_type: t.into(),
        tags,
        created_at: Utc::now(),
    }
}

#[async_trait]
impl Provider for MemoryProvider {
    fn name(&self) -> &ProviderName {
        &self.name
    }
    async fn create(&self, req: &CreateRequest) -> Result<Machine, ProviderError> {
        let mut st = self.state.lock().unwrap();
        st.create_keys.push(req.idempotency_key.clone());
        st.requests.push(req.clone());
        if let Some(id) = st.by_key.get(&req.idempotency_key).cloned() {
            return st
                .machines
                .get(&id)
                .cloned()
                .ok_or(ProviderError::NotFound { id });
        }
        st.next += 1;
        let id = ProviderInstanceId::new(format!("mem-{}", st.next));
        let m = machine(
            &id,
            st.next,
            req.tags.clone(),
            &req.zone,
            &req.instance_type,
        );
        st.machines.insert(id.clone(), m.clone());
        st.by_key.insert(req.idempotency_key.clone(), id);
        Ok(m)
    }
    async fn get(&self, id: &ProviderInstanceId) -> Result<Machine, ProviderError> {
        self.state
            .lock()
            .unwrap()
            .machines
            .get(id)
            .cloned()
            .ok_or(ProviderError::NotFound { id: id.clone() })
    }
    async fn terminate(&self, id: &ProviderInstanceId) -> Result<(), ProviderError> {
        self.state.lock().unwrap().machines.remove(id);
        Ok(())
    }
    async fn list(&self, tags: &BTreeMap<String, String>) -> Result<Vec<Machine>, ProviderError> {
        Ok(self
            .state
            .lock()
            .unwrap()
            .machines
            .values()
            .filter(|m| tags.iter().all(|(k, v)| m.tags.get(k) == Some(v)))
            .cloned()
            .collect())
    }
    async fn catalog(&self) -> Result<Catalog, ProviderError> {
        Ok(Catalog {
            zones: vec![Zone {
                name: "z1".into(),
                description: "memory".into(),
            }],
            instance_types: vec![InstanceType {
                name: "mem-1".into(),
                gpu: GpuSpec {
                    model: "NVIDIA L4".into(),
                    count: 1,
                    vram_mib: 23034,
                    power_limit_w: 72.0,
                },
                vcpus: 8,
                ram_mib: 49152,
                price_per_hour: 0.75,
                currency: "EUR".into(),
                zones: vec!["z1".into()],
            }],
        })
    }
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
    pub agents: AgentService,
    pub history: History,
    pub tasks: Tasks,
    pub stop: CancellationToken,
    pub _dir: tempfile::TempDir,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub async fn start(provider: Arc<dyn Provider>, config: ControlConfig) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::connect(&format!("sqlite://{}/t.db?mode=rwc", dir.path().display()))
        .await
        .unwrap();
    let mut reg = ProviderRegistry::new();
    reg.register(provider);
    let control = ControlPlane::build(store, reg, config).await.unwrap();
    let stop = CancellationToken::new();
    control.start(stop.clone());
    Harness {
        fleet: control.fleet,
        agents: control.agents,
        history: control.history,
        tasks: control.tasks,
        stop,
        _dir: dir,
    }
}

/// Poll `f` until it returns `Some`, failing after `secs`.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn wait_status(fleet: &Fleet, id: InstanceId, want: InstanceStatus) -> InstanceRecord {
    eventually(15, &format!("{id} to be {want}"), || async {
        let r = fleet.get_instance(id).await.unwrap();
        (r.status == want).then_some(r)
    })
    .await
}
