//! `gpufleet bench heartbeats`: a load generator for heartbeat ingestion.
//!
//! It runs a real control plane in this process (store, Fleet with its
//! reconcilers, the HTTP API on 127.0.0.1:0) over an in-memory `bench`
//! provider whose machines are 127.0.0.1 and whose "agents" answer
//! `/readyz`, so instances go through the real life cycle to `ready`. Each
//! simulated agent registers over HTTP with the bootstrap secret its
//! machine was handed and then posts heartbeats with its own agent token to
//! `/internal/v1/agent/heartbeat`: the real path (auth, validation, the
//! batching writer, one transaction per batch). The load generator and the
//! server share this machine's cores, so the figures are a lower bound for a
//! control plane on its own host. (Against a separate `--server` it cannot
//! run: agent tokens come only from bootstrap secrets that the control
//! plane hands to its provider's machines.)
//!
//! It prints the achieved rate of applied heartbeats and the client-side
//! latency percentiles; with `--query-check` it also writes 24 hours of
//! history for one instance, rolls it up and times 24-hour metric queries
//! through the API.

use anyhow::{bail, Context};
use async_trait::async_trait;
use bytes::Bytes;
use chrono::Utc;
use gpufleet_control::{ControlConfig, ControlPlane, CreateInstances, Fleet};
use gpufleet_domain::metrics::Tier;
use gpufleet_domain::{
    GpuSpec, InstanceId, InstanceStatus, InstanceType, ProviderInstanceId, ProviderName, Zone,
};
use gpufleet_proto::{
    identity, paths, EngineSample, EngineStatus, GpuSample, GpuSource, Heartbeat, Readiness,
    RegisterRequest, RegisterResponse, SystemSample,
};
use gpufleet_providers::{
    Catalog, CreateRequest, Machine, MachineState, Provider, ProviderError, ProviderRegistry,
};
use gpufleet_store::{InstanceFilter, Store};
use http_body_util::{BodyExt, Full};
use hyper::header::HeaderValue;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Arguments of `gpufleet bench heartbeats`.
#[derive(Debug, Clone, clap::Args)]
pub struct HeartbeatsArgs {
    /// Simulated agents (one instance each).
    #[arg(long, default_value_t = 500)]
    pub agents: u32,
    /// Target heartbeats per second, all agents together.
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// How long to send, e.g. `30s`, `2m`.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Database URL [default: a fresh SQLite file in a temporary directory].
    /// A postgres:// URL measures PostgreSQL (use an empty database).
    #[arg(long)]
    pub database: Option<String>,
    /// GPUs per simulated instance.
    #[arg(long, default_value_t = 1)]
    pub gpus: u32,
    /// Also write 24 hours of history for one instance and time 24-hour
    /// metric queries through the API.
    #[arg(long)]
    pub query_check: bool,
    /// Control-plane replicas on the one database (each its own Fleet,
    /// reconcilers under leases, API server and change listener; agents
    /// spread over them). More than one needs a postgres:// --database.
    /// Also reports each reconciler's longest pass and how fast a change
    /// made on one replica reaches the others.
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let bad = || format!("{s:?}: expected a duration like 30s or 2m");
    let split = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (n, unit) = t.split_at(split);
    let n: u64 = n.parse().map_err(|_| bad())?;
    match unit {
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(bad()),
    }
}

const PROVIDER: &str = "bench";
const TYPE: &str = "bench-gpu";
const ADMIN_TOKEN: &str = "bench-admin-token";

/// Machines in memory, each on its own loopback address (127.88.x.y, where
/// every replica's fake `/readyz` listens); remembers each instance's
/// bootstrap secret, and the agent token the load generator got for it, so
/// `/readyz` can prove it is that instance's agent.
struct BenchProvider {
    name: ProviderName,
    gpus: u32,
    machines: Mutex<HashMap<String, Machine>>,
    secrets: Mutex<HashMap<InstanceId, String>>,
    by_ip: Mutex<HashMap<IpAddr, InstanceId>>,
    tokens: Mutex<HashMap<InstanceId, String>>,
}

