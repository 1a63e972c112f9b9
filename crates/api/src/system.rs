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

/// Readiness for load balancers (no auth): 200 while this replica reaches
/// its database within a second, 503 otherwise. A replica cut off from the
/// database answers nothing useful (its requests wait for a connection);
/// a load balancer that checks this sends its traffic elsewhere.
#[utoipa::path(
    get, path = "/readyz", tag = "system",
    responses(
        (status = 200, description = "The database answers", body = Health),
        (status = 503, description = "The database does not answer within a second", body = Health),
    )
)]
pub async fn readyz(State(state): State<SharedState>) -> (axum::http::StatusCode, Json<Health>) {
    let ping = tokio::time::timeout(
        std::time::Duration::from_secs(1),
        state.fleet.store().ping(),
    )
    .await;
    match ping {
        Ok(Ok(())) => (
            axum::http::StatusCode::OK,
            Json(Health {
                status: "ok".to_string(),
            }),
        ),
        _ => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            Json(Health {
                status: "database unreachable".to_string(),
            }),
        ),
    }
}

/// Last status of every background reconciler.
#[utoipa::path(
    get, path = "/api/v1/system/tasks", tag = "system",
    responses(
        (status = 200, description = "Task statuses", body = TaskList),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Not the admin token", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn tasks(
    State(state): State<SharedState>,
    caller: crate::auth::Caller,
) -> Result<Json<TaskList>, crate::ApiError> {
    caller.require_admin()?;
    Ok(Json(TaskList {
        tasks: state.tasks.statuses(),
    }))
}
