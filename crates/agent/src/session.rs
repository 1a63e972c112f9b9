//! Registration and the token every later call carries.
//!
//! The registrar task obtains a token (from `<data-dir>/agent-token`, else by
//! registering with the one-time bootstrap secret), persists it, and
//! publishes it. A call that gets 401 hands the token back with
//! [`Session::reject`], which makes the registrar try again, with backoff,
//! for as long as the agent runs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use gpufleet_domain::InstanceId;
use gpufleet_proto::{AgentEventKind, EngineCert, EngineEnv, RegisterRequest};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::client::{chain, CallError, ControlPlane};
use crate::config::{clamp_interval_ms, DataDir, DEFAULT_HEARTBEAT_INTERVAL};
use crate::events::EventReporter;
use crate::token;

const REGISTER_BACKOFF_BASE: Duration = Duration::from_millis(250);
const REGISTER_BACKOFF_MAX: Duration = Duration::from_secs(5);

pub struct Session {
    token: watch::Sender<Option<String>>,
    interval_ms: AtomicU64,
    interval_override: bool,
    /// The engine canary's period and timeout as the control plane asks
    /// (0: off, until it says otherwise).
    canary_interval_ms: AtomicU64,
    canary_timeout_ms: AtomicU64,
}

impl Session {
    pub fn new(interval_override_ms: Option<u64>) -> Arc<Self> {
        let default_ms = DEFAULT_HEARTBEAT_INTERVAL.as_millis() as u64;
        Arc::new(Self {
            token: watch::Sender::new(None),
            interval_ms: AtomicU64::new(clamp_interval_ms(
                interval_override_ms.unwrap_or(default_ms),
            )),
            interval_override: interval_override_ms.is_some(),
            canary_interval_ms: AtomicU64::new(0),
            canary_timeout_ms: AtomicU64::new(0),
        })
    }

    /// The engine canary's period and timeout; `None` while it is off.
    pub fn canary(&self) -> Option<(Duration, Duration)> {
        let interval = self.canary_interval_ms.load(Ordering::Relaxed);
        let timeout = self.canary_timeout_ms.load(Ordering::Relaxed);
        (interval > 0 && timeout > 0).then(|| {
            (
                Duration::from_millis(interval),
                Duration::from_millis(timeout.min(interval)),
            )
        })
    }

    /// Adopts the canary settings the control plane sends (0: off).
    pub fn set_canary_ms(&self, interval_ms: u64, timeout_ms: u64) {
        self.canary_interval_ms
            .store(interval_ms, Ordering::Relaxed);
        self.canary_timeout_ms.store(timeout_ms, Ordering::Relaxed);
    }

    pub fn current_token(&self) -> Option<String> {
        self.token.borrow().clone()
    }

    /// Waits for a token; `None` once cancelled.
    pub async fn wait_token(&self, cancel: &CancellationToken) -> Option<String> {
        let mut rx = self.token.subscribe();
        tokio::select! {
            () = cancel.cancelled() => None,
            t = rx.wait_for(Option::is_some) => t.ok().and_then(|t| t.clone()),
        }
    }

    /// The control plane refused `token`: forget it so the registrar tries again.
    pub fn reject(&self, token: &str) {
        self.token.send_if_modified(|cur| {
            if cur.as_deref() == Some(token) {
                *cur = None;
                true
            } else {
                false
            }
        });
    }

    /// Tests: as if registration had handed out `token`.
    #[cfg(test)]
    pub fn set_token(&self, token: &str) {
        self.token.send_replace(Some(token.to_string()));
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms.load(Ordering::Relaxed))
    }

    /// Adopts the period the control plane asks for, unless overridden by flag.
    pub fn set_heartbeat_interval_ms(&self, ms: u64) {
        if !self.interval_override && ms > 0 {
            self.interval_ms
                .store(clamp_interval_ms(ms), Ordering::Relaxed);
        }
    }
}

pub struct Registrar {
    pub session: Arc<Session>,
    pub client: ControlPlane,
    pub data_dir: DataDir,
    pub request: RegisterRequest,
    pub events: EventReporter,
    pub instance_id: InstanceId,
}

impl Registrar {
    pub async fn run(self, cancel: CancellationToken) {
        let instance_id = self.instance_id;
        let path = self.data_dir.token_file();
        match token::load(&path) {
            Ok(Some(t)) => {
                tracing::info!(%instance_id, "using the stored agent token");
                self.session.token.send_replace(Some(t));
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(%instance_id, error = %chain(&e), "stored token unreadable; registering")
            }
        }
        let mut announced = false;
        let mut rx = self.session.token.subscribe();
        loop {
            if self.session.current_token().is_none() {
                let Some(token) = self.register(&cancel).await else {
                    return;
                };
                self.session.token.send_replace(Some(token));
            }
            if !announced {
                announced = true;
                self.events.report(
                    AgentEventKind::AgentStarted,
                    format!("agent {} started", env!("CARGO_PKG_VERSION")),
                );
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                r = rx.wait_for(Option::is_none) => if r.is_err() { return },
            }
            tracing::error!(%instance_id, "control plane rejected the agent token (401); registering again");
        }
    }

