//! The Mock provider (`mock`): machines are real process groups on this host.
//!
//! Each machine gets its own loopback address from [`MockConfig::ip_pool`]
//! (Linux routes all of `127.0.0.0/8` to `lo`, so nothing needs setting up),
//! a directory `<data_dir>/machines/<machine-id>/` and, once its boot delay has
//! passed, an agent process leading its own process group:
//!
//! ```text
//! <agent_program> <agent_args...> --instance-id <instance id> \
//!     --bootstrap-file <dir>/bootstrap.json --bind <ip> --data-dir <dir>
//! ```
//!
//! run with cwd `<dir>`, stdin from `/dev/null`, stdout and stderr appended to
//! `<dir>/agent.log`, and `GPUFLEET_MOCK_MACHINE_ID=<machine id>` in its
//! environment (other `GPUFLEET_*` variables of the control plane are removed:
//! a machine learns everything from its bootstrap, like a fresh VM).
//!
//! A supervisor task ticks every 200 ms, like systemd with `Restart=always`:
//! it boots machines whose delay passed, restarts dead agents after
//! `agent_restart_delay_ms` (taking the rest of their process group down
//! first), and drives terminations (SIGTERM to every process of the machine,
//! SIGKILL after `terminate_grace_ms`, deleted once none is left).
//!
//! State lives in `machine.json` per machine, so a new [`MockProvider::open`]
//! on the same `data_dir` adopts machines whose agent still runs, reports
//! machines whose agent died meanwhile as gone, and boots machines that had not
//! been booted yet.
//!
//! `create` is idempotent for good: replaying the key of a machine that has
//! since been deleted returns that machine in state `Stopped` (no IP), and
//! `get` on it says `NotFound`. Reusing a key for a different zone, type or
//! instance is `InvalidRequest { field: "idempotency_key" }`.
//!
//! Only one provider may have a `data_dir` open at a time (an advisory lock on
//! `<data_dir>/mock.lock`).

mod config;
mod ip_pool;
mod procfs;
mod record;

pub use config::{default_instance_types, default_zones, MockConfig};
pub use ip_pool::{IpPool, IpPoolError};
pub use procfs::MACHINE_ENV;

use crate::{Catalog, CreateRequest, Machine, MachineState, Provider, ProviderError};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use gpufleet_domain::{ProviderInstanceId, ProviderName};
use nix::sys::signal::Signal;
use procfs::{agent_alive, machine_processes, MachineProcesses, ProcTable};
use record::{write_atomic, LoadError, MachineRecord, BOOTSTRAP_FILE, LOG_FILE, RECORD_FILE};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

/// The provider name machines of this provider are registered under.
pub const PROVIDER_NAME: &str = "mock";

/// How often the supervisor looks at every machine.
pub const SUPERVISOR_TICK: Duration = Duration::from_millis(200);

const LOCK_FILE: &str = "mock.lock";

