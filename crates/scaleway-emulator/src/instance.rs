//! Instance API v1: `/instance/v1/zones/{zone}/...`.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use chrono::Utc;
use serde_json::{json, Map, Value};

use crate::api::{
    check_zone, has_all_tags, json_with, page_params, paginate, paging_headers, query_get,
    QueryPairs, StuckStarting,
};
use crate::errors::{ApiError, ApiResult};
use crate::faults::Availability;
use crate::state::{new_id, Image, SecurityGroup, Server, ServerState, ServerVolume, Volume};
use crate::AppState;

const P: &str = "/instance/v1/zones/{zone}";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(&format!("{P}/products/servers"), get(list_products))
        .route(
            &format!("{P}/products/servers/availability"),
            get(list_availability),
        )
        .route(
            &format!("{P}/servers"),
            get(list_servers).post(create_server),
        )
        .route(
            &format!("{P}/servers/{{id}}"),
            get(get_server).patch(update_server).delete(delete_server),
        )
        .route(&format!("{P}/servers/{{id}}/action"), post(server_action))
        .route(
            &format!("{P}/servers/{{id}}/user_data"),
            get(list_user_data),
        )
        .route(
            &format!("{P}/servers/{{id}}/user_data/{{key}}"),
            get(get_user_data)
                .patch(set_user_data)
                .delete(delete_user_data),
        )
        .route(&format!("{P}/ips"), get(list_ips).post(create_ip))
        .route(
            &format!("{P}/ips/{{id}}"),
            get(get_ip).patch(update_ip).delete(delete_ip),
        )
        .route(
            &format!("{P}/security_groups"),
            get(list_sgs).post(create_sg),
        )
        .route(
            &format!("{P}/security_groups/{{id}}"),
            get(get_sg).delete(delete_sg),
        )
        .route(
            &format!("{P}/security_groups/{{id}}/rules"),
            get(get_rules).put(set_rules).post(add_rule),
        )
}

/// Recorded `products/servers` answers, per zone (fr-par-2's for other zones).
fn catalog(zone: &str) -> &'static Map<String, Value> {
    static CATALOG: OnceLock<Map<String, Value>> = OnceLock::new();
    let all = CATALOG.get_or_init(|| {
        serde_json::from_str(include_str!("../data/products_servers.json"))
            .expect("embedded catalog is JSON")
    });
    all.get(zone)
        .or_else(|| all.get("fr-par-2"))
        .and_then(Value::as_object)
        .expect("catalog has fr-par-2")
}

/// Known marketplace images: (label, id, name, gpu). Labels and ids as
/// recorded (fr-par-2 for the GPU OS image, fr-par-1 for the others); the
/// emulator serves the same ids in every zone. The GPU image's name was not
/// recorded.
pub const IMAGES: &[(&str, &str, &str, bool)] = &[
    (
        "ubuntu_jammy_gpu_os_12",
        "8063548b-7ade-4faa-8be1-f48f8d3ba3ea",
        "Ubuntu Jammy GPU OS 12",
        true,
    ),
    (
        "ubuntu_jammy",
        "4481c662-2357-432f-b0fd-dd6470c08c49",
        "Ubuntu 22.04 Jammy Jellyfish",
        false,
    ),
    (
        "ubuntu_focal",
        "8ac1fe52-01dc-4dc1-8578-73ec5d126648",
        "Ubuntu 20.04 Focal Fossa",
        false,
    ),
];

fn base_url(headers: &HeaderMap) -> String {
    let host = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    format!("http://{host}")
}

fn created(headers: &HeaderMap, location: String, body: Value) -> Response {
    let mut h = HeaderMap::new();
    if let Ok(v) = HeaderValue::try_from(format!("{}{}", base_url(headers), location)) {
        h.insert("location", v);
    }
    json_with(StatusCode::CREATED, h, body)
}

fn parse_json(body: &Bytes) -> ApiResult<Value> {
    if body.is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid_request(&format!("invalid JSON body: {e}")))
}

