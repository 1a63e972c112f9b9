//! Marketplace API v2: `GET /marketplace/v2/local-images` (public, no token
//! needed), shaped like the recorded answers.

use axum::extract::{Path, Query};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};

use crate::api::{query_get, QueryPairs};
use crate::errors::{ApiError, ApiResult};
use crate::instance::IMAGES;
use crate::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/marketplace/v2/local-images", get(list))
        .route("/marketplace/v2/local-images/{id}", get(get_one))
}

const GPU_TYPES: &[&str] = &[
    "L4-1-24G",
    "L4-2-24G",
    "L4-4-24G",
    "L4-8-24G",
    "L40S-1-48G",
    "L40S-2-48G",
    "L40S-4-48G",
    "L40S-8-48G",
    "RENDER-S",
    "H100-1-M",
    "H100-2-M",
    "H100-1-80G",
    "H100-2-80G",
    "H100-SXM-1-80G",
    "H100-SXM-2-80G",
    "H100-SXM-4-80G",
    "H100-SXM-8-80G",
    "B300-SXM-1-288G",
    "B300-SXM-2-288G",
    "B300-SXM-4-288G",
    "B300-SXM-8-288G",
];

const CPU_TYPES: &[&str] = &[
    "DEV1-L",
    "DEV1-M",
    "DEV1-S",
    "DEV1-XL",
    "GP1-L",
    "GP1-M",
    "GP1-S",
    "GP1-XL",
    "GP1-XS",
    "PRO2-XXS",
    "PRO2-XS",
    "PRO2-S",
    "PRO2-M",
    "PRO2-L",
    "PLAY2-MICRO",
    "PLAY2-NANO",
    "PLAY2-PICO",
    "POP2-2C-8G",
    "POP2-4C-16G",
    "POP2-8C-32G",
    "POP2-16C-64G",
    "POP2-32C-128G",
];

fn image_json(label: &str, id: &str, gpu: bool, zone: &str, image_type: &str) -> Value {
    let types = if gpu { GPU_TYPES } else { CPU_TYPES };
    json!({"id": id, "arch": "x86_64", "zone": zone, "compatible_commercial_types": types,
           "label": label, "type": image_type})
}

async fn list(Query(q): Query<QueryPairs>) -> ApiResult<Response> {
    let zone = query_get(&q, "zone").unwrap_or("fr-par-1");
    let image_type = query_get(&q, "type").unwrap_or("instance_sbs");
    let label = query_get(&q, "image_label");
    let images: Vec<Value> = IMAGES
        .iter()
        .filter(|(l, _, _, _)| label.is_none_or(|x| x == *l))
        .map(|(l, id, _, gpu)| image_json(l, id, *gpu, zone, image_type))
        .collect();
    let total = images.len();
    Ok(axum::Json(json!({"local_images": images, "total_count": total})).into_response())
}

async fn get_one(Path(id): Path<String>) -> ApiResult<Response> {
    let (l, id, _, gpu) = IMAGES
        .iter()
        .find(|(_, i, _, _)| *i == id)
        .ok_or_else(|| ApiError::not_found_v2("local_image", &id))?;
    Ok(axum::Json(image_json(l, id, *gpu, "fr-par-1", "instance_sbs")).into_response())
}
