//! A cluster of `gpufleet up` replicas for the high-availability tests: a
//! fresh PostgreSQL database, one `gpufleet mock-provider` service whose
//! machines every replica shares, a TCP load balancer in front of the
//! replicas (what the agents reach), and optionally a proxy between one
//! replica and the database that can stall (a network partition).
//!
//! Dropping a [`Cluster`] kills every replica, the Mock service and every
//! Mock machine process, and drops the database.

use crate::db::TestDb;
use crate::e2e::{all_pids, cmdline, kill9, pids_with_env, MACHINE_ENV};
use anyhow::{bail, Context};
use gpufleet_api::views::InstanceList;
use gpufleet_domain::{InstanceId, InstanceStatus};
use reqwest::Method;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The admin token every replica shares (`GPUFLEET_ADMIN_TOKEN`).
pub const TOKEN: &str = "gpufleet-ha-test-admin-token";

/// The address (host:port) a PostgreSQL URL names.
fn pg_addr(url: &str) -> SocketAddr {
    let rest = url.rsplit('@').next().unwrap_or(url);
    let rest = rest
        .trim_start_matches("postgres://")
        .trim_start_matches("postgresql://");
    let hostport = rest.split('/').next().unwrap_or_default();
    hostport
        .parse()
        .expect("host:port in the test database URL")
}

/// `url` reached through `via` instead of its own host:port.
fn pg_url_via(url: &str, via: SocketAddr) -> String {
    url.replacen(&pg_addr(url).to_string(), &via.to_string(), 1)
}

/// A TCP load balancer like a cloud one: it checks every backend's
/// `GET /readyz` every 250 ms, sends each new connection to the next
/// healthy backend that accepts it (round robin; any backend when none is
/// healthy), and closes the connections of a backend that turns unhealthy
/// (so a client's kept-alive connection to a replica cut off from its
/// database moves to another one).
pub struct LoadBalancer {
    pub addr: SocketAddr,
}

struct Backend {
    addr: SocketAddr,
    healthy: AtomicBool,
    /// Closes the backend's connections when it turns unhealthy.
    epoch: Mutex<tokio::sync::watch::Sender<u64>>,
}

impl LoadBalancer {
    pub async fn start(backends: Vec<SocketAddr>) -> LoadBalancer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let list: Arc<Vec<Backend>> = Arc::new(
            backends
                .into_iter()
                .map(|addr| Backend {
                    addr,
                    healthy: AtomicBool::new(true),
                    epoch: Mutex::new(tokio::sync::watch::channel(0).0),
                })
                .collect(),
        );
        let checked = list.clone();
        tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_millis(1500))
                .build()
                .unwrap();
            loop {
                for b in checked.iter() {
                    let ok = http
                        .get(format!("http://{}/readyz", b.addr))
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success());
                    let was = b.healthy.swap(ok, Ordering::SeqCst);
                    if was && !ok {
                        b.epoch.lock().unwrap().send_modify(|e| *e += 1);
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        let next = Arc::new(AtomicUsize::new(0));
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let list = list.clone();
                let start = next.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let n = list.len();
                    let any_healthy = list.iter().any(|b| b.healthy.load(Ordering::SeqCst));
                    for k in 0..n {
                        let b = &list[(start + k) % n];
                        if any_healthy && !b.healthy.load(Ordering::SeqCst) {
                            continue;
                        }
                        let mut closed = b.epoch.lock().unwrap().subscribe();
                        if let Ok(Ok(upstream)) = tokio::time::timeout(
                            Duration::from_millis(300),
                            TcpStream::connect(b.addr),
                        )
                        .await
                        {
                            tokio::select! {
                                _ = pipe(client, upstream, None) => {}
                                _ = closed.changed() => {}
                            }
                            return;
                        }
                    }
                });
            }
        });
        LoadBalancer { addr }
    }
}

/// A TCP proxy to `to` that forwards nothing while stalled: what a replica
/// cut off from its database sees (connections hang; nothing is refused).
pub struct StallProxy {
    pub addr: SocketAddr,
    stalled: Arc<AtomicBool>,
}

impl StallProxy {
    pub async fn start(to: SocketAddr) -> StallProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stalled = Arc::new(AtomicBool::new(false));
        let flag = stalled.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let flag = flag.clone();
                tokio::spawn(async move {
                    while flag.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    if let Ok(upstream) = TcpStream::connect(to).await {
                        pipe(client, upstream, Some(flag)).await;
                    }
                });
            }
        });
        StallProxy { addr, stalled }
    }

    pub fn stall(&self) {
        self.stalled.store(true, Ordering::SeqCst);
    }

    pub fn resume(&self) {
        self.stalled.store(false, Ordering::SeqCst);
    }
}

/// Copy both ways until either side closes; while `stall` is set, bytes
/// wait.
async fn pipe(a: TcpStream, b: TcpStream, stall: Option<Arc<AtomicBool>>) {
    let (mut ar, mut aw) = a.into_split();
    let (mut br, mut bw) = b.into_split();
    let s1 = stall.clone();
    let up = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match ar.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            while s1.as_ref().is_some_and(|s| s.load(Ordering::SeqCst)) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if bw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = bw.shutdown().await;
    };
    let down = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match br.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            while stall.as_ref().is_some_and(|s| s.load(Ordering::SeqCst)) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if aw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = aw.shutdown().await;
    };
    tokio::join!(up, down);
}

