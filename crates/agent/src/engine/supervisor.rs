//! Keeps the engine running: launch, probe until ready, restart with
//! exponential backoff when it exits, stop it on shutdown.

use std::sync::Arc;
use std::time::Duration;

use gpufleet_domain::InstanceId;
use gpufleet_proto::{AgentEventKind, EngineStatus};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::probe::EngineProbe;
use super::{EngineLauncher, EngineProcess, EngineState, LaunchRequest};
use crate::backoff::Backoff;
use crate::events::EventReporter;

/// Probe interval while the engine is starting.
const STARTUP_PROBE_INTERVAL: Duration = Duration::from_millis(50);

/// Timings of the supervisor.
#[derive(Debug, Clone)]
pub struct RestartPolicy {
    pub probe_interval: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Running this long resets the backoff.
    pub healthy_reset: Duration,
    /// Between SIGTERM and SIGKILL on shutdown.
    pub stop_grace: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            probe_interval: Duration::from_millis(500),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
            healthy_reset: Duration::from_secs(60),
            stop_grace: Duration::from_secs(5),
        }
    }
}

pub struct Supervisor {
    pub launcher: Arc<dyn EngineLauncher>,
    pub request: LaunchRequest,
    pub probe: EngineProbe,
    pub state: watch::Sender<EngineState>,
    pub events: EventReporter,
    pub policy: RestartPolicy,
    pub instance_id: InstanceId,
}

enum Ended {
    /// The engine exited after serving the model for this long.
    Exited {
        healthy_for: Duration,
    },
    Shutdown,
}

impl Supervisor {
    fn set_status(&self, status: EngineStatus, pid: Option<u32>) {
        self.state.send_modify(|s| {
            s.status = status;
            s.pid = pid;
        });
    }

    pub async fn run(self, cancel: CancellationToken) {
        let instance_id = self.instance_id;
        let mut backoff = Backoff::new(self.policy.backoff_base, self.policy.backoff_max);
        loop {
            let healthy_for = match self.launcher.launch(&self.request).await {
                Ok(mut engine) => {
                    let pid = engine.pid();
                    self.set_status(EngineStatus::Starting, pid);
                    self.events.report(
                        AgentEventKind::EngineStarted,
                        match pid {
                            Some(pid) => format!("engine started (pid {pid})"),
                            None => "engine started".to_string(),
                        },
                    );
                    match self.watch(engine.as_mut(), &cancel).await {
                        Ended::Shutdown => {
                            tracing::info!(%instance_id, "stopping the engine");
                            engine.stop(self.policy.stop_grace).await;
                            self.set_status(EngineStatus::Stopped, None);
                            return;
                        }
                        Ended::Exited { healthy_for } => healthy_for,
                    }
                }
                Err(e) => {
                    tracing::error!(%instance_id, error = %crate::client::chain(&e), "cannot launch the engine");
                    self.set_status(EngineStatus::Crashed, None);
                    Duration::ZERO
                }
            };
            if healthy_for >= self.policy.healthy_reset {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            self.events.report(
                AgentEventKind::EngineRestarting,
                format!("restarting the engine in {} ms", delay.as_millis()),
            );
            tokio::select! {
                () = cancel.cancelled() => {
                    self.set_status(EngineStatus::Stopped, None);
                    return;
                }
                () = tokio::time::sleep(delay) => {}
            }
            self.state.send_modify(|s| s.restarts += 1);
        }
    }

    /// Probes the engine until it exits or the agent shuts down.
    async fn watch(&self, engine: &mut dyn EngineProcess, cancel: &CancellationToken) -> Ended {
        let instance_id = self.instance_id;
        let pid = engine.pid();
        let mut ready_since: Option<Instant> = None;
        loop {
            // Probe often while the engine loads, so readiness is seen at
            // once; then at the configured pace.
            let pause = if self.state.borrow().status == EngineStatus::Ready {
                self.policy.probe_interval
            } else {
                self.policy.probe_interval.min(STARTUP_PROBE_INTERVAL)
            };
            tokio::select! {
                () = cancel.cancelled() => return Ended::Shutdown,
                exit = engine.wait() => {
                    tracing::error!(%instance_id, ?pid, code = ?exit.code, "engine {}", exit.description);
                    self.set_status(EngineStatus::Crashed, None);
                    self.events.report(AgentEventKind::EngineExited, format!("engine {}", exit.description));
                    return Ended::Exited { healthy_for: ready_since.map(|t| t.elapsed()).unwrap_or_default() };
                }
                () = tokio::time::sleep(pause) => {
                    let status = self.state.borrow().status;
                    match (self.probe.serves_model().await, status) {
                        (Ok(()), EngineStatus::Starting) => {
                            tracing::info!(%instance_id, ?pid, "engine ready");
                            self.set_status(EngineStatus::Ready, pid);
                            ready_since = Some(Instant::now());
                            self.events.report(AgentEventKind::EngineReady, format!("engine serves {}", self.request.model));
                        }
                        (Err(e), EngineStatus::Ready) => {
                            tracing::warn!(%instance_id, ?pid, error = %crate::client::chain(&e), "engine stopped serving the model");
                            self.set_status(EngineStatus::Starting, pid);
                            ready_since = None;
                        }
                        (Err(e), _) => tracing::debug!(%instance_id, error = %crate::client::chain(&e), "engine not ready yet"),
                        (Ok(()), _) => {}
                    }
                }
            }
        }
    }
}
