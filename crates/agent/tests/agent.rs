//! The agent against a fake control plane over real HTTP, with the engine
//! either the simulator in-process or a real child process.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use gpufleet_agent::{
    AgentArgs, AgentError, EngineLauncher, EngineProcess, ExitInfo, GpuMode, LaunchError,
    LaunchRequest, RestartPolicy,
};
use gpufleet_domain::{GpuSpec, InstanceId};
use gpufleet_proto::{
    paths, AgentBootstrap, AgentEvent, AgentEventKind, AgentInfo, EngineSpec, EngineStatus,
    GpuSource, Heartbeat, HeartbeatAck, RegisterRequest, RegisterResponse,
};
use gpufleet_test_support::promtool::assert_metrics_pass;
use gpufleet_test_support::wait::wait_until;
use tokio::sync::oneshot;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const SECRET: &str = "one-time-secret";

// ---------- fake control plane ----------

#[derive(Default)]
struct CpState {
    /// The bootstrap secret while unused.
    secret: Mutex<Option<String>>,
    tokens: Mutex<HashSet<String>>,
    registers: Mutex<Vec<RegisterRequest>>,
    heartbeats: Mutex<Vec<Heartbeat>>,
    events: Mutex<Vec<AgentEvent>>,
}

impl CpState {
    fn new() -> Arc<Self> {
        let s = Self::default();
        *s.secret.lock().unwrap() = Some(SECRET.to_string());
        Arc::new(s)
    }
    fn registers(&self) -> usize {
        self.registers.lock().unwrap().len()
    }
    fn heartbeats(&self) -> Vec<Heartbeat> {
        self.heartbeats.lock().unwrap().clone()
    }
    fn event_kinds(&self) -> Vec<AgentEventKind> {
        self.events.lock().unwrap().iter().map(|e| e.kind).collect()
    }
    fn count(&self, kind: AgentEventKind) -> usize {
        self.event_kinds()
            .into_iter()
            .filter(|k| *k == kind)
            .count()
    }
    fn authorized(&self, headers: &HeaderMap) -> bool {
        let token = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        token.is_some_and(|t| self.tokens.lock().unwrap().contains(t))
    }
}

async fn register(
    State(cp): State<Arc<CpState>>,
    Json(req): Json<RegisterRequest>,
) -> Result<Json<RegisterResponse>, StatusCode> {
    let mut secret = cp.secret.lock().unwrap();
    if secret.as_deref() != Some(req.bootstrap_secret.as_str()) {
        return Err(StatusCode::UNAUTHORIZED);
    }
    *secret = None;
    let token = format!("token-{}", cp.registers() + 1);
    cp.tokens.lock().unwrap().insert(token.clone());
    cp.registers.lock().unwrap().push(req);
    Ok(Json(RegisterResponse {
        token,
        heartbeat_interval_ms: 100,
        canary_interval_ms: 0,
        canary_timeout_ms: 0,
    }))
}

async fn heartbeat(
    State(cp): State<Arc<CpState>>,
    headers: HeaderMap,
    Json(hb): Json<Heartbeat>,
) -> Result<Json<HeartbeatAck>, StatusCode> {
    if !cp.authorized(&headers) {
        return Err(StatusCode::UNAUTHORIZED);
    }
    let mut hbs = cp.heartbeats.lock().unwrap();
    let applied = hbs.last().is_none_or(|last| hb.seq > last.seq);
    hbs.push(hb);
    Ok(Json(HeartbeatAck {
        applied,
        heartbeat_interval_ms: 100,
        canary_interval_ms: 0,
        canary_timeout_ms: 0,
    }))
}

async fn event(
    State(cp): State<Arc<CpState>>,
    headers: HeaderMap,
    Json(ev): Json<AgentEvent>,
) -> StatusCode {
    if !cp.authorized(&headers) {
        return StatusCode::UNAUTHORIZED;
    }
    cp.events.lock().unwrap().push(ev);
    StatusCode::NO_CONTENT
}

