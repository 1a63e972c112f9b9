//! [`FakeProvider`]: machines that exist only in memory, running at once.
//!
//! It keeps the [`Provider`] contract (idempotent `create`, tags on every
//! machine, `list` filtered by tags, `NotFound` for a gone machine, idempotent
//! `terminate`) and records what it was asked. Failures, delays and vanishing
//! machines come from the product's fault-injecting wrapper around it
//! ([`FakeProvider::faulty`]), not from a second implementation here.

use async_trait::async_trait;
use chrono::Utc;
use gpufleet_domain::{GpuSpec, InstanceId, InstanceType, ProviderInstanceId, ProviderName, Zone};
use gpufleet_providers::fault::FaultyProvider;
use gpufleet_providers::{Catalog, CreateRequest, Machine, MachineState, Provider, ProviderError};
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Which IP a new machine gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ips {
    /// None: the machine never gets one.
    None,
    /// 127.0.0.1 for every machine (where a fake agent listens there).
    Localhost,
    /// A different address per machine in 127.99.0.0/16, where nothing
    /// listens.
    Distinct,
}

/// An in-memory provider; see the module documentation.
pub struct FakeProvider {
    name: ProviderName,
    catalog: Catalog,
    ips: Ips,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    machines: BTreeMap<ProviderInstanceId, Machine>,
    by_key: HashMap<String, ProviderInstanceId>,
    requests: Vec<CreateRequest>,
    /// Machines ever put there (numbers their ids and addresses).
    made: u32,
    created: u32,
    terminated: u32,
}

impl FakeProvider {
    /// A provider called `name` selling `catalog`; machines get
    /// [`Ips::Distinct`] addresses unless [`with_ips`](Self::with_ips) says
    /// otherwise.
    pub fn new(name: &str, catalog: Catalog) -> Self {
        Self {
            name: name.parse().expect("a valid provider name"),
            catalog,
            ips: Ips::Distinct,
            state: Mutex::default(),
        }
    }

    pub fn with_ips(mut self, ips: Ips) -> Self {
        self.ips = ips;
        self
    }

    /// The product's fault-injecting wrapper around this provider (nth call
    /// fails, slow calls, create succeeds but errors, vanishing machines).
    pub fn faulty(self: &Arc<Self>) -> Arc<FaultyProvider> {
        Arc::new(FaultyProvider::new(self.clone()))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every create request received, retries included, in order.
    pub fn requests(&self) -> Vec<CreateRequest> {
        self.state().requests.clone()
    }

    /// The first create request for instance `id`.
    pub fn request_for(&self, id: InstanceId) -> Option<CreateRequest> {
        self.state()
            .requests
            .iter()
            .find(|r| r.instance_id == id)
            .cloned()
    }

    /// The bootstrap secret handed to `id`'s machine, once it was asked for.
    pub fn bootstrap_secret(&self, id: InstanceId) -> Option<String> {
        self.request_for(id).map(|r| r.bootstrap.bootstrap_secret)
    }

    /// Machines made by `create` (a retry that finds its machine makes none).
    pub fn created(&self) -> u32 {
        self.state().created
    }

    /// `terminate` calls that removed a machine.
    pub fn terminated(&self) -> u32 {
        self.state().terminated
    }

    /// Machines that exist now.
    pub fn machines(&self) -> Vec<Machine> {
        self.state().machines.values().cloned().collect()
    }

    pub fn machine_count(&self) -> usize {
        self.state().machines.len()
    }

    pub fn has_machine(&self, id: &ProviderInstanceId) -> bool {
        self.state().machines.contains_key(id)
    }

    /// Puts a machine there behind gpufleet's back (neither a create nor
    /// counted as one).
    pub fn insert_foreign(&self, tags: BTreeMap<String, String>) -> ProviderInstanceId {
        let (zone, instance_type) = match self.catalog.instance_types.first() {
            Some(t) => (t.zones.first().cloned().unwrap_or_default(), t.name.clone()),
            None => (String::new(), String::new()),
        };
        let mut state = self.state();
        let machine = self.machine(&mut state, zone, instance_type, tags);
        let id = machine.id.clone();
        state.machines.insert(id.clone(), machine);
        id
    }

    fn machine(
        &self,
        state: &mut State,
        zone: String,
        instance_type: String,
        tags: BTreeMap<String, String>,
    ) -> Machine {
        state.made += 1;
        let n = state.made;
        let ip = match self.ips {
            Ips::None => None,
            Ips::Localhost => Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            Ips::Distinct => Some(IpAddr::V4(Ipv4Addr::new(
                127,
                99,
                (n / 250) as u8,
                (n % 250 + 1) as u8,
            ))),
        };
        Machine {
            id: ProviderInstanceId::new(format!("{}-{n}", self.name)),
            state: MachineState::Running,
            ip,
            zone,
            instance_type,
            tags,
            created_at: Utc::now(),
        }
    }
}

#[async_trait]
impl Provider for FakeProvider {
    fn name(&self) -> &ProviderName {
        &self.name
    }

    async fn create(&self, req: &CreateRequest) -> Result<Machine, ProviderError> {
        let mut state = self.state();
        state.requests.push(req.clone());
        if let Some(id) = state.by_key.get(&req.idempotency_key).cloned() {
            return state
                .machines
                .get(&id)
                .cloned()
                .ok_or(ProviderError::NotFound { id });
        }
        let machine = self.machine(
            &mut state,
            req.zone.clone(),
            req.instance_type.clone(),
            req.tags.clone(),
        );
        state.created += 1;
        state
            .by_key
            .insert(req.idempotency_key.clone(), machine.id.clone());
        state.machines.insert(machine.id.clone(), machine.clone());
        Ok(machine)
    }

    async fn get(&self, id: &ProviderInstanceId) -> Result<Machine, ProviderError> {
        self.state()
            .machines
            .get(id)
            .cloned()
            .ok_or_else(|| ProviderError::NotFound { id: id.clone() })
    }

    async fn terminate(&self, id: &ProviderInstanceId) -> Result<(), ProviderError> {
        let mut state = self.state();
        if state.machines.remove(id).is_some() {
            state.terminated += 1;
        }
        Ok(())
    }

    async fn list(&self, tags: &BTreeMap<String, String>) -> Result<Vec<Machine>, ProviderError> {
        Ok(self
            .state()
            .machines
            .values()
            .filter(|m| tags.iter().all(|(k, v)| m.tags.get(k) == Some(v)))
            .cloned()
            .collect())
    }

    async fn catalog(&self) -> Result<Catalog, ProviderError> {
        Ok(self.catalog.clone())
    }
}

/// A zone for a test catalog.
pub fn zone(name: &str, description: &str) -> Zone {
    Zone {
        name: name.into(),
        description: description.into(),
    }
}

/// A one-L4 instance type with `vram_mib` of GPU memory and `ram_mib` of
/// RAM, offered in `zones`, for a test catalog.
pub fn l4_type(name: &str, vram_mib: u64, ram_mib: u64, zones: &[&str]) -> InstanceType {
    InstanceType {
        name: name.into(),
        gpu: GpuSpec {
            model: "NVIDIA L4".into(),
            count: 1,
            vram_mib,
            power_limit_w: 72.0,
        },
        vcpus: 8,
        ram_mib,
        price_per_hour: 0.75,
        currency: "EUR".into(),
        zones: zones.iter().map(|z| z.to_string()).collect(),
    }
}
