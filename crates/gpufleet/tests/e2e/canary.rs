//! The engine canary end to end: a Mock instance's simulator hangs on every
//! completion while its `/health` still answers 200 (a known vLLM failure
//! mode). The agent's canary notices, the instance turns `unhealthy` with
//! the reason on its timeline and leaves the router's pool; once the engine
//! answers again, it is `ready` and routed to again.

use crate::common::*;
use gpufleet_domain::{InstanceId, InstanceStatus as S};
use gpufleet_test_support::wait::wait_for;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::net::IpAddr;
use std::time::{Duration, Instant};

const CANARY_INTERVAL_MS: u64 = 1_000;
const CANARY_TIMEOUT_MS: u64 = 500;
/// Room for the heartbeat, the Health pass and a busy test machine.
const MARGIN: Duration = Duration::from_secs(5);

fn detection_deadline() -> Duration {
    Duration::from_millis(CANARY_INTERVAL_MS + CANARY_TIMEOUT_MS) + MARGIN
}

async fn patch_engine(app: &TestApp, ip: IpAddr, body: Value) {
    let resp = app
        .http
        .patch(format!("http://{ip}:{ENGINE_PORT}/admin/config"))
        .json(&body)
        .send()
        .await
        .expect("the simulator's admin API answers");
    assert!(
        resp.status().is_success(),
        "PATCH {body}: {}",
        resp.status()
    );
}

/// Models the router lists to `key`.
async fn routed_models(app: &TestApp, key: &str) -> Vec<String> {
    let v: Value = app
        .http
        .get(app.url("/v1/models"))
        .bearer_auth(key)
        .send()
        .await
        .expect("router answers")
        .json()
        .await
        .expect("a model list");
    v["data"]
        .as_array()
        .map(|d| {
            d.iter()
                .filter_map(|m| m["id"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// A completion through the router: its status and the instance that served it.
async fn complete(app: &TestApp, key: &str) -> (StatusCode, Option<InstanceId>) {
    let resp = app
        .http
        .post(app.url("/v1/completions"))
        .bearer_auth(key)
        .json(&json!({"model": MODEL, "prompt": "hello", "max_tokens": 2}))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("router answers");
    let by = resp
        .headers()
        .get("x-gpufleet-instance")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    (resp.status(), by)
}

#[tokio::test]
async fn a_hung_engine_whose_health_answers_leaves_the_pool_and_returns() {
    let app = TestApp::spawn_with(
        BIN,
        Options {
            control_toml: format!(
                "canary_interval_ms = {CANARY_INTERVAL_MS}\ncanary_timeout_ms = {CANARY_TIMEOUT_MS}\n"
            ),
            ..Default::default()
        },
    )
    .await;
    let resp = app
        .req(Method::POST, "/api/v1/api-keys")
        .json(&json!({"name": "canary"}))
        .send()
        .await
        .expect("POST api-keys");
    assert_eq!(resp.status(), StatusCode::CREATED);
    let key = resp.json::<Value>().await.unwrap()["key"]
        .as_str()
        .unwrap()
        .to_string();

    let id = app.create(1).await[0].id;
    let ready = app
        .wait_status(&[id], S::Ready, Duration::from_secs(60))
        .await;
    let ip = ready[0].ip.expect("ready with an IP");
    // Routed to, and the canary passes.
    wait_for(
        "the router to list the model",
        Duration::from_secs(10),
        || {
            let app = &app;
            let key = &key;
            async move {
                routed_models(app, key)
                    .await
                    .contains(&MODEL.to_string())
                    .then_some(())
            }
        },
    )
    .await;
    assert_eq!(complete(&app, &key).await, (StatusCode::OK, Some(id)));
    wait_for(
        "a passing canary in the latest sample",
        Duration::from_secs(10),
        || {
            let app = &app;
            async move {
                let m = app.metrics(id).await.ok()?;
                m.latest?.engine.canary.filter(|c| c.ok).map(|_| ())
            }
        },
    )
    .await;

    // Every completion now waits ten minutes before a byte; /health is fine.
    patch_engine(
        &app,
        ip,
        json!({"failure_rate": 1.0, "failure_kinds": ["stall"], "stall_ms": 600_000}),
    )
    .await;
    let hung_at = Instant::now();
    let health = app
        .http
        .get(format!("http://{ip}:{ENGINE_PORT}/health"))
        .send()
        .await
        .expect("/health answers");
    assert_eq!(
        health.status(),
        StatusCode::OK,
        "the hang /health cannot see"
    );
    let unhealthy = app
        .wait_status(&[id], S::Unhealthy, detection_deadline())
        .await;
    let took = hung_at.elapsed();
    let why = unhealthy[0].status_message.clone().unwrap_or_default();
    assert!(
        why.starts_with("unhealthy: engine canary failed: no answer within 500 ms"),
        "{why}"
    );
    eprintln!("unhealthy {took:?} after the engine hung");

    // The timeline names the canary: the agent's event and Health's verdict.
    let tl = app.timeline(id).await.unwrap();
    assert!(
        tl.events.iter().any(|e| e.action == "health.canary"
            && e.outcome == "failed"
            && e.error_code.as_deref() == Some("engine_canary")
            && e.message.contains("no answer within 500 ms")),
        "{:#?}",
        tl.events
    );
    wait_for("the agent's canary event", Duration::from_secs(10), || {
        let app = &app;
        async move {
            let tl = app.timeline(id).await.ok()?;
            tl.events
                .iter()
                .any(|e| e.action == "agent.engine_canary_failed")
                .then_some(())
        }
    })
    .await;

    // Out of the router's pool: the model is not listed, nothing is routed.
    wait_for("the router to drop the model", Duration::from_secs(5), || {
        let app = &app;
        let key = &key;
        async move {
            (!routed_models(app, key)
                .await
                .contains(&MODEL.to_string()))
            .then_some(())
        }
    })
    .await;
    let (status, by) = complete(&app, &key).await;
    assert!(
        !status.is_success() && by.is_none(),
        "routed to a hung engine: {status} by {by:?}"
    );

    // The engine answers again: ready, listed and routed to.
    patch_engine(&app, ip, json!({"failure_rate": 0.0})).await;
    let ready = app.wait_status(&[id], S::Ready, detection_deadline()).await;
    assert_eq!(
        ready[0].status_message.as_deref(),
        Some("healthy again: engine canary passes")
    );
    let tl = app.timeline(id).await.unwrap();
    assert!(
        tl.events
            .iter()
            .any(|e| e.action == "health.canary" && e.outcome == "success"),
        "{:#?}",
        tl.events
    );
    wait_for(
        "the router to list the model again",
        Duration::from_secs(5),
        || {
            let app = &app;
            let key = &key;
            async move {
                routed_models(app, key)
                    .await
                    .contains(&MODEL.to_string())
                    .then_some(())
            }
        },
    )
    .await;
    assert_eq!(complete(&app, &key).await, (StatusCode::OK, Some(id)));
}
