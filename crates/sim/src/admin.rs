//! `GET /admin/config` (the knobs in force) and `PATCH /admin/config`
//! (change some of them while the simulator runs).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::Json;

use crate::error::ApiError;
use crate::knobs::{Knobs, KnobsPatch};
use crate::state::SimState;

pub async fn get_config(State(state): State<Arc<SimState>>) -> Json<Knobs> {
    Json((*state.knobs()).clone())
}

pub async fn patch_config(
    State(state): State<Arc<SimState>>,
    body: Bytes,
) -> Result<Json<Knobs>, ApiError> {
    let patch: KnobsPatch = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("Invalid knobs: {e}")))?;
    let knobs = state
        .knobs()
        .patched(&patch)
        .map_err(|e| ApiError::bad_param(e.field, e.to_string()))?;
    state.set_knobs(knobs.clone());
    tracing::info!(?patch, "simulator knobs changed");
    Ok(Json(knobs))
}