/// Start `cmd` (without the caller's `GPUFLEET_*` environment), its stderr
/// appended to `log`, and wait (60 s at most) for the stdout line starting
/// with `marker`; returns the child and the rest of that line.
pub fn spawn_logged(
    cmd: &mut Command,
    log: &Path,
    marker: &str,
) -> anyhow::Result<(Child, String)> {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("GPUFLEET_") {
            cmd.env_remove(k);
        }
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log_file));
    let mut child = cmd.spawn().context("spawn gpufleet")?;
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                if let Some(rest) = line.strip_prefix(marker) {
                    return Ok((child, rest.trim().to_string()));
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Some(st) = child.try_wait()? {
                    bail!("exited with {st} before listening; log:\n{}", tail(log));
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    bail!("did not start within 60 s; log:\n{}", tail(log));
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let st = child.wait()?;
                bail!("exited with {st} before listening; log:\n{}", tail(log));
            }
        }
    }
}

/// The last 30 lines of a log file.
pub fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// One `gpufleet up` replica.
pub struct Replica {
    pub index: usize,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub database_url: String,
    child: Mutex<Option<Child>>,
}

impl Replica {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub fn log(&self) -> PathBuf {
        self.data_dir.join("up.log")
    }
    pub fn running(&self) -> bool {
        self.child.lock().unwrap().is_some()
    }
}

/// Knobs of a cluster.
#[derive(Clone)]
pub struct ClusterOptions {
    pub replicas: usize,
    /// Replicas whose database connection goes through a [`StallProxy`].
    pub proxied: Vec<usize>,
    pub lease_ttl_ms: u64,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            replicas: 3,
            proxied: vec![],
            lease_ttl_ms: 3000,
        }
    }
}

pub struct Cluster {
    pub tmp: tempfile::TempDir,
    pub db: TestDb,
    pub lb: LoadBalancer,
    pub proxies: Vec<(usize, StallProxy)>,
    pub mock_url: String,
    pub mock_dir: PathBuf,
    mock: Option<Child>,
    pub replicas: Vec<Replica>,
    pub http: reqwest::Client,
    config: PathBuf,
    bin: PathBuf,
}

