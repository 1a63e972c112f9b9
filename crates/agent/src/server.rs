//! The agent's own HTTP server: `/healthz`, `/readyz`, `/info`.

use std::sync::Arc;

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

pub struct ServerState {
    pub instance_id: InstanceId,
    pub model: ModelName,
    pub gpu_source: GpuSource,
    pub started: Instant,
    pub engine: watch::Receiver<EngineState>,
}

pub fn router(state: Arc<ServerState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/info", get(info))
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
