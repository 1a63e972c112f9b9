//! What can be created: providers, their instance types, models.

use crate::error::ApiError;
use crate::views::{ErrorBody, InstanceTypeList, ModelList, ModelView, ProviderList, ProviderView};
use crate::SharedState;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::Json;
use gpufleet_domain::{InstanceStatus, ProviderName};
use gpufleet_store::InstanceFilter;
use std::collections::HashMap;

/// Registered providers with their zones.
#[utoipa::path(
    get, path = "/api/v1/providers", tag = "catalog",
    responses(
        (status = 200, description = "Providers", body = ProviderList),
        (status = 401, description = "Missing or wrong admin token", body = ErrorBody),
        (status = 503, description = "A provider's catalog is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn providers(State(state): State<SharedState>) -> Result<Json<ProviderList>, ApiError> {
    let names = state.catalogs.provider_names();
    let catalogs =
        futures::future::try_join_all(names.iter().map(|n| state.catalogs.catalog(n.as_str())))
            .await?;
    let providers = names
        .iter()
        .zip(catalogs)
        .map(|(name, catalog)| ProviderView {
            name: name.to_string(),
            instance_type_count: catalog.instance_types.len(),
            zones: catalog.zones,
        })
        .collect();
    Ok(Json(ProviderList { providers }))
}

/// A provider's instance types.
#[utoipa::path(
    get, path = "/api/v1/providers/{name}/instance-types", tag = "catalog",
    params(("name" = ProviderName, Path, description = "Provider name, e.g. `mock`")),
    responses(
        (status = 200, description = "Instance types", body = InstanceTypeList),
        (status = 400, description = "Malformed provider name", body = ErrorBody),
        (status = 401, description = "Missing or wrong admin token", body = ErrorBody),
        (status = 404, description = "No such provider", body = ErrorBody),
        (status = 503, description = "The provider's catalog is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn instance_types(
    State(state): State<SharedState>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<InstanceTypeList>, ApiError> {
    let Path(raw) = name.map_err(|r| ApiError::invalid("name", r.body_text()))?;
    let name: ProviderName = raw
        .parse()
        .map_err(|e| ApiError::invalid("name", format!("{e}")))?;
    let catalog = state.catalogs.catalog(name.as_str()).await?;
    Ok(Json(InstanceTypeList {
        provider: name.to_string(),
        instance_types: catalog.instance_types,
    }))
}

/// Models instances may serve, with how many ready instances of the
/// caller's projects serve each.
#[utoipa::path(
    get, path = "/api/v1/models", tag = "catalog",
    responses(
        (status = 200, description = "Models", body = ModelList),
        (status = 401, description = "Not signed in", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn models(
    State(state): State<SharedState>,
    caller: crate::auth::Caller,
) -> Result<Json<ModelList>, ApiError> {
    // Ready instances of the projects the caller may read only.
    let ready = state
        .fleet
        .list_instances(&InstanceFilter {
            statuses: vec![InstanceStatus::Ready],
            projects: caller.project_filter(None),
            ..InstanceFilter::default()
        })
        .await?;
    let mut per_model: HashMap<&str, u32> = HashMap::new();
    for rec in &ready {
        *per_model.entry(rec.model.as_str()).or_default() += 1;
    }
    let models = state
        .catalogs
        .models()
        .iter()
        .map(|m| ModelView {
            name: m.name.to_string(),
            description: m.description.clone(),
            min_vram_mib: m.min_vram_mib,
            ready_instances: per_model.get(m.name.as_str()).copied().unwrap_or(0),
        })
        .collect();
    Ok(Json(ModelList { models }))
}