/// A free loopback port (bound and released: replicas come back on theirs).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Cluster {
    /// Start the cluster around the `gpufleet` binary `bin`.
    pub async fn start(bin: impl AsRef<Path>, options: ClusterOptions) -> Cluster {
        let bin = bin.as_ref().to_path_buf();
        let tmp = tempfile::Builder::new()
            .prefix("gpufleet-ha-")
            .tempdir()
            .unwrap();
        let db = TestDb::postgres().await;
        let a: u8 = rand::random_range(100..=250);
        let b: u8 = rand::random::<u8>() & 0xf0;
        let ip_pool = format!("127.{a}.{b}.0/20");

        // The Mock provider, as a service of its own.
        let mock_dir = tmp.path().join("mock-service");
        std::fs::create_dir_all(&mock_dir).unwrap();
        let mock_config = mock_dir.join("config.toml");
        std::fs::write(
            &mock_config,
            format!(
                "[mock]\nip_pool = \"{ip_pool}\"\nip_delay_ms = 0\nboot_delay_ms = 0\n\
                 terminate_grace_ms = 2000\nagent_restart_delay_ms = 1000\n"
            ),
        )
        .unwrap();
        let (mock, mock_url) = spawn_logged(
            Command::new(&bin)
                .args(["mock-provider", "--listen", "127.0.0.1:0", "--data-dir"])
                .arg(&mock_dir)
                .arg("--config")
                .arg(&mock_config)
                .env("RUST_LOG", "info"),
            &mock_dir.join("mock.log"),
            "gpufleet mock-provider listening on ",
        )
        .expect("gpufleet mock-provider starts");

        let addrs: Vec<SocketAddr> = (0..options.replicas)
            .map(|_| SocketAddr::from(([127, 0, 0, 1], free_port())))
            .collect();
        let lb = LoadBalancer::start(addrs.clone()).await;
        let config = tmp.path().join("replica.toml");
        std::fs::write(
            &config,
            format!(
                r#"shutdown_timeout_secs = 5

[control]
heartbeat_interval_ms = 500
reconcile_interval_ms = 200
lease_ttl_ms = {ttl}
missed_heartbeats_unhealthy = 6
startup_timeout_secs = 180
agent_lost_after_secs = 120
probe_timeout_ms = 1000
agent_port = 7070
agent_control_url = "http://{lb}"

[control.engine]
port = 8000
model_load_delay_ms = 100

[mock]
url = "{mock_url}"

[router]
api_key_cache_ttl_ms = 30000
usage_flush_interval_ms = 200
connect_timeout_ms = 500
"#,
                ttl = options.lease_ttl_ms,
                lb = lb.addr,
            ),
        )
        .unwrap();
        let mut proxies = Vec::new();
        let mut replicas = Vec::new();
        for (index, addr) in addrs.into_iter().enumerate() {
            let database_url = if options.proxied.contains(&index) {
                let proxy = StallProxy::start(pg_addr(db.url())).await;
                let url = pg_url_via(db.url(), proxy.addr);
                proxies.push((index, proxy));
                url
            } else {
                db.url().to_string()
            };
            let data_dir = tmp.path().join(format!("replica-{index}"));
            std::fs::create_dir_all(&data_dir).unwrap();
            replicas.push(Replica {
                index,
                addr,
                data_dir,
                database_url,
                child: Mutex::new(None),
            });
        }
        let cluster = Cluster {
            tmp,
            db,
            lb,
            proxies,
            mock_url,
            mock_dir,
            mock: Some(mock),
            replicas,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
            config,
            bin,
        };
        for i in 0..cluster.replicas.len() {
            cluster.start_replica(i).expect("replica starts");
        }
        cluster
    }

    /// Start replica `i` (again) on its port.
    pub fn start_replica(&self, i: usize) -> anyhow::Result<()> {
        let r = &self.replicas[i];
        assert!(!r.running(), "replica {i} already runs");
        let (child, _) = spawn_logged(
            Command::new(&self.bin)
                .args(["up", "--listen", &r.addr.to_string(), "--data-dir"])
                .arg(&r.data_dir)
                .arg("--config")
                .arg(&self.config)
                .arg("--database")
                .arg(&r.database_url)
                .env("GPUFLEET_ADMIN_TOKEN", TOKEN)
                .env("RUST_LOG", "info,sqlx=warn"),
            &r.log(),
            "gpufleet listening on ",
        )
        .with_context(|| format!("replica {i}"))?;
        *r.child.lock().unwrap() = Some(child);
        Ok(())
    }

    /// SIGKILL replica `i` (no shutdown, no lease release).
    pub fn kill_replica(&self, i: usize) {
        let child = self.replicas[i].child.lock().unwrap().take();
        if let Some(mut c) = child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn proxy(&self, i: usize) -> &StallProxy {
        &self
            .proxies
            .iter()
            .find(|(k, _)| *k == i)
            .expect("replica is proxied")
            .1
    }

    pub fn req(&self, i: usize, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.replicas[i].url()))
            .bearer_auth(TOKEN)
    }

    /// GET `path` on replica `i` as JSON.
    pub async fn get_json(&self, i: usize, path: &str) -> anyhow::Result<serde_json::Value> {
        let resp = self.req(i, Method::GET, path).send().await?;
        let status = resp.status();
        if !status.is_success() {
            bail!("GET {path} on replica {i}: {status}");
        }
        Ok(resp.json().await?)
    }

    /// The reconcilers replica `i` leads (`GET /api/v1/system/tasks`).
    pub async fn leads(&self, i: usize) -> anyhow::Result<std::collections::HashSet<String>> {
        let v = self.get_json(i, "/api/v1/system/tasks").await?;
        let tasks = v["tasks"].as_array().cloned().unwrap_or_default();
        Ok(tasks
            .iter()
            .filter(|t| t["leader"] == serde_json::json!(true))
            .filter_map(|t| t["name"].as_str().map(String::from))
            .collect())
    }

    /// Every instance's status as replica `i` lists it (archived too).
    pub async fn statuses(
        &self,
        i: usize,
    ) -> anyhow::Result<std::collections::BTreeMap<InstanceId, InstanceStatus>> {
        let list: InstanceList = serde_json::from_value(
            self.get_json(i, "/api/v1/instances?include_archived=true&limit=1000")
                .await?,
        )?;
        Ok(list
            .instances
            .into_iter()
            .map(|x| (x.id, x.status))
            .collect())
    }

    /// Every process of every Mock machine, alive.
    pub fn machine_pids(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        for dir in self.machine_dirs() {
            if let Some(id) = dir.file_name().and_then(|n| n.to_str()) {
                pids.extend(pids_with_env(MACHINE_ENV, id));
            }
        }
        // Agents (and engines) carry the service's data dir in their arguments.
        let marker = self.mock_dir.to_string_lossy().to_string();
        for pid in all_pids() {
            if cmdline(pid).iter().any(|a| a.contains(&marker))
                && !pids.contains(&pid)
                && Some(pid as u32) != self.mock.as_ref().map(|c| c.id())
            {
                pids.push(pid);
            }
        }
        pids
    }

    pub fn machine_dirs(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.mock_dir.join("mock").join("machines"))
            .map(|rd| rd.filter_map(|e| Some(e.ok()?.path())).collect())
            .unwrap_or_default()
    }

    pub fn logs(&self) -> String {
        let mut out = String::new();
        for r in &self.replicas {
            out.push_str(&format!(
                "--- replica {} ---\n{}\n",
                r.index,
                tail(&r.log())
            ));
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.replicas.len() {
            self.kill_replica(i);
        }
        if let Some(mut m) = self.mock.take() {
            let _ = m.kill();
            let _ = m.wait();
        }
        for pid in self.machine_pids() {
            kill9(pid);
        }
    }
}
