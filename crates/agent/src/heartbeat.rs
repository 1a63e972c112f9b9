//! The heartbeat loop: sample host, GPUs and engine, send, repeat.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpufleet_domain::InstanceId;
use gpufleet_proto::{EngineSample, EngineStatus, Heartbeat, SystemSample};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::client::{chain, CallError, ControlPlane};
use crate::engine::probe::EngineProbe;
use crate::engine::EngineState;
use crate::gpu::{EngineLoad, GpuSampler};
use crate::metrics::AgentStats;
use crate::scrape::{EngineGauges, EngineRates};
use crate::session::Session;
use crate::system::SystemSampler;

/// The first `seq` of this agent process: the Unix time in milliseconds, so
/// that a restarted agent continues above its predecessor.
pub fn initial_seq() -> u64 {
    u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0)
}

pub struct HeartbeatLoop {
    pub instance_id: InstanceId,
    pub session: Arc<Session>,
    pub client: ControlPlane,
    pub system: Arc<Mutex<SystemSampler>>,
    pub gpus: Box<dyn GpuSampler>,
    pub engine: watch::Receiver<EngineState>,
    pub probe: EngineProbe,
    pub started: Instant,
    /// Heartbeat counters and the latest GPU sample, for `/metrics`.
    pub stats: Arc<AgentStats>,
    /// The engine's counters at the previous heartbeat, for rates.
    pub last_counters: Option<(Instant, EngineGauges)>,
}

impl HeartbeatLoop {
    pub async fn run(mut self, cancel: CancellationToken) {
        let instance_id = self.instance_id;
        let mut seq = initial_seq();
        let mut last_sample = Instant::now();
        let mut next = Instant::now();
        loop {
            // Before the first token, beat as soon as registration succeeds.
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep_until(next) => {}
                Some(_) = async { self.session.wait_token(&cancel).await }, if self.session.current_token().is_none() => {}
            }
            let tick = Instant::now();
            let hb = self.build(seq, tick.duration_since(last_sample)).await;
            last_sample = tick;
            next = tick + self.session.heartbeat_interval();
            let Some(token) = self.session.current_token() else {
                tracing::debug!(%instance_id, "not registered yet; heartbeat not sent");
                continue;
            };
            seq += 1;
            match self.client.heartbeat(&token, &hb).await {
                Ok(ack) => {
                    self.stats.sent();
                    if let Some(ack) = ack {
                        self.session
                            .set_heartbeat_interval_ms(ack.heartbeat_interval_ms);
                        if !ack.applied {
                            tracing::warn!(%instance_id, seq = hb.seq, "control plane ignored the heartbeat as stale");
                        }
                    }
                    next = tick + self.session.heartbeat_interval();
                }
                Err(CallError::Unauthorized) => {
                    self.stats.failed();
                    tracing::error!(%instance_id, "CONTROL PLANE REJECTED THE AGENT TOKEN (401); registering again");
                    self.session.reject(&token);
                }
                Err(e) => {
                    self.stats.failed();
                    tracing::warn!(%instance_id, seq = hb.seq, error = %chain(&e), "heartbeat failed; will retry next tick")
                }
            }
        }
    }

    async fn build(&mut self, seq: u64, elapsed: Duration) -> Heartbeat {
        let engine = *self.engine.borrow();
        let gauges = match engine.status {
            EngineStatus::Ready | EngineStatus::Starting => self.probe.gauges().await.ok(),
            EngineStatus::Stopped | EngineStatus::Crashed => None,
        }
        .unwrap_or_default();
        let now = Instant::now();
        let rates = match &self.last_counters {
            Some((at, prev)) => EngineRates::between(prev, &gauges, (now - *at).as_secs_f64()),
            None => EngineRates::default(),
        };
        self.last_counters = Some((now, gauges));
        let load = EngineLoad {
            loaded: engine.status == EngineStatus::Ready,
            requests_running: gauges.requests_running,
            requests_waiting: gauges.requests_waiting,
        };
        let gpus = self.gpus.sample(&load, elapsed);
        self.stats.set_gpus(&gpus);
        let system = {
            let sampler = self.system.clone();
            tokio::task::spawn_blocking(move || {
                sampler.lock().map(|mut s| s.sample()).unwrap_or_default()
            })
            .await
            .unwrap_or_else(|_| SystemSample::default())
        };
        Heartbeat {
            instance_id: self.instance_id,
            seq,
            sent_at: chrono::Utc::now(),
            agent_version: crate::VERSION.to_string(),
            agent_uptime_secs: self.started.elapsed().as_secs(),
            system,
            gpu_source: self.gpus.source(),
            gpus,
            engine: EngineSample {
                status: engine.status,
                requests_running: gauges.requests_running,
                requests_waiting: gauges.requests_waiting,
                restarts: engine.restarts,
                kv_cache_usage: gauges.kv_cache_usage,
                prompt_tokens_per_s: rates.prompt_tokens_per_s,
                generation_tokens_per_s: rates.generation_tokens_per_s,
                ttft_mean_s: rates.ttft_mean_s,
            },
        }
    }
}
