//! Block Storage API v1 (`/block/v1/zones/{zone}/volumes`, as recorded; the
//! older `/block/v1alpha1/` prefix is answered the same way).

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use chrono::Utc;
use serde_json::{json, Value};

use crate::api::{check_zone, page_params, paginate, query_get, QueryPairs};
use crate::errors::{ApiError, ApiResult};
use crate::state::{new_id, Volume};
use crate::AppState;

pub fn routes() -> Router<AppState> {
    let mut r = Router::new();
    for v in ["v1", "v1alpha1"] {
        r = r
            .route(
                &format!("/block/{v}/zones/{{zone}}/volumes"),
                get(list).post(create),
            )
            .route(
                &format!("/block/{v}/zones/{{zone}}/volumes/{{id}}"),
                get(get_one).patch(update).delete(delete),
            );
    }
    r
}

fn parse(body: &Bytes) -> ApiResult<Value> {
    if body.is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid_argument("body", "format", &e.to_string()))
}

fn tags_of(v: &Value) -> Vec<String> {
    v.get("tags")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

async fn create(
    State(app): State<AppState>,
    Path(zone): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    check_zone(&app, &zone)?;
    let b = parse(&body)?;
    let size = b
        .get("from_empty")
        .and_then(|f| f.get("size"))
        .and_then(Value::as_u64)
        .ok_or_else(|| {
            ApiError::invalid_argument(
                "from_empty.size",
                "required",
                "the emulator makes volumes from_empty only",
            )
        })?;
    if size < 1_000_000_000 {
        return Err(ApiError::invalid_argument(
            "from_empty.size",
            "constraint",
            "size must be at least 1 GB",
        ));
    }
    let now = Utc::now();
    let id = new_id();
    let vol = Volume {
        id: id.clone(),
        zone: zone.clone(),
        name: b
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        project: b
            .get("project_id")
            .and_then(Value::as_str)
            .unwrap_or(&app.config.project_id)
            .to_string(),
        size,
        perf_iops: b.get("perf_iops").and_then(Value::as_u64).unwrap_or(5000),
        tags: tags_of(&b),
        status: "creating".into(),
        server: None,
        reference_id: String::new(),
        parent_snapshot_id: None,
        created: now,
        updated: now,
        attached_at: None,
        last_detached_at: None,
    };
    let out = {
        let mut st = app.state.lock().unwrap();
        st.volume_order.push(id.clone());
        st.volumes.insert(id.clone(), vol);
        st.volume_json(&st.volumes[&id])
    };
    let app2 = app.clone();
    tokio::spawn(async move {
        tokio::time::sleep(app2.config.timings.volume_create).await;
        let mut st = app2.state.lock().unwrap();
        if let Some(v) = st.volumes.get_mut(&id) {
            if v.status == "creating" {
                v.status = "available".into();
                v.updated = Utc::now();
            }
        }
    });
    Ok((StatusCode::OK, axum::Json(out)).into_response())
}

async fn list(
    State(app): State<AppState>,
    Path(zone): Path<String>,
    Query(q): Query<QueryPairs>,
) -> ApiResult<Response> {
    check_zone(&app, &zone)?;
    let (page, per_page) = page_params(&q, "page_size")?;
    let st = app.state.lock().unwrap();
    let want_tags: Vec<&str> = q
        .iter()
        .filter(|(k, _)| k == "tags")
        .flat_map(|(_, v)| v.split(','))
        .collect();
    let mut matching: Vec<&Volume> = st
        .volume_order
        .iter()
        .filter_map(|id| st.volumes.get(id))
        .filter(|v| v.zone == zone)
        // Block API: a volume with one or more of the tags matches.
        .filter(|v| want_tags.is_empty() || want_tags.iter().any(|t| v.tags.iter().any(|x| x == t)))
        .filter(|v| query_get(&q, "project_id").is_none_or(|p| v.project == p))
        .filter(|v| query_get(&q, "name").is_none_or(|n| v.name.contains(n)))
        .filter(|v| {
            query_get(&q, "product_resource_id").is_none_or(|p| v.server.as_deref() == Some(p))
        })
        .collect();
    if query_get(&q, "order_by") == Some("created_at_desc") {
        matching.reverse();
    }
    let total = matching.len();
    let items: Vec<Value> = paginate(&matching, page, per_page)
        .into_iter()
        .map(|v| st.volume_json(v))
        .collect();
    Ok(axum::Json(json!({"total_count": total, "volumes": items})).into_response())
}

fn find<'a>(st: &'a crate::state::State, zone: &str, id: &str) -> ApiResult<&'a Volume> {
    st.volumes
        .get(id)
        .filter(|v| v.zone == zone)
        .ok_or_else(|| ApiError::not_found_v2("volume", id))
}

async fn get_one(
    State(app): State<AppState>,
    Path((zone, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    check_zone(&app, &zone)?;
    let st = app.state.lock().unwrap();
    let v = find(&st, &zone, &id)?;
    Ok(axum::Json(st.volume_json(v)).into_response())
}

async fn update(
    State(app): State<AppState>,
    Path((zone, id)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    check_zone(&app, &zone)?;
    let b = parse(&body)?;
    let mut st = app.state.lock().unwrap();
    find(&st, &zone, &id)?;
    let v = st.volumes.get_mut(&id).expect("found");
    if let Some(n) = b.get("name").and_then(Value::as_str) {
        v.name = n.to_string();
    }
    if b.get("tags").is_some() {
        v.tags = tags_of(&b);
    }
    if let Some(s) = b.get("size").and_then(Value::as_u64) {
        if s < v.size {
            return Err(ApiError::invalid_argument(
                "size",
                "constraint",
                "a volume can only grow",
            ));
        }
        v.size = s;
    }
    if let Some(i) = b.get("perf_iops").and_then(Value::as_u64) {
        v.perf_iops = i;
    }
    v.updated = Utc::now();
    let v = st.volumes[&id].clone();
    Ok(axum::Json(st.volume_json(&v)).into_response())
}

async fn delete(
    State(app): State<AppState>,
    Path((zone, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    check_zone(&app, &zone)?;
    let mut st = app.state.lock().unwrap();
    let v = find(&st, &zone, &id)?;
    if v.status == "in_use" || v.server.is_some() {
        return Err(ApiError::precondition_failed(
            "resource_still_in_use",
            "the volume is attached to a server; detach it or delete the server first",
        ));
    }
    st.volumes.remove(&id);
    st.volume_order.retain(|x| x != &id);
    Ok(StatusCode::NO_CONTENT.into_response())
}