impl BenchProvider {
    fn secrets(&self) -> std::sync::MutexGuard<'_, HashMap<InstanceId, String>> {
        self.secrets.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn machines(&self) -> std::sync::MutexGuard<'_, HashMap<String, Machine>> {
        self.machines.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn by_ip(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, InstanceId>> {
        self.by_ip.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn tokens(&self) -> std::sync::MutexGuard<'_, HashMap<InstanceId, String>> {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Provider for BenchProvider {
    fn name(&self) -> &ProviderName {
        &self.name
    }
    async fn create(&self, req: &CreateRequest) -> Result<Machine, ProviderError> {
        self.secrets()
            .insert(req.instance_id, req.bootstrap.bootstrap_secret.clone());
        let mut machines = self.machines();
        let n = machines.len() as u32;
        let ip = IpAddr::V4(Ipv4Addr::new(127, 88, (n / 250) as u8, (n % 250 + 1) as u8));
        Ok(machines
            .entry(req.idempotency_key.clone())
            .or_insert_with(|| {
                self.by_ip().insert(ip, req.instance_id);
                Machine {
                    id: ProviderInstanceId::new(format!("bench-{}", req.instance_id)),
                    state: MachineState::Running,
                    ip: Some(ip),
                    zone: req.zone.clone(),
                    instance_type: req.instance_type.clone(),
                    tags: req.tags.clone(),
                    created_at: Utc::now(),
                }
            })
            .clone())
    }
    async fn get(&self, id: &ProviderInstanceId) -> Result<Machine, ProviderError> {
        self.machines()
            .values()
            .find(|m| &m.id == id)
            .cloned()
            .ok_or_else(|| ProviderError::NotFound { id: id.clone() })
    }
    async fn terminate(&self, id: &ProviderInstanceId) -> Result<(), ProviderError> {
        self.machines().retain(|_, m| &m.id != id);
        Ok(())
    }
    async fn list(&self, tags: &BTreeMap<String, String>) -> Result<Vec<Machine>, ProviderError> {
        Ok(self
            .machines()
            .values()
            .filter(|m| tags.iter().all(|(k, v)| m.tags.get(k) == Some(v)))
            .cloned()
            .collect())
    }
    async fn catalog(&self) -> Result<Catalog, ProviderError> {
        Ok(Catalog {
            zones: vec![Zone {
                name: "local".into(),
                description: "this machine".into(),
            }],
            instance_types: vec![InstanceType {
                name: TYPE.into(),
                gpu: GpuSpec {
                    model: "NVIDIA L4".into(),
                    count: self.gpus,
                    vram_mib: 23_034,
                    power_limit_w: 72.0,
                },
                vcpus: 8,
                ram_mib: 32_768,
                price_per_hour: 0.75,
                currency: "EUR".into(),
                zones: vec!["local".into()],
            }],
        })
    }
}

/// `/readyz` → 200, for every simulated agent (they all share 127.0.0.1).
/// The machines' `/readyz` on every loopback address: ready, naming the
/// instance whose machine has the address asked (the `Host`), with the
/// identity proof of its agent token once the load generator has one.
async fn serve_readyz(
    stop: CancellationToken,
    provider: Arc<BenchProvider>,
) -> anyhow::Result<u16> {
    use axum::extract::{Query, State};
    use axum::http::HeaderMap;
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await?;
    let port = listener.local_addr()?.port();
    async fn readyz(
        State(p): State<Arc<BenchProvider>>,
        headers: HeaderMap,
        Query(q): Query<HashMap<String, String>>,
    ) -> Result<axum::Json<Readiness>, axum::http::StatusCode> {
        let host = headers
            .get(hyper::header::HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.parse::<SocketAddr>().ok())
            .ok_or(axum::http::StatusCode::BAD_REQUEST)?;
        let id = *p
            .by_ip()
            .get(&host.ip())
            .ok_or(axum::http::StatusCode::NOT_FOUND)?;
        let proof = match (q.get(identity::CHALLENGE_PARAM), p.tokens().get(&id)) {
            (Some(challenge), Some(token)) => Some(identity::readiness_proof(
                &identity::token_digest(token),
                id,
                challenge,
            )),
            _ => None,
        };
        Ok(axum::Json(Readiness {
            ready: true,
            instance_id: id,
            reason: None,
            proof,
        }))
    }
    let app = axum::Router::new()
        .route("/readyz", axum::routing::get(readyz))
        .with_state(provider);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
    });
    Ok(port)
}

