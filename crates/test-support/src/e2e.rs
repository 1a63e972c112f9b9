//! The end-to-end test harness: the real `gpufleet up` as a child process on
//! a loopback port, a temporary data directory (admin token, Mock machines),
//! a fresh database ([`TestDb::fresh_in`]: SQLite in the data directory, or
//! PostgreSQL with `GPUFLEET_TEST_DATABASE=postgres`), real agents and
//! engines, and helpers
//! that wait on conditions with deadlines — never on fixed sleeps.
//!
//! The binary is a parameter: only the gpufleet crate's own tests know its
//! path (`env!("CARGO_BIN_EXE_gpufleet")`); their `tests/common` passes it.
//!
//! Dropping a [`TestApp`] kills its control plane and every process of its
//! Mock machines, then drops its database, so a failing test leaks nothing.

use crate::db::TestDb;
use crate::wait::wait_until;
use anyhow::{anyhow, bail, Context};
use gpufleet_api::views::{
    CreateInstancesBody, CreatedInstances, InstanceList, InstanceMetrics, InstanceView, Timeline,
};
use gpufleet_domain::{InstanceId, InstanceStatus};
use reqwest::{Method, StatusCode};
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Port agents listen on, set in the test config.
pub const AGENT_PORT: u16 = 7070;
/// Port engines listen on, set in the test config.
pub const ENGINE_PORT: u16 = 8000;
/// Instance type and model every test uses.
pub const TYPE: &str = "mock-l4-1";
pub const MODEL: &str = "gpufleet/sim-small";

/// Knobs of a test's control plane.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Mock boot delay (create → agent start), in ms.
    pub boot_delay_ms: u64,
    /// Product defaults (heartbeat 5 s, reconcile 1 s) with every simulated
    /// delay at zero and a /16 pool: what the life-cycle benchmark measures.
    pub bench: bool,
    /// More TOML appended to the test config (e.g. a `[router]` section).
    pub extra_toml: String,
    /// More environment for `up` (e.g. `SCW_*` credentials).
    pub env: Vec<(String, String)>,
    /// More keys of the `[control]` section.
    pub control_toml: String,
}

/// A running (or stopped) `gpufleet up` over one data directory and database.
pub struct TestApp {
    /// The `gpufleet` binary.
    bin: PathBuf,
    pub data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    pub config_path: PathBuf,
    pub ip_pool: String,
    pub addr: SocketAddr,
    pub base_url: String,
    pub token: String,
    pub http: reqwest::Client,
    env: Vec<(String, String)>,
    child: Option<Child>,
    /// Dropped after the control plane is killed (fields drop after `drop`).
    pub db: TestDb,
}

/// A random /24 inside 127.100.0.0–127.250.255.0, so parallel tests never share IPs.
fn random_pool() -> String {
    let a: u8 = rand::random_range(100..=250);
    let b: u8 = rand::random::<u8>();
    format!("127.{a}.{b}.0/24")
}

impl TestApp {
    /// A fresh control plane of the `gpufleet` binary at `bin`, on a random
    /// port with a new data directory and database.
    pub async fn spawn(bin: impl AsRef<Path>) -> TestApp {
        Self::spawn_with(bin, Options::default()).await
    }

    pub async fn spawn_with(bin: impl AsRef<Path>, options: Options) -> TestApp {
        let tmp = tempfile::Builder::new()
            .prefix("gpufleet-e2e-")
            .tempdir()
            .expect("temp dir");
        // SQLite: the default file in the data directory, as `up` makes it,
        // so the tests that look through the data directory see it.
        let db = TestDb::fresh_in(tmp.path()).await;
        let mut app = Self::prepare(bin.as_ref(), tmp.path().to_path_buf(), db, options);
        app._tmp = Some(tmp);
        app.start(0).await.expect("gpufleet up starts");
        app
    }

