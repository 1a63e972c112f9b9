//! `gpufleet bench router`: the OpenAI router's added latency and throughput,
//! against calling the simulator directly and against nginx as a plain
//! reverse proxy, on this machine.
//!
//! Set-up, all on 127.0.0.1 (loopback IPs), bounded in time and torn down at
//! the end: a `gpufleet up` child on a temporary data directory with one Mock
//! instance (its engine is `gpufleet sim`, set to zero latency through its
//! admin endpoint), an API key, and, unless `--no-nginx`, an `nginx` child
//! (non-daemon, generated config in the temporary directory) proxying to the
//! same engine with upstream keep-alive.
//!
//! Each run: N keep-alive connections (one hyper HTTP/1.1 connection per
//! task) send chat completions for `--secs` seconds after a short warm-up,
//! closed-loop (as fast as answers come) or paced (`--rate` requests per
//! second in all). Latency is request sent → last byte of the answer.
//!
//! With `--keys N --projects M [--limits]`: N API keys spread over M
//! projects (each project gets an instance: `--instances` is raised to M),
//! written to the database before the runs, every request with the next
//! key; targets `keys` (N keys without limits) and, with `--limits`,
//! `limits` (N other keys with rpm, tpm and a budget too high to refuse),
//! run side by side in the same rounds. Every key is used once before the
//! runs, and the key cache keeps them, so the runs measure the hot path.
//! E.g. `gpufleet bench router --keys 10000 --projects 10 --limits
//! --rate 1000 --connections 10 --rounds 5 --no-nginx`: `limits` against
//! `keys` is the cost of the limits alone (same keys, projects, instances).
//! With `--busy-projects 1`, `keys` and `limits` send only the default
//! project's keys, to the instance `direct` and `router` use, while the
//! router holds every project and key: against `router`, the cost of their
//! number alone.

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
pub struct RouterBenchArgs {
    /// Measured seconds per run (after a warm-up of a fifth of it).
    #[arg(long, default_value_t = 5)]
    pub secs: u64,
    /// Concurrent connections of the closed-loop runs.
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    pub connections: Vec<usize>,
    /// Requests per second of the paced runs (0: none).
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Connections of the paced runs.
    #[arg(long, default_value_t = 50)]
    pub rate_connections: usize,
    /// Generated tokens per request.
    #[arg(long, default_value_t = 16)]
    pub max_tokens: u32,
    /// Skip nginx.
    #[arg(long)]
    pub no_nginx: bool,
    /// Only measure the simulator alone (non-streaming, closed loop).
    #[arg(long)]
    pub sim_only: bool,
    /// Which answers to measure: `whole`, `stream` or both.
    #[arg(long, value_delimiter = ',', default_value = "whole,stream")]
    pub modes: Vec<String>,
    /// Rounds per measurement. Each round runs every target once, one after
    /// the other, so a slow spell of a shared machine hits them alike; the
    /// summary gives the median over rounds (throughput ratio: the median
    /// of the rounds' ratios).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Ready instances behind the router (the direct and nginx targets use
    /// the first one's engine).
    #[arg(long, default_value_t = 1)]
    pub instances: u32,
    /// Another `gpufleet` binary (e.g. the previous release) whose `up`
    /// is measured too, as target `baseline`, in the same rounds.
    #[arg(long)]
    pub baseline_bin: Option<PathBuf>,
    /// Instead of throughput: the sick-engine scenario. Three instances,
    /// one answering 500 to everything and one stalling every request
    /// 20 s before its first byte; 8 clients send 12 requests each (half
    /// of them streamed); latency p50/p99 and the requests over 2 s, for
    /// this binary and the baseline.
    #[arg(long)]
    pub sick: bool,
    /// API keys the `keys` (and `limits`) targets spread their requests over.
    #[arg(long, default_value_t = 0)]
    pub keys: usize,
    /// Projects the keys (and instances) are spread over.
    #[arg(long, default_value_t = 1)]
    pub projects: usize,
    /// Also measure target `limits`: as many keys again, each with rpm, tpm
    /// and a monthly budget (too high to refuse).
    #[arg(long)]
    pub limits: bool,
    /// With `--projects`: the `keys` and `limits` targets send requests
    /// with the keys of the first this many projects only (default: all).
    /// `--busy-projects 1` keeps every request on the default project's
    /// instance, the one `direct` and `router` use, while the router holds
    /// every project's keys and pool: the cost of their number alone, not
    /// of as many engines sharing the machine.
    #[arg(long)]
    pub busy_projects: Option<usize>,
}

