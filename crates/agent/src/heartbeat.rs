//! The heartbeat loop: sample host, GPUs and engine, send, repeat.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpufleet_domain::InstanceId;
use gpufleet_proto::{
    AgentEventKind, CanarySample, EngineSample, EngineStatus, Heartbeat, SystemSample,
};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::client::{chain, CallError, ControlPlane};
use crate::engine::probe::EngineProbe;
use crate::engine::EngineState;
use crate::events::EventReporter;
use crate::gpu::{EngineLoad, GpuFault, GpuThread};
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
    /// GPU figures, sampled on their own thread within a deadline.
    pub gpus: GpuThread,
    /// GPU faults and recoveries go on the timeline through these.
    pub events: EventReporter,
    /// The GPU fault in force, if any.
    pub gpu_fault: Option<GpuFault>,
    pub engine: watch::Receiver<EngineState>,
    pub probe: EngineProbe,
    pub started: Instant,
    /// Heartbeat counters and the latest GPU sample, for `/metrics`.
    pub stats: Arc<AgentStats>,
    /// The engine's counters at the previous heartbeat, for rates.
    pub last_counters: Option<(Instant, EngineGauges)>,
    /// The engine canary's latest result ([`crate::engine::canary`]).
    pub canary: watch::Receiver<Option<CanarySample>>,
    /// Notified when the canary's verdict flips: beat now, not at the next tick.
    pub beat_now: Arc<Notify>,
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
                () = self.beat_now.notified() => {}
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
                        self.session
                            .set_canary_ms(ack.canary_interval_ms, ack.canary_timeout_ms);
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

    /// Puts a GPU fault, and its end, on the instance's timeline (once each).
    fn note_fault(&mut self, fault: Option<&GpuFault>) {
        match (fault, self.gpu_fault.take()) {
            (Some(f), None) => {
                tracing::error!(instance_id = %self.instance_id, fault = %f, "GPU fault");
                self.events.report(AgentEventKind::GpuFault, f.to_string());
                self.gpu_fault = Some(f.clone());
            }
            (Some(f), Some(prev)) => {
                if *f != prev {
                    self.events.report(AgentEventKind::GpuFault, f.to_string());
                }
                self.gpu_fault = Some(f.clone());
            }
            (None, Some(prev)) => {
                tracing::info!(instance_id = %self.instance_id, after = %prev, "GPU figures read again");
                self.events.report(
                    AgentEventKind::GpuRecovered,
                    format!("GPU figures read again after: {prev}"),
                );
            }
            (None, None) => {}
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
        let system = {
            let sampler = self.system.clone();
            async move {
                tokio::task::spawn_blocking(move || {
                    sampler.lock().map(|mut s| s.sample()).unwrap_or_default()
                })
                .await
                .unwrap_or_else(|_| SystemSample::default())
            }
        };
        // GPUs (on their own thread, within their deadline) and host figures
        // side by side.
        let (reading, system) = tokio::join!(self.gpus.sample(&load, elapsed), system);
        self.note_fault(reading.fault.as_ref());
        let gpus = reading.gpus;
        self.stats
            .set_gpus(&gpus, reading.fault.as_ref().map(GpuFault::to_string));
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
                canary: self.canary.borrow().clone(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{mpsc, Arc, Mutex};

    use axum::extract::State;
    use axum::routing::post;
    use axum::{Json, Router};
    use gpufleet_domain::GpuSpec;
    use gpufleet_proto::{paths, AgentEvent, HeartbeatAck};

    use super::*;
    use crate::gpu::GpuMode;
    use crate::nvml::fake::{FakeDevice, FakeNvml};
    use crate::nvml::{NvmlBackend, NvmlCallError};

    #[derive(Default)]
    struct Received {
        heartbeats: Vec<Heartbeat>,
        events: Vec<AgentEvent>,
    }
    type Shared = Arc<Mutex<Received>>;

    async fn heartbeat(State(r): State<Shared>, Json(hb): Json<Heartbeat>) -> Json<HeartbeatAck> {
        r.lock().unwrap().heartbeats.push(hb);
        Json(HeartbeatAck {
            applied: true,
            heartbeat_interval_ms: 0,
            canary_interval_ms: 0,
            canary_timeout_ms: 0,
        })
    }
    async fn event(State(r): State<Shared>, Json(ev): Json<AgentEvent>) -> Json<serde_json::Value> {
        r.lock().unwrap().events.push(ev);
        Json(serde_json::json!({}))
    }

    /// Waits until `cond` holds over what the fake control plane received.
    async fn until(r: &Shared, what: &str, cond: impl Fn(&Received) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if cond(&r.lock().unwrap()) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_hung_gpu_call_costs_the_figures_not_the_heartbeat() {
        let received: Shared = Arc::default();
        let app = Router::new()
            .route(paths::HEARTBEAT, post(heartbeat))
            .route(paths::EVENTS, post(event))
            .with_state(received.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });

        // NVML whose every device lookup blocks until the test lets it go.
        let (release, gate) = mpsc::channel::<()>();
        let gate = Arc::new(Mutex::new(gate));
        let backend = move || -> Result<Box<dyn NvmlBackend>, NvmlCallError> {
            Ok(Box::new(FakeNvml {
                hang: Some(gate),
                ..FakeNvml::with(vec![Some(FakeDevice::h100(0))])
            }))
        };
        let spec = GpuSpec {
            model: "x".into(),
            count: 1,
            vram_mib: 1,
            power_limit_w: 1.0,
        };
        let gpus = GpuThread::start(
            GpuMode::Nvml,
            &spec,
            1,
            backend,
            Duration::from_secs(10),
            Duration::from_millis(100),
        )
        .await
        .unwrap();
        let instance_id = InstanceId::new();
        let session = Session::new(Some(20));
        session.set_token("t");
        let (events, event_rx) = EventReporter::new(instance_id);
        let client = ControlPlane::new(&url, None).unwrap();
        let cancel = CancellationToken::new();
        tokio::spawn(crate::events::deliver(
            event_rx,
            session.clone(),
            client.clone(),
            instance_id,
            cancel.clone(),
        ));
        let stats = Arc::new(AgentStats::default());
        let dir = tempfile::tempdir().unwrap();
        let (_engine_tx, engine_rx) = watch::channel(EngineState::default());
        let hb_loop = HeartbeatLoop {
            instance_id,
            session,
            client,
            system: Arc::new(Mutex::new(SystemSampler::new(dir.path()))),
            gpus,
            events,
            gpu_fault: None,
            engine: engine_rx,
            probe: EngineProbe::new(
                std::net::Ipv4Addr::LOCALHOST.into(),
                9,
                "org/model".parse().unwrap(),
            ),
            started: Instant::now(),
            stats: stats.clone(),
            last_counters: None,
            canary: watch::channel(None).1,
            beat_now: Arc::default(),
        };
        tokio::spawn(hb_loop.run(cancel.clone()));

        // Heartbeats keep going out, without GPU figures; one fault on the timeline.
        until(&received, "heartbeats during the hang", |r| {
            r.heartbeats.len() >= 3
        })
        .await;
        until(&received, "the fault event", |r| {
            r.events.iter().any(|e| e.kind == AgentEventKind::GpuFault)
        })
        .await;
        {
            let r = received.lock().unwrap();
            assert!(
                r.heartbeats.iter().all(|h| h.gpus.is_empty()),
                "no stale figures"
            );
            let faults = r
                .events
                .iter()
                .filter(|e| e.kind == AgentEventKind::GpuFault)
                .count();
            assert_eq!(
                faults, 1,
                "one fault, not one per heartbeat: {:?}",
                r.events
            );
        }
        assert!(stats
            .gpu_fault_reason()
            .is_some_and(|m| m.contains("100 ms")));
        assert_eq!(
            stats.gpu_faults.load(std::sync::atomic::Ordering::Relaxed),
            1
        );

        // The driver answers again: figures come back, and so does a recovery event.
        drop(release);
        until(&received, "a heartbeat with GPU figures", |r| {
            r.heartbeats.iter().any(|h| h.gpus.len() == 1)
        })
        .await;
        until(&received, "the recovery event", |r| {
            r.events
                .iter()
                .any(|e| e.kind == AgentEventKind::GpuRecovered)
        })
        .await;
        assert_eq!(stats.gpu_fault_reason(), None);
        cancel.cancel();
    }
}