fn heartbeat(id: InstanceId, seq: u64, gpus: u32, phase: f64) -> Heartbeat {
    let util = 50.0 + 40.0 * phase.sin();
    Heartbeat {
        instance_id: id,
        seq,
        sent_at: Utc::now(),
        agent_version: "bench".into(),
        agent_uptime_secs: seq / 1000,
        system: SystemSample {
            cpu_pct: 20.0 + 10.0 * phase.cos().abs(),
            load1: 1.0,
            load5: 1.0,
            load15: 1.0,
            mem_used_bytes: 8 << 30,
            mem_total_bytes: 32 << 30,
            disk_used_bytes: 50 << 30,
            disk_total_bytes: 200 << 30,
            net_rx_bps: 1e6,
            net_tx_bps: 2e6,
        },
        gpu_source: GpuSource::Simulated,
        gpus: (0..gpus)
            .map(|index| GpuSample {
                index,
                name: "NVIDIA L4".into(),
                uuid: None,
                util_pct: Some(util),
                mem_used_mib: 18_000,
                mem_total_mib: 23_034,
                temp_c: Some(40.0 + util / 4.0),
                power_w: Some(20.0 + util / 2.0),
                power_limit_w: Some(72.0),
                ..GpuSample::default()
            })
            .collect(),
        engine: EngineSample {
            status: EngineStatus::Ready,
            requests_running: 4.0,
            requests_waiting: 1.0,
            restarts: 0,
            kv_cache_usage: Some(0.4),
            prompt_tokens_per_s: Some(900.0),
            generation_tokens_per_s: Some(300.0),
            ttft_mean_s: Some(0.12),
            canary: None,
        },
    }
}

/// Per-agent tallies.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    applied: u64,
    not_applied: u64,
    errors: BTreeMap<String, u64>,
}

fn percentile_ms(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}

struct Server {
    base: String,
    addr: SocketAddr,
    control: ControlPlane,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    reconcilers: tokio::task::JoinHandle<()>,
    _dir: Option<tempfile::TempDir>,
}

/// The control plane on a fresh database, and with `--query-check` the
/// instance whose 24 hours of history were written before the reconcilers
/// started (rollups only move forward from their watermark: a backfill
/// racing the rollup reconciler would land behind it).
async fn start_server(
    args: &HeartbeatsArgs,
    provider: Arc<BenchProvider>,
    url: &str,
    dir: Option<tempfile::TempDir>,
    seed: bool,
    agent_port: u16,
) -> anyhow::Result<(Server, Option<InstanceId>)> {
    let store = Store::connect(url)
        .await
        .context("cannot open the database")?;
    let stop = CancellationToken::new();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let base = format!("http://{addr}");
    let config = ControlConfig {
        agent_control_url: base.clone(),
        agent_port,
        max_instances_per_request: args.agents.max(1),
        ..ControlConfig::default()
    };
    let mut providers = ProviderRegistry::new();
    providers.register(provider);
    let control = ControlPlane::build(store, providers, config)
        .await
        .context("cannot start the control plane")?;
    let history = if seed {
        Some(seed_history(&control.fleet, args.gpus).await?)
    } else {
        None
    };
    control.follow_replicas(stop.clone()).await?;
    let reconcilers = control.start(stop.clone());
    let router = gpufleet_api::router(gpufleet_api::ApiState::new(&control, ADMIN_TOKEN));
    let server = tokio::spawn(gpufleet_api::serve(
        listener,
        router,
        stop.clone().cancelled_owned(),
    ));
    Ok((
        Server {
            base,
            addr,
            control,
            stop,
            server,
            reconcilers,
            _dir: dir,
        },
        history,
    ))
}

async fn create(fleet: &Fleet, count: u32) -> anyhow::Result<Vec<InstanceId>> {
    Ok(fleet
        .create_instances(CreateInstances {
            provider: PROVIDER.parse().expect("valid provider name"),
            zone: None,
            instance_type: TYPE.into(),
            model: "gpufleet/sim-small".parse().expect("valid model name"),
            count,
        })
        .await?
        .iter()
        .map(|r| r.id)
        .collect())
}

