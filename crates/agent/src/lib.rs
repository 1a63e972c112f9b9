//! `gpufleet agent`: the worker agent on each instance.
//!
//! It reads its [`AgentBootstrap`](gpufleet_proto::AgentBootstrap), registers
//! with the control plane (or reuses the token stored in its data directory),
//! launches and supervises the inference engine, sends a heartbeat with
//! host, GPU and engine figures every `heartbeat_interval_ms`, reports
//! engine events, and serves `/healthz`, `/readyz`, `/info` and `/metrics`
//! (DCGM-exporter and node-exporter names; see [`metrics`]). GPU figures come
//! from NVML or are simulated, per `--gpu` ([`gpu::select`]).
//!
//! Nothing that happens after start-up stops the agent: a control plane
//! that is down or rejects the token, an engine that crashes, are logged and
//! retried with backoff. Only the `shutdown` future ends [`run`], after the
//! engine has been stopped.
//!
//! Tasks (each a small struct with `run(cancel)`):
//! [`session::Registrar`] (token), [`events::deliver`] (event queue),
//! [`heartbeat::HeartbeatLoop`], [`engine::supervisor::Supervisor`],
//! [`engine::canary::CanaryLoop`] (a real one-token completion every
//! `canary_interval_ms` while the engine is ready), and the HTTP [`server`].

mod backoff;
mod client;
mod config;
pub mod engine;
mod error;
mod events;
pub mod gpu;
mod heartbeat;
pub mod metrics;
pub mod nvml;
mod scrape;
mod server;
mod session;
mod system;
mod token;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpufleet_proto::RegisterRequest;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use config::AgentArgs;
pub use engine::supervisor::RestartPolicy;
pub use engine::{
    EngineLauncher, EngineProcess, EngineState, ExitInfo, LaunchError, LaunchRequest,
    ProcessLauncher,
};
pub use error::AgentError;
pub use gpu::{EngineLoad, GpuFault, GpuMode, GpuReading, GpuSampler, GpuThread, SimulatedGpus};

use crate::config::{load_bootstrap, DataDir};
use crate::engine::canary::CanaryLoop;
use crate::engine::probe::EngineProbe;
use crate::engine::supervisor::Supervisor;
use crate::events::EventReporter;
use crate::heartbeat::HeartbeatLoop;
use crate::session::{Registrar, Session};
use crate::system::SystemSampler;

/// The agent's version, as reported to the control plane.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// How long background tasks get to finish after the engine stopped.
const TASK_STOP_DEADLINE: Duration = Duration::from_secs(3);

/// Runs the agent, launching the engine as a child process, until `shutdown`
/// completes; then stops the engine and returns.
pub async fn run(
    args: AgentArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    let sim_program = match &args.engine_program {
        Some(p) => p.clone(),
        None => std::env::current_exe().map_err(AgentError::EngineProgram)?,
    };
    run_with(
        args,
        Arc::new(ProcessLauncher { sim_program }),
        RestartPolicy::default(),
        shutdown,
    )
    .await
}