/// Children and the temporary directory, cleaned up on drop.
pub(crate) struct Setup {
    pub(crate) dir: PathBuf,
    pub(crate) ups: Vec<Child>,
    pub(crate) nginx: Option<Child>,
    pub(crate) machines: Vec<PathBuf>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        for child in self.nginx.take().into_iter().chain(self.ups.drain(..)) {
            stop_child(child);
        }
        // The Mock machines (agent + engine process groups) of our data dirs.
        for rd in self
            .machines
            .iter()
            .filter_map(|m| std::fs::read_dir(m).ok())
        {
            for e in rd.flatten() {
                let Ok(text) = std::fs::read_to_string(e.path().join("machine.json")) else {
                    continue;
                };
                let Ok(v) = serde_json::from_str::<Value>(&text) else {
                    continue;
                };
                if let Some(pgid) = v.get("agent_pgid").and_then(Value::as_i64) {
                    if pgid > 1 {
                        let _ = nix::sys::signal::killpg(
                            nix::unistd::Pid::from_raw(pgid as i32),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The process group of the one Mock machine under `machines`.
fn machine_group(machines: &Path) -> anyhow::Result<Procs> {
    for e in std::fs::read_dir(machines)?.flatten() {
        let text = std::fs::read_to_string(e.path().join("machine.json"))?;
        let v: Value = serde_json::from_str(&text)?;
        if let Some(g) = v.get("agent_pgid").and_then(Value::as_u64) {
            return Ok(Procs::Group(u32::try_from(g)?));
        }
    }
    bail!("no Mock machine under {}", machines.display())
}

fn stop_child(mut child: Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Where to send requests, and how.
#[derive(Clone)]
struct Target {
    name: &'static str,
    addr: SocketAddr,
    auth: Option<String>,
    /// `Authorization` values taken in turn (one per request), instead of `auth`.
    keys: Option<Arc<Vec<String>>>,
    /// The proxy's processes, whose CPU time is charged to each request.
    proxy: Option<Procs>,
}

/// Processes whose CPU time a run reads from `/proc`.
#[derive(Clone, Copy)]
enum Procs {
    /// One process (all its threads).
    Pid(u32),
    /// A process and its children (nginx's master and workers).
    WithChildren(u32),
    /// A process group (a Mock machine: agent and engine).
    Group(u32),
}

/// User plus system CPU seconds used so far by the processes of `p`.
fn cpu_secs(p: Procs) -> f64 {
    // /proc/<pid>/stat counts in USER_HZ, which Linux fixes at 100.
    const TICKS_PER_SEC: f64 = 100.0;
    let mut ticks = 0u64;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return f64::NAN;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command name, which is in parentheses and may hold spaces.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        let f: Vec<&str> = rest.split(' ').collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        // rest[0] is field 3 (state): ppid 4, pgrp 5, utime 14, stime 15.
        let (ppid, pgrp) = (num(1) as u32, num(2) as u32);
        let counted = match p {
            Procs::Pid(p) => pid == p,
            Procs::WithChildren(p) => pid == p || ppid == p,
            Procs::Group(g) => pgrp == g,
        };
        if counted {
            ticks += num(11) + num(12);
        }
    }
    ticks as f64 / TICKS_PER_SEC
}

#[derive(Clone, Copy, PartialEq)]
enum Load {
    Closed,
    Paced { rate: u64 },
}

struct RunResult {
    round: usize,
    target: &'static str,
    stream: bool,
    conns: usize,
    load: Load,
    ok: u64,
    errors: u64,
    secs: f64,
    lat_us: Vec<u32>,
    /// CPU microseconds per answered request over the measured window:
    /// the proxy (none for direct), the engine's machine, this load generator.
    cpu_us: [f64; 3],
}

impl RunResult {
    fn rps(&self) -> f64 {
        self.ok as f64 / self.secs
    }
    fn pct(&self, p: f64) -> f64 {
        if self.lat_us.is_empty() {
            return f64::NAN;
        }
        let i = ((self.lat_us.len() as f64 - 1.0) * p).round() as usize;
        f64::from(self.lat_us[i]) / 1000.0
    }
}

/// One running `gpufleet up` with its ready instances and an API key.
pub(crate) struct Up {
    pub(crate) addr: SocketAddr,
    pub(crate) key: String,
    pub(crate) token: String,
    /// The instances' engines, in creation order.
    engines: Vec<(String, SocketAddr)>,
    pid: u32,
    machines: PathBuf,
}

/// Start `exe up` in `dir` with `instances` ready Mock instances whose
/// engines are set to `knobs`, and an API key.
pub(crate) async fn start_up(
    setup: &mut Setup,
    exe: &Path,
    dir: &Path,
    instances: u32,
    knobs: &Value,
) -> anyhow::Result<Up> {
    start_up_in(setup, exe, dir, instances, knobs, "", &[]).await
}

/// [`start_up`] with `extra_toml` appended to the configuration, and the
/// instances spread over `projects` (none: all in the default project).
async fn start_up_in(
    setup: &mut Setup,
    exe: &Path,
    dir: &Path,
    instances: u32,
    knobs: &Value,
    extra_toml: &str,
    projects: &[gpufleet_domain::ProjectId],
) -> anyhow::Result<Up> {
    std::fs::create_dir_all(dir)?;
    let pool = format!(
        "127.{}.{}.0/24",
        rand::random_range(100..=250u8),
        rand::random::<u8>()
    );
    let config = format!(
        "[control]\nheartbeat_interval_ms = 1000\nreconcile_interval_ms = 200\n\
         [control.engine]\nmodel_load_delay_ms = 0\n\
         [mock]\nip_pool = \"{pool}\"\nip_delay_ms = 0\nboot_delay_ms = 0\n{extra_toml}\n"
    );
    std::fs::write(dir.join("config.toml"), config)?;
    let (mut pid, up_addr) = spawn_up(setup, exe, dir, "127.0.0.1:0")?;
    setup.machines.push(dir.join("data/mock/machines"));
    let token = std::fs::read_to_string(dir.join("data/admin-token"))?
        .trim()
        .to_string();
    let http = reqwest::Client::new();
    let base = format!("http://{up_addr}");

    let ids: Vec<String> = if instances == 0 {
        Vec::new()
    } else {
        let created: Value = http
            .post(format!("{base}/api/v1/instances"))
            .bearer_auth(&token)
            .json(&json!({"provider": "mock", "instance_type": "mock-l4-1",
                          "model": "gpufleet/sim-small", "count": instances}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        created["instances"]
            .as_array()
            .context("instances")?
            .iter()
            .filter_map(|i| i["id"].as_str().map(str::to_string))
            .collect()
    };
    if !projects.is_empty() {
        // Before they are ready: the lifecycle's next writes carry it.
        let store = store_of(dir).await?;
        for p in projects {
            store.insert_project(p, chrono::Utc::now()).await?;
        }
        for (i, id) in ids.iter().enumerate() {
            store
                .set_instance_project(id.parse()?, &projects[i % projects.len()])
                .await?;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut engines = Vec::new();
    for id in &ids {
        let ip = loop {
            let v: Value = http
                .get(format!("{base}/api/v1/instances/{id}"))
                .bearer_auth(&token)
                .send()
                .await?
                .json()
                .await?;
            if v["status"] == "ready" {
                break v["ip"].as_str().context("ip")?.to_string();
            }
            if Instant::now() > deadline {
                bail!("instance not ready in 90 s: {v}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let engine: SocketAddr = format!("{ip}:{}", gpufleet_proto::DEFAULT_ENGINE_PORT).parse()?;
        let patched = http
            .patch(format!("http://{engine}/admin/config"))
            .json(knobs)
            .send()
            .await;
        match patched {
            Ok(r) if r.status().is_success() => {}
            other => eprintln!("warning: could not set the simulator's knobs: {other:?}"),
        }
        eprintln!("instance {id} ready; engine at {engine}");
        engines.push((id.clone(), engine));
    }
    if !projects.is_empty() {
        // A lifecycle write that read an instance before its move may have
        // published it in `default`; a fresh `up` (same data, same address,
        // which its agents report to) lists every instance as stored.
        if let Some(old) = setup.ups.pop() {
            stop_child(old);
        }
        pid = spawn_up(setup, exe, dir, &up_addr.to_string())?.0;
    }
    let key: Value = http
        .post(format!("{base}/api/v1/api-keys"))
        .bearer_auth(&token)
        .json(&json!({"name": "bench"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let key = key["key"].as_str().context("key")?.to_string();
    Ok(Up {
        addr: up_addr,
        key,
        token,
        engines,
        pid,
        machines: dir.join("data/mock/machines"),
    })
}

/// Start `exe up` in `dir` listening on `listen`; its pid and address.
fn spawn_up(
    setup: &mut Setup,
    exe: &Path,
    dir: &Path,
    listen: &str,
) -> anyhow::Result<(u32, SocketAddr)> {
    eprintln!("starting {} up in {}", exe.display(), dir.display());
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("up.log"))?;
    let mut child = Command::new(exe)
        .args(["up", "--listen", listen, "--data-dir"])
        .arg(dir.join("data"))
        .arg("--config")
        .arg(dir.join("config.toml"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .context("cannot start gpufleet up")?;
    let stdout = child.stdout.take().context("stdout")?;
    let pid = child.id();
    setup.ups.push(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let addr: SocketAddr = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .map_err(|_| anyhow!("gpufleet up did not start; see {}/up.log", dir.display()))?;
        if let Some(a) = line.strip_prefix("gpufleet listening on http://") {
            break a.trim().parse()?;
        }
    };
    Ok((pid, addr))
}

/// The database of the `up` in `dir`.
async fn store_of(dir: &Path) -> anyhow::Result<gpufleet_store::Store> {
    let url = format!(
        "sqlite://{}?mode=rw",
        dir.join("data/gpufleet.db").display()
    );
    Ok(gpufleet_store::Store::connect(&url).await?)
}

/// `n` API keys over `projects`, written to the database; their
/// `Authorization` values.
async fn bench_keys(
    dir: &Path,
    n: usize,
    projects: &[gpufleet_domain::ProjectId],
    tag: &str,
    limits: gpufleet_domain::KeyLimits,
) -> anyhow::Result<Vec<String>> {
    let store = store_of(dir).await?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let secret = format!("gfk_bench{tag}{i:054}");
        store
            .insert_api_key(&gpufleet_store::NewApiKey {
                id: gpufleet_store::ApiKeyId::new(),
                name: format!("bench-{tag}-{i}"),
                key_hash: gpufleet_control::secrets::digest(&secret),
                models: None,
                created_at: chrono::Utc::now(),
                project_id: projects[i % projects.len()].clone(),
                limits,
            })
            .await?;
        out.push(format!("Bearer {secret}"));
    }
    Ok(out)
}

/// One request per key (50 at a time), so the key cache holds them all.
async fn warm_keys(addr: SocketAddr, keys: &[String]) -> anyhow::Result<()> {
    let body = body(false, 1);
    let failed = AtomicU64::new(0);
    use futures::StreamExt as _;
    futures::stream::iter(keys.chunks(keys.len().div_ceil(50).max(1)))
        .for_each_concurrent(50, |chunk| {
            let (body, failed) = (body.clone(), &failed);
            async move {
                let Ok(mut sender) = connect(addr).await else {
                    failed.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    return;
                };
                for k in chunk {
                    let t = Target {
                        name: "warm",
                        addr,
                        auth: Some(k.clone()),
                        keys: None,
                        proxy: None,
                    };
                    if !matches!(
                        one_request(&mut sender, &t, body.clone(), 0).await,
                        Ok(true)
                    ) {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
        .await;
    match failed.into_inner() {
        0 => Ok(()),
        n => bail!("{n} of {} warm-up requests failed", keys.len()),
    }
}

/// The simulator with no latency and no limits.
fn zero_latency() -> Value {
    json!({"ttft_ms": 0, "ttft_stddev_ms": 0, "itl_ms": 0, "itl_stddev_ms": 0,
           "max_num_seqs": 100000, "max_waiting": 100000, "failure_rate": 0.0})
}

pub async fn run(args: RouterBenchArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find this program")?;
    let dir = std::env::temp_dir().join(format!("gpufleet-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut setup = Setup {
        machines: vec![],
        dir: dir.clone(),
        ups: vec![],
        nginx: None,
    };
    if args.sick {
        let mut bins = vec![("this", exe.clone())];
        if let Some(b) = &args.baseline_bin {
            bins.push(("baseline", b.clone()));
        }
        for (i, (name, bin)) in bins.iter().enumerate() {
            let up = start_up(
                &mut setup,
                bin,
                &dir.join(format!("up{i}")),
                3,
                &json!({"ttft_ms": 30.0, "itl_ms": 5.0}),
            )
            .await?;
            sick_scenario(name, &up).await?;
        }
        drop(setup);
        return Ok(());
    }
    let projects: Vec<gpufleet_domain::ProjectId> = if args.keys > 0 && args.projects > 1 {
        std::iter::once(gpufleet_domain::ProjectId::default_project())
            .chain((1..args.projects).map(|i| format!("bench-{i}").parse().expect("a project id")))
            .collect()
    } else {
        vec![]
    };
    let instances = args.instances.max(projects.len() as u32);
    // Keys stay cached for the whole bench; usage is flushed every second,
    // so each target pays for writing its own (the N keys' rows would
    // otherwise be written during the next target's run).
    let router_toml = if args.keys > 0 {
        "[router]\napi_key_cache_ttl_ms = 86400000\nusage_flush_interval_ms = 1000\n"
    } else {
        ""
    };
    let up = start_up_in(
        &mut setup,
        &exe,
        &dir.join("up0"),
        instances,
        &zero_latency(),
        router_toml,
        &projects,
    )
    .await?;
    let key_projects = if projects.is_empty() {
        vec![gpufleet_domain::ProjectId::default_project()]
    } else {
        projects.clone()
    };
    let mut many_keys = vec![];
    if args.keys > 0 {
        let up0 = dir.join("up0");
        let plain = bench_keys(&up0, args.keys, &key_projects, "k", Default::default()).await?;
        many_keys.push(("keys", plain));
        if args.limits {
            let high = gpufleet_domain::KeyLimits {
                rpm: Some(gpufleet_domain::KeyLimits::MAX_RPM),
                tpm: Some(gpufleet_domain::KeyLimits::MAX_TPM),
                monthly_budget: Some(1e12),
            };
            let limited = bench_keys(&up0, args.keys, &key_projects, "l", high).await?;
            many_keys.push(("limits", limited));
        }
        for (name, keys) in &many_keys {
            eprintln!(
                "{} keys over {} projects ({name}); using each once",
                keys.len(),
                key_projects.len()
            );
            warm_keys(up.addr, keys).await?;
        }
    }
    let engine = up.engines[0].1;
    let key = up.key.clone();
    let up_addr = up.addr;
    let baseline = match &args.baseline_bin {
        Some(b) => Some(
            start_up(
                &mut setup,
                b,
                &dir.join("up1"),
                args.instances,
                &zero_latency(),
            )
            .await?,
        ),
        None => None,
    };
    let _ = &up.token;
    let machine = machine_group(&up.machines)?;
    let mut targets = vec![Target {
        name: "direct",
        addr: engine,
        auth: None,
        keys: None,
        proxy: None,
    }];
    if !args.sim_only {
        targets.push(Target {
            name: "router",
            addr: up_addr,
            auth: Some(format!("Bearer {key}")),
            keys: None,
            proxy: Some(Procs::Pid(up.pid)),
        });
        for (name, keys) in many_keys {
            // Key i belongs to project i % M (see `bench_keys`).
            let m = key_projects.len();
            let busy = args.busy_projects.unwrap_or(m).clamp(1, m);
            let keys: Vec<String> = keys
                .into_iter()
                .enumerate()
                .filter(|(i, _)| i % m < busy)
                .map(|(_, k)| k)
                .collect();
            if busy < m {
                eprintln!(
                    "{name}: requests with the {} keys of the first {busy} of {m} projects",
                    keys.len()
                );
            }
            targets.push(Target {
                name,
                addr: up_addr,
                auth: None,
                keys: Some(Arc::new(keys)),
                proxy: Some(Procs::Pid(up.pid)),
            });
        }
        if let Some(b) = &baseline {
            targets.push(Target {
                name: "baseline",
                addr: b.addr,
                auth: Some(format!("Bearer {}", b.key)),
                keys: None,
                proxy: Some(Procs::Pid(b.pid)),
            });
        }
        if !args.no_nginx {
            let addr = start_nginx(&mut setup, engine)?;
            targets.push(Target {
                name: "nginx",
                addr,
                auth: None,
                keys: None,
                proxy: setup.nginx.as_ref().map(|c| Procs::WithChildren(c.id())),
            });
        }
    }

    let measure = Duration::from_secs(args.secs.max(1));
    let mut results = Vec::new();
    let streams: Vec<bool> = if args.sim_only {
        vec![false]
    } else {
        [("whole", false), ("stream", true)]
            .into_iter()
            .filter(|(m, _)| args.modes.iter().any(|x| x == m))
            .map(|(_, s)| s)
            .collect()
    };
    let rounds = args.rounds.max(1);
    for stream in streams {
        let mut loads = Vec::new();
        if args.rate > 0 && !args.sim_only {
            loads.push((args.rate_connections, Load::Paced { rate: args.rate }));
        }
        loads.extend(args.connections.iter().map(|&c| (c, Load::Closed)));
        for (conns, load) in loads {
            for round in 0..rounds {
                for t in &targets {
                    let mut r =
                        run_load(t, machine, stream, conns, load, measure, args.max_tokens).await;
                    r.round = round;
                    print_row(&r);
                    results.push(r);
                }
            }
        }
    }
    summarize(&results);
    drop(setup);
    Ok(())
}

/// The sick-engine scenario against one `up`: its first instance answers
/// 500 to everything, its second stalls every request 20 s before the first
/// byte; 8 clients send 12 chat requests each (the even ones streamed).
async fn sick_scenario(name: &str, up: &Up) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let knob = |engine: SocketAddr, v: Value| {
        let http = http.clone();
        async move {
            http.patch(format!("http://{engine}/admin/config"))
                .json(&v)
                .send()
                .await?
                .error_for_status()?;
            anyhow::Ok(())
        }
    };
    knob(
        up.engines[0].1,
        json!({"failure_rate": 1.0, "failure_kinds": ["server_error"]}),
    )
    .await?;
    knob(
        up.engines[1].1,
        json!({"failure_rate": 1.0, "failure_kinds": ["stall"], "stall_ms": 20000}),
    )
    .await?;
    let url = format!("http://{}/v1/chat/completions", up.addr);
    let started = Instant::now();
    let clients: Vec<_> = (0..8)
        .map(|c| {
            let (http, url, key) = (http.clone(), url.clone(), up.key.clone());
            tokio::spawn(async move {
                let body = json!({"model": "gpufleet/sim-small", "max_tokens": 8, "stream": c % 2 == 0,
                                  "messages": [{"role": "user", "content": "hello there"}]});
                let mut out = Vec::new();
                for _ in 0..12 {
                    let t = Instant::now();
                    let ok = match http.post(&url).bearer_auth(&key).json(&body).send().await {
                        Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                        Err(_) => false,
                    };
                    out.push((t.elapsed(), ok));
                }
                out
            })
        })
        .collect();
    let mut all = Vec::new();
    for c in clients {
        all.extend(c.await?);
    }
    let wall = started.elapsed();
    let failed = all.iter().filter(|(_, ok)| !ok).count();
    let mut lat: Vec<Duration> = all.iter().map(|(d, _)| *d).collect();
    lat.sort();
    let pct = |q: f64| lat[((lat.len() - 1) as f64 * q).round() as usize];
    let over = lat.iter().filter(|d| **d > Duration::from_secs(2)).count();
    println!(
        "sick scenario, {name}: {} requests in {:.1} s, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, \
         over 2 s: {over}, failed: {failed}",
        lat.len(),
        wall.as_secs_f64(),
        pct(0.5).as_secs_f64() * 1000.0,
        pct(0.99).as_secs_f64() * 1000.0,
        lat[lat.len() - 1].as_secs_f64() * 1000.0,
    );
    Ok(())
}

fn start_nginx(setup: &mut Setup, engine: SocketAddr) -> anyhow::Result<SocketAddr> {
    let bin = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context("nginx not found (apt-get install -y nginx), or pass --no-nginx")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let d = setup.dir.join("nginx");
    std::fs::create_dir_all(&d)?;
    let p = d.display();
    let conf = format!(
        "worker_processes auto;\nworker_rlimit_nofile 16384;\nerror_log {p}/error.log warn;\npid {p}/nginx.pid;\n\
         events {{ worker_connections 8192; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {p}/body;\n  proxy_temp_path {p}/proxy;\n\
         fastcgi_temp_path {p}/fastcgi;\n  uwsgi_temp_path {p}/uwsgi;\n  scgi_temp_path {p}/scgi;\n\
         upstream engine {{ server {engine}; keepalive 1024; }}\n\
         server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://engine;\n\
         proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_buffering off;\n    }}\n  }}\n}}\n"
    );
    std::fs::write(d.join("nginx.conf"), conf)?;
    let child = Command::new(bin)
        .arg("-p")
        .arg(&d)
        .arg("-c")
        .arg(d.join("nginx.conf"))
        .args(["-g", "daemon off;"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(d.join("stderr.log"))?))
        .spawn()
        .context("cannot start nginx")?;
    setup.nginx = Some(child);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if Instant::now() > deadline {
            bail!(
                "nginx did not listen on {addr}; see {}/error.log",
                d.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("nginx {} on {addr} → {engine}", bin);
    Ok(addr)
}

fn body(stream: bool, max_tokens: u32) -> Bytes {
    Bytes::from(
        json!({"model": "gpufleet/sim-small", "max_tokens": max_tokens, "stream": stream,
               "messages": [{"role": "user", "content": "say something about GPUs"}]})
        .to_string(),
    )
}

async fn run_load(
    t: &Target,
    machine: Procs,
    stream: bool,
    conns: usize,
    load: Load,
    measure: Duration,
    max_tokens: u32,
) -> RunResult {
    let warmup = measure / 5;
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + measure;
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let body = body(stream, max_tokens);
    // CPU time over the measured window, read beside the load.
    let watched = [t.proxy, Some(machine), Some(Procs::Pid(std::process::id()))];
    let cpu = tokio::spawn(async move {
        let read = || watched.map(|p| p.map_or(f64::NAN, cpu_secs));
        tokio::time::sleep_until(measure_from.into()).await;
        let before = read();
        tokio::time::sleep_until(end.into()).await;
        let after = read();
        [0, 1, 2].map(|i| after[i] - before[i])
    });
    let mut tasks = Vec::with_capacity(conns);
    for i in 0..conns {
        let t = t.clone();
        let body = body.clone();
        let (ok, errors) = (ok.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat: Vec<u32> = Vec::new();
            let interval = match load {
                Load::Paced { rate } => Some(Duration::from_secs_f64(conns as f64 / rate as f64)),
                Load::Closed => None,
            };
            // Spread the paced connections' first sends over one interval.
            let mut next = interval.map(|iv| start + iv.mul_f64(i as f64 / conns as f64));
            let mut turn = i;
            'conn: while Instant::now() < end {
                let Ok(mut sender) = connect(t.addr).await else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                loop {
                    if let (Some(n), Some(iv)) = (next.as_mut(), interval) {
                        tokio::time::sleep_until((*n).into()).await;
                        *n += iv;
                    }
                    let sent = Instant::now();
                    if sent >= end {
                        break 'conn;
                    }
                    // Connections take the keys in turn, each a different one.
                    turn += conns;
                    match one_request(&mut sender, &t, body.clone(), turn).await {
                        Ok(true) => {
                            if sent >= measure_from {
                                ok.fetch_add(1, Ordering::Relaxed);
                                lat.push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
                            }
                        }
                        Ok(false) => {
                            if sent >= measure_from {
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(_) => {
                            if sent >= measure_from {
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                            continue 'conn;
                        }
                    }
                }
            }
            lat
        }));
    }
    let mut lat_us = Vec::new();
    for task in tasks {
        if let Ok(l) = task.await {
            lat_us.extend(l);
        }
    }
    lat_us.sort_unstable();
    let ok = ok.load(Ordering::Relaxed);
    let cpu_secs = cpu.await.unwrap_or([f64::NAN; 3]);
    RunResult {
        cpu_us: cpu_secs.map(|c| 1e6 * c / ok.max(1) as f64),
        round: 0,
        target: t.name,
        stream,
        conns,
        load,
        ok,
        errors: errors.load(Ordering::Relaxed),
        secs: measure.as_secs_f64(),
        lat_us,
    }
}

/// One HTTP/1.1 connection's request half (the connection runs in its own task).
pub(crate) type Sender = http1::SendRequest<Full<Bytes>>;

pub(crate) async fn connect(addr: SocketAddr) -> anyhow::Result<Sender> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Sends one request and reads the whole answer; `Ok(false)`: not 200.
/// With several keys, the `turn`-th (modulo their number) is used.
async fn one_request(
    sender: &mut Sender,
    t: &Target,
    body: Bytes,
    turn: usize,
) -> anyhow::Result<bool> {
    sender.ready().await?;
    let mut req = hyper::Request::post("/v1/chat/completions")
        .header(hyper::header::HOST, t.addr.to_string())
        .header(hyper::header::CONTENT_TYPE, "application/json");
    let auth = match &t.keys {
        Some(keys) if !keys.is_empty() => Some(&keys[turn % keys.len()]),
        _ => t.auth.as_ref(),
    };
    if let Some(a) = auth {
        req = req.header(hyper::header::AUTHORIZATION, a.as_str());
    }
    let resp = sender.send_request(req.body(Full::new(body))?).await?;
    let status = resp.status();
    let ok = status == hyper::StatusCode::OK;
    let mut b = resp.into_body();
    let mut head = Vec::new();
    while let Some(frame) = b.frame().await {
        if let (false, Ok(d)) = (ok, frame?.into_data()) {
            head.extend_from_slice(&d[..d.len().min(300usize.saturating_sub(head.len()))]);
        }
    }
    if !ok {
        let _ = FIRST_ERROR.set(format!(
            "{} {status}: {}",
            t.name,
            String::from_utf8_lossy(&head)
        ));
    }
    Ok(ok)
}

/// The first answer that was not a 200 (target, status, start of the body).
static FIRST_ERROR: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn load_text(r: &RunResult) -> String {
    match r.load {
        Load::Closed => format!("closed, {} conns", r.conns),
        Load::Paced { rate } => format!("{rate} req/s, {} conns", r.conns),
    }
}

fn print_row(r: &RunResult) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "r{} {:<7} {:<9} {:<22} {:>9.0} req/s  p50 {:>8.3} ms  p99 {:>8.3} ms  errors {}  \
         CPU µs/req: proxy {:.0}, engine {:.0}, client {:.0}",
        r.round + 1,
        r.target,
        if r.stream { "stream" } else { "whole" },
        load_text(r),
        r.rps(),
        r.pct(0.50),
        r.pct(0.99),
        r.errors,
        r.cpu_us[0],
        r.cpu_us[1],
        r.cpu_us[2],
    );
    let _ = out.flush();
}

/// The median of `v` (NaN if empty).
fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| !x.is_nan());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn summarize(results: &[RunResult]) {
    // Medians over rounds of one target at one (mode, load, connections).
    let runs = |name: &str, r: &RunResult| -> Vec<&RunResult> {
        results
            .iter()
            .filter(|x| {
                x.target == name && x.stream == r.stream && x.conns == r.conns && x.load == r.load
            })
            .collect()
    };
    let med = |rs: &[&RunResult], f: &dyn Fn(&RunResult) -> f64| -> f64 {
        median(rs.iter().map(|r| f(r)).collect())
    };
    if let Some(e) = FIRST_ERROR.get() {
        println!("\nfirst answer that was not a 200: {e}");
    }
    println!(
        "\nsummary, medians over rounds (added latency = proxy minus direct; \
         throughput ratio = router / nginx, per round)"
    );
    for r in results
        .iter()
        .filter(|r| r.target == "direct" && r.round == 0)
    {
        let direct = runs("direct", r);
        let (d50, d99) = (
            med(&direct, &|x| x.pct(0.5)),
            med(&direct, &|x| x.pct(0.99)),
        );
        let line = |name: &str| {
            let p = runs(name, r);
            (!p.is_empty()).then(|| {
                format!(
                    "{name}: {:+.3} ms p50, {:+.3} ms p99, {:.0} req/s, {:.0} µs CPU/req",
                    med(&p, &|x| x.pct(0.5)) - d50,
                    med(&p, &|x| x.pct(0.99)) - d99,
                    med(&p, &|x| x.rps()),
                    med(&p, &|x| x.cpu_us[0])
                )
            })
        };
        let ratios: Vec<f64> = runs("router", r)
            .iter()
            .filter_map(|a| {
                runs("nginx", r)
                    .into_iter()
                    .find(|b| b.round == a.round)
                    .map(|b| 100.0 * a.rps() / b.rps())
            })
            .collect();
        let ratio = if r.load == Load::Closed && !ratios.is_empty() {
            let each: Vec<String> = ratios.iter().map(|x| format!("{x:.0}")).collect();
            format!(
                ", router/nginx throughput {:.0} % (rounds: {} %)",
                median(ratios.clone()),
                each.join(", ")
            )
        } else {
            String::new()
        };
        let base_ratio: Vec<f64> = runs("baseline", r)
            .iter()
            .filter_map(|a| {
                runs("nginx", r)
                    .into_iter()
                    .find(|b| b.round == a.round)
                    .map(|b| 100.0 * a.rps() / b.rps())
            })
            .collect();
        let base_ratio = if r.load == Load::Closed && !base_ratio.is_empty() {
            format!(", baseline/nginx {:.0} %", median(base_ratio))
        } else {
            String::new()
        };
        let many: String = ["keys", "limits"]
            .into_iter()
            .filter_map(line)
            .map(|l| format!(" | {l}"))
            .collect();
        println!(
            "  {:<6} {:<22} direct {:.0} req/s | {}{many} | {}{}{}{}",
            if r.stream { "stream" } else { "whole" },
            load_text(r),
            med(&direct, &|x| x.rps()),
            line("router").unwrap_or_default(),
            line("baseline")
                .map(|l| format!("{l} | "))
                .unwrap_or_default(),
            line("nginx").unwrap_or_default(),
            ratio,
            base_ratio
        );
    }
}
