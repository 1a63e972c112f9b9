//! Admin HTTP API under `/emulator/v1/` (no token): fault rules,
//! availability, locks, the request log and everything that exists.
//!
//! - `GET    /emulator/v1/faults`                    → `{"rules": [{"id", "rule", "fired"}]}`
//! - `POST   /emulator/v1/faults`  body: a `FaultRule` → `{"id": N}`
//! - `DELETE /emulator/v1/faults`                    → 204, every rule removed
//! - `DELETE /emulator/v1/faults/{id}`               → 204 or 404
//! - `PUT    /emulator/v1/availability/{type}` body `{"availability": "available|scarce|shortage"}` → 204
//! - `PUT    /emulator/v1/servers/{id}/lock` body `{"locked": true|false}` → 204
//! - `GET    /emulator/v1/requests`                  → `{"counts": {"GET /route": N}, "log": [...]}`
//! - `DELETE /emulator/v1/requests`                  → 204, log and counts emptied
//! - `GET    /emulator/v1/state`                     → `{"servers", "ips", "volumes", "security_groups"}`

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::faults::{Availability, FaultRule};
use crate::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/faults",
            get(list_faults).post(add_fault).delete(clear_faults),
        )
        .route("/faults/{id}", delete(remove_fault))
        .route("/availability/{commercial_type}", put(set_availability))
        .route("/servers/{id}/lock", put(lock))
        .route("/requests", get(requests).delete(reset_requests))
        .route("/state", get(state))
}

async fn list_faults(State(app): State<AppState>) -> Json<Value> {
    Json(json!({ "rules": app.faults.rules() }))
}

async fn add_fault(State(app): State<AppState>, Json(rule): Json<FaultRule>) -> Json<Value> {
    Json(json!({ "id": app.faults.add(rule) }))
}

async fn clear_faults(State(app): State<AppState>) -> StatusCode {
    app.faults.clear();
    StatusCode::NO_CONTENT
}

async fn remove_fault(State(app): State<AppState>, Path(id): Path<u64>) -> StatusCode {
    if app.faults.remove(id) {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::NOT_FOUND
    }
}

#[derive(Deserialize)]
struct AvailabilityBody {
    availability: Availability,
}

async fn set_availability(
    State(app): State<AppState>,
    Path(t): Path<String>,
    Json(b): Json<AvailabilityBody>,
) -> StatusCode {
    app.faults.set_availability(&t, b.availability);
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct LockBody {
    locked: bool,
}

async fn lock(
    State(app): State<AppState>,
    Path(id): Path<String>,
    Json(b): Json<LockBody>,
) -> StatusCode {
    app.faults.lock_server(&id, b.locked);
    let mut st = app.state.lock().unwrap();
    if let Some(s) = st.servers.get_mut(&id) {
        s.locked = b.locked;
    }
    StatusCode::NO_CONTENT
}

async fn requests(State(app): State<AppState>) -> Json<Value> {
    Json(json!({ "counts": app.faults.request_counts(), "log": app.faults.request_log() }))
}

async fn reset_requests(State(app): State<AppState>) -> StatusCode {
    app.faults.reset_log();
    StatusCode::NO_CONTENT
}

async fn state(State(app): State<AppState>) -> Response {
    let st = app.state.lock().unwrap();
    let sgs: Vec<Value> = st
        .sg_order
        .iter()
        .filter_map(|id| st.security_groups.get(id))
        .map(|sg| st.sg_json(sg))
        .collect();
    Json(json!({
        "servers": st.server_infos(&app.vms),
        "ips": st.ip_infos(),
        "volumes": st.volume_infos(),
        "security_groups": sgs,
    }))
    .into_response()
}
