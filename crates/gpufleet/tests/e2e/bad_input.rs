//! Bad requests get a 4xx with a message naming what is wrong, and change nothing.

use crate::common::*;
use gpufleet_api::views::ErrorBody;
use gpufleet_domain::{InstanceId, InstanceStatus as S};
use gpufleet_proto::{EngineSample, EngineStatus, GpuSource, Heartbeat, SystemSample};
use reqwest::{Method, StatusCode};
use serde_json::json;
use std::time::Duration;

/// Ids and statuses-independent view of the list: which instances exist.
async fn ids(app: &TestApp) -> Vec<InstanceId> {
    let mut v: Vec<_> = app
        .list(true)
        .await
        .expect("list")
        .iter()
        .map(|v| v.id)
        .collect();
    v.sort();
    v
}

/// Checks the answer is 4xx with an error body whose message (or field)
/// mentions `mention`, and that no instance appeared or vanished.
async fn expect_rejected(
    app: &TestApp,
    before: &[InstanceId],
    what: &str,
    resp: reqwest::Response,
    want: StatusCode,
    mention: &str,
) {
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    assert_eq!(status, want, "{what}: status (body {text})");
    let body: ErrorBody = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{what}: error body is not {{\"error\":...}}: {e}: {text}"));
    assert!(!body.error.code.is_empty(), "{what}: error code");
    let said = format!(
        "{} {}",
        body.error.message,
        body.error.field.clone().unwrap_or_default()
    )
    .to_lowercase();
    assert!(
        said.contains(&mention.to_lowercase()),
        "{what}: message should name {mention:?}: {text}"
    );
    assert_eq!(ids(app).await, before, "{what}: the instance list changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_rejected_and_change_nothing() {
    let app = TestApp::spawn(BIN).await;
    let two: Vec<InstanceId> = app.create(2).await.iter().map(|v| v.id).collect();
    let (a, b) = (two[0], two[1]);
    let before = ids(&app).await;
    let post = |body: serde_json::Value| app.req(Method::POST, "/api/v1/instances").json(&body);
    let good = |key: &str, value: serde_json::Value| {
        let mut body = json!({"provider": "mock", "instance_type": TYPE, "model": MODEL});
        body[key] = value;
        body
    };

    let cases = [
        (
            "unknown provider",
            good("provider", json!("nope")),
            "provider",
        ),
        (
            "unknown type",
            good("instance_type", json!("gpu-9000")),
            "instance_type",
        ),
        (
            "unknown model",
            good("model", json!("no/such-model")),
            "model",
        ),
        ("unknown zone", good("zone", json!("mars-1")), "zone"),
        ("count 0", good("count", json!(0)), "count"),
        ("count too large", good("count", json!(100_000)), "count"),
        (
            "missing model",
            json!({"provider": "mock", "instance_type": TYPE}),
            "model",
        ),
    ];
    for (what, body, field) in cases {
        let resp = post(body).send().await.unwrap();
        let want = if resp.status() == StatusCode::UNPROCESSABLE_ENTITY {
            StatusCode::UNPROCESSABLE_ENTITY
        } else {
            StatusCode::BAD_REQUEST
        };
        expect_rejected(&app, &before, what, resp, want, field).await;
    }

    let resp = app
        .req(Method::POST, "/api/v1/instances")
        .header("content-type", "application/json")
        .body("{\"provider\": \"mock\", ")
        .send()
        .await
        .unwrap();
    expect_rejected(
        &app,
        &before,
        "malformed JSON",
        resp,
        StatusCode::BAD_REQUEST,
        "json",
    )
    .await;

    let resp = app
        .req(Method::GET, "/api/v1/instances/not-an-id")
        .send()
        .await
        .unwrap();
    assert!(
        resp.status().is_client_error(),
        "malformed id: {}",
        resp.status()
    );

    // Auth: no token, a wrong token.
    let body = good("count", json!(1));
    let resp = app
        .http
        .post(app.url("/api/v1/instances"))
        .json(&body)
        .send()
        .await
        .unwrap();
    expect_rejected(
        &app,
        &before,
        "missing token",
        resp,
        StatusCode::UNAUTHORIZED,
        "authorization",
    )
    .await;
    let resp = app
        .http
        .post(app.url("/api/v1/instances"))
        .bearer_auth("gfa_wrong")
        .json(&body)
        .send()
        .await
        .unwrap();
    expect_rejected(
        &app,
        &before,
        "wrong token",
        resp,
        StatusCode::UNAUTHORIZED,
        "token",
    )
    .await;

    // An agent's token: not an admin token, and good for its own instance only.
    app.wait_status(&two, S::Ready, Duration::from_secs(60))
        .await;
    let dir = app.machine_dir_of(a).expect("machine dir of a");
    let a_token = std::fs::read_to_string(dir.join("agent-token"))
        .expect("agent-token file")
        .trim()
        .to_string();
    assert!(!a_token.is_empty());
    let resp = app
        .http
        .post(app.url("/api/v1/instances"))
        .bearer_auth(&a_token)
        .json(&body)
        .send()
        .await
        .unwrap();
    expect_rejected(
        &app,
        &before,
        "agent token on the admin API",
        resp,
        StatusCode::UNAUTHORIZED,
        "token",
    )
    .await;

    let hb = Heartbeat {
        instance_id: b,
        seq: u64::MAX / 2,
        sent_at: chrono::Utc::now(),
        agent_version: "test".into(),
        agent_uptime_secs: 1,
        system: SystemSample::default(),
        gpu_source: GpuSource::Simulated,
        gpus: vec![],
        // Built from JSON so optional fields added later keep their defaults.
        engine: serde_json::from_value::<EngineSample>(json!({
            "status": EngineStatus::Crashed, "requests_running": 0.0, "requests_waiting": 0.0, "restarts": 9
        }))
        .expect("engine sample"),
    };
    let heartbeat = app.url(gpufleet_proto::paths::HEARTBEAT);
    let resp = app
        .http
        .post(&heartbeat)
        .bearer_auth(&a_token)
        .json(&hb)
        .send()
        .await
        .unwrap();
    expect_rejected(
        &app,
        &before,
        "a's token heartbeating for b",
        resp,
        StatusCode::FORBIDDEN,
        &b.to_string(),
    )
    .await;
    let resp = app
        .http
        .post(&heartbeat)
        .bearer_auth("gft_forged")
        .json(&hb)
        .send()
        .await
        .unwrap();
    expect_rejected(
        &app,
        &before,
        "forged agent token",
        resp,
        StatusCode::UNAUTHORIZED,
        "token",
    )
    .await;
    let resp = app.http.post(&heartbeat).json(&hb).send().await.unwrap();
    expect_rejected(
        &app,
        &before,
        "heartbeat without token",
        resp,
        StatusCode::UNAUTHORIZED,
        "authorization",
    )
    .await;

    // b was not disturbed: still ready, still heartbeating (its seq was not poisoned).
    let t0 = app
        .get(b)
        .await
        .unwrap()
        .last_heartbeat_at
        .expect("b heartbeats");
    app.wait_until(&[b], Duration::from_secs(10), "b heartbeats again", |vs| {
        vs[0].status == S::Ready && vs[0].last_heartbeat_at.is_some_and(|t| t > t0)
    })
    .await;

    // A bootstrap secret cannot be used twice: re-registering a is refused.
    let reg = json!({"instance_id": a, "bootstrap_secret": "gfb_guess", "agent_version": "x", "hostname": "h"});
    let resp = app
        .http
        .post(app.url(gpufleet_proto::paths::REGISTER))
        .json(&reg)
        .send()
        .await
        .unwrap();
    expect_rejected(
        &app,
        &before,
        "register with a wrong secret",
        resp,
        StatusCode::UNAUTHORIZED,
        "secret",
    )
    .await;
}
