//! The agent's own HTTP server: `/healthz`, `/readyz`, `/info`, `/metrics`.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use gpufleet_domain::{InstanceId, ModelName};
use gpufleet_proto::{identity, AgentInfo, EngineStatus, GpuSource, Readiness};
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::engine::EngineState;
use crate::metrics::{AgentFigures, AgentStats, HostCollector};

pub struct ServerState {
    pub instance_id: InstanceId,
    pub model: ModelName,
    pub gpu_source: GpuSource,
    pub started: Instant,
    pub engine: watch::Receiver<EngineState>,
    pub stats: Arc<AgentStats>,
    pub host: Arc<Mutex<HostCollector>>,
    pub hostname: String,
    /// The agent's token (proves identity to readiness probes).
    pub session: Arc<crate::session::Session>,
}

pub fn router(state: Arc<ServerState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/info", get(info))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

#[derive(serde::Deserialize)]
struct ReadyQuery {
    challenge: Option<String>,
}

/// 200 once the engine serves the model, else 503; with a `challenge`, the
/// answer proves it comes from this instance's own agent
/// ([`gpufleet_proto::identity`]).
async fn readyz(State(state): State<Arc<ServerState>>, Query(q): Query<ReadyQuery>) -> Response {
    let engine = *state.engine.borrow();
    let reason = match engine.status {
        EngineStatus::Ready => None,
        EngineStatus::Stopped => Some("engine not started"),
        EngineStatus::Starting => Some("engine starting: model not served yet"),
        EngineStatus::Crashed => Some("engine crashed; restarting"),
    };
    let proof = q.challenge.as_deref().and_then(|challenge| {
        let token = state.session.current_token()?;
        Some(identity::readiness_proof(
            &identity::token_digest(&token),
            state.instance_id,
            challenge,
        ))
    });
    let status = if reason.is_none() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Readiness {
        ready: reason.is_none(),
        instance_id: state.instance_id,
        reason: reason.map(str::to_string),
        proof,
    };
    (status, Json(body)).into_response()
}

async fn info(State(state): State<Arc<ServerState>>) -> Json<AgentInfo> {
    Json(AgentInfo {
        version: crate::VERSION.to_string(),
        instance_id: state.instance_id,
        uptime_secs: state.started.elapsed().as_secs(),
        gpu_source: state.gpu_source,
        engine_status: state.engine.borrow().status,
        model: state.model.clone(),
    })
}

/// Prometheus text format 0.0.4 (see [`crate::metrics`]).
async fn metrics(State(state): State<Arc<ServerState>>) -> Response {
    let host = state.host.clone();
    let host = tokio::task::spawn_blocking(move || {
        host.lock().map(|mut h| h.collect()).unwrap_or_default()
    })
    .await
    .unwrap_or_default();
    let engine = *state.engine.borrow();
    let agent = AgentFigures {
        hostname: state.hostname.clone(),
        version: crate::VERSION.to_string(),
        instance_id: state.instance_id.to_string(),
        model: state.model.to_string(),
        gpu_source: state.gpu_source,
        uptime_secs: state.started.elapsed().as_secs_f64(),
        heartbeats_sent: state.stats.heartbeats_sent.load(Ordering::Relaxed),
        heartbeats_failed: state.stats.heartbeats_failed.load(Ordering::Relaxed),
        engine_status: engine.status,
        engine_restarts: engine.restarts,
        gpu_faults: state.stats.gpu_faults.load(Ordering::Relaxed),
        gpu_fault: state.stats.gpu_fault_reason(),
    };
    let body = crate::metrics::render(&agent, &state.stats.gpus(), &host);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}