fn str_list(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

// ---------- catalog ----------

async fn list_products(
    State(app): State<AppState>,
    Path(zone): Path<String>,
    Query(q): Query<QueryPairs>,
) -> ApiResult<Response> {
    check_zone(&app, &zone)?;
    let (page, per_page) = page_params(&q, "per_page")?;
    let all: Vec<(&String, &Value)> = catalog(&zone).iter().collect();
    let items = paginate(&all, page, per_page);
    let servers: Map<String, Value> = items
        .into_iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let h = paging_headers("/products/servers", &q, page, per_page, all.len());
    Ok(json_with(StatusCode::OK, h, json!({ "servers": servers })))
}

async fn list_availability(
    State(app): State<AppState>,
    Path(zone): Path<String>,
    Query(q): Query<QueryPairs>,
) -> ApiResult<Response> {
    check_zone(&app, &zone)?;
    let (page, per_page) = page_params(&q, "per_page")?;
    let all: Vec<&String> = catalog(&zone).keys().collect();
    let items = paginate(&all, page, per_page);
    let servers: Map<String, Value> = items
        .into_iter()
        .map(|k| {
            (
                k.clone(),
                json!({"availability": app.faults.availability(k).as_str()}),
            )
        })
        .collect();
    let h = paging_headers(
        "/products/servers/availability",
        &q,
        page,
        per_page,
        all.len(),
    );
    Ok(json_with(StatusCode::OK, h, json!({ "servers": servers })))
}

// ---------- servers ----------

fn find_server<'a>(st: &'a crate::state::State, zone: &str, id: &str) -> ApiResult<&'a Server> {
    st.servers
        .get(id)
        .filter(|s| s.zone == zone)
        .ok_or_else(|| ApiError::not_found("instance_server", id))
}