/// Why the Mock provider could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum MockError {
    #[error(transparent)]
    IpPool(#[from] IpPoolError),
    #[error("invalid mock catalog: {reason}")]
    Catalog { reason: String },
    #[error("MockProvider::open must be called from within a Tokio runtime")]
    NoRuntime,
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is locked: another mock provider has this data_dir open")]
    Locked { path: PathBuf },
    #[error("cannot load the mock provider's machines")]
    Load(#[from] LoadError),
}

/// The Mock provider. See the [module documentation](self).
pub struct MockProvider {
    inner: Arc<Inner>,
    shutdown_tx: watch::Sender<bool>,
    supervisor: Mutex<Option<JoinHandle<()>>>,
    /// Holds the advisory lock on the data dir while open.
    lock_file: Mutex<Option<File>>,
}

struct Inner {
    name: ProviderName,
    config: MockConfig,
    machines_dir: PathBuf,
    pool: IpPool,
    catalog: Catalog,
    state: Mutex<State>,
    wake: Notify,
    ticks: AtomicU64,
}

struct State {
    /// Every machine ever made, deleted ones included (their idempotency keys stay taken).
    machines: BTreeMap<ProviderInstanceId, Entry>,
    keys: HashMap<String, ProviderInstanceId>,
    used_ips: BTreeSet<Ipv4Addr>,
    /// False once `shutdown` began: no new work is accepted.
    open: bool,
}

struct Entry {
    record: MachineRecord,
    /// `record` differs from `machine.json` (a write failed); retried every tick.
    dirty: bool,
    /// The next agent start is not before this instant (after a death or a failed spawn).
    restart_at: Option<Instant>,
    /// When the machine's processes got SIGTERM for termination.
    term_sent_at: Option<Instant>,
    kill_sent: bool,
    /// Set by the reaper task once the agent this provider spawned has
    /// exited. `None` for adopted agents (not our children), which are
    /// checked through `/proc` instead.
    child_exited: Option<Arc<AtomicBool>>,
}

impl Entry {
    fn new(record: MachineRecord) -> Self {
        Self {
            record,
            dirty: false,
            restart_at: None,
            term_sent_at: None,
            kill_sent: false,
            child_exited: None,
        }
    }

    /// Whether the agent we spawned ourselves still runs (so its process
    /// group is certainly this machine's).
    fn own_child_running(&self) -> bool {
        self.child_exited
            .as_ref()
            .is_some_and(|exited| !exited.load(Ordering::SeqCst))
    }

    /// Whether the machine's agent runs. Our own child is known from its
    /// reaper: right after a spawn its `/proc/<pid>/cmdline` can still be
    /// empty (the exec is not complete when the parent resumes), so the
    /// `/proc` check is only for adopted agents.
    fn agent_running(&self) -> bool {
        match &self.child_exited {
            Some(exited) => !exited.load(Ordering::SeqCst),
            None => agent_alive(
                self.record.agent_pid.unwrap_or(0),
                &self.record.instance_id.to_string(),
            ),
        }
    }

    fn processes(&self, table: &ProcTable) -> MachineProcesses {
        let r = &self.record;
        table.machine(
            r.id.as_str(),
            &r.instance_id.to_string(),
            r.agent_pgid,
            self.own_child_running(),
        )
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic while holding the lock leaves plain data behind; keep going.
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl MockProvider {
    /// Opens the provider on `config.data_dir`: loads its machines, adopts or
    /// reports gone the ones that had been started, and starts the supervisor.
    ///
    /// Must be called from within a Tokio runtime. Blocks for up to about a
    /// second if the data dir's lock is taken.
    pub fn open(config: MockConfig) -> Result<Arc<MockProvider>, MockError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| MockError::NoRuntime)?;
        let mut config = config;
        let pool = IpPool::parse(&config.ip_pool)?;
        let catalog = validate_catalog(&config)?;
        let io_err = |action, path: &Path| {
            let path = path.to_path_buf();
            move |source| MockError::Io {
                action,
                path,
                source,
            }
        };

        let machines_dir = config.data_dir.join("machines");
        fs::create_dir_all(&machines_dir).map_err(io_err("create", &machines_dir))?;
        config.data_dir = config
            .data_dir
            .canonicalize()
            .map_err(io_err("resolve", &config.data_dir))?;
        let machines_dir = config.data_dir.join("machines");
        if config.agent_program.is_relative() && config.agent_program.components().count() > 1 {
            let cwd = std::env::current_dir().map_err(io_err("resolve", Path::new(".")))?;
            config.agent_program = cwd.join(&config.agent_program);
        }

        let lock_path = config.data_dir.join(LOCK_FILE);
        let lock_file = lock_data_dir(&lock_path)?;

        let mut state = State {
            machines: BTreeMap::new(),
            keys: HashMap::new(),
            used_ips: BTreeSet::new(),
            open: true,
        };
        for record in record::load_all(&machines_dir)? {
            state
                .keys
                .insert(record.idempotency_key.clone(), record.id.clone());
            if !record.deleted && !state.used_ips.insert(record.ip) {
                warn!(machine_id = %record.id, ip = %record.ip, "two machines hold the same IP");
            }
            state.machines.insert(record.id.clone(), Entry::new(record));
        }

        let inner = Arc::new(Inner {
            name: ProviderName::try_from(PROVIDER_NAME.to_string())
                .expect("\"mock\" is a valid provider name"),
            config,
            machines_dir,
            pool,
            catalog,
            state: Mutex::new(state),
            wake: Notify::new(),
            ticks: AtomicU64::new(0),
        });
        inner.readopt();

        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let supervisor = runtime.spawn(supervise(inner.clone(), shutdown_rx));
        info!(data_dir = %inner.config.data_dir.display(), ip_pool = %inner.config.ip_pool, "mock provider open");
        Ok(Arc::new(MockProvider {
            inner,
            shutdown_tx,
            supervisor: Mutex::new(Some(supervisor)),
            lock_file: Mutex::new(Some(lock_file)),
        }))
    }

    /// Stops the supervisor and releases the data dir. Machines keep running
    /// and are adopted by the next [`MockProvider::open`]. Afterwards `create`
    /// and `terminate` fail with `Retryable`; `get`, `list` and `catalog` still answer.
    pub async fn shutdown(&self) {
        lock(&self.inner.state).open = false;
        let _ = self.shutdown_tx.send(true);
        let handle = self
            .supervisor
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(handle) = handle {
            if let Err(e) = handle.await {
                error!(error = %e, "mock provider supervisor ended abnormally");
            }
        }
        drop(
            self.lock_file
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        info!(data_dir = %self.inner.config.data_dir.display(), "mock provider shut down; machines keep running");
    }

    /// The directory of machine `id`: `<data_dir>/machines/<id>` (whether or not it exists).
    pub fn machine_dir(&self, id: &ProviderInstanceId) -> PathBuf {
        self.inner.machine_dir(id)
    }

    /// The pid of the machine's current (or most recent) agent process, which
    /// leads the machine's process group. `None` if the machine does not exist
    /// (any more) or no agent was started yet.
    pub fn agent_pid(&self, id: &ProviderInstanceId) -> Option<i32> {
        let state = lock(&self.inner.state);
        state
            .machines
            .get(id)
            .filter(|e| !e.record.deleted)
            .and_then(|e| e.record.agent_pid)
    }

    /// The running processes of a machine (its agent, the agent's children,
    /// and anything else carrying its [`MACHINE_ENV`] marker), sorted by pid.
    pub fn machine_pids(&self, id: &ProviderInstanceId) -> Vec<i32> {
        let (instance_id, pgid) = {
            let state = lock(&self.inner.state);
            match state.machines.get(id) {
                Some(e) => (e.record.instance_id.to_string(), e.record.agent_pgid),
                None => return Vec::new(),
            }
        };
        machine_processes(id.as_str(), &instance_id, pgid, false).pids
    }

    /// How many supervisor ticks have completed; lets tests wait for the
    /// supervisor to have looked at the world a few times.
    pub fn supervisor_ticks(&self) -> u64 {
        self.inner.ticks.load(Ordering::Relaxed)
    }

    /// The configuration in effect (`data_dir` and `agent_program` made absolute).
    pub fn config(&self) -> &MockConfig {
        &self.inner.config
    }
}

impl Drop for MockProvider {
    fn drop(&mut self) {
        let _ = self.shutdown_tx.send(true);
        if let Some(handle) = self
            .supervisor
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            handle.abort();
        }
    }
}

/// Takes the advisory lock on the data dir. A lock that is still held after
/// about a second means another provider has the dir open. (The wait covers a
/// brief, harmless overlap: a process forked elsewhere in this program holds a
/// copy of a just-released lock's descriptor until it execs.)
fn lock_data_dir(path: &Path) -> Result<File, MockError> {
    const ATTEMPTS: u32 = 50;
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o644)
        .open(path)
        .map_err(|source| MockError::Io {
            action: "open",
            path: path.to_path_buf(),
            source,
        })?;
    for attempt in 1..=ATTEMPTS {
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(file);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::WouldBlock {
            return Err(MockError::Io {
                action: "lock",
                path: path.to_path_buf(),
                source: err,
            });
        }
        if attempt < ATTEMPTS {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Err(MockError::Locked {
        path: path.to_path_buf(),
    })
}

fn validate_catalog(config: &MockConfig) -> Result<Catalog, MockError> {
    let bad = |reason: String| Err(MockError::Catalog { reason });
    if config.zones.is_empty() {
        return bad("no zones".to_string());
    }
    if config.instance_types.is_empty() {
        return bad("no instance types".to_string());
    }
    let mut zones = BTreeSet::new();
    for zone in &config.zones {
        if !zones.insert(zone.name.as_str()) {
            return bad(format!("zone {:?} is listed twice", zone.name));
        }
    }
    let mut types = BTreeSet::new();
    for ty in &config.instance_types {
        if !types.insert(ty.name.as_str()) {
            return bad(format!("instance type {:?} is listed twice", ty.name));
        }
        if ty.zones.is_empty() {
            return bad(format!("instance type {:?} is offered in no zone", ty.name));
        }
        if let Some(z) = ty.zones.iter().find(|z| !zones.contains(z.as_str())) {
            return bad(format!(
                "instance type {:?} names unknown zone {z:?}",
                ty.name
            ));
        }
    }
    Ok(Catalog {
        zones: config.zones.clone(),
        instance_types: config.instance_types.clone(),
    })
}

fn new_machine_id() -> ProviderInstanceId {
    ProviderInstanceId::new(format!("mock-{}", hex::encode(rand::random::<[u8; 6]>())))
}

async fn supervise(inner: Arc<Inner>, mut shutdown: watch::Receiver<bool>) {
    debug!("mock provider supervisor started");
    loop {
        if *shutdown.borrow_and_update() {
            break;
        }
        inner.tick();
        tokio::select! {
            changed = shutdown.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            _ = inner.wake.notified() => {}
            _ = tokio::time::sleep(SUPERVISOR_TICK) => {}
        }
    }
    debug!("mock provider supervisor stopped");
}

impl Inner {
    fn machine_dir(&self, id: &ProviderInstanceId) -> PathBuf {
        self.machines_dir.join(id.as_str())
    }

    fn view(&self, record: &MachineRecord) -> Machine {
        let ip_visible = Utc::now() >= after_ms(record.created_at, self.config.ip_delay_ms);
        Machine {
            id: record.id.clone(),
            state: if record.deleted {
                MachineState::Stopped
            } else {
                record.state
            },
            ip: (ip_visible && !record.deleted).then_some(IpAddr::V4(record.ip)),
            zone: record.zone.clone(),
            instance_type: record.instance_type.clone(),
            tags: record.tags.clone(),
            created_at: record.created_at,
        }
    }

    /// Writes `entry.record` to its `machine.json`; on failure marks it dirty
    /// so that the next tick tries again.
    fn save(&self, entry: &mut Entry) -> io::Result<()> {
        let path = self.machine_dir(&entry.record.id).join(RECORD_FILE);
        let result = serde_json::to_vec_pretty(&entry.record)
            .map_err(io::Error::other)
            .and_then(|bytes| write_atomic(&path, &bytes, 0o644));
        match &result {
            Ok(()) => entry.dirty = false,
            Err(e) => {
                if !entry.dirty {
                    error!(machine_id = %entry.record.id, path = %path.display(), error = %e,
                        "cannot save machine record; will retry");
                }
                entry.dirty = true;
            }
        }
        result
    }

    /// On open: adopt machines whose agent is alive, report gone those whose
    /// agent died while nobody supervised it.
    fn readopt(&self) {
        let mut guard = lock(&self.state);
        let State {
            machines, used_ips, ..
        } = &mut *guard;
        let mut table = None;
        for entry in machines.values_mut() {
            let r = &entry.record;
            if r.deleted || r.state != MachineState::Running {
                continue;
            }
            let instance_id = r.instance_id.to_string();
            let pid = r.agent_pid.unwrap_or(0);
            if agent_alive(pid, &instance_id) {
                info!(machine_id = %r.id, instance_id = %instance_id, pid, ip = %r.ip, "adopted running machine");
                continue;
            }
            warn!(machine_id = %r.id, instance_id = %instance_id, pid,
                "agent died while no provider supervised it; reporting the machine gone");
            let leftovers = entry.processes(table.get_or_insert_with(ProcTable::scan));
            if let Err(e) = leftovers.signal(Signal::SIGKILL) {
                warn!(machine_id = %entry.record.id, error = %e, "cannot kill leftover processes of a gone machine");
            }
            self.mark_deleted(entry, used_ips);
        }
    }

    fn mark_deleted(&self, entry: &mut Entry, used_ips: &mut BTreeSet<Ipv4Addr>) {
        entry.record.deleted = true;
        entry.record.deleted_at = Some(Utc::now());
        entry.record.state = MachineState::Stopped;
        used_ips.remove(&entry.record.ip);
        let _ = self.save(entry);
        append_log(&self.machine_dir(&entry.record.id), "machine deleted");
    }

    /// One look at every machine; bounded, idempotent work.
    fn tick(&self) {
        let mut guard = lock(&self.state);
        let State {
            machines, used_ips, ..
        } = &mut *guard;
        // Read /proc at most once per tick, and only if some machine needs it.
        let mut table = None;
        for entry in machines.values_mut() {
            if !entry.record.deleted {
                match entry.record.state {
                    MachineState::Pending => self.boot_if_due(entry),
                    MachineState::Running => self.watch_agent(entry, &mut table),
                    MachineState::Stopping | MachineState::Stopped => {
                        if self.advance_termination(entry, &mut table) {
                            self.mark_deleted(entry, used_ips);
                            info!(machine_id = %entry.record.id, instance_id = %entry.record.instance_id,
                                "machine deleted");
                        }
                    }
                }
            }
            if entry.dirty {
                let _ = self.save(entry);
            }
        }
        drop(guard);
        self.ticks.fetch_add(1, Ordering::Relaxed);
    }

    fn boot_if_due(&self, entry: &mut Entry) {
        if Utc::now() < after_ms(entry.record.created_at, self.config.boot_delay_ms) {
            return;
        }
        if entry.restart_at.is_some_and(|at| Instant::now() < at) {
            return;
        }
        self.spawn_agent(entry);
    }

    /// Restart=always: a dead agent is restarted after the restart delay,
    /// its leftover processes taken down first.
    fn watch_agent(&self, entry: &mut Entry, table: &mut Option<ProcTable>) {
        if entry.agent_running() {
            entry.restart_at = None;
            return;
        }
        let r = &entry.record;
        let pid = r.agent_pid.unwrap_or(0);
        let now = Instant::now();
        match entry.restart_at {
            None => {
                let delay_ms = self.config.agent_restart_delay_ms;
                warn!(machine_id = %r.id, instance_id = %r.instance_id, pid, restart_delay_ms = delay_ms,
                    "agent is not running; restarting it");
                append_log(
                    &self.machine_dir(&r.id),
                    &format!("agent (pid {pid}) is not running; restarting it in {delay_ms} ms"),
                );
                // Like systemd's KillMode=control-group: the rest goes too.
                if let Err(e) = entry
                    .processes(table.get_or_insert_with(ProcTable::scan))
                    .signal(Signal::SIGTERM)
                {
                    warn!(machine_id = %r.id, error = %e, "cannot signal the dead agent's leftover processes");
                }
                entry.restart_at = Some(now + Duration::from_millis(delay_ms));
            }
            Some(at) if now >= at => {
                let leftovers = entry.processes(table.get_or_insert_with(ProcTable::scan));
                if !leftovers.is_empty() {
                    debug!(machine_id = %r.id, pids = ?leftovers.pids, "killing leftover processes before the restart");
                    if let Err(e) = leftovers.signal(Signal::SIGKILL) {
                        warn!(machine_id = %r.id, error = %e, "cannot kill the dead agent's leftover processes");
                    }
                    return; // the restart follows on the next tick
                }
                self.spawn_agent(entry);
            }
            Some(_) => {}
        }
    }

    /// Drives a termination one step. True once no process of the machine is left.
    fn advance_termination(&self, entry: &mut Entry, table: &mut Option<ProcTable>) -> bool {
        let procs = entry.processes(table.get_or_insert_with(ProcTable::scan));
        if procs.is_empty() {
            return true;
        }
        let r = &entry.record;
        let instance_id = r.instance_id.to_string();
        let now = Instant::now();
        let grace = Duration::from_millis(self.config.terminate_grace_ms);
        let signal = match entry.term_sent_at {
            None => {
                info!(machine_id = %r.id, instance_id = %instance_id, pids = ?procs.pids, "sending SIGTERM to the machine");
                append_log(
                    &self.machine_dir(&r.id),
                    "terminating: SIGTERM to every process of the machine",
                );
                entry.term_sent_at = Some(now);
                Signal::SIGTERM
            }
            Some(at) if now.duration_since(at) >= grace => {
                if !entry.kill_sent {
                    warn!(machine_id = %r.id, instance_id = %instance_id, pids = ?procs.pids,
                        grace_ms = self.config.terminate_grace_ms, "machine still running after the grace period; sending SIGKILL");
                    append_log(
                        &self.machine_dir(&r.id),
                        "terminating: grace period over, SIGKILL",
                    );
                    entry.kill_sent = true;
                }
                Signal::SIGKILL
            }
            Some(_) => return false,
        };
        if let Err(e) = procs.signal(signal) {
            warn!(machine_id = %r.id, %signal, error = %e, "cannot signal the machine's processes");
        }
        false
    }

    fn spawn_agent(&self, entry: &mut Entry) {
        let id = entry.record.id.clone();
        let instance_id = entry.record.instance_id.to_string();
        let dir = self.machine_dir(&id);
        let mut cmd = tokio::process::Command::new(&self.config.agent_program);
        cmd.args(&self.config.agent_args)
            .arg("--instance-id")
            .arg(&instance_id)
            .arg("--bootstrap-file")
            .arg(dir.join(BOOTSTRAP_FILE))
            .arg("--bind")
            .arg(entry.record.ip.to_string())
            .arg("--data-dir")
            .arg(&dir)
            .current_dir(&dir)
            .process_group(0)
            .stdin(Stdio::null())
            .kill_on_drop(false);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("GPUFLEET_") {
                cmd.env_remove(key);
            }
        }
        cmd.env(MACHINE_ENV, id.as_str());

        let retry_ms = self.config.agent_restart_delay_ms;
        let spawned = open_log(&dir).and_then(|log| {
            let err_log = log.try_clone()?;
            cmd.stdout(log).stderr(err_log);
            let std_cmd = cmd.as_std();
            let argv: Vec<_> = std::iter::once(std_cmd.get_program())
                .chain(std_cmd.get_args())
                .collect();
            append_log(&dir, &format!("starting agent: {argv:?}"));
            cmd.spawn()
        });
        let child = match spawned {
            Ok(child) => child,
            Err(e) => {
                error!(machine_id = %id, instance_id = %instance_id, program = %self.config.agent_program.display(),
                    error = %e, retry_in_ms = retry_ms, "cannot start the agent");
                append_log(
                    &dir,
                    &format!("cannot start the agent: {e}; retrying in {retry_ms} ms"),
                );
                entry.restart_at = Some(Instant::now() + Duration::from_millis(retry_ms));
                return;
            }
        };
        let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) else {
            // Only possible if the child was already reaped, which nothing did.
            error!(machine_id = %id, "spawned agent has no pid");
            entry.restart_at = Some(Instant::now() + Duration::from_millis(retry_ms));
            return;
        };
        let r = &mut entry.record;
        r.agent_pid = Some(pid);
        r.agent_pgid = Some(pid);
        r.spawned = true;
        r.spawn_count += 1;
        r.state = MachineState::Running;
        entry.restart_at = None;
        let exited = Arc::new(AtomicBool::new(false));
        entry.child_exited = Some(exited.clone());
        info!(machine_id = %id, instance_id = %instance_id, pid, ip = %r.ip, spawn_count = r.spawn_count, "agent started");
        let _ = self.save(entry);
        tokio::spawn(reap(child, exited, id, instance_id, pid));
    }

    fn create(&self, req: &CreateRequest) -> Result<Machine, ProviderError> {
        self.validate(req)?;
        let mut guard = lock(&self.state);
        let state = &mut *guard;
        if !state.open {
            return Err(ProviderError::retryable(
                "the mock provider is shut down".to_string(),
            ));
        }
        if let Some(entry) = state
            .keys
            .get(&req.idempotency_key)
            .and_then(|id| state.machines.get(id))
        {
            let r = &entry.record;
            if r.zone != req.zone
                || r.instance_type != req.instance_type
                || r.instance_id != req.instance_id
            {
                return Err(ProviderError::InvalidRequest {
                    field: "idempotency_key",
                    message: format!(
                        "already used for machine {} with a different request ({} {} in {})",
                        r.id, r.instance_id, r.instance_type, r.zone
                    ),
                });
            }
            debug!(machine_id = %r.id, instance_id = %r.instance_id, "create replayed; returning the existing machine");
            return Ok(self.view(r));
        }
        if let Some(&cap) = self.config.zone_capacity.get(&req.zone) {
            let used = state
                .machines
                .values()
                .filter(|e| {
                    !e.record.deleted
                        && e.record.zone == req.zone
                        && matches!(
                            e.record.state,
                            MachineState::Pending | MachineState::Running
                        )
                })
                .count();
            if used >= cap as usize {
                return Err(ProviderError::OutOfCapacity {
                    message: format!("zone {} is full ({cap} machines)", req.zone),
                });
            }
        }
        // An address whose agent or engine port something else listens on
        // (another fleet's machine, on the same host) is skipped: traffic
        // for this machine must never reach a stranger.
        let ports = [req.bootstrap.agent_port, req.bootstrap.engine.port()];
        let mut used = std::borrow::Cow::Borrowed(&state.used_ips);
        let ip = loop {
            let Some(ip) = self.pool.lowest_free(&used) else {
                return Err(ProviderError::OutOfCapacity {
                    message: format!(
                        "all {} addresses of ip_pool {} are in use",
                        self.pool.size(),
                        self.config.ip_pool
                    ),
                });
            };
            if ports_free(ip, &ports) {
                break ip;
            }
            warn!(%ip, ?ports, "address in use by processes this provider does not own; skipping it");
            used.to_mut().insert(ip);
        };
        let id = loop {
            let id = new_machine_id();
            if !state.machines.contains_key(&id) && !self.machine_dir(&id).exists() {
                break id;
            }
        };
        let record = MachineRecord {
            id: id.clone(),
            instance_id: req.instance_id,
            idempotency_key: req.idempotency_key.clone(),
            tags: req.tags.clone(),
            zone: req.zone.clone(),
            instance_type: req.instance_type.clone(),
            ip,
            state: MachineState::Pending,
            created_at: Utc::now(),
            agent_pid: None,
            agent_pgid: None,
            spawned: false,
            spawn_count: 0,
            deleted: false,
            deleted_at: None,
        };
        let dir = self.machine_dir(&id);
        if let Err(e) = self.write_new_machine(&dir, req, &record) {
            let _ = fs::remove_dir_all(&dir);
            return Err(ProviderError::retryable(format!(
                "cannot write machine {id} under {}: {e}",
                dir.display()
            )));
        }
        let machine = self.view(&record);
        state
            .keys
            .insert(record.idempotency_key.clone(), id.clone());
        state.used_ips.insert(ip);
        state.machines.insert(id.clone(), Entry::new(record));
        drop(guard);
        self.wake.notify_one();
        info!(machine_id = %id, instance_id = %req.instance_id, ip = %ip, zone = %req.zone,
            instance_type = %req.instance_type, "machine created");
        Ok(machine)
    }

    fn validate(&self, req: &CreateRequest) -> Result<(), ProviderError> {
        let invalid = |field, message| Err(ProviderError::InvalidRequest { field, message });
        if !self.catalog.zones.iter().any(|z| z.name == req.zone) {
            let known: Vec<&str> = self.catalog.zones.iter().map(|z| z.name.as_str()).collect();
            return invalid(
                "zone",
                format!(
                    "unknown zone {:?}; mock offers {}",
                    req.zone,
                    known.join(", ")
                ),
            );
        }
        let Some(ty) = self.catalog.instance_type(&req.instance_type) else {
            let known: Vec<&str> = self
                .catalog
                .instance_types
                .iter()
                .map(|t| t.name.as_str())
                .collect();
            return invalid(
                "instance_type",
                format!(
                    "unknown instance type {:?}; mock offers {}",
                    req.instance_type,
                    known.join(", ")
                ),
            );
        };
        if !ty.zones.contains(&req.zone) {
            return invalid(
                "instance_type",
                format!("{} is not offered in zone {}", req.instance_type, req.zone),
            );
        }
        if req.idempotency_key.is_empty() {
            return invalid("idempotency_key", "must not be empty".to_string());
        }
        if req.bootstrap.instance_id != req.instance_id {
            return invalid(
                "bootstrap",
                format!(
                    "is for instance {} but the request is for {}",
                    req.bootstrap.instance_id, req.instance_id
                ),
            );
        }
        Ok(())
    }

    /// The user data first, the record last: a directory without
    /// `machine.json` is not a machine.
    fn write_new_machine(
        &self,
        dir: &Path,
        req: &CreateRequest,
        record: &MachineRecord,
    ) -> io::Result<()> {
        fs::create_dir_all(dir)?;
        let bootstrap = serde_json::to_vec_pretty(&req.bootstrap).map_err(io::Error::other)?;
        write_atomic(&dir.join(BOOTSTRAP_FILE), &bootstrap, 0o600)?;
        let bytes = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
        write_atomic(&dir.join(RECORD_FILE), &bytes, 0o644)
    }

    fn get(&self, id: &ProviderInstanceId) -> Result<Machine, ProviderError> {
        let state = lock(&self.state);
        match state.machines.get(id) {
            Some(entry) if !entry.record.deleted => Ok(self.view(&entry.record)),
            _ => Err(ProviderError::NotFound { id: id.clone() }),
        }
    }

    fn terminate(&self, id: &ProviderInstanceId) -> Result<(), ProviderError> {
        let mut state = lock(&self.state);
        let open = state.open;
        let Some(entry) = state.machines.get_mut(id) else {
            return Ok(());
        };
        if entry.record.deleted || entry.record.state == MachineState::Stopping {
            return Ok(());
        }
        if !open {
            return Err(ProviderError::retryable(
                "the mock provider is shut down".to_string(),
            ));
        }
        let before = entry.record.state;
        entry.record.state = MachineState::Stopping;
        entry.term_sent_at = None;
        entry.kill_sent = false;
        if let Err(e) = self.save(entry) {
            entry.record.state = before;
            entry.dirty = false;
            return Err(ProviderError::retryable(format!(
                "cannot record the termination of {id}: {e}"
            )));
        }
        info!(machine_id = %id, instance_id = %entry.record.instance_id, "terminating machine");
        drop(state);
        self.wake.notify_one();
        Ok(())
    }

    fn list(&self, tags: &BTreeMap<String, String>) -> Vec<Machine> {
        let state = lock(&self.state);
        state
            .machines
            .values()
            .map(|e| &e.record)
            .filter(|r| !r.deleted && tags.iter().all(|(k, v)| r.tags.get(k) == Some(v)))
            .map(|r| self.view(r))
            .collect()
    }
}