    fn prepare(bin: &Path, data_dir: PathBuf, db: TestDb, options: Options) -> TestApp {
        std::fs::create_dir_all(&data_dir).expect("data dir");
        let ip_pool = if options.bench {
            format!("127.{}.0.0/16", rand::random_range(100..=250u8))
        } else {
            random_pool()
        };
        let config_path = data_dir.join("test-config.toml");
        let config = if options.bench {
            format!(
                r#"[control]
agent_port = {AGENT_PORT}

[control.engine]
port = {ENGINE_PORT}
model_load_delay_ms = 0

[mock]
ip_pool = "{ip_pool}"
ip_delay_ms = 0
boot_delay_ms = 0
"#
            )
        } else {
            format!(
                r#"shutdown_timeout_secs = 15

[control]
heartbeat_interval_ms = 300
reconcile_interval_ms = 200
missed_heartbeats_unhealthy = 3
startup_timeout_secs = 60
probe_timeout_ms = 1000
agent_port = {AGENT_PORT}
{control}

[control.engine]
port = {ENGINE_PORT}
model_load_delay_ms = 200

[mock]
ip_pool = "{ip_pool}"
ip_delay_ms = 0
boot_delay_ms = {boot}
terminate_grace_ms = 2000
agent_restart_delay_ms = 1500
"#,
                boot = options.boot_delay_ms,
                control = options.control_toml,
            )
        };
        let config = format!("{config}\n{}\n", options.extra_toml);
        std::fs::write(&config_path, config).expect("write test config");
        TestApp {
            bin: bin.to_path_buf(),
            data_dir,
            _tmp: None,
            config_path,
            ip_pool,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            base_url: String::new(),
            token: String::new(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .expect("http client"),
            env: options.env,
            child: None,
            db,
        }
    }

    /// Starts `up` on `port` (0: any) and waits for its `listening on` line.
    async fn start(&mut self, port: u16) -> anyhow::Result<()> {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.join("up.log"))?;
        let mut cmd = Command::new(&self.bin);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("GPUFLEET_") {
                cmd.env_remove(k);
            }
        }
        cmd.args(["up", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
            .arg(&self.data_dir)
            .arg("--config")
            .arg(&self.config_path)
            .args(["--database", self.db.url()])
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        let mut child = cmd.spawn().context("spawn gpufleet up")?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            // Keeps draining stdout for the child's whole life.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        let addr = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok(line) => {
                    if let Some(url) = line.strip_prefix("gpufleet listening on http://") {
                        break url
                            .trim()
                            .parse::<SocketAddr>()
                            .context("address in the listening line")?;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(status) = self
                        .child
                        .as_mut()
                        .and_then(|c| c.try_wait().ok().flatten())
                    {
                        self.child = None;
                        bail!(
                            "gpufleet up exited with {status} before listening; log:\n{}",
                            self.log_tail()
                        );
                    }
                    if Instant::now() >= deadline {
                        bail!(
                            "gpufleet up did not print its address within 60 s; log:\n{}",
                            self.log_tail()
                        );
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!(
                        "gpufleet up closed stdout before listening; log:\n{}",
                        self.log_tail()
                    )
                }
            }
        };
        self.addr = addr;
        self.base_url = format!("http://{addr}");
        self.token = std::fs::read_to_string(self.data_dir.join("admin-token"))
            .context("admin-token written by up")?
            .trim()
            .to_string();
        Ok(())
    }

    /// Starts `up` again on the same data directory and port.
    pub async fn restart(&mut self) {
        let port = self.addr.port();
        self.start(port)
            .await
            .expect("gpufleet up restarts on the same port");
    }

    /// The last lines of the control plane's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.data_dir.join("up.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// SIGKILL the control plane (its machines keep running).
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM the control plane and wait (up to `deadline`) for it to exit.
    pub fn stop(&mut self, deadline: Duration) -> anyhow::Result<ExitStatus> {
        let mut child = self.child.take().ok_or_else(|| anyhow!("not running"))?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        let end = Instant::now() + deadline;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= end {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "gpufleet up did not exit within {deadline:?} of SIGTERM; log:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    // ---- API helpers -------------------------------------------------------

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url, path)
    }

    /// A request with the admin token.
    pub fn req(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .bearer_auth(&self.token)
    }

