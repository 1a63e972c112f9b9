//! The engine canary: a real one-token completion every `canary_interval_ms`
//! while the engine is ready.
//!
//! `/health` answers from the engine's HTTP layer; an engine whose
//! scheduler or GPU hangs (a known vLLM failure mode) keeps answering it
//! while no request ever completes. Only a real request shows that. The
//! latest result goes out with every heartbeat; when the verdict flips
//! (pass → fail, fail → pass) the heartbeat goes out at once and an agent
//! event puts it on the timeline, so the control plane takes the instance
//! out of the router's pool within about one interval plus the timeout. While
//! it fails it checks again a second after each failure, so a recovered
//! engine is back within about one timeout.
//!
//! The canary does not run while the engine is not ready (starting,
//! restarting): the engine status already says so, and its result is
//! cleared then.

use std::sync::Arc;
use std::time::Duration;

use gpufleet_domain::InstanceId;
use gpufleet_proto::{AgentEventKind, CanarySample, EngineStatus};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::probe::{human, EngineProbe};
use super::EngineState;
use crate::events::EventReporter;
use crate::session::Session;

/// How often the canary looks again at its settings while it is off.
const OFF_RECHECK: Duration = Duration::from_secs(1);
/// Pause between two checks while the canary fails.
const RETRY_WHILE_FAILING: Duration = Duration::from_secs(1);

pub struct CanaryLoop {
    pub instance_id: InstanceId,
    pub probe: EngineProbe,
    pub engine: watch::Receiver<EngineState>,
    /// The canary's period and timeout, as the control plane sent them.
    pub session: Arc<Session>,
    pub events: EventReporter,
    /// The latest result, read by the heartbeat.
    pub result: watch::Sender<Option<CanarySample>>,
    /// Notified when the verdict flips.
    pub beat_now: Arc<Notify>,
}