    /// Registers until it works (or the agent stops), persisting the token
    /// before returning it.
    async fn register(&self, cancel: &CancellationToken) -> Option<String> {
        let instance_id = self.instance_id;
        let mut backoff = Backoff::new(REGISTER_BACKOFF_BASE, REGISTER_BACKOFF_MAX);
        let token = loop {
            match self.client.register(&self.request).await {
                Ok(resp) => {
                    self.session
                        .set_heartbeat_interval_ms(resp.heartbeat_interval_ms);
                    self.session
                        .set_canary_ms(resp.canary_interval_ms, resp.canary_timeout_ms);
                    tracing::info!(%instance_id, heartbeat_interval_ms = resp.heartbeat_interval_ms, canary_interval_ms = resp.canary_interval_ms, "registered with the control plane");
                    break resp.token;
                }
                Err(e @ CallError::Unreachable(_)) => {
                    tracing::warn!(%instance_id, error = %chain(&e), "control plane unreachable; will retry registration");
                }
                Err(e) => {
                    tracing::error!(
                        %instance_id,
                        error = %chain(&e),
                        "REGISTRATION REJECTED: the bootstrap secret may already have been used; retrying"
                    );
                }
            }
            if !sleep_or_cancel(backoff.next_delay(), cancel).await {
                return None;
            }
        };
        let path = self.data_dir.token_file();
        let mut backoff = Backoff::new(REGISTER_BACKOFF_BASE, REGISTER_BACKOFF_MAX);
        loop {
            match token::persist(&path, &token) {
                Ok(()) => return Some(token),
                Err(e) => {
                    tracing::error!(%instance_id, error = %chain(&e), "cannot persist the agent token; retrying")
                }
            }
            if !sleep_or_cancel(backoff.next_delay(), cancel).await {
                return None;
            }
        }
    }
}

/// Sleeps; false when cancelled first.
pub async fn sleep_or_cancel(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        () = cancel.cancelled() => false,
        () = tokio::time::sleep(d) => true,
    }
}

/// The engine's secret environment (and its TLS grant, for machines off the
/// control plane's host), fetched over the authenticated channel once the
/// agent has a token; retried until it arrives. `None` once cancelled.
pub async fn engine_env(
    session: &Session,
    client: &ControlPlane,
    instance_id: InstanceId,
    cancel: &CancellationToken,
) -> Option<EngineEnv> {
    let mut backoff = Backoff::new(REGISTER_BACKOFF_BASE, REGISTER_BACKOFF_MAX);
    loop {
        let token = session.wait_token(cancel).await?;
        match client.engine_env(&token).await {
            Ok(env) => {
                // Names only: the values are secrets.
                let names: Vec<&str> = env.env.keys().map(String::as_str).collect();
                let tls = env.engine_tls.is_some();
                tracing::info!(%instance_id, ?names, tls, "received the engine's environment");
                return Some(env);
            }
            Err(CallError::Unauthorized) => session.reject(&token),
            // A control plane without the route (older than this agent)
            // has no secrets to give.
            Err(CallError::Rejected { status, .. }) if status == reqwest::StatusCode::NOT_FOUND => {
                tracing::warn!(%instance_id, "the control plane hands out no engine environment (404); starting the engine without it");
                return Some(EngineEnv::default());
            }
            Err(e) => {
                tracing::warn!(%instance_id, error = %chain(&e), "cannot fetch the engine's environment; retrying")
            }
        }
        if !sleep_or_cancel(backoff.next_delay(), cancel).await {
            return None;
        }
    }
}

/// Report the certificate the engine will serve; retried until the control
/// plane has it (the router must know it before the engine can be ready).
/// `false` once cancelled.
pub async fn report_engine_cert(
    session: &Session,
    client: &ControlPlane,
    instance_id: InstanceId,
    cert_pem: &str,
    cancel: &CancellationToken,
) -> bool {
    let cert = EngineCert {
        cert_pem: cert_pem.to_string(),
    };
    let mut backoff = Backoff::new(REGISTER_BACKOFF_BASE, REGISTER_BACKOFF_MAX);
    loop {
        let Some(token) = session.wait_token(cancel).await else {
            return false;
        };
        match client.engine_cert(&token, &cert).await {
            Ok(()) => {
                tracing::info!(%instance_id, "reported the engine's TLS certificate");
                return true;
            }
            Err(CallError::Unauthorized) => session.reject(&token),
            Err(e) => {
                tracing::warn!(%instance_id, error = %chain(&e), "cannot report the engine's TLS certificate; retrying")
            }
        }
        if !sleep_or_cancel(backoff.next_delay(), cancel).await {
            return false;
        }
    }
}