fn random_mac() -> String {
    let b: [u8; 3] = rand::random();
    format!("de:00:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

async fn create_server(
    State(app): State<AppState>,
    Path(zone): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    check_zone(&app, &zone)?;
    let b = parse_json(&body)?;
    let commercial_type = b
        .get("commercial_type")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            ApiError::invalid_argument("commercial_type", "required", "commercial_type is required")
        })?
        .to_string();
    let product = catalog(&zone).get(&commercial_type).ok_or_else(|| {
        ApiError::invalid_argument(
            "commercial_type",
            "constraint",
            &format!("{commercial_type} is not a valid commercial type in {zone}"),
        )
    })?;
    let arch = product
        .get("arch")
        .and_then(Value::as_str)
        .unwrap_or("x86_64")
        .to_string();
    let project = b
        .get("project")
        .or_else(|| b.get("organization"))
        .and_then(Value::as_str)
        .unwrap_or(&app.config.project_id)
        .to_string();
    let id = new_id();
    let name = b
        .get("name")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| format!("scw-{}", &id[..8]));
    let image = b.get("image").and_then(Value::as_str).map(|img| {
        match IMAGES
            .iter()
            .find(|(label, iid, _, _)| *iid == img || *label == img)
        {
            Some((_, iid, iname, _)) => Image {
                id: iid.to_string(),
                name: iname.to_string(),
                arch: arch.clone(),
            },
            None => Image {
                id: img.to_string(),
                name: "Custom image".into(),
                arch: arch.clone(),
            },
        }
    });

    let mut st = app.state.lock().unwrap();
    // Validate references before changing anything.
    let public_ips: Vec<String> = {
        let mut v = str_list(b.get("public_ips"));
        if let Some(p) = b.get("public_ip").and_then(Value::as_str) {
            v.push(p.to_string());
        }
        v
    };
    for ip_id in &public_ips {
        let ip = st
            .ips
            .get(ip_id)
            .filter(|ip| ip.zone == zone)
            .ok_or_else(|| ApiError::not_found("instance_ip", ip_id))?;
        if ip.server.is_some() {
            return Err(ApiError::invalid_argument(
                "public_ips",
                "constraint",
                &format!("ip {ip_id} is already attached to a server"),
            ));
        }
    }
    let security_group = match b
        .get("security_group")
        .and_then(|v| v.as_str().or_else(|| v.get("id")?.as_str()))
    {
        Some(sg_id) => {
            let sg = st
                .security_groups
                .get(sg_id)
                .filter(|sg| sg.zone == zone)
                .ok_or_else(|| ApiError::not_found("instance_security_group", sg_id))?;
            (sg.id.clone(), sg.name.clone())
        }
        None => st.default_security_group(&zone, &project),
    };
    let mut requested: Vec<(String, Value)> = b
        .get("volumes")
        .and_then(Value::as_object)
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    requested.sort_by_key(|(k, _)| k.parse::<u32>().unwrap_or(u32::MAX));
    if requested.is_empty() && image.is_some() {
        requested.push(("0".into(), json!({})));
    }
    for (_, v) in &requested {
        if let Some(vid) = v.get("id").and_then(Value::as_str) {
            let vol = st
                .volumes
                .get(vid)
                .filter(|x| x.zone == zone)
                .ok_or_else(|| ApiError::not_found("instance_volume", vid))?;
            if vol.status != "available" {
                return Err(ApiError::precondition_failed(
                    "resource_still_in_use",
                    &format!("volume {vid} is {}", vol.status),
                ));
            }
        }
    }

    let now = Utc::now();
    let mut volumes = BTreeMap::new();
    for (idx, v) in &requested {
        let size = v
            .get("size")
            .and_then(Value::as_u64)
            .unwrap_or(10_000_000_000);
        let vtype = v
            .get("volume_type")
            .and_then(Value::as_str)
            .unwrap_or("sbs_volume");
        let image_name = image.as_ref().map(|i| i.name.as_str()).unwrap_or("volume");
        let vname = v
            .get("name")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| format!("{image_name}_{vtype}_{idx}"));
        if let Some(vid) = v.get("id").and_then(Value::as_str) {
            st.attach_volume(vid, &id);
            let vol = &st.volumes[vid];
            volumes.insert(
                idx.clone(),
                ServerVolume {
                    id: vid.to_string(),
                    volume_type: "sbs_volume".into(),
                    size: vol.size,
                    name: vol.name.clone(),
                },
            );
        } else if vtype == "l_ssd" || vtype == "scratch" {
            volumes.insert(
                idx.clone(),
                ServerVolume {
                    id: new_id(),
                    volume_type: vtype.into(),
                    size,
                    name: vname,
                },
            );
        } else {
            let vid = new_id();
            st.volumes.insert(
                vid.clone(),
                Volume {
                    id: vid.clone(),
                    zone: zone.clone(),
                    name: vname.clone(),
                    project: project.clone(),
                    size,
                    perf_iops: 5000,
                    tags: vec![],
                    status: "available".into(),
                    server: None,
                    reference_id: String::new(),
                    parent_snapshot_id: image.as_ref().map(|i| i.id.clone()),
                    created: now,
                    updated: now,
                    attached_at: None,
                    last_detached_at: None,
                },
            );
            st.volume_order.push(vid.clone());
            st.attach_volume(&vid, &id);
            volumes.insert(
                idx.clone(),
                ServerVolume {
                    id: vid,
                    volume_type: "sbs_volume".into(),
                    size,
                    name: vname,
                },
            );
        }
    }
    let dynamic_ip_required = b
        .get("dynamic_ip_required")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let server = Server {
        id: id.clone(),
        zone: zone.clone(),
        name,
        commercial_type,
        arch,
        project: project.clone(),
        image,
        volumes,
        tags: str_list(b.get("tags")),
        state: ServerState::Stopped,
        state_detail: String::new(),
        mac_address: random_mac(),
        routed_ip_enabled: b
            .get("routed_ip_enabled")
            .and_then(Value::as_bool)
            .unwrap_or(true),
        dynamic_ip_required,
        security_group,
        created: now,
        modified: now,
        user_data: BTreeMap::new(),
        generation: 0,
        stuck_starting: false,
        locked: false,
        terminating: false,
    };
    st.servers.insert(id.clone(), server);
    st.server_order.push(id.clone());
    for ip_id in &public_ips {
        if let Some(ip) = st.ips.get_mut(ip_id) {
            ip.server = Some(id.clone());
        }
    }
    if dynamic_ip_required && public_ips.is_empty() {
        if let Some(ip_id) = st.new_ip(&zone, &project, "routed_ipv4", vec![]) {
            let ip = st.ips.get_mut(&ip_id).expect("just made");
            ip.server = Some(id.clone());
            ip.dynamic = true;
        }
    }
    let body = json!({"server": st.server_json(&st.servers[&id])});
    Ok(created(
        &headers,
        format!("/instance/v1/zones/{zone}/servers/{id}"),
        body,
    ))
}

