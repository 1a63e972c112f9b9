//! The agent's own HTTP server: `/healthz`, `/readyz`, `/info`, `/metrics`.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use gpufleet_domain::{InstanceId, ModelName};
use gpufleet_proto::{AgentInfo, EngineStatus, GpuSource};
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

async fn readyz(State(state): State<Arc<ServerState>>) -> Response {
    let engine = *state.engine.borrow();
    let reason = match engine.status {
        EngineStatus::Ready => {
            return (StatusCode::OK, Json(json!({"ready": true}))).into_response()
        }
        EngineStatus::Stopped => "engine not started",
        EngineStatus::Starting => "engine starting: model not served yet",
        EngineStatus::Crashed => "engine crashed; restarting",
    };
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"ready": false, "engine_status": engine.status, "reason": reason})),
    )
        .into_response()
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