/// A running fake control plane; `stop` takes it off the network.
struct FakeCp {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeCp {
    async fn start(state: Arc<CpState>, addr: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind control plane");
        let addr = listener.local_addr().expect("addr");
        let app = Router::new()
            .route(paths::REGISTER, post(register))
            .route(paths::HEARTBEAT, post(heartbeat))
            .route(paths::EVENTS, post(event))
            .with_state(state);
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await;
        });
        Self {
            addr,
            stop: Some(tx),
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
        self.task.abort();
    }
}

// ---------- in-process simulator as the engine ----------

struct InProcessSim;

struct SimHandle {
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), gpufleet_sim::SimError>>>,
}

#[async_trait]
impl EngineLauncher for InProcessSim {
    async fn launch(&self, req: &LaunchRequest) -> Result<Box<dyn EngineProcess>, LaunchError> {
        let EngineSpec::Sim {
            port,
            model_load_delay_ms,
        } = req.spec
        else {
            return Err(LaunchError::Other("only the sim".into()));
        };
        let args = gpufleet_sim::SimArgs {
            host: req.host,
            port,
            model: req.model.to_string(),
            model_load_delay_ms,
            ..gpufleet_sim::SimArgs::for_tests("unused")
        };
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(gpufleet_sim::run(args, async move {
            let _ = rx.await;
        }));
        Ok(Box::new(SimHandle {
            stop: Some(tx),
            task: Some(task),
        }))
    }
}

#[async_trait]
impl EngineProcess for SimHandle {
    fn pid(&self) -> Option<u32> {
        None
    }
    async fn wait(&mut self) -> ExitInfo {
        match self.task.as_mut() {
            Some(task) => {
                let res = task.await;
                self.task = None;
                ExitInfo {
                    code: None,
                    description: format!("in-process sim ended: {res:?}"),
                }
            }
            None => std::future::pending().await,
        }
    }
    async fn stop(&mut self, grace: Duration) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(grace, task).await;
        }
    }
}

// ---------- helpers ----------

fn free_port() -> u16 {
    std::net::TcpListener::bind((LOCALHOST, 0))
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

struct Setup {
    dir: tempfile::TempDir,
    instance_id: InstanceId,
    agent_port: u16,
}

impl Setup {
    fn new(cp_url: &str, engine: EngineSpec) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let instance_id = InstanceId::new();
        let agent_port = free_port();
        let bootstrap = AgentBootstrap {
            instance_id,
            control_plane_url: cp_url.to_string(),
            bootstrap_secret: SECRET.to_string(),
            model: "org/sim-model".parse().expect("model"),
            agent_port,
            engine,
            gpu: GpuSpec {
                model: "NVIDIA L4".into(),
                count: 2,
                vram_mib: 24_576,
                power_limit_w: 72.0,
            },
            control_plane_ca_pem: None,
            engine_args: vec![],
        };
        std::fs::write(
            dir.path().join("bootstrap.json"),
            serde_json::to_vec(&bootstrap).expect("json"),
        )
        .expect("write bootstrap");
        Self {
            dir,
            instance_id,
            agent_port,
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn args(&self) -> AgentArgs {
        AgentArgs {
            instance_id: Some(self.instance_id),
            bootstrap_file: self.dir.path().join("bootstrap.json"),
            bind: LOCALHOST,
            data_dir: self.data_dir(),
            engine_program: None,
            heartbeat_interval_ms: None,
            gpu: GpuMode::Simulated,
            gpu_sample_deadline_ms: 2_000,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.agent_port)
    }
}

struct RunningAgent {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), AgentError>>,
}

impl RunningAgent {
    fn start(args: AgentArgs, launcher: Arc<dyn EngineLauncher>, policy: RestartPolicy) -> Self {
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(gpufleet_agent::run_with(
            args,
            launcher,
            policy,
            async move {
                let _ = rx.await;
            },
        ));
        Self {
            stop: Some(tx),
            task,
        }
    }

    async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("agent stops in time")
            .expect("join")
            .expect("agent exits cleanly");
    }
}

