//! `/api/v1/deployments`: create, list, get, patch, delete, timeline.

use crate::audit::AuditTarget;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::{ApiJson, ApiQuery, DeploymentIdPath};
use crate::instances::parse_project_opt;
use crate::views::{
    CreateDeploymentBody, DeploymentEventView, DeploymentList, DeploymentTimeline, DeploymentView,
    ErrorBody, InstanceView, PatchDeploymentBody,
};
use crate::SharedState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use gpufleet_control::{CreateDeployment, DeploymentPatch};
use gpufleet_domain::{DeploymentId, DeploymentSpec, ModelName, Permission};
use serde::Deserialize;

const EVENTS_DEFAULT_LIMIT: i64 = 100;
const EVENTS_MAX_LIMIT: i64 = 1000;

/// Declare a deployment; its replicas start in the background.
#[utoipa::path(
    post, path = "/api/v1/deployments", tag = "deployments",
    request_body = CreateDeploymentBody,
    responses(
        (status = 201, description = "Deployment recorded; its replicas start", body = DeploymentView),
        (status = 400, description = "Malformed JSON, or invalid input; `field` names it (e.g. `replicas.min` above max, `model` unknown, `placements[1].instance_type` unknown or too small for the model)", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Your role does not allow this", body = ErrorBody),
        (status = 409, description = "A deployment with this name exists", body = ErrorBody),
        (status = 413, description = "Body over 1 MiB", body = ErrorBody),
        (status = 415, description = "The body is not `Content-Type: application/json`", body = ErrorBody),
        (status = 503, description = "A provider's catalog is unavailable; retry", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create(
    State(state): State<SharedState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateDeploymentBody>,
) -> Result<(StatusCode, Extension<AuditTarget>, Json<DeploymentView>), ApiError> {
    let asked = parse_project_opt(body.project.as_deref(), "project")?;
    let model: ModelName = body
        .model
        .parse()
        .map_err(|e| ApiError::invalid("model", format!("{e}")))?;
    let spec = DeploymentSpec {
        placements: body.placements,
        replicas: body.replicas,
        autoscaling: body.autoscaling.unwrap_or_default(),
        scale_to_zero_after: body.scale_to_zero_after,
        engine_args: body.engine_args,
    };
    let project = caller.project_for_create(asked, Permission::Operate)?;
    let rec = state
        .deployments
        .create(CreateDeployment {
            project: project.clone(),
            name: body.name,
            model,
            spec,
        })
        .await?;
    Ok((
        StatusCode::CREATED,
        Extension(
            AuditTarget::new(rec.id, Some(&project))
                .with_message(format!("deployment {} of {} created", rec.name, rec.model)),
        ),
        Json(DeploymentView::from(&rec)),
    ))
}

/// The deployment, if the caller may do `need` in its project; another
/// project's answers as a missing one.
async fn reach(
    state: &SharedState,
    caller: &Caller,
    id: DeploymentId,
    need: Permission,
) -> Result<gpufleet_store::DeploymentRecord, ApiError> {
    let rec = state.deployments.get(id).await?;
    caller.check(&rec.project_id, need, || {
        ApiError::not_found(format!("deployment {id} not found"))
    })?;
    Ok(rec)
}

/// Query of `GET /api/v1/deployments`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Include deleted deployments (default false).
    pub include_deleted: Option<bool>,
    /// Only this project's deployments.
    #[param(value_type = Option<String>, pattern = "^[a-z0-9][a-z0-9-]{0,38}$")]
    pub project: Option<String>,
}

/// List deployments, oldest first.
#[utoipa::path(
    get, path = "/api/v1/deployments", tag = "deployments",
    params(ListParams),
    responses(
        (status = 200, description = "Deployments", body = DeploymentList),
        (status = 400, description = "Bad query parameter", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Your role does not allow this", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<SharedState>,
    caller: Caller,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<Json<DeploymentList>, ApiError> {
    let projects = caller.project_filter(parse_project_opt(params.project.as_deref(), "project")?);
    let mut records = state
        .deployments
        .list(params.include_deleted.unwrap_or(false))
        .await?;
    if let Some(ps) = projects {
        records.retain(|d| ps.contains(&d.project_id));
    }
    Ok(Json(DeploymentList {
        deployments: records.iter().map(DeploymentView::from).collect(),
    }))
}

/// One deployment, with its instances.
#[utoipa::path(
    get, path = "/api/v1/deployments/{id}", tag = "deployments",
    params(("id" = DeploymentId, Path, description = "Deployment id, `d-` and 32 lowercase hex digits")),
    responses(
        (status = 200, description = "The deployment and its instances", body = DeploymentView),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Your role does not allow this", body = ErrorBody),
        (status = 404, description = "No such deployment", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get(
    State(state): State<SharedState>,
    caller: Caller,
    DeploymentIdPath(id): DeploymentIdPath,
) -> Result<Json<DeploymentView>, ApiError> {
    let rec = reach(&state, &caller, id, Permission::Read).await?;
    let instances = state.deployments.instances(id).await?;
    let mut view = DeploymentView::from(&rec);
    view.instances = Some(instances.iter().map(InstanceView::from).collect());
    Ok(Json(view))
}

/// Change replica bounds, autoscaling, the scale-to-zero delay or the name.
#[utoipa::path(
    patch, path = "/api/v1/deployments/{id}", tag = "deployments",
    params(("id" = DeploymentId, Path, description = "Deployment id")),
    request_body = PatchDeploymentBody,
    responses(
        (status = 200, description = "The deployment as changed", body = DeploymentView),
        (status = 400, description = "Malformed JSON or id, or invalid input naming the field (`placements` and `engine_args` cannot change yet)", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Your role does not allow this", body = ErrorBody),
        (status = 404, description = "No such deployment", body = ErrorBody),
        (status = 409, description = "Being deleted, or the new name is taken", body = ErrorBody),
        (status = 413, description = "Body over 1 MiB", body = ErrorBody),
        (status = 415, description = "The body is not `Content-Type: application/json`", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn patch(
    State(state): State<SharedState>,
    caller: Caller,
    DeploymentIdPath(id): DeploymentIdPath,
    ApiJson(body): ApiJson<PatchDeploymentBody>,
) -> Result<(Extension<AuditTarget>, Json<DeploymentView>), ApiError> {
    reach(&state, &caller, id, Permission::Operate).await?;
    let message = format!(
        "changed: {}",
        [
            body.name.as_ref().map(|_| "name"),
            body.replicas.as_ref().map(|_| "replicas"),
            body.autoscaling.as_ref().map(|_| "autoscaling"),
            body.scale_to_zero_after
                .as_ref()
                .map(|_| "scale_to_zero_after"),
            body.placements.as_ref().map(|_| "placements"),
            body.engine_args.as_ref().map(|_| "engine_args"),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(", ")
    );
    let rec = state
        .deployments
        .patch(
            id,
            DeploymentPatch {
                name: body.name,
                replicas: body.replicas,
                autoscaling: body.autoscaling,
                scale_to_zero_after: body.scale_to_zero_after.map(Some),
                placements: body.placements,
                engine_args: body.engine_args.map(Some),
            },
        )
        .await?;
    Ok((
        Extension(AuditTarget::new(id, Some(&rec.project_id)).with_message(message)),
        Json(DeploymentView::from(&rec)),
    ))
}

/// Delete: its instances drain, then terminate; then it is marked deleted.
/// Idempotent.
#[utoipa::path(
    delete, path = "/api/v1/deployments/{id}", tag = "deployments",
    params(("id" = DeploymentId, Path, description = "Deployment id")),
    responses(
        (status = 202, description = "Deletion under way (or done)", body = DeploymentView),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Your role does not allow this", body = ErrorBody),
        (status = 404, description = "No such deployment", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn delete(
    State(state): State<SharedState>,
    caller: Caller,
    DeploymentIdPath(id): DeploymentIdPath,
) -> Result<(StatusCode, Extension<AuditTarget>, Json<DeploymentView>), ApiError> {
    reach(&state, &caller, id, Permission::Operate).await?;
    let rec = state.deployments.delete(id).await?;
    Ok((
        StatusCode::ACCEPTED,
        Extension(AuditTarget::new(id, Some(&rec.project_id))),
        Json(DeploymentView::from(&rec)),
    ))
}

/// Query of `GET /api/v1/deployments/{id}/events`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsParams {
    /// Only entries with an id above this (for paging / following).
    pub after: Option<i64>,
    /// At most this many entries (default 100; more than 1000 reads as 1000).
    #[param(minimum = 1)]
    pub limit: Option<i64>,
}

/// The deployment's timeline (every decision with its reason), oldest first.
#[utoipa::path(
    get, path = "/api/v1/deployments/{id}/events", tag = "deployments",
    params(("id" = DeploymentId, Path, description = "Deployment id"), EventsParams),
    responses(
        (status = 200, description = "Timeline", body = DeploymentTimeline),
        (status = 400, description = "Malformed id or query", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Your role does not allow this", body = ErrorBody),
        (status = 404, description = "No such deployment", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn timeline(
    State(state): State<SharedState>,
    caller: Caller,
    DeploymentIdPath(id): DeploymentIdPath,
    ApiQuery(params): ApiQuery<EventsParams>,
) -> Result<Json<DeploymentTimeline>, ApiError> {
    let limit = params.limit.unwrap_or(EVENTS_DEFAULT_LIMIT);
    if limit < 1 {
        return Err(ApiError::invalid(
            "limit",
            format!("limit must be at least 1, got {limit}"),
        ));
    }
    reach(&state, &caller, id, Permission::Read).await?;
    let events = state
        .deployments
        .events(id, params.after, limit.min(EVENTS_MAX_LIMIT))
        .await?;
    Ok(Json(DeploymentTimeline {
        deployment_id: id,
        events: events.iter().map(DeploymentEventView::from).collect(),
    }))
}