/// [`run`] with the engine launcher and restart timings given (tests launch
/// the simulator in-process, or shorten the backoff).
pub async fn run_with(
    args: AgentArgs,
    launcher: Arc<dyn EngineLauncher>,
    policy: RestartPolicy,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    let bootstrap = load_bootstrap(&args)?;
    let data_dir = DataDir::create(&args.data_dir)?;
    let instance_id = bootstrap.instance_id;
    let started = Instant::now();
    let client = client::ControlPlane::new(
        &bootstrap.control_plane_url,
        bootstrap.control_plane_ca_pem.as_deref(),
    )?;

    let addr = SocketAddr::new(args.bind, bootstrap.agent_port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| AgentError::Bind { addr, source })?;
    tracing::info!(%instance_id, %addr, model = %bootstrap.model, control_plane = %bootstrap.control_plane_url, "agent starting");

    let cancel = CancellationToken::new();
    let session = Session::new(args.heartbeat_interval_ms);
    let (events, event_rx) = EventReporter::new(instance_id);
    let (engine_tx, engine_rx) = watch::channel(EngineState::default());
    let gpus = gpu::GpuThread::start(
        args.gpu,
        &bootstrap.gpu,
        seed_of(instance_id),
        load_real_nvml,
        NVML_START_DEADLINE,
        Duration::from_millis(args.gpu_sample_deadline_ms.max(1)),
    )
    .await?;
    let stats = Arc::new(metrics::AgentStats::default());
    let hostname = sysinfo::System::host_name().unwrap_or_default();
    let probe = EngineProbe::new(args.bind, bootstrap.engine.port(), bootstrap.model.clone());

    let mut tasks = tokio::task::JoinSet::new();
    let server_state = Arc::new(server::ServerState {
        instance_id,
        model: bootstrap.model.clone(),
        gpu_source: gpus.source(),
        started,
        engine: engine_rx.clone(),
        stats: stats.clone(),
        host: Arc::new(Mutex::new(metrics::HostCollector::new())),
        hostname: hostname.clone(),
        session: session.clone(),
    });
    let server = {
        let cancel = cancel.clone();
        axum::serve(listener, server::router(server_state))
            .with_graceful_shutdown(async move { cancel.cancelled().await })
    };
    let server = tokio::spawn(async move { server.await.map_err(AgentError::Serve) });

    tasks.spawn(
        Registrar {
            session: session.clone(),
            client: client.clone(),
            data_dir: data_dir.clone(),
            request: RegisterRequest {
                instance_id,
                bootstrap_secret: bootstrap.bootstrap_secret.clone(),
                agent_version: VERSION.to_string(),
                hostname,
            },
            events: events.clone(),
            instance_id,
        }
        .run(cancel.clone()),
    );
    tasks.spawn(events::deliver(
        event_rx,
        session.clone(),
        client.clone(),
        instance_id,
        cancel.clone(),
    ));
    let env_client = client.clone();
    let (canary_tx, canary_rx) = watch::channel(None);
    let beat_now = Arc::new(tokio::sync::Notify::new());
    tasks.spawn(
        CanaryLoop {
            instance_id,
            probe: probe.clone(),
            engine: engine_rx.clone(),
            session: session.clone(),
            events: events.clone(),
            result: canary_tx,
            beat_now: beat_now.clone(),
        }
        .run(cancel.clone()),
    );
    tasks.spawn(
        HeartbeatLoop {
            instance_id,
            session: session.clone(),
            client,
            system: Arc::new(Mutex::new(SystemSampler::new(data_dir.path()))),
            gpus,
            events: events.clone(),
            gpu_fault: None,
            engine: engine_rx,
            probe: probe.clone(),
            started,
            stats,
            last_counters: None,
            canary: canary_rx,
            beat_now,
        }
        .run(cancel.clone()),
    );
    let supervisor = {
        let cancel = cancel.clone();
        let mut request = LaunchRequest {
            spec: bootstrap.engine.clone(),
            host: args.bind,
            model: bootstrap.model.clone(),
            data_dir: data_dir.path().to_path_buf(),
            env: Vec::new(),
            tls: None,
            extra_args: bootstrap.engine_args.clone(),
        };
        tokio::spawn(async move {
            // A real engine may need secrets (a Hugging Face token) that
            // never travel in user data: it starts once they arrived.
            if request.spec.needs_secrets() {
                let Some(env) =
                    session::engine_env(&session, &env_client, instance_id, &cancel).await
                else {
                    return;
                };
                request.env = env.env.into_iter().collect();
                // Off the control plane's host, the engine serves mutual
                // TLS: its certificate is known to the control plane (so
                // the router) before it starts, and the agent's probes speak
                // https with a client certificate of their own.
                if let Some(grant) = env.engine_tls {
                    let tls = match engine::tls::prepare(&request.data_dir, &grant) {
                        Ok(t) => t,
                        Err(e) => {
                            tracing::error!(%instance_id, error = %client::chain(&e), "cannot set up the engine's TLS; not starting it");
                            return;
                        }
                    };
                    if !session::report_engine_cert(
                        &session,
                        &env_client,
                        instance_id,
                        &tls.cert_pem,
                        &cancel,
                    )
                    .await
                    {
                        return;
                    }
                    if let Err(e) = probe.use_tls(&tls.cert_pem, &tls.client_identity_pem) {
                        tracing::error!(%instance_id, error = %client::chain(&e), "cannot set up the engine probe's TLS; not starting the engine");
                        return;
                    }
                    request.tls = Some(tls.files);
                }
            }
            Supervisor {
                launcher,
                request,
                probe,
                state: engine_tx,
                events,
                policy,
                instance_id,
            }
            .run(cancel)
            .await
        })
    };

    let mut server = server;
    let outcome = tokio::select! {
        () = shutdown => Ok(()),
        res = &mut server => match res {
            Ok(Err(e)) => Err(e),
            _ => Ok(()),
        },
    };
    tracing::info!(%instance_id, "agent shutting down");
    cancel.cancel();
    if supervisor.await.is_err() {
        tracing::error!(%instance_id, "engine supervisor panicked");
    }
    let _ = tokio::time::timeout(TASK_STOP_DEADLINE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    if !server.is_finished() {
        let _ = tokio::time::timeout(TASK_STOP_DEADLINE, &mut server).await;
        server.abort();
    }
    tracing::info!(%instance_id, "agent stopped");
    outcome
}

/// How long NVML gets to start (`nvmlInit`, the device count).
const NVML_START_DEADLINE: Duration = Duration::from_secs(20);

fn load_real_nvml() -> Result<Box<dyn nvml::NvmlBackend>, nvml::NvmlCallError> {
    nvml::RealNvml::init().map(|n| Box::new(n) as Box<dyn nvml::NvmlBackend>)
}

/// `gpufleet agent-once`: one GPU sample per `mode`, as the agent's
/// `/metrics` would show it (DCGM families) followed by the heartbeat's
/// JSON, for checking a GPU machine by hand. Needs no control plane.
pub async fn sample_once(mode: GpuMode, deadline: Duration) -> Result<String, AgentError> {
    let spec = gpufleet_domain::GpuSpec {
        model: "simulated".into(),
        count: 1,
        vram_mib: 1024,
        power_limit_w: 100.0,
    };
    let mut gpus = gpu::GpuThread::start(
        mode,
        &spec,
        1,
        load_real_nvml,
        NVML_START_DEADLINE,
        deadline,
    )
    .await?;
    let reading = gpus
        .sample(&EngineLoad::default(), Duration::from_secs(1))
        .await;
    let agent = metrics::AgentFigures {
        hostname: sysinfo::System::host_name().unwrap_or_default(),
        version: VERSION.to_string(),
        instance_id: String::new(),
        model: String::new(),
        gpu_source: gpus.source(),
        uptime_secs: 0.0,
        heartbeats_sent: 0,
        heartbeats_failed: 0,
        engine_status: gpufleet_proto::EngineStatus::Stopped,
        engine_restarts: 0,
        gpu_faults: u64::from(reading.fault.is_some()),
        gpu_fault: reading.fault.as_ref().map(ToString::to_string),
    };
    let text = metrics::render(&agent, &reading.gpus, &metrics::HostFigures::default());
    let dcgm: String = text
        .lines()
        .filter(|l| l.contains("DCGM_FI_") || l.contains("gpufleet_agent_gpu_fault"))
        .map(|l| format!("{l}\n"))
        .collect();
    let json = serde_json::to_string_pretty(&serde_json::json!({
        "gpu_source": gpus.source(),
        "fault": reading.fault.as_ref().map(ToString::to_string),
        "gpus": reading.gpus,
    }))
    .unwrap_or_default();
    Ok(format!("{dcgm}{json}\n"))
}

/// A stable seed per instance, so its simulated GPUs are reproducible.
fn seed_of(id: gpufleet_domain::InstanceId) -> u64 {
    let v = id.as_uuid().as_u128();
    (v as u64) ^ ((v >> 64) as u64)
}