async fn status_of(http: &reqwest::Client, url: &str) -> Option<u16> {
    http.get(url).send().await.ok().map(|r| r.status().as_u16())
}

fn assert_sane(hb: &Heartbeat, instance_id: InstanceId) {
    assert_eq!(hb.instance_id, instance_id);
    assert_eq!(hb.gpu_source, GpuSource::Simulated);
    assert_eq!(hb.gpus.len(), 2);
    for g in &hb.gpus {
        assert_eq!(g.name, "NVIDIA L4");
        assert!(
            (0.0..=100.0).contains(&g.util_pct.expect("simulated GPUs know their figures")),
            "{g:?}"
        );
        assert!(
            g.mem_used_mib <= g.mem_total_mib && g.mem_total_mib == 24_576,
            "{g:?}"
        );
        assert!(
            g.power_w
                .is_some_and(|p| (0.15 * 72.0 - 1e-9..=72.0).contains(&p)),
            "{g:?}"
        );
    }
    let s = &hb.system;
    assert!((0.0..=100.0).contains(&s.cpu_pct), "{s:?}");
    assert!(
        s.mem_total_bytes > 0 && s.mem_used_bytes <= s.mem_total_bytes,
        "{s:?}"
    );
    assert!(
        s.disk_total_bytes > 0 && s.disk_used_bytes <= s.disk_total_bytes,
        "{s:?}"
    );
    assert!(s.net_rx_bps >= 0.0 && s.net_tx_bps >= 0.0, "{s:?}");
}

