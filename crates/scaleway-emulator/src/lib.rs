//! A local emulator of the Scaleway APIs gpufleet's Scaleway provider uses.
//!
//! It answers the Instance API v1 (`/instance/v1/zones/{zone}/...`), the Block
//! Storage API v1 (`/block/v1/zones/{zone}/volumes`) and the Marketplace API v2
//! (`/marketplace/v2/local-images`) with the paths, bodies, status codes and
//! headers of the real API (shapes taken from recorded real answers), so a
//! client written against `https://api.scaleway.com` runs unchanged against
//! [`Emulator::url`]. On top of that it offers fault injection ([`Faults`]),
//! a request log with counts per route, per-token rate limiting, and — when
//! [`VmConfig`] is set — "VMs": a powered-on server runs its `cloud-init` user
//! data (a cloud-config subset) as local processes in their own process group,
//! bound to the server's loopback public IP.
//!
//! The admin HTTP API lives under `/emulator/v1/` (see `admin.rs`).

mod admin;
mod api;
mod block;
mod errors;
mod faults;
mod instance;
mod marketplace;
mod state;
mod vm;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use faults::{
    Availability, FaultAction, FaultRule, Faults, LoggedRequest, RateLimit, RuleEntry,
};
pub use state::{IpInfo, ServerInfo, VolumeInfo};

/// How long the emulated machines take to change state.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    /// `starting` → `running` after `poweron` (and `reboot`).
    pub boot: Duration,
    /// `stopping` → `stopped` (or `stopped in place`) after `poweroff`/`stop_in_place`/`terminate`.
    pub stop: Duration,
    /// After `terminate` has stopped the server: how long until it is gone.
    pub delete: Duration,
    /// Block volume `creating` → `available`.
    pub volume_create: Duration,
}

/// How powered-on servers run their user data as local processes.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Stand-in executables, prepended to the VMs' `PATH` (before the emulator's `systemctl`).
    pub bin_dir: Option<PathBuf>,
    /// Extra environment for every VM process.
    pub env: Vec<(String, String)>,
    /// Time between SIGTERM and SIGKILL to a VM's process group.
    pub kill_grace: Duration,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            bin_dir: None,
            env: Vec::new(),
            kill_grace: Duration::from_secs(3),
        }
    }
}

/// Everything the emulator needs to start.
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    /// The only accepted `X-Auth-Token`.
    pub secret_key: String,
    /// The project (and organization) id of the key; default for `project` in bodies.
    pub project_id: String,
    /// Zones answered; others get the real API's 404 for an unknown zone.
    pub zones: Vec<String>,
    /// VM directories (`<data_dir>/servers/<id>/`) and the emulator's bin dir.
    pub data_dir: PathBuf,
    /// IPv4 CIDR the flexible IPs are taken from (loopback so VMs can bind them).
    pub ip_pool: String,
    pub timings: Timings,
    pub rate_limit: Option<RateLimit>,
    /// `None`: servers only change state; nothing runs.
    pub vm: Option<VmConfig>,
}

impl EmulatorConfig {
    /// A config with the defaults: zones fr-par-1, fr-par-2, nl-ams-1, pl-waw-2,
    /// pool 127.91.0.0/16, zero timings, no rate limit, no VMs.
    pub fn new(
        secret_key: impl Into<String>,
        project_id: impl Into<String>,
        data_dir: PathBuf,
    ) -> Self {
        EmulatorConfig {
            secret_key: secret_key.into(),
            project_id: project_id.into(),
            zones: ["fr-par-1", "fr-par-2", "nl-ams-1", "pl-waw-2"]
                .iter()
                .map(|z| z.to_string())
                .collect(),
            data_dir,
            ip_pool: "127.91.0.0/16".into(),
            timings: Timings::default(),
            rate_limit: None,
            vm: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid ip_pool {0:?}: expected an IPv4 CIDR such as 127.91.0.0/16")]
    IpPool(String),
    #[error("data dir: {0}")]
    Io(#[from] std::io::Error),
}

/// Shared by every handler.
pub(crate) struct Shared {
    pub config: EmulatorConfig,
    pub state: Mutex<state::State>,
    pub faults: Faults,
    pub vms: vm::Vms,
    pub shutdown: CancellationToken,
}

pub(crate) type AppState = Arc<Shared>;

/// A running emulator. Call [`Emulator::shutdown`]; dropping it without
/// (say, in a test that panicked) SIGKILLs every VM process group at once and
/// stops serving.
pub struct Emulator {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server_task: tokio::task::JoinHandle<()>,
}

impl Emulator {
    /// Serves on `listener` until [`Emulator::shutdown`].
    pub async fn start(
        config: EmulatorConfig,
        listener: TcpListener,
    ) -> Result<Emulator, StartError> {
        let pool = state::IpPool::parse(&config.ip_pool)
            .ok_or_else(|| StartError::IpPool(config.ip_pool.clone()))?;
        std::fs::create_dir_all(config.data_dir.join("servers"))?;
        let vms = vm::Vms::new(&config)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(state::State::new(pool)),
            faults: Faults::new(config.rate_limit.clone()),
            vms,
            shutdown: CancellationToken::new(),
            config,
        });
        let app = api::router(shared.clone());
        let server_task = tokio::spawn(api::serve(listener, app, shared.shutdown.clone()));
        Ok(Emulator {
            shared,
            addr,
            server_task,
        })
    }

    /// `http://127.0.0.1:PORT` — use as `SCW_API_URL`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Fault rules, availability per type, locks, and the request log.
    pub fn faults(&self) -> &Faults {
        &self.shared.faults
    }

    /// Requests answered so far, per `"METHOD /route/{template}"`.
    pub fn request_counts(&self) -> BTreeMap<String, u64> {
        self.shared.faults.request_counts()
    }

    /// Every request answered so far, in order.
    pub fn request_log(&self) -> Vec<LoggedRequest> {
        self.shared.faults.request_log()
    }

    /// Every server that exists, in creation order.
    pub fn servers(&self) -> Vec<ServerInfo> {
        let st = self.shared.state.lock().unwrap();
        st.server_infos(&self.shared.vms)
    }

    /// Locks (or unlocks) a server: it shows `state: locked` and refuses
    /// actions and deletion with the `locked` error.
    pub fn lock_server(&self, id: &str, locked: bool) {
        self.shared.faults.lock_server(id, locked);
        if let Some(s) = self.shared.state.lock().unwrap().servers.get_mut(id) {
            s.locked = locked;
        }
    }

    /// The VM directory of a server (`<data_dir>/servers/<id>`).
    pub fn vm_dir(&self, id: &str) -> PathBuf {
        self.shared.vms.vm_dir(id)
    }

    /// Every flexible IP that exists.
    pub fn ips(&self) -> Vec<IpInfo> {
        self.shared.state.lock().unwrap().ip_infos()
    }

    /// Every block volume that exists.
    pub fn volumes(&self) -> Vec<VolumeInfo> {
        self.shared.state.lock().unwrap().volume_infos()
    }

    /// Stops serving and kills every VM process group (TERM, then KILL after
    /// the grace period); returns once none of their processes is alive.
    pub async fn shutdown(mut self) {
        self.shared.shutdown.cancel();
        let _ = (&mut self.server_task).await;
        self.shared.vms.kill_all().await;
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
        self.shared.vms.kill_all_now();
    }
}