async fn list_servers(
    State(app): State<AppState>,
    Path(zone): Path<String>,
    Query(q): Query<QueryPairs>,
) -> ApiResult<Response> {
    check_zone(&app, &zone)?;
    let (page, per_page) = page_params(&q, "per_page")?;
    let st = app.state.lock().unwrap();
    let ids_filter: Option<Vec<&str>> = query_get(&q, "servers").map(|s| s.split(',').collect());
    let mut matching: Vec<&Server> = st
        .server_order
        .iter()
        .filter_map(|id| st.servers.get(id))
        .filter(|s| s.zone == zone)
        .filter(|s| has_all_tags(&s.tags, query_get(&q, "tags")))
        .filter(|s| query_get(&q, "name").is_none_or(|n| s.name.contains(n)))
        .filter(|s| query_get(&q, "project").is_none_or(|p| s.project == p))
        .filter(|s| query_get(&q, "organization").is_none_or(|p| s.project == p))
        .filter(|s| query_get(&q, "commercial_type").is_none_or(|t| s.commercial_type == t))
        .filter(|s| {
            query_get(&q, "state").is_none_or(|t| {
                let state = if s.locked {
                    ServerState::Locked
                } else {
                    s.state
                };
                state.as_str() == t
            })
        })
        .filter(|s| {
            ids_filter
                .as_ref()
                .is_none_or(|ids| ids.contains(&s.id.as_str()))
        })
        .collect();
    // The API's default order is creation_date_desc.
    if query_get(&q, "order") != Some("creation_date_asc") {
        matching.reverse();
    }
    let total = matching.len();
    let items: Vec<Value> = paginate(&matching, page, per_page)
        .into_iter()
        .map(|s| st.server_json(s))
        .collect();
    let h = paging_headers("/servers", &q, page, per_page, total);
    Ok(json_with(StatusCode::OK, h, json!({ "servers": items })))
}