// ---------- tests ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_heartbeats_serves_and_reuses_its_token() {
    let cp_state = CpState::new();
    let cp = FakeCp::start(cp_state.clone(), (LOCALHOST, 0).into()).await;
    let setup = Setup::new(
        &cp.url(),
        EngineSpec::Sim {
            port: free_port(),
            model_load_delay_ms: 1500,
        },
    );
    let http = reqwest::Client::new();
    let started_ms = u64::try_from(chrono::Utc::now().timestamp_millis()).expect("ms");

    let agent = RunningAgent::start(
        setup.args(),
        Arc::new(InProcessSim),
        RestartPolicy::default(),
    );
    wait_until("/healthz", Duration::from_secs(10), || async {
        status_of(&http, &setup.url("/healthz")).await == Some(200)
    })
    .await;
    assert_eq!(
        status_of(&http, &setup.url("/readyz")).await,
        Some(503),
        "model still loading"
    );

    let token_file = setup.data_dir().join("agent-token");
    // The agent persists the token once it has the control plane's answer.
    wait_until(
        "registered, token stored",
        Duration::from_secs(10),
        || async { cp_state.registers() == 1 && token_file.exists() },
    )
    .await;
    let reg = cp_state.registers.lock().unwrap()[0].clone();
    assert_eq!(
        (reg.instance_id, reg.bootstrap_secret.as_str()),
        (setup.instance_id, SECRET)
    );
    assert_eq!(
        std::fs::read_to_string(&token_file)
            .expect("token file")
            .trim(),
        "token-1"
    );
    assert_eq!(
        std::fs::metadata(&token_file)
            .expect("meta")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    wait_until("/readyz 200", Duration::from_secs(15), || async {
        status_of(&http, &setup.url("/readyz")).await == Some(200)
    })
    .await;
    wait_until(
        "ready events and heartbeats",
        Duration::from_secs(10),
        || async {
            cp_state.count(AgentEventKind::EngineReady) == 1
                && cp_state
                    .heartbeats()
                    .iter()
                    .filter(|h| h.engine.status == EngineStatus::Ready)
                    .count()
                    >= 3
        },
    )
    .await;
    let kinds = cp_state.event_kinds();
    assert!(kinds.contains(&AgentEventKind::AgentStarted), "{kinds:?}");
    assert!(kinds.contains(&AgentEventKind::EngineStarted), "{kinds:?}");

    let hbs = cp_state.heartbeats();
    assert!(
        hbs.windows(2).all(|w| w[1].seq > w[0].seq),
        "seq strictly increases"
    );
    assert!(hbs[0].seq >= started_ms);
    for hb in &hbs {
        assert_sane(hb, setup.instance_id);
    }
    let last = hbs.last().expect("a heartbeat");
    assert_eq!(last.engine.status, EngineStatus::Ready);
    assert!(
        last.gpus.iter().all(|g| g.mem_used_mib >= 24_576 * 6 / 10),
        "weights loaded: {:?}",
        last.gpus
    );

    let info: AgentInfo = http
        .get(setup.url("/info"))
        .send()
        .await
        .expect("info")
        .json()
        .await
        .expect("json");
    assert_eq!(info.instance_id, setup.instance_id);
    assert_eq!(info.engine_status, EngineStatus::Ready);
    assert_eq!(info.gpu_source, GpuSource::Simulated);
    assert_eq!(info.model.as_str(), "org/sim-model");
    assert!(hbs.iter().all(|h| h.gpu_source == GpuSource::Simulated));

    // `/metrics`: DCGM and node-exporter names, the agent's counters; promtool-clean.
    let resp = http
        .get(setup.url("/metrics"))
        .send()
        .await
        .expect("metrics");
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = resp.text().await.expect("text");
    for gpu in 0..last.gpus.len() {
        let prefix = format!(
            "DCGM_FI_DEV_GPU_UTIL{{gpu=\"{gpu}\",UUID=\"\",device=\"nvidia{gpu}\",modelName="
        );
        assert!(
            text.lines().any(|l| l.starts_with(&prefix)),
            "{prefix}\n{text}"
        );
    }
    for family in [
        "DCGM_FI_DEV_FB_USED{",
        "DCGM_FI_DEV_FB_FREE{",
        "DCGM_FI_DEV_GPU_TEMP{",
        "DCGM_FI_DEV_POWER_USAGE{",
        "DCGM_FI_DEV_SM_CLOCK{",
        "DCGM_FI_DEV_ENFORCED_POWER_LIMIT{",
        "DCGM_FI_DEV_CLOCKS_EVENT_REASONS{",
        "node_load1 ",
        "node_memory_MemTotal_bytes ",
        "node_memory_MemAvailable_bytes ",
        "node_filesystem_size_bytes{",
        "node_network_receive_bytes_total{",
        "gpufleet_agent_engine_status{status=\"ready\"} 1",
        "gpufleet_agent_engine_restarts_total 0",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(family)),
            "{family}\n{text}"
        );
    }
    let sent: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("gpufleet_agent_heartbeats_sent_total "))
        .expect("heartbeats sent")
        .parse()
        .expect("number");
    assert!(sent >= 3.0, "{text}");
    assert_metrics_pass(&text, gpufleet_agent::metrics::is_upstream_lint);

    agent.shutdown().await;
    assert!(
        status_of(&http, &setup.url("/healthz")).await.is_none(),
        "server gone"
    );

    // A restarted agent reuses the stored token and keeps seq increasing.
    let max_seq = cp_state
        .heartbeats()
        .iter()
        .map(|h| h.seq)
        .max()
        .expect("seq");
    let before = cp_state.heartbeats().len();
    let agent = RunningAgent::start(
        setup.args(),
        Arc::new(InProcessSim),
        RestartPolicy::default(),
    );
    wait_until(
        "heartbeats from the restarted agent",
        Duration::from_secs(10),
        || async { cp_state.heartbeats().len() >= before + 2 },
    )
    .await;
    assert_eq!(cp_state.registers(), 1, "no second registration");
    let hbs = cp_state.heartbeats();
    assert!(
        hbs[before..].iter().all(|h| h.seq > max_seq),
        "seq continues above the old agent's"
    );
    agent.shutdown().await;
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_a_bootstrap_for_another_instance() {
    let setup = Setup::new(
        "http://127.0.0.1:9",
        EngineSpec::Sim {
            port: free_port(),
            model_load_delay_ms: 0,
        },
    );
    let args = AgentArgs {
        instance_id: Some(InstanceId::new()),
        ..setup.args()
    };
    let err = gpufleet_agent::run(args, std::future::pending())
        .await
        .expect_err("must refuse");
    assert!(
        matches!(err, AgentError::InstanceIdMismatch { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("differs"), "{err}");
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| !r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_engine_process_is_restarted_and_reported() {
    let cp_state = CpState::new();
    let cp = FakeCp::start(cp_state.clone(), (LOCALHOST, 0).into()).await;
    let engine = EngineSpec::Vllm {
        port: free_port(),
        command: vec!["/bin/sh".into(), "-c".into(), "exec sleep 600".into()],
    };
    let setup = Setup::new(&cp.url(), engine);
    let policy = RestartPolicy {
        backoff_base: Duration::from_millis(300),
        ..RestartPolicy::default()
    };
    let agent = RunningAgent::start(
        setup.args(),
        Arc::new(gpufleet_agent::ProcessLauncher {
            sim_program: "/nonexistent".into(),
        }),
        policy,
    );
    let pid_file = setup.data_dir().join("engine.pid");

    wait_until("engine.pid", Duration::from_secs(10), || async {
        read_pid(&pid_file).is_some_and(alive)
    })
    .await;
    let first = read_pid(&pid_file).expect("pid");
    wait_until(
        "engine_started reported",
        Duration::from_secs(10),
        || async { cp_state.count(AgentEventKind::EngineStarted) == 1 },
    )
    .await;

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    wait_until("restarted", Duration::from_secs(10), || async {
        cp_state.count(AgentEventKind::EngineStarted) == 2
            && read_pid(&pid_file).is_some_and(|p| p != first && alive(p))
    })
    .await;
    let kinds = cp_state.event_kinds();
    let pos = |k| kinds.iter().position(|x| *x == k).expect("event present");
    assert!(
        pos(AgentEventKind::EngineExited) < pos(AgentEventKind::EngineRestarting),
        "{kinds:?}"
    );
    wait_until(
        "heartbeat counts the restart",
        Duration::from_secs(10),
        || async {
            cp_state.heartbeats().last().is_some_and(|h| {
                h.engine.restarts == 1 && h.engine.status == EngineStatus::Starting
            })
        },
    )
    .await;

    let second = read_pid(&pid_file).expect("pid");
    agent.shutdown().await;
    wait_until(
        "engine stopped with the agent",
        Duration::from_secs(5),
        || async { !alive(second) },
    )
    .await;
    assert!(!pid_file.exists(), "pid file removed on clean stop");
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_a_stale_engine_before_starting_its_own() {
    let cp_state = CpState::new();
    let cp = FakeCp::start(cp_state.clone(), (LOCALHOST, 0).into()).await;
    let port = free_port();
    let engine = EngineSpec::Vllm {
        port,
        command: vec!["/bin/sh".into(), "-c".into(), "exec sleep 600".into()],
    };
    let setup = Setup::new(&cp.url(), engine);
    std::fs::create_dir_all(setup.data_dir()).expect("mkdir");
    // Its command line names the engine port.
    let mut stale = std::process::Command::new("sleep")
        .arg(port.to_string())
        .spawn()
        .expect("spawn");
    // Right after exec the kernel may not have filled in the command line yet.
    let stale_pid = stale.id();
    wait_until(
        "stale engine's command line",
        Duration::from_secs(5),
        || async {
            std::fs::read(format!("/proc/{stale_pid}/cmdline")).is_ok_and(|c| !c.is_empty())
        },
    )
    .await;
    std::fs::write(setup.data_dir().join("engine.pid"), stale_pid.to_string()).expect("pid");
    let agent = RunningAgent::start(
        setup.args(),
        Arc::new(gpufleet_agent::ProcessLauncher {
            sim_program: "/nonexistent".into(),
        }),
        RestartPolicy::default(),
    );
    let status = tokio::task::spawn_blocking(move || stale.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(!status.success(), "stale engine killed");
    agent.shutdown().await;
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovers_when_the_control_plane_comes_back() {
    let cp_state = CpState::new();
    let cp_addr: SocketAddr = (LOCALHOST, free_port()).into();
    let setup = Setup::new(
        &format!("http://{cp_addr}"),
        EngineSpec::Sim {
            port: free_port(),
            model_load_delay_ms: 0,
        },
    );
    let http = reqwest::Client::new();

    // Control plane down from the start: the agent runs anyway.
    let agent = RunningAgent::start(
        setup.args(),
        Arc::new(InProcessSim),
        RestartPolicy::default(),
    );
    wait_until(
        "agent ready without a control plane",
        Duration::from_secs(15),
        || async { status_of(&http, &setup.url("/readyz")).await == Some(200) },
    )
    .await;

    let cp = FakeCp::start(cp_state.clone(), cp_addr).await;
    wait_until(
        "registered and beating",
        Duration::from_secs(15),
        || async { cp_state.registers() == 1 && cp_state.heartbeats().len() >= 2 },
    )
    .await;
    wait_until(
        "queued events delivered",
        Duration::from_secs(10),
        || async {
            cp_state.count(AgentEventKind::EngineReady) == 1
                && cp_state.count(AgentEventKind::AgentStarted) == 1
        },
    )
    .await;

    cp.stop().await;
    let seen = cp_state.heartbeats().len();
    // The agent keeps running while the control plane is away...
    for _ in 0..5 {
        assert_eq!(status_of(&http, &setup.url("/healthz")).await, Some(200));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ...and resumes heartbeats once it is back.
    let cp = FakeCp::start(cp_state.clone(), cp_addr).await;
    wait_until("heartbeats resume", Duration::from_secs(15), || async {
        cp_state.heartbeats().len() >= seen + 2
    })
    .await;
    assert_eq!(cp_state.registers(), 1);
    agent.shutdown().await;
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_token_leads_to_registration_retries_without_crashing() {
    let cp_state = CpState::new();
    let cp = FakeCp::start(cp_state.clone(), (LOCALHOST, 0).into()).await;
    let setup = Setup::new(
        &cp.url(),
        EngineSpec::Sim {
            port: free_port(),
            model_load_delay_ms: 0,
        },
    );
    let http = reqwest::Client::new();
    let agent = RunningAgent::start(
        setup.args(),
        Arc::new(InProcessSim),
        RestartPolicy::default(),
    );
    wait_until("beating", Duration::from_secs(10), || async {
        !cp_state.heartbeats().is_empty()
    })
    .await;

    // The control plane forgets the token; the secret is already used.
    cp_state.tokens.lock().unwrap().clear();
    let seen = cp_state.heartbeats().len();
    for _ in 0..5 {
        assert_eq!(
            status_of(&http, &setup.url("/healthz")).await,
            Some(200),
            "agent keeps running"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(cp_state.heartbeats().len(), seen);

    // Once registration is possible again, the agent gets a new token.
    *cp_state.secret.lock().unwrap() = Some(SECRET.to_string());
    wait_until(
        "re-registered and beating",
        Duration::from_secs(15),
        || async { cp_state.registers() == 2 && cp_state.heartbeats().len() > seen },
    )
    .await;
    let stored = std::fs::read_to_string(setup.data_dir().join("agent-token")).expect("token");
    assert_eq!(stored.trim(), "token-2");
    agent.shutdown().await;
    cp.stop().await;
}