fn after_ms(t: DateTime<Utc>, ms: u64) -> DateTime<Utc> {
    t + chrono::Duration::milliseconds(i64::try_from(ms).unwrap_or(i64::MAX / 1_000_000))
}

/// Awaits our own child so it does not linger as a zombie.
async fn reap(
    mut child: tokio::process::Child,
    exited: Arc<AtomicBool>,
    machine_id: ProviderInstanceId,
    instance_id: String,
    pid: i32,
) {
    let result = child.wait().await;
    exited.store(true, Ordering::SeqCst);
    match result {
        Ok(status) => {
            info!(machine_id = %machine_id, instance_id = %instance_id, pid, %status, "agent process exited")
        }
        Err(e) => {
            warn!(machine_id = %machine_id, instance_id = %instance_id, pid, error = %e, "cannot wait for the agent process")
        }
    }
}

fn open_log(dir: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o644)
        .open(dir.join(LOG_FILE))
}

/// Appends one line of the provider's own to `agent.log`, best effort.
fn append_log(dir: &Path, message: &str) {
    let line = format!(
        "{} [mock-provider] {message}\n",
        Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    );
    if let Err(e) = open_log(dir).and_then(|mut f| f.write_all(line.as_bytes())) {
        debug!(dir = %dir.display(), error = %e, "cannot append to agent.log");
    }
}

/// Whether nothing listens on `ip` at any of `ports` (a failed bind for any
/// other reason than "in use" counts as free: the agent will say more).
fn ports_free(ip: Ipv4Addr, ports: &[u16]) -> bool {
    ports.iter().all(|&port| {
        !matches!(
            std::net::TcpListener::bind((ip, port)),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse
        )
    })
}

#[async_trait]
impl Provider for MockProvider {
    fn name(&self) -> &ProviderName {
        &self.inner.name
    }

    fn machines_on_this_host(&self) -> bool {
        true
    }

    async fn create(&self, req: &CreateRequest) -> Result<Machine, ProviderError> {
        self.inner.create(req)
    }

    async fn get(&self, id: &ProviderInstanceId) -> Result<Machine, ProviderError> {
        self.inner.get(id)
    }

    async fn terminate(&self, id: &ProviderInstanceId) -> Result<(), ProviderError> {
        self.inner.terminate(id)
    }

    async fn list(&self, tags: &BTreeMap<String, String>) -> Result<Vec<Machine>, ProviderError> {
        Ok(self.inner.list(tags))
    }

    async fn catalog(&self) -> Result<Catalog, ProviderError> {
        Ok(self.inner.catalog.clone())
    }
}