    async fn json<T: serde::de::DeserializeOwned>(
        resp: reqwest::Response,
        what: &str,
    ) -> anyhow::Result<T> {
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("{what}: {status}: {text}");
        }
        serde_json::from_str(&text).with_context(|| format!("{what}: cannot parse {text}"))
    }

    /// `GET path` with the admin token: the JSON answer; panics unless 2xx.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        let resp = self
            .req(Method::GET, path)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        Self::json(resp, &format!("GET {path}"))
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// `POST /api/v1/instances` of `count` Mock instances; panics unless 202.
    pub async fn create(&self, count: u32) -> Vec<InstanceView> {
        self.create_on("mock", TYPE, count).await
    }

    /// `POST /api/v1/instances` of `count` instances of `provider`'s
    /// `instance_type` serving [`MODEL`]; panics unless 202.
    pub async fn create_on(
        &self,
        provider: &str,
        instance_type: &str,
        count: u32,
    ) -> Vec<InstanceView> {
        let body = CreateInstancesBody {
            project: None,
            provider: provider.into(),
            zone: None,
            instance_type: instance_type.into(),
            model: MODEL.into(),
            count: Some(count),
        };
        let resp = self
            .req(Method::POST, "/api/v1/instances")
            .json(&body)
            .send()
            .await
            .expect("POST");
        assert_eq!(resp.status(), StatusCode::ACCEPTED, "create answers 202");
        let created: CreatedInstances =
            Self::json(resp, "create").await.expect("created instances");
        assert_eq!(created.instances.len(), count as usize);
        created.instances
    }

    pub async fn get(&self, id: InstanceId) -> anyhow::Result<InstanceView> {
        let resp = self
            .req(Method::GET, &format!("/api/v1/instances/{id}"))
            .send()
            .await?;
        Self::json(resp, "get instance").await
    }

    pub async fn list(&self, include_archived: bool) -> anyhow::Result<Vec<InstanceView>> {
        let path = if include_archived {
            "/api/v1/instances?include_archived=true"
        } else {
            "/api/v1/instances"
        };
        let resp = self.req(Method::GET, path).send().await?;
        Ok(Self::json::<InstanceList>(resp, "list").await?.instances)
    }

    pub async fn timeline(&self, id: InstanceId) -> anyhow::Result<Timeline> {
        let resp = self
            .req(Method::GET, &format!("/api/v1/instances/{id}/events"))
            .send()
            .await?;
        Self::json(resp, "timeline").await
    }

    pub async fn metrics(&self, id: InstanceId) -> anyhow::Result<InstanceMetrics> {
        let resp = self
            .req(Method::GET, &format!("/api/v1/instances/{id}/metrics"))
            .send()
            .await?;
        Self::json(resp, "metrics").await
    }

    pub async fn terminate(&self, id: InstanceId) {
        let resp = self
            .req(Method::DELETE, &format!("/api/v1/instances/{id}"))
            .send()
            .await
            .expect("DELETE");
        assert!(
            resp.status().is_success(),
            "terminate {id}: {}",
            resp.status()
        );
    }

    pub async fn archive(&self, id: InstanceId) -> StatusCode {
        self.req(Method::POST, &format!("/api/v1/instances/{id}/archive"))
            .send()
            .await
            .expect("archive")
            .status()
    }

    /// Polls every 100 ms until `cond` holds for the instances `ids` (in that
    /// order), or fails at the deadline with the last state seen.
    pub async fn wait_until(
        &self,
        ids: &[InstanceId],
        timeout: Duration,
        what: &str,
        cond: impl Fn(&[InstanceView]) -> bool,
    ) -> Vec<InstanceView> {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("(no answer)");
        loop {
            let mut views = Vec::new();
            for id in ids {
                match self.get(*id).await {
                    Ok(v) => views.push(v),
                    Err(e) => {
                        last = e.to_string();
                        break;
                    }
                }
            }
            if views.len() == ids.len() {
                if cond(&views) {
                    return views;
                }
                last = views
                    .iter()
                    .map(|v| {
                        format!(
                            "{} {} {:?} {:?}",
                            v.id, v.status, v.status_reason, v.status_message
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n  ");
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting until {what}; last:\n  {last}\nlog:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every instance in `ids` has `status`.
    pub async fn wait_status(
        &self,
        ids: &[InstanceId],
        status: InstanceStatus,
        timeout: Duration,
    ) -> Vec<InstanceView> {
        self.wait_until(ids, timeout, &format!("all are {status}"), |vs| {
            vs.iter().all(|v| v.status == status)
        })
        .await
    }

    /// Machine directories of this app's Mock provider.
    pub fn machine_dirs(&self) -> Vec<PathBuf> {
        let Ok(rd) = std::fs::read_dir(self.data_dir.join("mock/machines")) else {
            return Vec::new();
        };
        rd.filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect()
    }

    /// The directory of the machine of instance `id`.
    pub fn machine_dir_of(&self, id: InstanceId) -> Option<PathBuf> {
        self.machine_dirs().into_iter().find(|d| {
            read_record(d).and_then(|r| {
                r.get("instance_id")
                    .and_then(|v| v.as_str())
                    .map(String::from)
            }) == Some(id.to_string())
        })
    }

    /// Kills every process of every machine of this data dir.
    pub fn kill_machines(&self) {
        for dir in self.machine_dirs() {
            let Some(record) = read_record(&dir) else {
                continue;
            };
            if let Some(pgid) = record.get("agent_pgid").and_then(|v| v.as_i64()) {
                if pgid > 1 {
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pgid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            if let Some(machine) = record.get("id").and_then(|v| v.as_str()) {
                for pid in pids_with_env(MACHINE_ENV, machine) {
                    kill9(pid);
                }
            }
            if let Some(inst) = record.get("instance_id").and_then(|v| v.as_str()) {
                for pid in agent_pids(inst) {
                    kill9(pid);
                }
            }
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.kill9();
        self.kill_machines();
    }
}

fn read_record(dir: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(dir.join("machine.json")).ok()?).ok()
}

/// The environment marker the Mock provider puts on a machine's processes.
pub const MACHINE_ENV: &str = "GPUFLEET_MOCK_MACHINE_ID";

pub fn kill9(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// Every process id in /proc.
pub fn all_pids() -> Vec<i32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// A process's command line (empty for zombies and kernel threads).
pub fn cmdline(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn has_pair(args: &[String], flag: &str, value: &str) -> bool {
    args.windows(2).any(|w| w[0] == flag && w[1] == value)
        || args.iter().any(|a| a == &format!("{flag}={value}"))
}

/// Live agent processes of instance `id`: `... agent ... --instance-id <id>`.
pub fn agent_pids(id: &str) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|&pid| {
            let args = cmdline(pid);
            args.iter().any(|a| a == "agent") && has_pair(&args, "--instance-id", id)
        })
        .collect()
}

/// Live engine processes bound to `ip`: `... sim ... --host <ip>`.
pub fn engine_pids(ip: IpAddr) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|&pid| {
            let args = cmdline(pid);
            args.iter().any(|a| a == "sim") && has_pair(&args, "--host", &ip.to_string())
        })
        .collect()
}

/// Live processes whose environment has `key=value`.
pub fn pids_with_env(key: &str, value: &str) -> Vec<i32> {
    let needle = format!("{key}={value}");
    all_pids()
        .into_iter()
        .filter(|&pid| {
            !cmdline(pid).is_empty()
                && std::fs::read(format!("/proc/{pid}/environ"))
                    .map(|b| b.split(|&c| c == 0).any(|kv| kv == needle.as_bytes()))
                    .unwrap_or(false)
        })
        .collect()
}

/// True when nothing accepts TCP connections at `addr`.
pub fn tcp_closed(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_err()
}

/// [`wait_until`] for a condition that needs no `.await` (processes, ports).
pub async fn eventually(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    wait_until(what, timeout, || std::future::ready(cond())).await
}

/// Transitions (from, to) on a timeline, in order.
pub fn transitions(tl: &Timeline) -> Vec<(InstanceStatus, InstanceStatus)> {
    tl.events
        .iter()
        .filter_map(|e| Some((e.from_status?, e.to_status?)))
        .collect()
}

/// True if `seq` appears in `list` in order (not necessarily adjacent).
pub fn contains_in_order<T: PartialEq>(list: &[T], seq: &[T]) -> bool {
    let mut it = list.iter();
    seq.iter().all(|want| it.any(|got| got == want))
}
