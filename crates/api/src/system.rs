//! The system explains itself: liveness and background task statuses.

use crate::views::{ErrorBody, Health, TaskList};
use crate::SharedState;
use axum::extract::State;
use axum::Json;

/// Liveness (no auth).
#[utoipa::path(
    get, path = "/healthz", tag = "system",
    responses((status = 200, description = "The process serves requests", body = Health))
)]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".to_string(),
    })
}

/// Last status of every background reconciler.
#[utoipa::path(
    get, path = "/api/v1/system/tasks", tag = "system",
    responses(
        (status = 200, description = "Task statuses", body = TaskList),
        (status = 401, description = "Missing or wrong admin token", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn tasks(State(state): State<SharedState>) -> Json<TaskList> {
    Json(TaskList {
        tasks: state.tasks.statuses(),
    })
}
