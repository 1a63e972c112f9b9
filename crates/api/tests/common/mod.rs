//! Test harness: the real router served on 127.0.0.1:0, over a real control
//! plane with a fresh database (SQLite, or PostgreSQL with
//! `GPUFLEET_TEST_DATABASE=postgres`) and the in-memory provider of
//! `gpufleet_test_support`, which records calls and hands out machines (no
//! processes). A fake agent answers `/readyz` on
//! 127.0.0.1 when asked to, for the last agent registered through
//! [`TestApp::register_agent`] (with its identity proof), so instances can
//! reach `ready`.

#![allow(dead_code)]

use axum::response::IntoResponse;
use chrono::Utc;
use gpufleet_api::views::{ErrorBody, InstanceView};
use gpufleet_api::{router, serve, ApiState};
use gpufleet_control::{ControlConfig, ControlPlane, Fleet, Tasks};
use gpufleet_domain::InstanceId;
use gpufleet_providers::{Catalog, ProviderRegistry};
use gpufleet_store::Store;
pub use gpufleet_test_support::db::TestDb;
use gpufleet_test_support::provider::{l4_type, zone, FakeProvider, Ips};
use reqwest::StatusCode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const ADMIN_TOKEN: &str = "test-admin-token";
pub const PROVIDER: &str = "testcloud";
pub const TYPE: &str = "gpu-24g";
pub const SMALL_TYPE: &str = "gpu-8g";
pub const ZONE: &str = "zone-a";
pub const OTHER_ZONE: &str = "zone-b";
pub const MODEL: &str = "gpufleet/sim-small";
/// Largest `count` per create request in tests.
pub const MAX_COUNT: u32 = 3;
/// How long a wait on a condition may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// The provider the tests create on: [`PROVIDER`] with two zones and two
/// types; every machine gets 127.0.0.1, where the fake agent answers.
fn test_provider() -> Arc<FakeProvider> {
    let catalog = Catalog {
        zones: vec![zone(ZONE, "Zone A"), zone(OTHER_ZONE, "Zone B")],
        instance_types: vec![
            l4_type(TYPE, 24_576, 32_768, &[ZONE, OTHER_ZONE]),
            l4_type(SMALL_TYPE, 8_192, 32_768, &[ZONE]),
        ],
    };
    Arc::new(FakeProvider::new(PROVIDER, catalog).with_ips(Ips::Localhost))
}

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub provider: Arc<FakeProvider>,
    pub fleet: Fleet,
    /// The reconcilers' driver (their statuses).
    pub driver: Tasks,
    /// Whether the fake agent answers `/readyz` with 200.
    pub agents_ready: Arc<AtomicBool>,
    /// Agents registered by the tests; the fake agent speaks for the last.
    agents: FakeAgents,
    stop: CancellationToken,
    server: Option<JoinHandle<std::io::Result<()>>>,
    tasks: Option<JoinHandle<()>>,
    /// Dropped after `drop` stops the server and the reconcilers.
    pub db: TestDb,
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        Self::spawn_with(|s, _| s).await
    }

    /// [`TestApp::spawn`], with the API's state changed by `configure`
    /// (e.g. single sign-on), which is given the server's base URL.
    pub async fn spawn_with(configure: impl FnOnce(ApiState, &str) -> ApiState) -> TestApp {
        let db = TestDb::fresh().await;
        let store = Store::connect(db.url()).await.expect("store connects");

        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind api");
        let base = format!("http://{}", listener.local_addr().unwrap());

        let agents_ready = Arc::new(AtomicBool::new(false));
        let agents = FakeAgents::default();
        let agent_port = spawn_fake_agent(agents_ready.clone(), agents.clone()).await;

        let config = ControlConfig {
            agent_control_url: base.clone(),
            max_instances_per_request: MAX_COUNT,
            reconcile_interval_ms: 50,
            provision_backoff_base_ms: 50,
            provision_backoff_max_ms: 200,
            probe_timeout_ms: 500,
            ready_probe_interval_ms: 300,
            drain_timeout_secs: 1,
            agent_port,
            ..ControlConfig::default()
        };
        let provider = test_provider();
        let mut providers = ProviderRegistry::new();
        providers.register(provider.clone());
        let control = ControlPlane::build(store, providers, config)
            .await
            .expect("control plane builds");

        let stop = CancellationToken::new();
        let tasks = control.start(stop.clone());
        let app = router(configure(ApiState::new(&control, ADMIN_TOKEN), &base));
        let server = tokio::spawn(serve(listener, app, stop.clone().cancelled_owned()));

        TestApp {
            base,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            provider,
            fleet: control.fleet,
            driver: control.tasks,
            agents_ready,
            agents,
            stop,
            server: Some(server),
            tasks: Some(tasks),
            db,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A request with the admin token.
    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, self.url(path))
            .bearer_auth(ADMIN_TOKEN)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.admin(reqwest::Method::GET, path)
            .send()
            .await
            .expect("request sent")
    }

    pub async fn delete(&self, path: &str) -> reqwest::Response {
        self.admin(reqwest::Method::DELETE, path)
            .send()
            .await
            .expect("request sent")
    }

    pub async fn post<B: Serialize>(&self, path: &str, body: &B) -> reqwest::Response {
        self.admin(reqwest::Method::POST, path)
            .json(body)
            .send()
            .await
            .expect("request sent")
    }

    pub async fn patch<B: Serialize>(&self, path: &str, body: &B) -> reqwest::Response {
        self.admin(reqwest::Method::PATCH, path)
            .json(body)
            .send()
            .await
            .expect("request sent")
    }

    pub async fn post_empty(&self, path: &str) -> reqwest::Response {
        self.admin(reqwest::Method::POST, path)
            .send()
            .await
            .expect("request sent")
    }

    /// Create instances and return them (asserting 202).
    pub async fn create(&self, count: u32) -> Vec<InstanceView> {
        let resp = self
            .post(
                "/api/v1/instances",
                &serde_json::json!({ "provider": PROVIDER, "instance_type": TYPE, "model": MODEL, "count": count }),
            )
            .await;
        let created: gpufleet_api::views::CreatedInstances =
            expect_json(resp, StatusCode::ACCEPTED).await;
        created.instances
    }

    pub async fn instance(&self, id: InstanceId) -> InstanceView {
        expect_json(
            self.get(&format!("/api/v1/instances/{id}")).await,
            StatusCode::OK,
        )
        .await
    }

    pub async fn list_all(&self) -> Vec<InstanceView> {
        let list: gpufleet_api::views::InstanceList = expect_json(
            self.get("/api/v1/instances?include_archived=true").await,
            StatusCode::OK,
        )
        .await;
        list.instances
    }

    /// The bootstrap secret of `id`, once the provisioner created its machine.
    pub async fn bootstrap_secret(&self, id: InstanceId) -> String {
        let provider = self.provider.clone();
        wait_for("the provider create call", || {
            let provider = provider.clone();
            async move { provider.bootstrap_secret(id) }
        })
        .await
    }

    /// Register `id`'s agent with its bootstrap secret; the fake agent then
    /// answers readiness probes as this instance's agent. Returns the token.
    pub async fn register_agent(&self, id: InstanceId) -> String {
        let secret = self.bootstrap_secret(id).await;
        let resp = self
            .client
            .post(self.url(gpufleet_proto::paths::REGISTER))
            .json(&gpufleet_proto::RegisterRequest {
                instance_id: id,
                bootstrap_secret: secret,
                agent_version: "test".into(),
                hostname: "host".into(),
            })
            .send()
            .await
            .expect("request sent");
        let reg: gpufleet_proto::RegisterResponse = expect_json(resp, StatusCode::OK).await;
        self.agents.lock().unwrap().push((id, reg.token.clone()));
        reg.token
    }

    /// Stop the server (and the reconcilers) and wait for both.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        self.stop.cancel();
        if let Some(t) = self.tasks.take() {
            t.await.expect("reconcilers join");
        }
        match self.server.take() {
            Some(s) => tokio::time::timeout(DEADLINE, s)
                .await
                .expect("server stops within the deadline")
                .expect("server task joins"),
            None => Ok(()),
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

type FakeAgents = Arc<Mutex<Vec<(InstanceId, String)>>>;

/// Serve `/readyz` on 127.0.0.1:<port> as the last registered agent: 200
/// when `ready`, 503 otherwise, with the answer to the probe's challenge.
async fn spawn_fake_agent(ready: Arc<AtomicBool>, agents: FakeAgents) -> u16 {
    use axum::http::StatusCode as S;
    use gpufleet_proto::{identity, Readiness};
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind fake agent");
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new().route(
        "/readyz",
        axum::routing::get(
            move |axum::extract::Query(q): axum::extract::Query<HashMap<String, String>>| {
                let ready = ready.load(Ordering::SeqCst);
                let agent = agents.lock().unwrap().last().cloned();
                async move {
                    let Some((id, token)) = agent else {
                        return S::SERVICE_UNAVAILABLE.into_response();
                    };
                    let proof = q
                        .get(identity::CHALLENGE_PARAM)
                        .map(|c| identity::readiness_proof(&identity::token_digest(&token), id, c));
                    let status = if ready { S::OK } else { S::SERVICE_UNAVAILABLE };
                    let body = Readiness {
                        ready,
                        instance_id: id,
                        reason: None,
                        proof,
                    };
                    (status, axum::Json(body)).into_response()
                }
            },
        ),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    port
}

/// Poll `probe` until it yields a value, failing the test after [`DEADLINE`].
pub async fn wait_for<T, F, Fut>(what: &str, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    gpufleet_test_support::wait::wait_for(what, DEADLINE, probe).await
}

/// Assert the status and decode the JSON body.
pub async fn expect_json<T: DeserializeOwned>(resp: reqwest::Response, status: StatusCode) -> T {
    let got = resp.status();
    let url = resp.url().clone();
    let text = resp.text().await.expect("body");
    assert_eq!(got, status, "{url}: unexpected status; body: {text}");
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{url}: body is not the expected JSON ({e}): {text}"))
}

/// Assert an error status and return the `ErrorBody`.
pub async fn expect_error(resp: reqwest::Response, status: StatusCode) -> ErrorBody {
    let ct = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body: ErrorBody = expect_json(resp, status).await;
    assert!(
        ct.starts_with("application/json"),
        "error content type {ct:?}"
    );
    assert!(!body.error.code.is_empty());
    assert!(!body.error.message.is_empty());
    body
}

/// A heartbeat from `id`'s agent.
pub fn heartbeat(id: InstanceId, seq: u64) -> gpufleet_proto::Heartbeat {
    use gpufleet_proto::*;
    Heartbeat {
        instance_id: id,
        seq,
        sent_at: Utc::now(),
        agent_version: "test".into(),
        agent_uptime_secs: 1,
        system: SystemSample {
            cpu_pct: 12.5,
            mem_total_bytes: 1 << 30,
            ..SystemSample::default()
        },
        gpu_source: GpuSource::Simulated,
        gpus: vec![GpuSample {
            index: 0,
            name: "NVIDIA L4".into(),
            uuid: None,
            util_pct: Some(40.0),
            mem_used_mib: 1_000,
            mem_total_mib: 24_576,
            temp_c: Some(50.0),
            power_w: Some(40.0),
            power_limit_w: Some(72.0),
            ..GpuSample::default()
        }],
        engine: EngineSample {
            status: EngineStatus::Starting,
            requests_running: 0.0,
            requests_waiting: 0.0,
            restarts: 0,
            kv_cache_usage: None,
            prompt_tokens_per_s: None,
            generation_tokens_per_s: None,
            ttft_mean_s: None,
            canary: None,
        },
    }
}