impl CanaryLoop {
    pub async fn run(mut self, cancel: CancellationToken) {
        loop {
            let ready = self.engine.borrow_and_update().status == EngineStatus::Ready;
            let settings = self.session.canary();
            let Some((interval, timeout)) = settings.filter(|_| ready) else {
                // Off, or the engine is not ready: nothing to report.
                self.clear();
                tokio::select! {
                    () = cancel.cancelled() => return,
                    r = self.engine.changed() => if r.is_err() { return },
                    () = tokio::time::sleep(OFF_RECHECK) => {}
                }
                continue;
            };
            let started = Instant::now();
            let outcome = tokio::select! {
                () = cancel.cancelled() => return,
                o = self.probe.canary(timeout) => o,
            };
            // The engine left `ready` meanwhile (a crash, a restart): that
            // is the engine status's news, not the canary's.
            if self.engine.borrow().status != EngineStatus::Ready {
                continue;
            }
            self.record(outcome, timeout);
            // While it fails, look again soon: a recovered engine is back
            // within about one timeout, not one interval.
            let failing = self.result.borrow().as_ref().is_some_and(|r| !r.ok);
            let next = if failing {
                Instant::now() + interval.min(RETRY_WHILE_FAILING)
            } else {
                started + interval
            };
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep_until(next) => break,
                    r = self.engine.changed() => {
                        if r.is_err() {
                            return;
                        }
                        if self.engine.borrow_and_update().status != EngineStatus::Ready {
                            break;
                        }
                    }
                }
            }
        }
    }

    /// Forget the last result (the engine is not ready, or the canary is off).
    fn clear(&self) {
        self.result.send_if_modified(|r| r.take().is_some());
    }

    fn record(&self, outcome: Result<Duration, super::probe::CanaryFailure>, timeout: Duration) {
        let instance_id = self.instance_id;
        let previous = self.result.borrow().clone();
        let failures_before = previous.as_ref().map_or(0, |p| p.consecutive_failures);
        let sample = match outcome {
            Ok(answered) => CanarySample {
                ok: true,
                checked_at: chrono::Utc::now(),
                latency_ms: Some(answered.as_secs_f64() * 1000.0),
                error: None,
                consecutive_failures: 0,
            },
            Err(f) => CanarySample {
                ok: false,
                checked_at: chrono::Utc::now(),
                latency_ms: f.answered.map(|d| d.as_secs_f64() * 1000.0),
                error: Some(f.reason),
                consecutive_failures: failures_before.saturating_add(1),
            },
        };
        let was_ok = previous.as_ref().map(|p| p.ok);
        match (was_ok, sample.ok) {
            // First failure, or after passing: report at once.
            (None | Some(true), false) => {
                let reason = sample.error.clone().unwrap_or_default();
                tracing::error!(%instance_id, %reason, timeout = %human(timeout), "engine canary failed");
                self.events.report(
                    AgentEventKind::EngineCanaryFailed,
                    format!("engine canary failed: {reason}"),
                );
                self.beat_now.notify_one();
            }
            (Some(false), true) => {
                let ms = sample.latency_ms.unwrap_or_default();
                tracing::info!(%instance_id, latency_ms = ms, after = failures_before, "engine canary passes again");
                self.events.report(
                    AgentEventKind::EngineCanaryPassed,
                    format!(
                        "engine canary passes again (answered in {ms:.0} ms after {failures_before} failed checks)"
                    ),
                );
                self.beat_now.notify_one();
            }
            // The first pass: the next heartbeat carries it.
            (None, true) => {
                tracing::debug!(%instance_id, latency_ms = sample.latency_ms, "engine canary passed");
            }
            (Some(true), true) | (Some(false), false) => {}
        }
        self.result.send_replace(Some(sample));
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicU8, Ordering};

    use axum::extract::State;
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    use axum::routing::{get, post};
    use axum::{Json, Router};

    use super::*;

    /// How the fake engine answers `/v1/completions` (`/health` always 200).
    const ANSWER: u8 = 0;
    const HANG: u8 = 1;
    const FAIL_500: u8 = 2;
    const NO_CHOICE: u8 = 3;

    async fn completions(
        State(mode): State<Arc<AtomicU8>>,
        Json(body): Json<serde_json::Value>,
    ) -> axum::response::Response {
        assert_eq!(body["max_tokens"], 1);
        assert_eq!(body["model"], "org/model");
        match mode.load(Ordering::SeqCst) {
            ANSWER => Json(serde_json::json!({
                "object": "text_completion",
                "choices": [{"index": 0, "text": "!", "finish_reason": "length"}]
            }))
            .into_response(),
            HANG => {
                std::future::pending::<()>().await;
                unreachable!()
            }
            FAIL_500 => (StatusCode::INTERNAL_SERVER_ERROR, "engine dead").into_response(),
            _ => Json(serde_json::json!({"choices": []})).into_response(),
        }
    }

    async fn fake_engine(mode: Arc<AtomicU8>) -> SocketAddr {
        let app = Router::new()
            .route("/health", get(|| async { StatusCode::OK }))
            .route("/v1/completions", post(completions))
            .with_state(mode);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    fn probe_of(addr: SocketAddr) -> EngineProbe {
        EngineProbe::new(addr.ip(), addr.port(), "org/model".parse().unwrap())
    }

    #[tokio::test]
    async fn the_check_passes_fails_and_says_why() {
        let mode = Arc::new(AtomicU8::new(ANSWER));
        let addr = fake_engine(mode.clone()).await;
        let probe = probe_of(addr);
        let t = Duration::from_millis(300);
        assert!(probe.canary(t).await.is_ok());

        mode.store(HANG, Ordering::SeqCst);
        let started = Instant::now();
        let f = probe.canary(t).await.unwrap_err();
        assert_eq!(f.reason, "no answer within 300 ms");
        assert_eq!(f.answered, None);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "bounded by the timeout"
        );

        mode.store(FAIL_500, Ordering::SeqCst);
        let f = probe.canary(t).await.unwrap_err();
        assert_eq!(f.reason, "HTTP 500: engine dead");
        assert!(f.answered.is_some());

        mode.store(NO_CHOICE, Ordering::SeqCst);
        let f = probe.canary(t).await.unwrap_err();
        assert_eq!(f.reason, "the answer has no choice");

        // Nothing listens there any more.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let f = probe_of(closed).canary(t).await.unwrap_err();
        assert!(
            f.reason.starts_with("cannot connect to the engine: "),
            "{}",
            f.reason
        );
    }

    #[tokio::test]
    async fn a_flip_beats_at_once_and_goes_on_the_timeline() {
        let mode = Arc::new(AtomicU8::new(ANSWER));
        let addr = fake_engine(mode.clone()).await;
        let instance_id = InstanceId::new();
        let session = Session::new(None);
        session.set_canary_ms(100, 50);
        let (events, mut event_rx) = EventReporter::new(instance_id);
        let (engine_tx, engine_rx) = watch::channel(EngineState::default());
        let (result_tx, mut result) = watch::channel(None);
        let beat_now = Arc::new(Notify::new());
        let cancel = CancellationToken::new();
        tokio::spawn(
            CanaryLoop {
                instance_id,
                probe: probe_of(addr),
                engine: engine_rx,
                session: session.clone(),
                events,
                result: result_tx,
                beat_now: beat_now.clone(),
            }
            .run(cancel.clone()),
        );
        let deadline = Duration::from_secs(10);
        let until = |result: &mut watch::Receiver<Option<CanarySample>>,
                     what: &'static str,
                     cond: fn(&Option<CanarySample>) -> bool| {
            let mut result = result.clone();
            async move {
                tokio::time::timeout(deadline, result.wait_for(cond))
                    .await
                    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
                    .map(|r| r.clone())
                    .unwrap()
            }
        };

        // Not while the engine is not ready.
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(*result.borrow_and_update(), None);

        engine_tx.send_modify(|s| s.status = EngineStatus::Ready);
        let passed = until(&mut result, "a pass", |r| r.as_ref().is_some_and(|c| c.ok)).await;
        assert!(passed.unwrap().latency_ms.is_some());

        // The engine hangs: one failure event, a beat right away.
        mode.store(HANG, Ordering::SeqCst);
        let failed = until(&mut result, "a failure", |r| {
            r.as_ref().is_some_and(|c| !c.ok)
        })
        .await
        .unwrap();
        assert_eq!(failed.error.as_deref(), Some("no answer within 50 ms"));
        tokio::time::timeout(deadline, beat_now.notified())
            .await
            .expect("a heartbeat right away");
        let ev = tokio::time::timeout(deadline, event_rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ev.kind, AgentEventKind::EngineCanaryFailed);
        assert_eq!(ev.message, "engine canary failed: no answer within 50 ms");
        let counted = until(&mut result, "failures counted", |r| {
            r.as_ref().is_some_and(|c| c.consecutive_failures >= 3)
        })
        .await;
        assert!(!counted.unwrap().ok);
        assert!(event_rx.try_recv().is_err(), "one event, not one per check");

        // It answers again.
        mode.store(ANSWER, Ordering::SeqCst);
        until(&mut result, "a pass again", |r| {
            r.as_ref().is_some_and(|c| c.ok)
        })
        .await;
        let ev = tokio::time::timeout(deadline, event_rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ev.kind, AgentEventKind::EngineCanaryPassed);

        // The engine restarts: the result is cleared, nothing is sent.
        engine_tx.send_modify(|s| s.status = EngineStatus::Starting);
        until(&mut result, "the result cleared", |r| r.is_none()).await;
        // Turned off: nothing runs even when ready.
        session.set_canary_ms(0, 0);
        engine_tx.send_modify(|s| s.status = EngineStatus::Ready);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(*result.borrow(), None);
        cancel.cancel();
    }
}
