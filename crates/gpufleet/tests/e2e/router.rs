//! The OpenAI-compatible router, driven by a real OpenAI client library
//! (`async-openai`) against `gpufleet up` with Mock instances running the
//! simulator: models, chat and completions (streaming too), API keys (401,
//! 403, revocation), usage accounting, cancellation reaching the engine,
//! failover when an instance dies, and no traffic to instances that are not
//! ready or are draining.

use crate::common::*;
use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::types::{
    ChatCompletionRequestUserMessageArgs, ChatCompletionStreamOptions, CreateChatCompletionRequest,
    CreateChatCompletionRequestArgs, CreateCompletionRequestArgs,
};
use futures::StreamExt;
use gpufleet_domain::{InstanceId, InstanceStatus as S};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Router settings for tests: revocations and usage show up fast.
const ROUTER_TOML: &str = r#"
[router]
api_key_cache_ttl_ms = 200
usage_flush_interval_ms = 200
connect_timeout_ms = 500
breaker_failure_threshold = 3
breaker_cooldown_ms = 500
"#;

async fn spawn_app(policy: &str) -> TestApp {
    TestApp::spawn_with(
        BIN,
        Options {
            extra_toml: format!("{ROUTER_TOML}policy = \"{policy}\"\n"),
            ..Default::default()
        },
    )
    .await
}

/// `POST /api/v1/api-keys`; returns (id, secret).
pub(crate) async fn create_key(
    app: &TestApp,
    name: &str,
    models: Option<Vec<&str>>,
) -> (String, String) {
    let resp = app
        .req(Method::POST, "/api/v1/api-keys")
        .json(&json!({"name": name, "models": models}))
        .send()
        .await
        .expect("POST api-keys");
    assert_eq!(resp.status(), StatusCode::CREATED);
    let v: Value = resp.json().await.unwrap();
    let key = v["key"].as_str().unwrap().to_string();
    assert!(key.starts_with("gfk_"), "{key}");
    (v["id"].as_str().unwrap().to_string(), key)
}

/// An OpenAI client of the router that never retries by itself, so every
/// failure the router lets through shows.
pub(crate) fn openai(app: &TestApp, key: &str) -> async_openai::Client<OpenAIConfig> {
    let config = OpenAIConfig::new()
        .with_api_base(format!("{}/v1", app.base_url))
        .with_api_key(key);
    let no_retry = backoff::ExponentialBackoffBuilder::new()
        .with_max_elapsed_time(Some(Duration::ZERO))
        .build();
    async_openai::Client::with_config(config).with_backoff(no_retry)
}

fn chat(max_tokens: u32, stream: bool) -> CreateChatCompletionRequest {
    CreateChatCompletionRequestArgs::default()
        .model(MODEL)
        .max_tokens(max_tokens)
        .stream(stream)
        .messages(vec![ChatCompletionRequestUserMessageArgs::default()
            .content("one two three four")
            .build()
            .unwrap()
            .into()])
        .build()
        .unwrap()
}

