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
    std::fs::create_dir_all(dir)?;
    let pool = format!(
        "127.{}.{}.0/24",
        rand::random_range(100..=250u8),
        rand::random::<u8>()
    );
    let config = format!(
        "[control]\nheartbeat_interval_ms = 1000\nreconcile_interval_ms = 200\n\
         [control.engine]\nmodel_load_delay_ms = 0\n\
         [mock]\nip_pool = \"{pool}\"\nip_delay_ms = 0\nboot_delay_ms = 0\n"
    );
    std::fs::write(dir.join("config.toml"), config)?;
    eprintln!("starting {} up in {}", exe.display(), dir.display());
    let mut child = Command::new(exe)
        .args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.join("data"))
        .arg("--config")
        .arg(dir.join("config.toml"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(dir.join("up.log"))?))
        .spawn()
        .context("cannot start gpufleet up")?;
    let stdout = child.stdout.take().context("stdout")?;
    let pid = child.id();
    setup.ups.push(child);
    setup.machines.push(dir.join("data/mock/machines"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let up_addr: SocketAddr = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .map_err(|_| anyhow!("gpufleet up did not start; see {}/up.log", dir.display()))?;
        if let Some(a) = line.strip_prefix("gpufleet listening on http://") {
            break a.trim().parse()?;
        }
    };
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
    let up = start_up(
        &mut setup,
        &exe,
        &dir.join("up0"),
        args.instances,
        &zero_latency(),
    )
    .await?;
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
        proxy: None,
    }];
    if !args.sim_only {
        targets.push(Target {
            name: "router",
            addr: up_addr,
            auth: Some(format!("Bearer {key}")),
            proxy: Some(Procs::Pid(up.pid)),
        });
        if let Some(b) = &baseline {
            targets.push(Target {
                name: "baseline",
                addr: b.addr,
                auth: Some(format!("Bearer {}", b.key)),
                proxy: Some(Procs::Pid(b.pid)),
            });
        }
        if !args.no_nginx {
            let addr = start_nginx(&mut setup, engine)?;
            targets.push(Target {
                name: "nginx",
                addr,
                auth: None,
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
                    match one_request(&mut sender, &t, body.clone()).await {
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
async fn one_request(sender: &mut Sender, t: &Target, body: Bytes) -> anyhow::Result<bool> {
    sender.ready().await?;
    let mut req = hyper::Request::post("/v1/chat/completions")
        .header(hyper::header::HOST, t.addr.to_string())
        .header(hyper::header::CONTENT_TYPE, "application/json");
    if let Some(a) = &t.auth {
        req = req.header(hyper::header::AUTHORIZATION, a.as_str());
    }
    let resp = sender.send_request(req.body(Full::new(body))?).await?;
    let ok = resp.status() == hyper::StatusCode::OK;
    let mut b = resp.into_body();
    while let Some(frame) = b.frame().await {
        frame?;
    }
    Ok(ok)
}

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
        println!(
            "  {:<6} {:<22} direct {:.0} req/s | {} | {}{}{}{}",
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
