//! The Scaleway provider against a small in-test HTTP server that answers
//! with the real recorded bodies (tests/fixtures/scaleway, taken from the
//! Scaleway Terraform provider's cassettes) and records every request.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use gpufleet_domain::{GpuSpec, InstanceId};
use gpufleet_proto::{AgentBootstrap, EngineSpec};
use gpufleet_providers::cloudinit::{self, AgentInstall};
use gpufleet_providers::scaleway::{ScalewayConfig, ScalewayProvider, ScalewaySettings, SecretKey};
use gpufleet_providers::{
    tags, CreateRequest, MachineState, Provider, ProviderError, ResourceKind,
};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const ZONE: &str = "fr-par-1";
const PROJECT: &str = "105bdce1-64c0-48ab-899d-868455867ecf";
const SECRET: &str = "11111111-2222-3333-4444-555555555555";

fn fixture(name: &str) -> Value {
    let text = std::fs::read_to_string(format!(
        "{}/tests/fixtures/scaleway/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

#[derive(Debug, Clone)]
struct Req {
    method: Method,
    path: String,
    query: String,
    content_type: Option<String>,
    token: Option<String>,
    body: String,
}

#[derive(Default)]
struct Fake {
    requests: Vec<Req>,
    servers: Vec<Value>,
    user_data: HashMap<String, String>,
    volumes: Vec<Value>,
    ips: Vec<Value>,
    groups: Vec<Value>,
    rules: Vec<Value>,
    next_id: u32,
    /// Answer the next request with this instead.
    fail_next: Option<Canned>,
    /// Make the server on the next `POST servers` but answer 504.
    lose_server_answer: bool,
}

impl Fake {
    fn id(&mut self) -> String {
        self.next_id += 1;
        format!("00000000-0000-4000-8000-{:012}", self.next_id)
    }
}

type Shared = Arc<Mutex<Fake>>;
/// A status, headers and body to answer with.
type Canned = (u16, Vec<(&'static str, String)>, Value);

fn reply(status: u16, body: Value) -> Response {
    (StatusCode::from_u16(status).unwrap(), axum::Json(body)).into_response()
}

fn not_found(resource: &str, id: &str) -> Response {
    reply(
        404,
        json!({"type": "not_found", "message": "resource is not found", "resource": resource, "resource_id": id}),
    )
}

fn query_values(query: &str, key: &str) -> Vec<String> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| *k == key)
        .map(|(_, v)| {
            v.replace("%3D", "=")
                .replace("%2C", ",")
                .replace("%2F", "/")
        })
        .collect()
}

fn has_tags(v: &Value, wanted: &[String]) -> bool {
    let tags: Vec<&str> = v["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    wanted
        .iter()
        .filter(|w| !w.is_empty())
        .all(|w| tags.contains(&w.as_str()))
}

fn paged(status: u16, body: Value, page: &str, path: &str) -> Response {
    let n: u32 = page.parse().unwrap_or(1);
    let link = match n {
        1 => format!(
            r#"<{path}?page=2&per_page=50&>; rel="next",<{path}?page=3&per_page=50&>; rel="last""#
        ),
        2 => format!(
            r#"<{path}?page=1&per_page=50&>; rel="first",<{path}?page=1&per_page=50&>; rel="previous",<{path}?page=3&per_page=50&>; rel="next",<{path}?page=3&per_page=50&>; rel="last""#
        ),
        _ => format!(
            r#"<{path}?page=1&per_page=50&>; rel="first",<{path}?page=2&per_page=50&>; rel="previous",<{path}?page=3&per_page=50&>; rel="last""#
        ),
    };
    let mut r = reply(status, body);
    r.headers_mut().insert("link", link.parse().unwrap());
    r.headers_mut()
        .insert("x-total-count", "135".parse().unwrap());
    r
}

async fn handle(
    State(fake): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut f = fake.lock().unwrap();
    let path = uri.path().to_string();
    let query = uri.query().unwrap_or("").to_string();
    let body = String::from_utf8_lossy(&body).to_string();
    f.requests.push(Req {
        method: method.clone(),
        path: path.clone(),
        query: query.clone(),
        content_type: headers
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string()),
        token: headers
            .get("x-auth-token")
            .map(|v| v.to_str().unwrap().to_string()),
        body: body.clone(),
    });
    if let Some((status, hdrs, b)) = f.fail_next.take() {
        let mut r = reply(status, b);
        for (k, v) in hdrs {
            r.headers_mut().insert(k, v.parse().unwrap());
        }
        return r;
    }
    let json_body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let inst = format!("/instance/v1/zones/{ZONE}");
    let block = format!("/block/v1/zones/{ZONE}");
    let page = query_values(&query, "page")
        .pop()
        .unwrap_or_else(|| "1".into());
    let rest = path.strip_prefix(&inst).map(str::to_string);
    let brest = path.strip_prefix(&block).map(str::to_string);
    let segs: Vec<String> = rest
        .as_deref()
        .or(brest.as_deref())
        .unwrap_or("")
        .split('/')
        .skip(1)
        .map(str::to_string)
        .collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    match (&method, rest.is_some(), segs.as_slice()) {
        (&Method::GET, true, ["products", "servers"]) => paged(
            200,
            fixture(&format!("products_servers_page{page}.json")),
            &page,
            "/products/servers",
        ),
        (&Method::GET, true, ["products", "servers", "availability"]) => paged(
            200,
            fixture(&format!("availability_page{page}.json")),
            &page,
            "/products/servers/availability",
        ),
        (&Method::GET, true, ["servers"]) => {
            let wanted: Vec<String> = query_values(&query, "tags")
                .iter()
                .flat_map(|t| t.split(',').map(str::to_string).collect::<Vec<_>>())
                .collect();
            let servers: Vec<Value> = f
                .servers
                .iter()
                .filter(|s| has_tags(s, &wanted))
                .cloned()
                .collect();
            let mut r = reply(200, json!({ "servers": servers }));
            r.headers_mut()
                .insert("x-total-count", servers.len().to_string().parse().unwrap());
            r
        }
        (&Method::POST, true, ["servers"]) => {
            let mut s = fixture("server_create.json")["server"].clone();
            let id = f.id();
            let root = f.id();
            s["id"] = json!(id);
            s["name"] = json_body["name"].clone();
            s["commercial_type"] = json_body["commercial_type"].clone();
            s["tags"] = json_body["tags"].clone();
            s["zone"] = json!(ZONE);
            // Both SBS volumes are made by the server, and a dynamic routed
            // IP with it (as the real API does for these fields).
            let model = f.id();
            s["volumes"] = json!({"0": {"boot": false, "volume_type": "sbs_volume", "id": root, "state": "available", "zone": ZONE},
                                  "1": {"boot": false, "volume_type": "sbs_volume", "id": model, "state": "available", "zone": ZONE}});
            assert_eq!(json_body["dynamic_ip_required"], json!(true), "{json_body}");
            let mut ip = fixture("ip_create.json")["ip"].clone();
            let ip_id = f.id();
            ip["id"] = json!(ip_id);
            ip["tags"] = json!([]);
            ip["server"] = json!({"id": id, "name": s["name"]});
            ip["state"] = json!("attached");
            let address = ip["address"].clone();
            f.ips.push(ip);
            s["public_ips"][0]["id"] = json!(ip_id);
            s["public_ips"][0]["address"] = address.clone();
            s["public_ip"]["id"] = json!(ip_id);
            s["public_ip"]["address"] = address;
            for vid in [&root, &model] {
                let mut v = fixture("block_volume_in_use.json");
                v["id"] = json!(vid);
                v["tags"] = json!([]);
                v["references"][0]["product_resource_id"] = json!(id);
                f.volumes.push(v);
            }
            f.servers.push(s.clone());
            if std::mem::take(&mut f.lose_server_answer) {
                return reply(504, json!({"message": "upstream timed out"}));
            }
            reply(201, json!({ "server": s }))
        }
        (_, true, ["servers", id, more @ ..]) => {
            let id = id.to_string();
            let Some(pos) = f.servers.iter().position(|s| s["id"] == json!(id)) else {
                return not_found("instance_server", &id);
            };
            match (&method, more) {
                (&Method::GET, []) => reply(200, json!({ "server": f.servers[pos] })),
                (&Method::GET, ["user_data"]) => {
                    let keys: Vec<&str> = if f.user_data.contains_key(&id) {
                        vec!["cloud-init"]
                    } else {
                        vec![]
                    };
                    reply(200, json!({ "user_data": keys }))
                }
                (&Method::PATCH, ["user_data", "cloud-init"]) => {
                    f.user_data.insert(id, body);
                    StatusCode::NO_CONTENT.into_response()
                }
                (&Method::POST, ["action"]) => {
                    let action = json_body["action"].as_str().unwrap().to_string();
                    match action.as_str() {
                        "poweron" => {
                            // As recorded for a running server.
                            f.servers[pos]["state"] = json!("running");
                            f.servers[pos]["allowed_actions"] = json!([
                                "poweroff",
                                "terminate",
                                "reboot",
                                "stop_in_place",
                                "backup"
                            ]);
                        }
                        "terminate" => {
                            f.servers.remove(pos);
                            for v in f.volumes.iter_mut() {
                                if v["references"].as_array().is_some_and(|r| {
                                    r.iter().any(|r| r["product_resource_id"] == json!(id))
                                }) {
                                    v["references"] = json!([]);
                                    v["status"] = json!("available");
                                }
                            }
                            for i in f.ips.iter_mut() {
                                if i["server"]["id"] == json!(id) {
                                    i["server"] = Value::Null;
                                    i["state"] = json!("detached");
                                }
                            }
                        }
                        _ => {}
                    }
                    let mut t = fixture("action_poweron.json");
                    t["task"]["href_from"] = json!(format!("/servers/{id}/action"));
                    reply(202, t)
                }
                _ => reply(405, json!({"message": "unexpected"})),
            }
        }
        (&Method::GET, true, ["security_groups"]) => {
            let name = query_values(&query, "name").pop().unwrap_or_default();
            let groups: Vec<Value> = f
                .groups
                .iter()
                .filter(|g| g["name"] == json!(name))
                .cloned()
                .collect();
            reply(200, json!({ "security_groups": groups }))
        }
        (&Method::POST, true, ["security_groups"]) => {
            let mut g = fixture("security_group_create.json");
            let id = f.id();
            g["security_group"]["id"] = json!(id);
            g["security_group"]["name"] = json_body["name"].clone();
            f.groups.push(g["security_group"].clone());
            reply(201, g)
        }
        (&Method::POST, true, ["security_groups", _, "rules"]) => {
            f.rules.push(json_body.clone());
            reply(201, json!({ "rule": json_body }))
        }
        (&Method::GET, true, ["security_groups", _, "rules"]) => {
            reply(200, json!({ "rules": f.rules }))
        }
        (&Method::GET, true, ["ips"]) => {
            let wanted: Vec<String> = query_values(&query, "tags")
                .iter()
                .flat_map(|t| t.split(',').map(str::to_string).collect::<Vec<_>>())
                .collect();
            let ips: Vec<Value> = f
                .ips
                .iter()
                .filter(|i| has_tags(i, &wanted))
                .cloned()
                .collect();
            reply(200, json!({ "ips": ips }))
        }
        (&Method::POST, true, ["ips"]) => {
            let mut ip = fixture("ip_create.json");
            let id = f.id();
            ip["ip"]["id"] = json!(id);
            ip["ip"]["tags"] = json_body["tags"].clone();
            f.ips.push(ip["ip"].clone());
            reply(201, ip)
        }
        (&Method::DELETE, true, ["ips", id]) => {
            let before = f.ips.len();
            f.ips.retain(|i| i["id"] != json!(id));
            if before == f.ips.len() {
                not_found("instance_ip", id)
            } else {
                StatusCode::NO_CONTENT.into_response()
            }
        }
        (&Method::GET, false, ["volumes"]) => {
            let wanted = query_values(&query, "tags");
            let vols: Vec<Value> = f
                .volumes
                .iter()
                .filter(|v| has_tags(v, &wanted))
                .cloned()
                .collect();
            reply(200, json!({ "volumes": vols, "total_count": vols.len() }))
        }
        (&Method::POST, false, ["volumes"]) => {
            let mut v = fixture("block_volume_create.json"); // status "creating", as recorded
            let id = f.id();
            v["id"] = json!(id);
            v["name"] = json_body["name"].clone();
            v["size"] = json_body["from_empty"]["size"].clone();
            v["tags"] = json_body["tags"].clone();
            let mut stored = v.clone();
            stored["status"] = json!("available");
            f.volumes.push(stored);
            reply(200, v)
        }
        (m, false, ["volumes", id]) => {
            let id = id.to_string();
            let Some(pos) = f.volumes.iter().position(|v| v["id"] == json!(id)) else {
                return not_found("block_volume", &id);
            };
            match *m {
                Method::GET => reply(200, f.volumes[pos].clone()),
                Method::PATCH => {
                    f.volumes[pos]["tags"] = json_body["tags"].clone();
                    reply(200, f.volumes[pos].clone())
                }
                Method::DELETE if f.volumes[pos]["status"] == json!("in_use") => reply(
                    412,
                    json!({"type": "precondition_failed", "message": "resource is in use", "precondition": "resource_still_in_use"}),
                ),
                Method::DELETE => {
                    f.volumes.remove(pos);
                    StatusCode::NO_CONTENT.into_response()
                }
                _ => reply(405, json!({})),
            }
        }
        _ if path == "/marketplace/v2/local-images" => {
            reply(200, fixture("marketplace_gpu_os_local_images.json"))
        }
        _ => reply(404, json!({"message": format!("no route {method} {path}")})),
    }
}

struct Env {
    fake: Shared,
    provider: Arc<ScalewayProvider>,
    install: AgentInstall,
}

async fn start() -> Env {
    let fake: Shared = Arc::default();
    let app = axum::Router::new()
        .fallback(handle)
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let config = ScalewayConfig {
        access_key: "SCWXXXXXXXXXXXXXXXXX".into(),
        secret_key: SecretKey::new(SECRET),
        project_id: PROJECT.into(),
        organization_id: None,
        default_zone: ZONE.into(),
        default_region: "fr-par".into(),
        api_url: format!("http://{addr}"),
        profile: None,
    };
    let settings = ScalewaySettings {
        zones: vec![ZONE.into()],
        request_timeout_ms: 5_000,
        tags: vec!["team=ml".into()],
        ..Default::default()
    };
    let install = AgentInstall {
        binary_url: "https://fleet.example.com/downloads/gpufleet".into(),
        binary_sha256: "ab".repeat(32),
        agent_args: vec!["--gpu".into(), "nvml".into()],
    };
    let provider = ScalewayProvider::new(config, settings, install.clone()).unwrap();
    Env {
        fake,
        provider,
        install,
    }
}

fn request(instance_type: &str) -> CreateRequest {
    let instance_id = InstanceId::new();
    let mut t = BTreeMap::new();
    t.insert(tags::CLUSTER.to_string(), "cluster-1".to_string());
    t.insert(tags::INSTANCE.to_string(), instance_id.to_string());
    CreateRequest {
        instance_id,
        idempotency_key: "key-1".into(),
        zone: ZONE.into(),
        instance_type: instance_type.into(),
        tags: t,
        bootstrap: AgentBootstrap {
            instance_id,
            control_plane_url: "https://fleet.example.com".into(),
            bootstrap_secret: "one-time".into(),
            model: "Qwen/Qwen2.5-7B-Instruct".parse().unwrap(),
            agent_port: 7070,
            engine: EngineSpec::Sim {
                port: 8000,
                model_load_delay_ms: 0,
            },
            gpu: GpuSpec {
                model: "NVIDIA L4".into(),
                count: 1,
                vram_mib: 23034,
                power_limit_w: 72.0,
            },
            control_plane_ca_pem: None,
            engine_args: vec![],
        },
        model_size_mib: 15_000,
        first_attempt: false,
    }
}

fn steps(fake: &Shared) -> Vec<String> {
    fake.lock()
        .unwrap()
        .requests
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
}

fn position(steps: &[String], from: usize, pred: impl Fn(&str) -> bool) -> usize {
    from + steps[from..]
        .iter()
        .position(|s| pred(s))
        .unwrap_or_else(|| panic!("step missing after {from}: {steps:#?}"))
}

#[tokio::test]
async fn create_runs_every_step_in_order_and_sets_user_data_as_text() {
    let env = start().await;
    let req = request("L4-1-24G");
    let m = env.provider.create(&req).await.unwrap();
    assert_eq!(m.state, MachineState::Pending);
    assert_eq!(m.tags, req.tags, "tags round-trip");
    assert_eq!(m.zone, ZONE);
    assert!(m.id.as_str().starts_with("fr-par-1/"));
    let s = steps(&env.fake);
    let servers = format!("/instance/v1/zones/{ZONE}/servers");
    let lookup = position(&s, 0, |x| x == format!("GET {servers}"));
    let image = position(&s, lookup, |x| x == "GET /marketplace/v2/local-images");
    let sg = position(&s, image, |x| {
        x.starts_with("POST /instance/v1/zones/fr-par-1/security_groups")
    });
    let server = position(&s, sg, |x| x == format!("POST {servers}"));
    let root_tags = position(&s, server, |x| {
        x.starts_with("PATCH /block/v1/zones/fr-par-1/volumes/")
    });
    let model_tags = position(&s, root_tags + 1, |x| {
        x.starts_with("PATCH /block/v1/zones/fr-par-1/volumes/")
    });
    let ud = position(&s, model_tags, |x| {
        x.starts_with("PATCH") && x.ends_with("/user_data/cloud-init")
    });
    let on = position(&s, ud, |x| x.starts_with("POST") && x.ends_with("/action"));
    assert!(lookup < image && on == s.len() - 1, "{s:#?}");
    {
        let f = env.fake.lock().unwrap();
        assert!(f
            .requests
            .iter()
            .all(|r| r.token.as_deref() == Some(SECRET)));
        let udr = &f.requests[ud];
        assert_eq!(udr.content_type.as_deref(), Some("text/plain"));
        // The user data mounts the model volume the server made.
        let model_volume = f.servers[0]["volumes"]["1"]["id"].as_str().unwrap();
        let disk = cloudinit::CacheDisk {
            device: format!("/dev/disk/by-id/scsi-0SCW_sbs_volume-{model_volume}"),
            mount_point: gpufleet_providers::scaleway::MODEL_CACHE_DIR.to_string(),
        };
        assert_eq!(
            udr.body,
            cloudinit::user_data(&req.bootstrap, &env.install, Some(&disk))
        );
        assert_eq!(
            serde_json::from_str::<Value>(&f.requests[on].body).unwrap(),
            json!({"action": "poweron"})
        );
        let lookup_q = &f.requests[lookup].query;
        assert!(
            lookup_q.contains(&format!("gpufleet-instance%3D{}", req.instance_id)),
            "{lookup_q}"
        );
        let body: Value = serde_json::from_str(&f.requests[server].body).unwrap();
        assert_eq!(body["commercial_type"], json!("L4-1-24G"));
        assert_eq!(body["image"], json!("8063548b-7ade-4faa-8be1-f48f8d3ba3ea"));
        assert_eq!(body["project"], json!(PROJECT));
        // One call makes the server, both volumes and a dynamic routed IP.
        assert_eq!(body["dynamic_ip_required"], json!(true));
        assert_eq!(body["routed_ip_enabled"], json!(true));
        assert_eq!(body["volumes"]["0"]["volume_type"], json!("sbs_volume"));
        assert_eq!(body["volumes"]["0"]["size"], json!(54_000_000_000u64));
        assert_eq!(body["volumes"]["1"]["volume_type"], json!("sbs_volume"));
        assert!(body["volumes"]["1"]["size"].as_u64().unwrap() >= 100_000_000_000);
        assert!(body.get("public_ips").is_none());
        let model_patch: Value = serde_json::from_str(&f.requests[model_tags].body).unwrap();
        assert_eq!(model_patch["perf_iops"], json!(5000));
        assert!(model_patch["tags"]
            .as_array()
            .unwrap()
            .contains(&json!("gpufleet-volume=models")));
        assert!(body["security_group"].is_string());
        let tags: Vec<&str> = body["tags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert!(
            tags.contains(&"gpufleet")
                && tags.contains(&"gpufleet-cluster=cluster-1")
                && tags.contains(&"team=ml")
        );
        // Security group: inbound drop, the two ports opened.
        let sg_body: Value = serde_json::from_str(&f.requests[sg].body).unwrap();
        assert_eq!(sg_body["inbound_default_policy"], json!("drop"));
        let ports: Vec<Value> = f
            .rules
            .iter()
            .map(|r| r["dest_port_from"].clone())
            .collect();
        assert_eq!(ports, vec![json!(7070), json!(8000)]);
        // Both volumes carry the instance tag once tagged; the dynamic IP
        // belongs to the server.
        let itag = format!("gpufleet-instance={}", req.instance_id);
        assert_eq!(f.volumes.len(), 2);
        assert!(f
            .volumes
            .iter()
            .all(|v| v["tags"].as_array().unwrap().contains(&json!(itag))));
        assert!(f.ips.iter().all(|i| i["server"]["id"].is_string()));
    }
    // Running now: the IP shows.
    let got = env.provider.get(&m.id).await.unwrap();
    assert_eq!(got.state, MachineState::Running);
    assert_eq!(got.ip, Some("51.158.77.33".parse().unwrap()));
    assert_eq!(got.tags, req.tags);
    // A second create with the same instance is the same machine, no new resource.
    let posts_before = steps(&env.fake)
        .iter()
        .filter(|s| s.starts_with("POST"))
        .count();
    let again = env.provider.create(&req).await.unwrap();
    assert_eq!(again.id, m.id);
    assert_eq!(
        steps(&env.fake)
            .iter()
            .filter(|s| s.starts_with("POST"))
            .count(),
        posts_before
    );
    let calls = env.provider.api_calls();
    assert_eq!(calls.total, calls.by_operation.values().sum::<u64>());
    assert!(calls.by_operation["create"] > 0 && calls.by_operation["get"] == 1);
}

#[tokio::test]
async fn a_lost_create_answer_is_resumed_without_a_second_server() {
    let env = start().await;
    let req = request("L4-1-24G");
    env.fake.lock().unwrap().lose_server_answer = true;
    let e = env.provider.create(&req).await.unwrap_err();
    assert!(e.is_retryable(), "{e:?}");
    let m = env.provider.create(&req).await.unwrap();
    let f = env.fake.lock().unwrap();
    assert_eq!(f.servers.len(), 1);
    assert_eq!(
        m.id.as_str(),
        format!("{ZONE}/{}", f.servers[0]["id"].as_str().unwrap())
    );
    let posts = |p: &str| {
        f.requests
            .iter()
            .filter(|r| r.method == Method::POST && r.path == p)
            .count()
    };
    assert_eq!(posts(&format!("/instance/v1/zones/{ZONE}/servers")), 1);
    // The server makes its volumes and IP: nothing else is made.
    assert_eq!(posts(&format!("/instance/v1/zones/{ZONE}/ips")), 0);
    assert_eq!(posts(&format!("/block/v1/zones/{ZONE}/volumes")), 0);
    assert_eq!(f.user_data.len(), 1);
    assert_eq!(f.servers[0]["state"], json!("running"));
}

#[tokio::test]
async fn terminate_deletes_the_server_its_ip_and_its_volumes() {
    let env = start().await;
    let req = request("L4-1-24G");
    let m = env.provider.create(&req).await.unwrap();
    assert_eq!(env.fake.lock().unwrap().volumes.len(), 2);
    env.provider.terminate(&m.id).await.unwrap();
    // The terminator's loop: get until NotFound, terminate again meanwhile.
    let mut gone = false;
    for _ in 0..3 {
        match env.provider.get(&m.id).await {
            Err(ProviderError::NotFound { .. }) => {
                gone = true;
                break;
            }
            Ok(_) => env.provider.terminate(&m.id).await.unwrap(),
            Err(e) => panic!("{e:?}"),
        }
    }
    assert!(gone);
    {
        let f = env.fake.lock().unwrap();
        assert!(f.servers.is_empty());
        assert!(f.ips.is_empty(), "{:?}", f.ips);
        assert!(f.volumes.is_empty(), "{:?}", f.volumes);
        let terminate = f
            .requests
            .iter()
            .find(|r| r.path.ends_with("/action") && r.body.contains("terminate"));
        assert!(terminate.is_some());
    }
    // Idempotent.
    env.provider.terminate(&m.id).await.unwrap();
}

#[tokio::test]
async fn a_429_is_waited_out_for_its_retry_after_then_sent_again() {
    let env = start().await;
    env.fake.lock().unwrap().fail_next = Some((
        429,
        vec![("retry-after", "1".into())],
        json!({"type": "too_many_requests", "message": "rate limit exceeded"}),
    ));
    let started = std::time::Instant::now();
    let c = env
        .provider
        .catalog()
        .await
        .expect("answered once the wait is over");
    assert!(!c.instance_types.is_empty());
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "the client waited the Retry-After before sending again"
    );
    let pages = steps(&env.fake)
        .iter()
        .filter(|x| x.ends_with("/products/servers"))
        .count();
    assert!(pages >= 2, "the refused call was sent again: {pages}");
}

#[test]
fn a_429_maps_to_retryable_with_its_retry_after() {
    let e = gpufleet_providers::scaleway::map_error(
        429,
        Some(3),
        br#"{"type": "too_many_requests", "message": "rate limit exceeded"}"#,
    );
    assert!(e.is_retryable(), "{e:?}");
    assert_eq!(e.retry_after(), Some(Duration::from_secs(3)));
}

#[tokio::test]
async fn catalog_follows_every_page_and_is_cached() {
    let env = start().await;
    let c = env.provider.catalog().await.unwrap();
    let names: Vec<&str> = c.instance_types.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        vec!["L4-1-24G", "L4-2-24G", "L4-4-24G", "L4-8-24G", "RENDER-S"]
    );
    assert_eq!(c.zones[0].name, ZONE);
    assert!(c
        .instance_types
        .iter()
        .all(|t| t.zones == vec![ZONE.to_string()]));
    let s = steps(&env.fake);
    assert_eq!(
        s.iter()
            .filter(|x| x.ends_with("/products/servers"))
            .count(),
        3
    );
    assert_eq!(s.iter().filter(|x| x.ends_with("/availability")).count(), 3);
    let pages: Vec<String> = env
        .fake
        .lock()
        .unwrap()
        .requests
        .iter()
        .map(|r| r.query.clone())
        .collect();
    assert!(pages.iter().any(|q| q.contains("page=3")));
    // Cached: no new call; a failed refresh later serves the stale copy.
    env.provider.catalog().await.unwrap();
    assert_eq!(steps(&env.fake).len(), 6);
}

#[tokio::test]
async fn a_type_in_shortage_is_out_of_capacity_before_anything_is_made() {
    let env = start().await;
    // MEMORY3-X32C-256G is `shortage` in the recorded availability pages.
    let e = env
        .provider
        .create(&request("MEMORY3-X32C-256G"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), "out_of_capacity", "{e:?}");
    assert!(steps(&env.fake).iter().all(|s| !s.starts_with("POST")));
}

#[tokio::test]
async fn list_and_resources_filter_by_tags() {
    let env = start().await;
    let a = request("L4-1-24G");
    let b = request("L4-1-24G");
    let ma = env.provider.create(&a).await.unwrap();
    env.provider.create(&b).await.unwrap();
    let mut cluster = BTreeMap::new();
    cluster.insert(tags::CLUSTER.to_string(), "cluster-1".to_string());
    assert_eq!(env.provider.list(&cluster).await.unwrap().len(), 2);
    let only_a = env.provider.list(&a.tags).await.unwrap();
    assert_eq!(only_a.len(), 1);
    assert_eq!(only_a[0].id, ma.id);
    let res = env.provider.list_resources(&a.tags).await.unwrap();
    // The dynamic IP goes with its server: only the volumes are tagged.
    assert_eq!(res.iter().filter(|r| r.kind == ResourceKind::Ip).count(), 0);
    assert_eq!(
        res.iter()
            .filter(|r| r.kind == ResourceKind::Volume)
            .count(),
        2
    );
    assert!(res.iter().all(|r| r.attached_to.as_ref() == Some(&ma.id)));
    // Deleting a detached resource works and is idempotent.
    env.provider.terminate(&ma.id).await.unwrap();
    let res = env.provider.list_resources(&a.tags).await.unwrap();
    for r in &res {
        assert!(r.attached_to.is_none());
        env.provider.delete_resource(r).await.unwrap();
        env.provider.delete_resource(r).await.unwrap();
    }
    assert!(env
        .provider
        .list_resources(&a.tags)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(env.provider.engine().unwrap().port(), 8000);
}

#[tokio::test]
async fn a_first_attempt_looks_for_nothing_an_earlier_one_made() {
    let env = start().await;
    let req = CreateRequest {
        first_attempt: true,
        ..request("L4-1-24G")
    };
    env.provider.create(&req).await.unwrap();
    let s = steps(&env.fake);
    let looked_up = |prefix: &str| s.iter().any(|x| x == prefix);
    assert!(
        !looked_up("GET /instance/v1/zones/fr-par-1/servers"),
        "{s:#?}"
    );
    assert!(!looked_up("GET /instance/v1/zones/fr-par-1/ips"), "{s:#?}");
    assert!(!looked_up("GET /block/v1/zones/fr-par-1/volumes"), "{s:#?}");
    assert!(
        looked_up("POST /instance/v1/zones/fr-par-1/servers"),
        "{s:#?}"
    );
}