fn api_error(e: OpenAIError) -> async_openai::error::ApiError {
    match e {
        OpenAIError::ApiError(e) => e,
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// A raw chat request through the router (to see statuses and headers).
async fn raw_chat(app: &TestApp, key: &str, body: Value) -> reqwest::Response {
    app.http
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .expect("router answers")
}

pub(crate) fn served_by(resp: &reqwest::Response) -> InstanceId {
    resp.headers()["x-gpufleet-instance"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// Sum of a metric's samples on an engine's `/metrics`.
pub(crate) async fn engine_metric(app: &TestApp, ip: IpAddr, name: &str) -> f64 {
    let text = app
        .http
        .get(format!("http://{ip}:{ENGINE_PORT}/metrics"))
        .send()
        .await
        .expect("engine metrics")
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn ready_instances(app: &TestApp, n: u32) -> HashMap<InstanceId, IpAddr> {
    let ids: Vec<InstanceId> = app.create(n).await.iter().map(|v| v.id).collect();
    app.wait_status(&ids, S::Ready, Duration::from_secs(60))
        .await
        .into_iter()
        .map(|v| (v.id, v.ip.expect("ready with an IP")))
        .collect()
}

/// Polls `GET /api/v1/usage` until `cond` holds.
pub(crate) async fn wait_usage(app: &TestApp, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v: Value = app.get_json("/api/v1/usage").await;
        if cond(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "usage never showed {what}: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) fn usage_of<'a>(report: &'a Value, scope: &str, id: &str) -> Option<&'a Value> {
    report[scope]
        .as_array()?
        .iter()
        .find(|u| u["id"].as_str() == Some(id))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_openai_client_talks_to_the_fleet() {
    let app = spawn_app("least_outstanding").await;
    let (key_id, key) = create_key(&app, "e2e", None).await;
    let client = openai(&app, &key);

    // No instance of it in the key's project (none at all yet): not found,
    // as a model served only in another project would be.
    let e = api_error(client.chat().create(chat(4, false)).await.unwrap_err());
    assert_eq!(e.code.as_deref(), Some("model_not_found"), "{e:?}");
    assert!(client.models().list().await.unwrap().data.is_empty());

    let instances = ready_instances(&app, 2).await;

    // Models with a ready instance.
    let models = client.models().list().await.unwrap();
    let names: Vec<&str> = models.data.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(names, vec![MODEL]);

    // Chat, whole.
    let r = client.chat().create(chat(5, false)).await.unwrap();
    let text = r.choices[0].message.content.clone().unwrap_or_default();
    assert!(!text.is_empty());
    let u = r.usage.expect("usage");
    assert_eq!(u.completion_tokens, 5);
    assert!(u.prompt_tokens > 0);

    // Chat, streamed: the words arrive in chunks and the stream ends; the
    // usage chunk the router asked for is not passed on.
    let mut stream = client.chat().create_stream(chat(8, true)).await.unwrap();
    let (mut pieces, mut usage_chunks) = (0, 0);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("chunk");
        if chunk.usage.is_some() {
            usage_chunks += 1;
        }
        if chunk
            .choices
            .first()
            .and_then(|c| c.delta.content.as_ref())
            .is_some_and(|t| !t.is_empty())
        {
            pieces += 1;
        }
    }
    assert_eq!(pieces, 8, "one chunk per token");
    assert_eq!(usage_chunks, 0, "no usage chunk unless asked for");

    // Asked for: exactly one usage chunk, with the counts.
    let mut req = chat(6, true);
    req.stream_options = Some(ChatCompletionStreamOptions {
        include_usage: true,
    });
    let mut stream = client.chat().create_stream(req).await.unwrap();
    let mut usage = None;
    while let Some(chunk) = stream.next().await {
        if let Some(u) = chunk.expect("chunk").usage {
            assert!(usage.is_none(), "one usage chunk");
            usage = Some(u);
        }
    }
    assert_eq!(usage.expect("usage chunk").completion_tokens, 6);

    // Legacy completions.
    let r = client
        .completions()
        .create(
            CreateCompletionRequestArgs::default()
                .model(MODEL)
                .prompt("hello there")
                .max_tokens(3_u32)
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.usage.unwrap().completion_tokens, 3);

    // Unknown model: 404 naming it.
    let mut bad = chat(2, false);
    bad.model = "nobody/serves-this".into();
    let e = api_error(client.chat().create(bad).await.unwrap_err());
    assert_eq!(e.code.as_deref(), Some("model_not_found"));
    assert!(e.message.contains("nobody/serves-this"), "{}", e.message);

    // Keys: none, unknown, not allowed for the model, revoked.
    let resp = app
        .http
        .post(app.url("/v1/chat/completions"))
        .json(&json!({"model": MODEL, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "authentication_error");
    let e = api_error(
        openai(&app, "gfk_nope")
            .chat()
            .create(chat(2, false))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.r#type.as_deref(), Some("authentication_error"));
    let (_, narrow) = create_key(&app, "narrow", Some(vec!["other/model"])).await;
    let e = api_error(
        openai(&app, &narrow)
            .chat()
            .create(chat(2, false))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.r#type.as_deref(), Some("permission_error"), "{e:?}");
    assert!(openai(&app, &narrow)
        .models()
        .list()
        .await
        .unwrap()
        .data
        .is_empty());
    let (revoked_id, revoked) = create_key(&app, "short-lived", None).await;
    openai(&app, &revoked)
        .chat()
        .create(chat(2, false))
        .await
        .unwrap();
    let resp = app
        .req(Method::DELETE, &format!("/api/v1/api-keys/{revoked_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = raw_chat(&app, &revoked, json!({"model": MODEL, "messages": []}))
            .await
            .status();
        if status == StatusCode::UNAUTHORIZED {
            break;
        }
        assert!(Instant::now() < deadline, "revoked key still works");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A cancelled stream stops the engine's work.
    let resp = raw_chat(
        &app,
        &key,
        json!({"model": MODEL, "stream": true, "max_tokens": 20000,
               "messages": [{"role": "user", "content": "go on"}]}),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let ip = instances[&served_by(&resp)];
    let mut body = resp.bytes_stream();
    for _ in 0..3 {
        body.next().await.expect("chunks flow").expect("chunk");
    }
    assert_eq!(
        engine_metric(&app, ip, "vllm:num_requests_running").await,
        1.0
    );
    drop(body);
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine_metric(&app, ip, "vllm:num_requests_running").await > 0.0 {
        assert!(
            Instant::now() < deadline,
            "the engine still runs the cancelled request"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Usage per key and per instance: 5 successful generations with tokens
    // (chat, 2 streams, completion... ) and the errors.
    let report = wait_usage(&app, "the key's requests and tokens", |v| {
        usage_of(v, "keys", &key_id).is_some_and(|u| {
            u["requests"].as_u64() >= Some(7)
                && u["completion_tokens"].as_u64() >= Some(5 + 8 + 6 + 3)
                && u["errors"].as_u64() >= Some(2)
        })
    })
    .await;
    let key_usage = usage_of(&report, "keys", &key_id).unwrap();
    assert_eq!(key_usage["name"], "e2e");
    let per_instance: u64 = instances
        .keys()
        .filter_map(|id| usage_of(&report, "instances", &id.to_string()))
        .map(|u| u["completion_tokens"].as_u64().unwrap())
        .sum();
    assert!(per_instance >= 5 + 8 + 6 + 3, "{report}");

    // The same figures on the control plane's /metrics, a valid exposition.
    let exposition = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("/metrics")
        .text()
        .await
        .expect("/metrics body");
    let line = exposition
        .lines()
        .find(|l| {
            l.starts_with("gpufleet_router_key_requests_total{")
                && l.contains(&format!("api_key_id=\"{key_id}\""))
        })
        .unwrap_or_else(|| panic!("no router usage for the key in /metrics:\n{exposition}"));
    let requests: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(requests >= 7.0, "{line}");
    gpufleet_test_support::promtool::assert_metrics_pass(
        &exposition,
        gpufleet_agent::metrics::is_upstream_lint,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn traffic_only_reaches_ready_instances_and_survives_failures() {
    let app = spawn_app("round_robin").await;
    let (_, key) = create_key(&app, "load", None).await;
    let client = openai(&app, &key);
    let instances = ready_instances(&app, 2).await;
    let ids: Vec<InstanceId> = instances.keys().copied().collect();
    let body = json!({"model": MODEL, "max_tokens": 2,
                      "messages": [{"role": "user", "content": "hi"}]});

    // Round robin: both instances serve.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..6 {
        let r = raw_chat(&app, &key, body.clone()).await;
        assert_eq!(r.status(), StatusCode::OK);
        seen.insert(served_by(&r));
    }
    assert_eq!(seen.len(), 2, "round robin uses both instances");

    // A new instance gets nothing until it is ready.
    let late = app.create(1).await[0].id;
    loop {
        let r = raw_chat(&app, &key, body.clone()).await;
        assert_eq!(r.status(), StatusCode::OK);
        let by = served_by(&r);
        let status = app.get(late).await.unwrap().status;
        if status == S::Ready {
            break;
        }
        assert_ne!(by, late, "a request reached {late} while it was {status}");
        assert!(
            matches!(status, S::Provisioning | S::Booting | S::Starting),
            "{status}"
        );
    }
    let late_ip = app.get(late).await.unwrap().ip.unwrap();

    // Draining: a long stream on one instance goes on to its end while new
    // requests go elsewhere; termination waits for it.
    let resp = raw_chat(
        &app,
        &key,
        json!({"model": MODEL, "stream": true, "max_tokens": 600,
               "messages": [{"role": "user", "content": "long"}]}),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let draining = served_by(&resp);
    let reader = tokio::spawn(async move {
        let mut text = Vec::new();
        let mut s = resp.bytes_stream();
        while let Some(c) = s.next().await {
            text.extend_from_slice(&c.expect("the draining instance's stream goes on"));
        }
        String::from_utf8(text).unwrap()
    });
    app.terminate(draining).await;
    app.wait_status(&[draining], S::Draining, Duration::from_secs(10))
        .await;
    for _ in 0..10 {
        let r = raw_chat(&app, &key, body.clone()).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_ne!(served_by(&r), draining, "a draining instance got a request");
    }
    assert_eq!(
        app.get(draining).await.unwrap().status,
        S::Draining,
        "still draining while its stream runs"
    );
    let text = tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("the stream ends")
        .unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "complete stream");
    app.wait_status(&[draining], S::Terminated, Duration::from_secs(30))
        .await;

    // Failover: kill one of the two left mid-test; every request after that
    // still succeeds (retried on the other instance).
    let left: Vec<InstanceId> = ids
        .iter()
        .copied()
        .chain([late])
        .filter(|id| *id != draining)
        .collect();
    assert_eq!(left.len(), 2);
    let victim = left[0];
    let victim_ip = if victim == late {
        late_ip
    } else {
        instances[&victim]
    };
    let agents = agent_pids(&victim.to_string());
    for pid in agents.into_iter().chain(engine_pids(victim_ip)) {
        kill9(pid);
    }
    eventually(
        Duration::from_secs(10),
        "the victim's engine is gone",
        || tcp_closed(std::net::SocketAddr::new(victim_ip, ENGINE_PORT)),
    )
    .await;
    for i in 0..20 {
        let r = client.chat().create(chat(2, false)).await;
        assert!(r.is_ok(), "request {i} after the kill failed: {r:?}");
    }
    let mut stream = client.chat().create_stream(chat(4, true)).await.unwrap();
    let mut chunks = 0;
    while let Some(c) = stream.next().await {
        c.expect("streams fail over too");
        chunks += 1;
    }
    assert!(chunks >= 4);
    // The failed attempts are counted on the victim.
    let report = wait_usage(&app, "errors on the killed instance", |v| {
        usage_of(v, "instances", &victim.to_string())
            .is_some_and(|u| u["errors"].as_u64() >= Some(1))
    })
    .await;
    assert!(usage_of(&report, "instances", &draining.to_string()).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_and_failing_instances_are_routed_around() {
    let app = TestApp::spawn_with(
        BIN,
        Options {
            extra_toml: format!(
                "{ROUTER_TOML}first_byte_timeout_ms = 400\npolicy = \"round_robin\"\n"
            ),
            ..Default::default()
        },
    )
    .await;
    let (_, key) = create_key(&app, "faults", None).await;
    let instances = ready_instances(&app, 2).await;
    let mut ids: Vec<InstanceId> = instances.keys().copied().collect();
    ids.sort();
    let (bad, good) = (ids[0], ids[1]);
    // The bad instance's engine stalls every request (failure injection
    // through the simulator's admin endpoint).
    let resp = app
        .http
        .patch(format!(
            "http://{}:{ENGINE_PORT}/admin/config",
            instances[&bad]
        ))
        .json(&json!({"failure_rate": 1.0, "failure_kinds": ["stall"], "stall_ms": 30000}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = json!({"model": MODEL, "max_tokens": 2,
                      "messages": [{"role": "user", "content": "hi"}]});
    let mut slow = 0;
    for i in 0..12 {
        let t = Instant::now();
        let r = raw_chat(&app, &key, body.clone()).await;
        assert_eq!(r.status(), StatusCode::OK, "request {i}");
        assert_eq!(served_by(&r), good);
        if t.elapsed() >= Duration::from_millis(400) {
            slow += 1;
        }
    }
    // One stall (no first token within the 1 s floor of the stall bound)
    // opens the bad instance's circuit at once; after that nothing waits
    // on it (a half-open probe may cost one more).
    assert!(
        (1..=2).contains(&slow),
        "{slow} requests waited for the stalled instance"
    );

    // 5xx answers are retried elsewhere too.
    let resp = app
        .http
        .patch(format!(
            "http://{}:{ENGINE_PORT}/admin/config",
            instances[&bad]
        ))
        .json(&json!({"failure_kinds": ["server_error"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let injected_before = engine_metric(
        &app,
        instances[&bad],
        "gpufleet_sim:injected_failures_total",
    )
    .await;
    // For a few breaker cool-downs: half-open probes reach the failing
    // instance, get a 500, and the request is retried on the good one.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        let r = raw_chat(&app, &key, body.clone()).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(served_by(&r), good);
    }
    let injected_after = engine_metric(
        &app,
        instances[&bad],
        "gpufleet_sim:injected_failures_total",
    )
    .await;
    assert!(
        injected_after > injected_before,
        "no probe reached the failing instance ({injected_before} → {injected_after})"
    );
}
