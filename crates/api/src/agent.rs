//! Endpoints the worker agents call (`/internal/v1/agent/...`). Not under the
//! admin token: registration trades the one-time bootstrap secret for an agent
//! token, and every later call carries that token ([`AgentAuth`]).

use crate::auth::AgentAuth;
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::views::ErrorBody;
use crate::SharedState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use gpufleet_proto::{
    AgentEvent, EngineCert, EngineEnv, Heartbeat, HeartbeatAck, RegisterRequest, RegisterResponse,
};

/// Trade the bootstrap secret for an agent token (shown once).
#[utoipa::path(
    post, path = "/internal/v1/agent/register", tag = "agent",
    request_body = RegisterRequest,
    responses(
        (status = 200, description = "Registered", body = RegisterResponse),
        (status = 400, description = "Malformed body", body = ErrorBody),
        (status = 401, description = "Unknown instance, wrong or used secret", body = ErrorBody),
        (status = 413, description = "Body over 256 KiB", body = ErrorBody),
        (status = 415, description = "The body is not `Content-Type: application/json`", body = ErrorBody),
    )
)]
pub async fn register(
    State(state): State<SharedState>,
    ApiJson(req): ApiJson<RegisterRequest>,
) -> Result<Json<RegisterResponse>, ApiError> {
    Ok(Json(state.agents.register_agent(req).await?))
}

/// A heartbeat from the agent of the token's instance.
#[utoipa::path(
    post, path = "/internal/v1/agent/heartbeat", tag = "agent",
    request_body = Heartbeat,
    responses(
        (status = 200, description = "Received (`applied` false when stale)", body = HeartbeatAck),
        (status = 400, description = "Malformed body, or impossible figures (`field` names one, e.g. `gpus[0].util_pct`); nothing stored", body = ErrorBody),
        (status = 401, description = "Missing or unknown agent token", body = ErrorBody),
        (status = 403, description = "The heartbeat names another instance", body = ErrorBody),
        (status = 413, description = "Body over 256 KiB", body = ErrorBody),
        (status = 415, description = "The body is not `Content-Type: application/json`", body = ErrorBody),
        (status = 503, description = "Too many heartbeats queued; retry", body = ErrorBody),
    ),
    security(("agent_token" = []))
)]
pub async fn heartbeat(
    State(state): State<SharedState>,
    AgentAuth(agent): AgentAuth,
    ApiJson(hb): ApiJson<Heartbeat>,
) -> Result<Json<HeartbeatAck>, ApiError> {
    // An agent token speaks for its own instance only: the service answers 403.
    Ok(Json(state.agents.ingest_heartbeat(agent, hb).await?))
}

/// Something the agent wants on its instance's timeline.
#[utoipa::path(
    post, path = "/internal/v1/agent/events", tag = "agent",
    request_body = AgentEvent,
    responses(
        (status = 204, description = "Recorded"),
        (status = 400, description = "Malformed body", body = ErrorBody),
        (status = 401, description = "Missing or unknown agent token", body = ErrorBody),
        (status = 413, description = "Body over 256 KiB", body = ErrorBody),
        (status = 415, description = "The body is not `Content-Type: application/json`", body = ErrorBody),
    ),
    security(("agent_token" = []))
)]
pub async fn events(
    State(state): State<SharedState>,
    AgentAuth(agent): AgentAuth,
    ApiJson(ev): ApiJson<AgentEvent>,
) -> Result<StatusCode, ApiError> {
    state.agents.record_agent_event(agent, ev).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The secret environment of the token's instance's engine (e.g.
/// `HF_TOKEN`): handed over this authenticated channel, never in user data.
#[utoipa::path(
    post, path = "/internal/v1/agent/engine-env", tag = "agent",
    responses(
        (status = 200, description = "The engine's environment", body = EngineEnv),
        (status = 401, description = "Missing or unknown agent token", body = ErrorBody),
        (status = 404, description = "The instance is gone", body = ErrorBody),
    ),
    security(("agent_token" = []))
)]
pub async fn engine_env(
    State(state): State<SharedState>,
    AgentAuth(agent): AgentAuth,
) -> Result<Json<EngineEnv>, ApiError> {
    Ok(Json(state.agents.engine_env(agent).await?))
}

/// The certificate the engine of the token's instance serves (mutual TLS
/// for engines off the control plane's host): the router trusts it alone.
#[utoipa::path(
    post, path = "/internal/v1/agent/engine-cert", tag = "agent",
    request_body = EngineCert,
    responses(
        (status = 204, description = "Recorded"),
        (status = 400, description = "Malformed body, or not a PEM certificate", body = ErrorBody),
        (status = 401, description = "Missing or unknown agent token", body = ErrorBody),
        (status = 404, description = "The instance is gone", body = ErrorBody),
        (status = 413, description = "Body over 256 KiB", body = ErrorBody),
        (status = 415, description = "The body is not `Content-Type: application/json`", body = ErrorBody),
    ),
    security(("agent_token" = []))
)]
pub async fn engine_cert(
    State(state): State<SharedState>,
    AgentAuth(agent): AgentAuth,
    ApiJson(cert): ApiJson<EngineCert>,
) -> Result<StatusCode, ApiError> {
    state.agents.record_engine_cert(agent, cert).await?;
    Ok(StatusCode::NO_CONTENT)
}