pub async fn run(args: HeartbeatsArgs) -> anyhow::Result<()> {
    if args.agents == 0 || args.rate.is_nan() || args.rate <= 0.0 {
        bail!("--agents and --rate must be positive");
    }
    let provider = Arc::new(BenchProvider {
        name: PROVIDER.parse().expect("valid provider name"),
        gpus: args.gpus,
        machines: Mutex::new(HashMap::new()),
        secrets: Mutex::new(HashMap::new()),
        by_ip: Mutex::new(HashMap::new()),
        tokens: Mutex::new(HashMap::new()),
    });
    let (url, dir) = match &args.database {
        Some(u) => (u.clone(), None),
        None => {
            let dir = tempfile::tempdir().context("cannot make a temporary directory")?;
            (
                format!("sqlite://{}/bench.db?mode=rwc", dir.path().display()),
                Some(dir),
            )
        }
    };
    if args.replicas > 1 && !url.starts_with("postgres") {
        bail!("--replicas above 1 needs a postgres:// --database (SQLite serves one replica)");
    }
    let replicas = args.replicas.max(1);
    let readyz_stop = CancellationToken::new();
    let agent_port = serve_readyz(readyz_stop.clone(), provider.clone()).await?;
    let (srv, history) = start_server(
        &args,
        provider.clone(),
        &url,
        dir,
        args.query_check,
        agent_port,
    )
    .await?;
    let mut others = Vec::new();
    for _ in 1..replicas {
        others.push(
            start_server(&args, provider.clone(), &url, None, false, agent_port)
                .await?
                .0,
        );
    }
    let bases: Vec<String> = std::iter::once(srv.base.clone())
        .chain(others.iter().map(|o| o.base.clone()))
        .collect();
    let addrs: Vec<SocketAddr> = std::iter::once(srv.addr)
        .chain(others.iter().map(|o| o.addr))
        .collect();
    let fleets: Vec<Fleet> = std::iter::once(srv.control.fleet.clone())
        .chain(others.iter().map(|o| o.control.fleet.clone()))
        .collect();
    let drivers: Vec<gpufleet_control::Tasks> = std::iter::once(srv.control.tasks.clone())
        .chain(others.iter().map(|o| o.control.tasks.clone()))
        .collect();
    let backend = match srv.control.store.backend() {
        gpufleet_store::Backend::Sqlite => "SQLite",
        gpufleet_store::Backend::Postgres => "PostgreSQL",
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;

    // Instances, their machines and agent tokens.
    let ids = create(&srv.control.fleet, args.agents).await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ids.iter().all(|id| provider.secrets().contains_key(id)) {
        if Instant::now() > deadline {
            bail!("the provisioner did not create every machine within 2 minutes");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secrets = provider.secrets().clone();
    let mut agents: Vec<(InstanceId, String)> = Vec::with_capacity(ids.len());
    for (c, chunk) in ids.chunks(64).enumerate() {
        let bases = &bases;
        let regs = chunk.iter().enumerate().map(|(k, id)| {
            let client = client.clone();
            let url = format!("{}{}", bases[(c * 64 + k) % bases.len()], paths::REGISTER);
            let secret = secrets[id].clone();
            async move {
                let resp = client
                    .post(url)
                    .json(&RegisterRequest {
                        instance_id: *id,
                        bootstrap_secret: secret,
                        agent_version: "bench".into(),
                        hostname: "bench".into(),
                    })
                    .send()
                    .await?
                    .error_for_status()?;
                let reg: RegisterResponse = resp.json().await?;
                Ok::<_, reqwest::Error>((*id, reg.token))
            }
        });
        for r in futures::future::join_all(regs).await {
            let (id, token) = r.context("agent registration failed")?;
            provider.tokens().insert(id, token.clone());
            agents.push((id, token));
        }
    }
    // Heartbeats every 2 s (as agents do while they start) until the fleet
    // is ready: the steady state the load runs in.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut warm_seq = 0;
    let ready = loop {
        warm_seq += 1;
        for (c, chunk) in agents.chunks(64).enumerate() {
            let bases = &bases;
            let posts = chunk.iter().enumerate().map(|(k, (id, token))| {
                client
                    .post(format!(
                        "{}{}",
                        bases[(c * 64 + k) % bases.len()],
                        paths::HEARTBEAT
                    ))
                    .bearer_auth(token)
                    .json(&heartbeat(*id, warm_seq, args.gpus, 0.0))
                    .send()
            });
            for r in futures::future::join_all(posts).await {
                r?.error_for_status()?;
            }
        }
        let ready = srv
            .control
            .fleet
            .list_instances(&InstanceFilter {
                statuses: vec![InstanceStatus::Ready],
                ..InstanceFilter::default()
            })
            .await?
            .iter()
            .filter(|r| ids.contains(&r.id))
            .count();
        if ready >= agents.len() || Instant::now() > deadline {
            break ready;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    println!(
        "backend {backend}; {replicas} replica(s); {} agents ({ready} ready), {} GPU(s) each; target {:.0} heartbeats/s for {}s",
        agents.len(),
        args.gpus,
        args.rate,
        args.duration.as_secs()
    );

    let passes = tokio::spawn(longest_passes(drivers, args.duration));
    let all = load(&args, &addrs, &agents).await?;
    let elapsed = args.duration.as_secs_f64();
    let l = &all.latencies_us;
    println!(
        "applied {} heartbeats in {elapsed:.1}s: {:.0}/s sustained (target {:.0}/s); not applied {}; errors {:?}",
        all.applied,
        all.applied as f64 / elapsed,
        args.rate,
        all.not_applied,
        all.errors
    );
    println!(
        "ingestion latency (client side, request sent to commit acknowledged): \
         p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile_ms(l, 0.50),
        percentile_ms(l, 0.90),
        percentile_ms(l, 0.99),
        percentile_ms(l, 1.0)
    );

    let passes = passes.await?;
    println!(
        "longest reconciler pass during the load (any replica): {}",
        passes
            .iter()
            .map(|(t, ms)| format!("{t} {ms} ms"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if replicas > 1 {
        propagation(&fleets, &ids).await?;
    }

    if let Some(id) = history {
        time_queries(&srv, &client, id).await?;
    }
    for o in others {
        o.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), o.server).await;
        let _ = tokio::time::timeout(Duration::from_secs(10), o.reconcilers).await;
        o.control.agents.stop_ingest().await;
        o.control.store.close().await;
    }
    readyz_stop.cancel();
    srv.stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), srv.server).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), srv.reconcilers).await;
    srv.control.agents.stop_ingest().await;
    srv.control.store.close().await;
    Ok(())
}

/// Every agent on its own period (start times spread evenly), each
/// waiting for its answer before the next, like real agents. A late agent
/// skips the beats it missed rather than bursting, so the achieved rate is
/// what the server sustains. Each agent keeps its own HTTP/1.1 connection
/// (as a real agent does) through hyper's connection API: the load
/// generator shares the cores with the server, so it spends as little as
/// it can per request (no pool, no URL parsing); each heartbeat is still
/// built and serialized afresh.
async fn load(
    args: &HeartbeatsArgs,
    addrs: &[SocketAddr],
    agents: &[(InstanceId, String)],
) -> anyhow::Result<Tally> {
    let period = Duration::from_secs_f64(agents.len() as f64 / args.rate);
    // Time for every agent to connect first.
    let start = tokio::time::Instant::now() + Duration::from_millis(200 + agents.len() as u64);
    let end = start + args.duration;
    let n = agents.len();
    let tasks: Vec<_> = agents
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, (id, token))| {
            let gpus = args.gpus;
            let addr = addrs[i % addrs.len()];
            let host = HeaderValue::from_str(&addr.to_string());
            tokio::spawn(async move {
                let mut tally = Tally::default();
                let Ok(host) = host else {
                    *tally.errors.entry("host".into()).or_default() += 1;
                    return tally;
                };
                let Ok(auth) = HeaderValue::from_str(&format!("Bearer {token}")) else {
                    *tally.errors.entry("token".into()).or_default() += 1;
                    return tally;
                };
                let offset = period.mul_f64(i as f64 / n as f64);
                let mut tick = tokio::time::interval_at(start + offset, period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                // Above every warm-up heartbeat's seq.
                let mut seq = 1_000_000u64;
                // Connected before the run (agents keep theirs open), one
                // per millisecond (hundreds of connects at once overflow
                // the accept queue: a 200 ms retransmit shows as the
                // maximum); a reconnect during the run is timed with its
                // heartbeat.
                tokio::time::sleep(Duration::from_millis(i as u64)).await;
                let mut conn: Option<crate::bench_router::Sender> =
                    crate::bench_router::connect(addr).await.ok();
                loop {
                    if tick.tick().await >= end {
                        break;
                    }
                    seq += 1;
                    let hb = heartbeat(id, seq, gpus, seq as f64 / 10.0);
                    let body = match serde_json::to_vec(&hb) {
                        Ok(b) => Bytes::from(b),
                        Err(_) => {
                            *tally.errors.entry("encode".into()).or_default() += 1;
                            continue;
                        }
                    };
                    let t0 = Instant::now();
                    if conn.is_none() {
                        conn = crate::bench_router::connect(addr).await.ok();
                    }
                    let Some(sender) = conn.as_mut() else {
                        *tally.errors.entry("connect".into()).or_default() += 1;
                        continue;
                    };
                    let mut req = hyper::Request::new(Full::new(body));
                    *req.method_mut() = hyper::Method::POST;
                    *req.uri_mut() = hyper::Uri::from_static(paths::HEARTBEAT);
                    let h = req.headers_mut();
                    h.insert(hyper::header::HOST, host.clone());
                    h.insert(hyper::header::AUTHORIZATION, auth.clone());
                    h.insert(
                        hyper::header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                    match post(sender, req).await {
                        Ok((status, body)) if status.is_success() => {
                            tally.latencies_us.push(t0.elapsed().as_micros() as u32);
                            if body.windows(14).any(|w| w == b"\"applied\":true") {
                                tally.applied += 1;
                            } else {
                                tally.not_applied += 1;
                            }
                        }
                        Ok((status, _)) => {
                            *tally.errors.entry(status.as_u16().to_string()).or_default() += 1
                        }
                        Err(_) => {
                            *tally.errors.entry("transport".into()).or_default() += 1;
                            conn = None;
                        }
                    }
                }
                tally
            })
        })
        .collect();
    let mut all = Tally::default();
    for t in tasks {
        let t = t.await?;
        all.latencies_us.extend(t.latencies_us);
        all.applied += t.applied;
        all.not_applied += t.not_applied;
        for (k, v) in t.errors {
            *all.errors.entry(k).or_default() += v;
        }
    }
    all.latencies_us.sort_unstable();
    Ok(all)
}

/// Each reconciler's longest pass on any replica, sampled from the task
/// statuses every 100 ms for `over`.
async fn longest_passes(
    drivers: Vec<gpufleet_control::Tasks>,
    over: Duration,
) -> BTreeMap<String, u64> {
    let mut longest: BTreeMap<String, u64> = BTreeMap::new();
    let end = Instant::now() + over;
    while Instant::now() < end {
        for d in &drivers {
            for t in d.statuses() {
                if let Some(ms) = t.last_duration_ms {
                    let e = longest.entry(t.name).or_default();
                    *e = (*e).max(ms);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    longest
}

/// Terminate every instance through the last replica and time how long
/// each change (ready → draining, written there) takes to reach the other
/// replicas' buses: now − the record's `updated_at` (one host, one clock).
async fn propagation(fleets: &[Fleet], ids: &[InstanceId]) -> anyhow::Result<()> {
    // A steady trickle (a change every 20 ms), then the rest all at once.
    let paced = ids.len().min(200);
    propagation_of(fleets, &ids[..paced], Some(Duration::from_millis(20))).await?;
    propagation_of(fleets, &ids[paced..], None).await
}

async fn propagation_of(
    fleets: &[Fleet],
    ids: &[InstanceId],
    every: Option<Duration>,
) -> anyhow::Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let (writer, observers) = fleets.split_last().expect("replicas");
    let collect = observers
        .iter()
        .map(|f| {
            let mut rx = f.subscribe();
            let want: std::collections::HashSet<InstanceId> = ids.iter().copied().collect();
            tokio::spawn(async move {
                let mut lat_us: Vec<u32> = Vec::with_capacity(want.len());
                let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                while lat_us.len() < want.len() {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Ok(c))
                            if c.instance.status == InstanceStatus::Draining
                                && want.contains(&c.instance.id) =>
                        {
                            let us = (Utc::now() - c.instance.updated_at)
                                .num_microseconds()
                                .unwrap_or(0)
                                .max(0);
                            lat_us.push(us as u32);
                        }
                        Ok(Ok(_)) => {}
                        Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
                        _ => break,
                    }
                }
                lat_us
            })
        })
        .collect::<Vec<_>>();
    match every {
        Some(gap) => {
            let mut tick = tokio::time::interval(gap);
            for id in ids {
                tick.tick().await;
                writer.terminate_instance(*id).await?;
            }
        }
        None => {
            use futures::StreamExt;
            futures::stream::iter(ids.iter().copied())
                .map(|id| {
                    let w = writer.clone();
                    async move { w.terminate_instance(id).await }
                })
                .buffer_unordered(32)
                .collect::<Vec<_>>()
                .await;
        }
    }
    let mut all = Vec::new();
    for c in collect {
        all.extend(c.await?);
    }
    all.sort_unstable();
    let how = match every {
        Some(gap) => format!("one change every {} ms", gap.as_millis()),
        None => "all at once, 32 in flight".to_string(),
    };
    println!(
        "change propagation between replicas ({how}; {} changes seen by {} other replica(s)): \
         p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        all.len(),
        observers.len(),
        percentile_ms(&all, 0.5),
        percentile_ms(&all, 0.99),
        percentile_ms(&all, 1.0)
    );
    Ok(())
}

/// Send `req` on the agent's connection; the status and the whole body.
async fn post(
    sender: &mut crate::bench_router::Sender,
    req: hyper::Request<Full<Bytes>>,
) -> anyhow::Result<(hyper::StatusCode, Bytes)> {
    sender.ready().await?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// 24 hours of 5-second samples for a fresh instance, rolled up.
async fn seed_history(fleet: &Fleet, gpus: u32) -> anyhow::Result<InstanceId> {
    let id = create(fleet, 1).await?[0];
    let store = fleet.store();
    let now = Utc::now();
    let first = now - chrono::Duration::hours(24);
    let total: u64 = 24 * 3600 / 5;
    let t0 = Instant::now();
    let mut batch = Vec::with_capacity(256);
    for i in 0..total {
        let at = first + chrono::Duration::seconds(5 * i as i64);
        batch.push((heartbeat(id, i + 1, gpus, i as f64 / 50.0), at));
        if batch.len() == 256 || i + 1 == total {
            store.record_heartbeats(&batch).await?;
            batch.clear();
        }
    }
    // Moved out of staging, as 24 hours of operation would have done.
    store.compact_staging().await?;
    let up_to = now - chrono::Duration::seconds(10);
    for tier in [Tier::Minute, Tier::Hour] {
        for _ in 0..1000 {
            if store.rollup(tier, up_to).await?.caught_up {
                break;
            }
        }
    }
    println!(
        "query check: wrote and rolled up {total} samples (24 h at 5 s) in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    Ok(id)
}

/// Time 24-hour (and 1-hour raw) queries of `id` through the API.
async fn time_queries(
    srv: &Server,
    client: &reqwest::Client,
    id: InstanceId,
) -> anyhow::Result<()> {
    let now = Utc::now();
    let fmt = |t: chrono::DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let (from, to) = (fmt(now - chrono::Duration::hours(24)), fmt(now));
    for (what, query) in [
        (
            "24 h, default step (1m, minute tier)",
            format!("from={from}&to={to}"),
        ),
        (
            "24 h, step 5m (minute tier)",
            format!("from={from}&to={to}&step=5m"),
        ),
        (
            "24 h, step 1h (hour tier)",
            format!("from={from}&to={to}&step=1h"),
        ),
        ("last 1 h, step 5s (raw tier)", "step=5s".to_string()),
    ] {
        let url = format!("{}/api/v1/instances/{id}/metrics?limit=1&{query}", srv.base);
        let mut times = Vec::new();
        let mut buckets = 0;
        for _ in 0..20 {
            let t = Instant::now();
            let resp = client
                .get(&url)
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await?
                .error_for_status()?;
            let m: gpufleet_api::views::InstanceMetrics = resp.json().await?;
            times.push(t.elapsed().as_micros() as u32);
            buckets = m
                .series
                .map(|s| s.samples.iter().filter(|n| **n > 0).count())
                .unwrap_or(0);
        }
        times.sort_unstable();
        println!(
            "query {what}: {buckets} buckets with data; p50 {:.2} ms, max {:.2} ms (20 runs over HTTP, JSON decoded)",
            percentile_ms(&times, 0.5),
            percentile_ms(&times, 1.0)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("30").is_err());
        assert!(parse_duration("1h").is_err());
    }

    #[test]
    fn percentiles() {
        let v: Vec<u32> = (1..=100).map(|i| i * 1000).collect();
        assert_eq!(percentile_ms(&v, 0.5), 51.0);
        assert_eq!(percentile_ms(&v, 1.0), 100.0);
    }
}