async fn get_server(
    State(app): State<AppState>,
    Path((zone, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    check_zone(&app, &zone)?;
    let st = app.state.lock().unwrap();
    let s = find_server(&st, &zone, &id)?;
    Ok(axum::Json(json!({"server": st.server_json(s)})).into_response())
}

async fn update_server(
    State(app): State<AppState>,
    Path((zone, id)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    check_zone(&app, &zone)?;
    let b = parse_json(&body)?;
    let mut st = app.state.lock().unwrap();
    let s = find_server(&st, &zone, &id)?.clone();
    if let Some(t) = b.get("commercial_type").and_then(Value::as_str) {
        if s.state != ServerState::Stopped {
            return Err(ApiError::invalid_request("server should be stopped"));
        }
        if !catalog(&zone).contains_key(t) {
            return Err(ApiError::invalid_argument(
                "commercial_type",
                "constraint",
                "unknown commercial type",
            ));
        }
    }
    let sg = match b
        .get("security_group")
        .and_then(|v| v.get("id"))
        .and_then(Value::as_str)
    {
        Some(sg_id) => {
            let sg = st
                .security_groups
                .get(sg_id)
                .ok_or_else(|| ApiError::not_found("instance_security_group", sg_id))?;
            Some((sg.id.clone(), sg.name.clone()))
        }
        None => None,
    };
    let s = st.servers.get_mut(&id).expect("found above");
    if let Some(n) = b.get("name").and_then(Value::as_str) {
        s.name = n.to_string();
    }
    if b.get("tags").is_some() {
        s.tags = str_list(b.get("tags"));
    }
    if let Some(t) = b.get("commercial_type").and_then(Value::as_str) {
        s.commercial_type = t.to_string();
    }
    if let Some(v) = b.get("dynamic_ip_required").and_then(Value::as_bool) {
        s.dynamic_ip_required = v;
    }
    if let Some(v) = b.get("routed_ip_enabled").and_then(Value::as_bool) {
        s.routed_ip_enabled = v;
    }
    if let Some(sg) = sg {
        s.security_group = sg;
    }
    s.modified = Utc::now();
    let s = st.servers[&id].clone();
    Ok(axum::Json(json!({"server": st.server_json(&s)})).into_response())
}

async fn delete_server(
    State(app): State<AppState>,
    Path((zone, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    check_zone(&app, &zone)?;
    {
        let mut st = app.state.lock().unwrap();
        let s = find_server(&st, &zone, &id)?;
        if app.faults.is_locked(&id) {
            return Err(ApiError::locked("instance_server", &id));
        }
        if !matches!(s.state, ServerState::Stopped | ServerState::StoppedInPlace) {
            return Err(ApiError::invalid_request("server should be stopped"));
        }
        st.remove_server(&id);
    }
    app.vms.kill(&id).await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn task(zone: &str, id: &str, action: &str) -> Value {
    json!({"task": {
        "id": new_id(), "description": format!("server_{action}"), "status": "pending",
        "href_from": format!("/servers/{id}/action"), "href_result": format!("/servers/{id}"),
        "started_at": crate::state::instance_date(Utc::now()), "terminated_at": null, "progress": 0, "zone": zone,
    }})
}

/// Sets a new state and returns the new generation.
fn set_state(s: &mut Server, state: ServerState, detail: &str) -> u64 {
    s.state = state;
    s.state_detail = detail.to_string();
    s.modified = Utc::now();
    s.generation += 1;
    s.generation
}

async fn server_action(
    State(app): State<AppState>,
    Path((zone, id)): Path<(String, String)>,
    stuck: Option<Extension<StuckStarting>>,
    body: Bytes,
) -> ApiResult<Response> {
    check_zone(&app, &zone)?;
    let b = parse_json(&body)?;
    let action = b
        .get("action")
        .and_then(Value::as_str)
        .unwrap_or("poweron")
        .to_string();
    let mut st = app.state.lock().unwrap();
    let s = find_server(&st, &zone, &id)?;
    if app.faults.is_locked(&id) {
        return Err(ApiError::locked("instance_server", &id));
    }
    let state = s.state;
    let commercial_type = s.commercial_type.clone();
    let s = st.servers.get_mut(&id).expect("found above");
    let t = app.config.timings.clone();
    match action.as_str() {
        "poweron" => {
            if !matches!(state, ServerState::Stopped | ServerState::StoppedInPlace) {
                return Err(ApiError::invalid_request("server should be stopped"));
            }
            if app.faults.availability(&commercial_type) == Availability::Shortage {
                return Err(ApiError::out_of_stock("server"));
            }
            s.stuck_starting = stuck.is_some();
            let gen = set_state(s, ServerState::Starting, "allocating node");
            drop(st);
            spawn_boot(app.clone(), id.clone(), gen, t.boot);
        }
        "reboot" => {
            if state != ServerState::Running {
                return Err(ApiError::invalid_request("server should be running"));
            }
            s.stuck_starting = stuck.is_some();
            let gen = set_state(s, ServerState::Starting, "rebooting");
            drop(st);
            let app2 = app.clone();
            let id2 = id.clone();
            tokio::spawn(async move {
                app2.vms.kill(&id2).await;
                spawn_boot(app2, id2, gen, t.boot);
            });
        }
        "poweroff" | "stop_in_place" | "terminate" => {
            let allowed = match action.as_str() {
                "poweroff" | "terminate" => state == ServerState::Running,
                _ => matches!(state, ServerState::Running | ServerState::Starting),
            };
            if !allowed {
                return Err(ApiError::invalid_request("server should be running"));
            }
            let terminate = action == "terminate";
            s.terminating = terminate;
            let detail = if terminate { "terminating" } else { "stopping" };
            let gen = set_state(s, ServerState::Stopping, detail);
            let final_state = if action == "stop_in_place" {
                ServerState::StoppedInPlace
            } else {
                ServerState::Stopped
            };
            drop(st);
            spawn_stop(app.clone(), id.clone(), gen, final_state, terminate);
        }
        "backup" | "enable_routed_ip" => {
            return Err(ApiError::invalid_argument(
                "action",
                "constraint",
                &format!("action {action} is not supported by the emulator"),
            ))
        }
        other => {
            return Err(ApiError::invalid_argument(
                "action",
                "constraint",
                &format!("unknown action {other}"),
            ))
        }
    }
    Ok((StatusCode::ACCEPTED, axum::Json(task(&zone, &id, &action))).into_response())
}

fn spawn_boot(app: AppState, id: String, gen: u64, delay: Duration) {
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = app.shutdown.cancelled() => return,
        }
        let boot = {
            let mut st = app.state.lock().unwrap();
            let Some(s) = st.servers.get_mut(&id) else {
                return;
            };
            if s.generation != gen || s.state != ServerState::Starting || s.stuck_starting {
                return;
            }
            set_state(s, ServerState::Running, "booting kernel");
            let user_data = s.user_data.clone();
            let address = st.server_address(&id);
            (user_data, address)
        };
        if app.config.vm.is_some() {
            app.vms.boot(&id, boot.0, boot.1).await;
        }
    });
}

fn spawn_stop(app: AppState, id: String, gen: u64, final_state: ServerState, terminate: bool) {
    tokio::spawn(async move {
        app.vms.kill(&id).await;
        tokio::select! {
            _ = tokio::time::sleep(app.config.timings.stop) => {}
            _ = app.shutdown.cancelled() => return,
        }
        let gen = {
            let mut st = app.state.lock().unwrap();
            let Some(s) = st.servers.get_mut(&id) else {
                return;
            };
            if s.generation != gen {
                return;
            }
            let detail = if final_state == ServerState::StoppedInPlace {
                "stopped in place"
            } else {
                ""
            };
            let g = set_state(s, final_state, detail);
            if terminate {
                s.state = ServerState::Stopping;
                s.state_detail = "terminating".into();
            }
            g
        };
        if terminate {
            tokio::select! {
                _ = tokio::time::sleep(app.config.timings.delete) => {}
                _ = app.shutdown.cancelled() => return,
            }
            let mut st = app.state.lock().unwrap();
            if st.servers.get(&id).is_some_and(|s| s.generation == gen) {
                st.remove_server(&id);
            }
        }
    });
}

// ---------- user data ----------

async fn list_user_data(
    State(app): State<AppState>,
    Path((zone, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    check_zone(&app, &zone)?;
    let st = app.state.lock().unwrap();
    let s = find_server(&st, &zone, &id)?;
    let keys: Vec<&String> = s.user_data.keys().collect();
    Ok(axum::Json(json!({ "user_data": keys })).into_response())
}

async fn get_user_data(
    State(app): State<AppState>,
    Path((zone, id, key)): Path<(String, String, String)>,
) -> ApiResult<Response> {
    check_zone(&app, &zone)?;
    let st = app.state.lock().unwrap();
    let s = find_server(&st, &zone, &id)?;
    let v = s
        .user_data
        .get(&key)
        .ok_or_else(|| ApiError::not_found("instance_user_data", &key))?;
    Ok(([("content-type", "text/plain")], v.clone()).into_response())
}

async fn set_user_data(
    State(app): State<AppState>,
    Path((zone, id, key)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    check_zone(&app, &zone)?;
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.starts_with("text/plain") {
        return Err(ApiError::invalid_request(
            "user data content type must be text/plain",
        ));
    }
    if body.len() > 1_000_000 {
        return Err(ApiError::invalid_argument(
            "content",
            "constraint",
            "user data is limited to 1 MB",
        ));
    }
    let mut st = app.state.lock().unwrap();
    find_server(&st, &zone, &id)?;
    st.servers
        .get_mut(&id)
        .expect("found")
        .user_data
        .insert(key, body.to_vec());
    Ok((StatusCode::NO_CONTENT, [("content-type", "text/plain")]).into_response())
}

async fn delete_user_data(
    State(app): State<AppState>,
    Path((zone, id, key)): Path<(String, String, String)>,
) -> ApiResult<Response> {
    check_zone(&app, &zone)?;
    let mut st = app.state.lock().unwrap();
    find_server(&st, &zone, &id)?;
    st.servers
        .get_mut(&id)
        .expect("found")
        .user_data
        .remove(&key);
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ---------- ips ----------

async fn create_ip(
    State(app): State<AppState>,
    Path(zone): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    check_zone(&app, &zone)?;
    let b = parse_json(&body)?;
    let ip_type = b
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("routed_ipv4");
    if ip_type != "routed_ipv4" {
        return Err(ApiError::invalid_argument(
            "type",
            "constraint",
            "the emulator makes routed_ipv4 addresses only",
        ));
    }
    let project = b
        .get("project")
        .and_then(Value::as_str)
        .unwrap_or(&app.config.project_id)
        .to_string();
    let mut st = app.state.lock().unwrap();
    let server = b.get("server").and_then(Value::as_str).map(str::to_string);
    if let Some(sid) = &server {
        find_server(&st, &zone, sid)?;
    }
    let id = st
        .new_ip(&zone, &project, ip_type, str_list(b.get("tags")))
        .ok_or_else(|| ApiError::quotas_exceeded("routed_ipv4", 0, 0))?;
    if let Some(sid) = server {
        st.ips.get_mut(&id).expect("made").server = Some(sid);
    }
    let body = json!({"ip": st.ip_json(&st.ips[&id])});
    Ok(created(
        &headers,
        format!("/instance/v1/zones/{zone}/ips/{id}"),
        body,
    ))
}

async fn list_ips(
    State(app): State<AppState>,
    Path(zone): Path<String>,
    Query(q): Query<QueryPairs>,
) -> ApiResult<Response> {
    check_zone(&app, &zone)?;
    let (page, per_page) = page_params(&q, "per_page")?;
    let st = app.state.lock().unwrap();
    let matching: Vec<_> = st
        .ip_order
        .iter()
        .filter_map(|id| st.ips.get(id))
        .filter(|ip| ip.zone == zone)
        .filter(|ip| has_all_tags(&ip.tags, query_get(&q, "tags")))
        .filter(|ip| query_get(&q, "project").is_none_or(|p| ip.project == p))
        .filter(|ip| query_get(&q, "type").is_none_or(|t| ip.ip_type == t))
        .collect();
    let total = matching.len();
    let items: Vec<Value> = paginate(&matching, page, per_page)
        .into_iter()
        .map(|ip| st.ip_json(ip))
        .collect();
    let h = paging_headers("/ips", &q, page, per_page, total);
    Ok(json_with(StatusCode::OK, h, json!({ "ips": items })))
}

fn find_ip<'a>(
    st: &'a crate::state::State,
    zone: &str,
    id: &str,
) -> ApiResult<&'a crate::state::Ip> {
    st.ips
        .get(id)
        .filter(|ip| ip.zone == zone)
        .ok_or_else(|| ApiError::not_found("instance_ip", id))
}

async fn get_ip(
    State(app): State<AppState>,
    Path((zone, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    check_zone(&app, &zone)?;
    let st = app.state.lock().unwrap();
    let ip = find_ip(&st, &zone, &id)?;
    Ok(axum::Json(json!({"ip": st.ip_json(ip)})).into_response())
}

async fn update_ip(
    State(app): State<AppState>,
    Path((zone, id)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    check_zone(&app, &zone)?;
    let b = parse_json(&body)?;
    let mut st = app.state.lock().unwrap();
    find_ip(&st, &zone, &id)?;
    let server = match b.get("server") {
        None => None,
        Some(Value::Null) => Some(None),
        Some(v) => {
            let sid = v
                .as_str()
                .or_else(|| v.get("id").and_then(Value::as_str))
                .ok_or_else(|| {
                    ApiError::invalid_argument("server", "format", "server must be an id or null")
                })?;
            find_server(&st, &zone, sid)?;
            Some(Some(sid.to_string()))
        }
    };
    let ip = st.ips.get_mut(&id).expect("found");
    if let Some(server) = server {
        ip.server = server;
    }
    if b.get("tags").is_some() {
        ip.tags = str_list(b.get("tags"));
    }
    if let Some(r) = b.get("reverse") {
        ip.reverse = r.as_str().map(str::to_string);
    }
    let ip = st.ips[&id].clone();
    Ok(axum::Json(json!({"ip": st.ip_json(&ip)})).into_response())
}

async fn delete_ip(
    State(app): State<AppState>,
    Path((zone, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    check_zone(&app, &zone)?;
    let mut st = app.state.lock().unwrap();
    find_ip(&st, &zone, &id)?;
    st.ips.remove(&id);
    st.ip_order.retain(|i| i != &id);
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ---------- security groups ----------

async fn create_sg(
    State(app): State<AppState>,
    Path(zone): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    check_zone(&app, &zone)?;
    let b = parse_json(&body)?;
    let name = b
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid_argument("name", "required", "name is required"))?;
    let now = Utc::now();
    let sg = SecurityGroup {
        id: new_id(),
        zone: zone.clone(),
        name: name.to_string(),
        description: b
            .get("description")
            .and_then(Value::as_str)
            .map(str::to_string),
        project: b
            .get("project")
            .and_then(Value::as_str)
            .unwrap_or(&app.config.project_id)
            .to_string(),
        project_default: b
            .get("project_default")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        stateful: b.get("stateful").and_then(Value::as_bool).unwrap_or(true),
        inbound_default_policy: b
            .get("inbound_default_policy")
            .and_then(Value::as_str)
            .unwrap_or("accept")
            .to_string(),
        outbound_default_policy: b
            .get("outbound_default_policy")
            .and_then(Value::as_str)
            .unwrap_or("accept")
            .to_string(),
        enable_default_security: b
            .get("enable_default_security")
            .and_then(Value::as_bool)
            .unwrap_or(true),
        tags: str_list(b.get("tags")),
        rules: vec![],
        created: now,
        modified: now,
    };
    let id = sg.id.clone();
    let mut st = app.state.lock().unwrap();
    st.sg_order.push(id.clone());
    st.security_groups.insert(id.clone(), sg);
    let body = json!({"security_group": st.sg_json(&st.security_groups[&id])});
    Ok(created(
        &headers,
        format!("/instance/v1/zones/{zone}/security_groups/{id}"),
        body,
    ))
}

async fn list_sgs(
    State(app): State<AppState>,
    Path(zone): Path<String>,
    Query(q): Query<QueryPairs>,
) -> ApiResult<Response> {
    check_zone(&app, &zone)?;
    let (page, per_page) = page_params(&q, "per_page")?;
    let st = app.state.lock().unwrap();
    let matching: Vec<_> = st
        .sg_order
        .iter()
        .filter_map(|id| st.security_groups.get(id))
        .filter(|sg| sg.zone == zone)
        .filter(|sg| has_all_tags(&sg.tags, query_get(&q, "tags")))
        .filter(|sg| query_get(&q, "name").is_none_or(|n| sg.name.contains(n)))
        .filter(|sg| query_get(&q, "project").is_none_or(|p| sg.project == p))
        .collect();
    let total = matching.len();
    let items: Vec<Value> = paginate(&matching, page, per_page)
        .into_iter()
        .map(|sg| st.sg_json(sg))
        .collect();
    let h = paging_headers("/security_groups", &q, page, per_page, total);
    Ok(json_with(
        StatusCode::OK,
        h,
        json!({ "security_groups": items }),
    ))
}

fn find_sg<'a>(st: &'a crate::state::State, zone: &str, id: &str) -> ApiResult<&'a SecurityGroup> {
    st.security_groups
        .get(id)
        .filter(|sg| sg.zone == zone)
        .ok_or_else(|| ApiError::not_found("instance_security_group", id))
}

async fn get_sg(
    State(app): State<AppState>,
    Path((zone, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    check_zone(&app, &zone)?;
    let st = app.state.lock().unwrap();
    let sg = find_sg(&st, &zone, &id)?;
    Ok(axum::Json(json!({"security_group": st.sg_json(sg)})).into_response())
}

async fn delete_sg(
    State(app): State<AppState>,
    Path((zone, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    check_zone(&app, &zone)?;
    let mut st = app.state.lock().unwrap();
    find_sg(&st, &zone, &id)?;
    if st.servers.values().any(|s| s.security_group.0 == id) {
        return Err(ApiError::conflict("Group is in use. You cannot delete it."));
    }
    st.security_groups.remove(&id);
    st.sg_order.retain(|s| s != &id);
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn get_rules(
    State(app): State<AppState>,
    Path((zone, id)): Path<(String, String)>,
    Query(q): Query<QueryPairs>,
) -> ApiResult<Response> {
    check_zone(&app, &zone)?;
    let (page, per_page) = page_params(&q, "per_page")?;
    let st = app.state.lock().unwrap();
    let sg = find_sg(&st, &zone, &id)?;
    let items = paginate(&sg.rules, page, per_page);
    let h = paging_headers(
        &format!("/security_groups/{id}/rules"),
        &q,
        page,
        per_page,
        sg.rules.len(),
    );
    Ok(json_with(StatusCode::OK, h, json!({ "rules": items })))
}

/// A rule as the API shows it, from the fields a request gave.
fn rule_json(r: &Value, position: usize, zone: &str) -> Value {
    json!({
        "id": r.get("id").and_then(Value::as_str).map(str::to_string).unwrap_or_else(new_id),
        "protocol": r.get("protocol").cloned().unwrap_or(json!("TCP")),
        "direction": r.get("direction").cloned().unwrap_or(json!("inbound")),
        "ip_range": r.get("ip_range").cloned().unwrap_or(json!("0.0.0.0/0")),
        "dest_ip_range": r.get("dest_ip_range").cloned().unwrap_or(Value::Null),
        "dest_port_from": r.get("dest_port_from").cloned().unwrap_or(Value::Null),
        "dest_port_to": r.get("dest_port_to").cloned().unwrap_or(Value::Null),
        "position": position, "editable": true,
        "action": r.get("action").cloned().unwrap_or(json!("accept")), "zone": zone,
    })
}

/// `POST .../security_groups/{id}/rules`: one rule more (201 `{"rule": ...}`).
async fn add_rule(
    State(app): State<AppState>,
    Path((zone, id)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    check_zone(&app, &zone)?;
    let b = parse_json(&body)?;
    let mut st = app.state.lock().unwrap();
    find_sg(&st, &zone, &id)?;
    let sg = st.security_groups.get_mut(&id).expect("found");
    let rule = rule_json(&b, sg.rules.len() + 1, &zone);
    sg.rules.push(rule.clone());
    sg.modified = Utc::now();
    Ok((StatusCode::CREATED, axum::Json(json!({ "rule": rule }))).into_response())
}

async fn set_rules(
    State(app): State<AppState>,
    Path((zone, id)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    check_zone(&app, &zone)?;
    let b = parse_json(&body)?;
    let mut st = app.state.lock().unwrap();
    find_sg(&st, &zone, &id)?;
    let rules: Vec<Value> = b
        .get("rules")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, r)| rule_json(&r, i + 1, &zone))
        .collect();
    let sg = st.security_groups.get_mut(&id).expect("found");
    sg.rules = rules.clone();
    sg.modified = Utc::now();
    Ok(axum::Json(json!({ "rules": rules })).into_response())
}
