//! Per-key limits, projects and exact usage through the router, against
//! `gpufleet up` with a Mock instance running the simulator: requests per
//! minute exact under a burst from many connections, tokens per minute, a
//! monthly budget reached under concurrency, a key of one project that
//! cannot reach another's model, and a stream whose client goes away
//! counted with what was generated.

use crate::common::*;
use crate::router::{openai, usage_of};
use async_openai::error::OpenAIError;
use async_openai::types::{ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs};
use futures::StreamExt;
use gpufleet_domain::{InstanceStatus as S, ProjectId};
use gpufleet_store::Store;
use gpufleet_test_support::wait::{wait_for, wait_until};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::net::IpAddr;
use std::time::Duration;

/// One completion token costs 1 EUR (prompt tokens are free), so budgets
/// read in tokens.
fn app_toml() -> String {
    format!(
        r#"
[router]
api_key_cache_ttl_ms = 60000
usage_flush_interval_ms = 200

[[control.models]]
name = "{MODEL}"
prompt_price_per_million = 0.0
completion_price_per_million = 1000000.0
"#
    )
}

const WAIT: Duration = Duration::from_secs(20);

async fn spawn_app() -> TestApp {
    TestApp::spawn_with(
        BIN,
        Options {
            extra_toml: app_toml(),
            ..Default::default()
        },
    )
    .await
}

/// One ready instance whose engine takes many requests at once, with
/// `itl_ms` between tokens.
async fn ready_instance(app: &TestApp, itl_ms: f64) -> IpAddr {
    let ids: Vec<_> = app.create(1).await.iter().map(|v| v.id).collect();
    let ready = app
        .wait_status(&ids, S::Ready, Duration::from_secs(60))
        .await;
    let ip = ready[0].ip.expect("ready with an IP");
    let resp = app
        .http
        .patch(format!("http://{ip}:{ENGINE_PORT}/admin/config"))
        .json(&json!({"max_num_seqs": 256, "max_waiting": 1024, "itl_ms": itl_ms, "ttft_ms": 5.0}))
        .send()
        .await
        .expect("the simulator's admin API answers");
    assert!(resp.status().is_success(), "{}", resp.status());
    ip
}

/// `POST /api/v1/api-keys` with `extra` members; returns (id, secret).
async fn create_key(app: &TestApp, name: &str, extra: Value) -> (String, String) {
    let mut body = json!({"name": name});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let resp = app
        .req(Method::POST, "/api/v1/api-keys")
        .json(&body)
        .send()
        .await
        .expect("POST api-keys");
    assert_eq!(resp.status(), StatusCode::CREATED);
    let v: Value = resp.json().await.unwrap();
    (
        v["id"].as_str().unwrap().to_string(),
        v["key"].as_str().unwrap().to_string(),
    )
}

async fn create_project(app: &TestApp, id: &str) {
    let resp = app
        .req(Method::POST, "/api/v1/projects")
        .json(&json!({"id": id}))
        .send()
        .await
        .expect("POST projects");
    assert_eq!(resp.status(), StatusCode::CREATED);
}

async fn key_view(app: &TestApp, id: &str) -> Value {
    let v: Value = app.get_json("/api/v1/api-keys").await;
    v["api_keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == id)
        .cloned()
        .expect("the key is listed")
}

async fn chat(app: &TestApp, key: &str, max_tokens: u32) -> reqwest::Response {
    app.http
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": MODEL, "max_tokens": max_tokens,
                      "messages": [{"role": "user", "content": "one two three"}]}))
        .send()
        .await
        .expect("router answers")
}

fn header(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_are_held_to_their_rpm_tpm_and_budget() {
    let app = spawn_app().await;
    ready_instance(&app, 1.0).await;

    // Invalid limits: 400 naming the field.
    for (body, field) in [
        (json!({"name": "x", "rpm": 0}), "rpm"),
        (json!({"name": "x", "tpm": "many"}), "tpm"),
        (json!({"name": "x", "monthly_budget": -1}), "monthly_budget"),
    ] {
        let resp = app
            .req(Method::POST, "/api/v1/api-keys")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{body}");
        let e: Value = resp.json().await.unwrap();
        assert_eq!(e["error"]["field"], field, "{e}");
    }

    // rpm: a burst of 3 x rpm from 50 connections admits exactly rpm.
    const RPM: usize = 20;
    let (rpm_id, rpm_key) = create_key(&app, "rpm", json!({"rpm": RPM})).await;
    let answers = futures::stream::iter(0..3 * RPM)
        .map(|_| chat(&app, &rpm_key, 1))
        .buffer_unordered(50)
        .collect::<Vec<_>>()
        .await;
    let ok: Vec<_> = answers
        .iter()
        .filter(|r| r.status() == StatusCode::OK)
        .collect();
    let limited: Vec<_> = answers
        .iter()
        .filter(|r| r.status() == StatusCode::TOO_MANY_REQUESTS)
        .collect();
    assert_eq!((ok.len(), limited.len()), (RPM, 2 * RPM));
    for r in &ok {
        assert_eq!(
            header(r, "x-ratelimit-limit-requests").as_deref(),
            Some("20")
        );
        assert!(header(r, "x-ratelimit-remaining-requests").is_some());
        assert!(header(r, "x-ratelimit-reset-requests").is_some());
        assert!(header(r, "x-ratelimit-limit-tokens").is_none(), "no tpm");
    }
    let r = limited[0];
    assert_eq!(
        header(r, "x-ratelimit-remaining-requests").as_deref(),
        Some("0")
    );
    let retry: u64 = header(r, "retry-after").unwrap().parse().unwrap();
    // The window's 60 s and its 100 ms bucket, rounded up.
    assert!((1..=61).contains(&retry), "{retry}");
    let reset = header(r, "x-ratelimit-reset-requests").unwrap();
    assert!(reset.ends_with('s'), "{reset}");
    let resp = chat(&app, &rpm_key, 1).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
    assert_eq!(body["error"]["type"], "requests");
    assert!(body["error"]["param"].is_null());
    // An official-style client sees a rate-limit error.
    let req = CreateChatCompletionRequestArgs::default()
        .model(MODEL)
        .max_tokens(1_u32)
        .messages(vec![ChatCompletionRequestUserMessageArgs::default()
            .content("hi")
            .build()
            .unwrap()
            .into()])
        .build()
        .unwrap();
    match openai(&app, &rpm_key).chat().create(req.clone()).await {
        Err(OpenAIError::ApiError(e)) => {
            assert_eq!(e.code.as_deref(), Some("rate_limit_exceeded"), "{e:?}")
        }
        other => panic!("expected a rate-limit error, got {other:?}"),
    }
    // Raised limit (PATCH): effective at once through the key cache.
    let resp = app
        .req(Method::PATCH, &format!("/api/v1/api-keys/{rpm_id}"))
        .json(&json!({"rpm": 1000}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = resp.json().await.unwrap();
    assert_eq!((v["rpm"].as_u64(), v["tpm"].as_u64()), (Some(1000), None));
    assert_eq!(v["project_id"], "default");
    let resp = chat(&app, &rpm_key, 1).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        header(&resp, "x-ratelimit-limit-requests").as_deref(),
        Some("1000")
    );
    let resp = app
        .req(Method::PATCH, &format!("/api/v1/api-keys/{rpm_id}"))
        .json(&json!({"rpm": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);

    // tpm: each request reserves body bytes / 4 + max_tokens and settles
    // to what it used; past the limit, a 429 of type tokens.
    let (_, tpm_key) = create_key(&app, "tpm", json!({"tpm": 300})).await;
    let first = chat(&app, &tpm_key, 100).await;
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(
        header(&first, "x-ratelimit-limit-tokens").as_deref(),
        Some("300")
    );
    let left = |r: &reqwest::Response| -> u64 {
        header(r, "x-ratelimit-remaining-tokens")
            .unwrap()
            .parse()
            .unwrap()
    };
    let mut statuses = vec![];
    let mut remaining = vec![left(&first)];
    for _ in 0..3 {
        let r = chat(&app, &tpm_key, 100).await;
        statuses.push(r.status());
        if r.status() == StatusCode::OK {
            remaining.push(left(&r));
        } else {
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["error"]["type"], "tokens", "{body}");
            assert_eq!(body["error"]["code"], "rate_limit_exceeded");
            break;
        }
    }
    assert_eq!(
        statuses,
        vec![StatusCode::OK, StatusCode::TOO_MANY_REQUESTS],
        "two requests of ~130 fit in 300 tokens a minute, not three"
    );
    assert!(remaining[1] < remaining[0], "{remaining:?}");

    // Budget: 30 completion tokens' worth, 10 per request, 12 at once.
    // Reservations count: the budget is overshot by less than a request.
    let (budget_id, budget_key) = create_key(&app, "budget", json!({"monthly_budget": 30})).await;
    let answers = futures::stream::iter(0..12)
        .map(|_| chat(&app, &budget_key, 10))
        .buffer_unordered(12)
        .collect::<Vec<_>>()
        .await;
    let mut ok = 0;
    for r in answers {
        match r.status() {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                let body: Value = r.json().await.unwrap();
                assert_eq!(body["error"]["code"], "insufficient_quota", "{body}");
                assert_eq!(body["error"]["type"], "insufficient_quota");
            }
            s => panic!("unexpected {s}"),
        }
    }
    assert!((1..=3).contains(&ok), "{ok} admitted");
    // Spent it (what is left settles), then refused.
    let mut spent_all = false;
    for _ in 0..10 {
        let r = chat(&app, &budget_key, 10).await;
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            let body: Value = r.json().await.unwrap();
            let msg = body["error"]["message"].as_str().unwrap();
            assert!(
                msg.contains("of its monthly budget of 30 EUR") && msg.contains("has spent 3"),
                "{msg}"
            );
            spent_all = true;
            break;
        }
        assert_eq!(r.status(), StatusCode::OK);
    }
    assert!(spent_all, "the budget was never reached");
    let spent = wait_for("the key's charges flushed", WAIT, || async {
        let v = key_view(&app, &budget_id).await;
        let spent = v["spent_this_month"].as_f64().unwrap();
        (spent >= 30.0).then_some(spent)
    })
    .await;
    assert!(spent < 40.0, "overshot by a request at most: {spent}");
    match openai(&app, &budget_key).chat().create(req).await {
        Err(OpenAIError::ApiError(e)) => {
            assert_eq!(e.code.as_deref(), Some("insufficient_quota"), "{e:?}")
        }
        other => panic!("expected insufficient_quota, got {other:?}"),
    }
    // Keys without limits get no rate-limit headers.
    let (_, free) = create_key(&app, "free", json!({})).await;
    let r = chat(&app, &free, 1).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(header(&r, "x-ratelimit-limit-requests").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_reaches_its_own_project_and_a_dropped_stream_is_counted() {
    let app = spawn_app().await;
    ready_instance(&app, 20.0).await;
    let (key_id, key) = create_key(&app, "mine", json!({"tpm": 1_000_000})).await;

    let store = Store::connect(app.db.url())
        .await
        .expect("the test's database");
    // A key of another project sees none of the default project's models.
    create_project(&app, "research").await;
    let (_, other) = create_key(&app, "research", json!({"project": "research"})).await;
    let models = |k: String| {
        let app = &app;
        async move {
            let v: Value = app
                .http
                .get(app.url("/v1/models"))
                .bearer_auth(k)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        }
    };
    assert!(models(other.clone()).await.is_empty());
    let resp = chat(&app, &other, 1).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body["error"]["code"], "model_not_found",
        "like an unknown model"
    );
    let r = chat(&app, &key, 1).await;
    assert_eq!(r.status(), StatusCode::OK);
    let before = 1;

    // A client that asks for vLLM's continuous usage gets it as the engine
    // sends it: the usage so far in every chunk.
    let resp = app
        .http
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&json!({"model": MODEL, "stream": true, "max_tokens": 3,
                      "stream_options": {"include_usage": true, "continuous_usage_stats": true},
                      "messages": [{"role": "user", "content": "one two three"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let text = resp.text().await.unwrap();
    let chunks: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let so_far: Vec<u64> = chunks
        .iter()
        .map(|c| {
            c["usage"]["completion_tokens"]
                .as_u64()
                .expect("usage in every chunk")
        })
        .collect();
    assert_eq!(so_far, vec![0, 1, 2, 3, 3, 3], "{text}");
    let before = before + 3;

    // A stream of 200 tokens whose client goes away after 5 chunks.
    let resp = app
        .http
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&json!({"model": MODEL, "stream": true, "max_tokens": 200,
                      "messages": [{"role": "user", "content": "one two three"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.bytes_stream();
    let mut tokens = 0;
    let mut text = String::new();
    while tokens < 5 {
        let chunk = body.next().await.expect("chunks flow").expect("chunk");
        text.push_str(&String::from_utf8_lossy(&chunk));
        tokens = text.matches("\"content\":\"").count().saturating_sub(1);
    }
    assert!(
        !text.contains("\"usage\""),
        "the per-chunk usage the client did not ask for is stripped: {text}"
    );
    drop(body);
    // The requests before it counted 1 + 3 completion tokens; this one
    // adds its prompt and what was generated and relayed (not 0, not 200).
    let u = wait_for("the dropped stream counted", WAIT, || async {
        let v: Value = app.get_json("/api/v1/usage").await;
        let u = usage_of(&v, "keys", &key_id)?.clone();
        (u["requests"].as_u64() == Some(3) && u["completion_tokens"].as_u64()? > before)
            .then_some(u)
    })
    .await;
    let completion = u["completion_tokens"].as_u64().unwrap() - before;
    assert!(
        (5..200).contains(&completion),
        "counted {completion} completion tokens of a stream dropped after 5: {u}"
    );
    assert!(u["prompt_tokens"].as_u64().unwrap() >= 2, "{u}");
    // The same in usage_hourly, per (hour, key, instance), with its charge.
    wait_until("usage_hourly has the stream", WAIT, || async {
        let rows = store
            .hourly_usage(
                chrono::Utc::now() - chrono::Duration::hours(1),
                chrono::Utc::now() + chrono::Duration::hours(1),
            )
            .await
            .unwrap();
        let mine: Vec<_> = rows
            .iter()
            .filter(|r| r.key_id.map(|k| k.to_string()) == Some(key_id.clone()))
            .collect();
        let completion: u64 = mine.iter().map(|r| r.completion_tokens).sum();
        let cost: f64 = mine.iter().map(|r| r.cost).sum();
        mine.iter()
            .all(|r| r.project_id.as_str() == "default" && r.model.as_str() == MODEL)
            && Some(completion) == u["completion_tokens"].as_u64()
            && (cost - completion as f64).abs() < 1e-6
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_project_s_requests_are_held_for_its_own_deployment_only() {
    let app = spawn_app().await;
    // A deployment of project `research` and a key of that project.
    let store = Store::connect(app.db.url())
        .await
        .expect("the test's database");
    let research: ProjectId = "research".parse().unwrap();
    create_project(&app, "research").await;
    let (_, theirs) = create_key(&app, "research", json!({"project": "research"})).await;
    let (_, ours) = create_key(&app, "default", json!({})).await;
    let resp = app
        .req(Method::POST, "/api/v1/deployments")
        .json(&json!({
            "project": "research",
            "name": "theirs",
            "model": MODEL,
            "placements": [{"provider": "mock", "zone": "local-1", "instance_type": TYPE}],
            "replicas": {"min": 1, "max": 1},
        }))
        .send()
        .await
        .expect("POST deployments");
    assert_eq!(resp.status(), StatusCode::CREATED);
    let deployment: gpufleet_api::views::DeploymentView = resp.json().await.unwrap();

    // No replica ready yet: the research key's request is held until its
    // project's replica is, while the default project (no deployment)
    // gets model_not_found at once rather than waiting.
    let held = tokio::spawn({
        let http = app.http.clone();
        let url = app.url("/v1/chat/completions");
        async move {
            http.post(url)
                .bearer_auth(theirs)
                .json(&json!({"model": MODEL, "max_tokens": 2,
                              "messages": [{"role": "user", "content": "wake up"}]}))
                .timeout(Duration::from_secs(120))
                .send()
                .await
                .expect("router answers")
        }
    });
    let t = std::time::Instant::now();
    let resp = chat(&app, &ours, 1).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert!(t.elapsed() < Duration::from_secs(5), "not held");
    let resp = held.await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let served: gpufleet_domain::InstanceId = header(&resp, "x-gpufleet-instance")
        .unwrap()
        .parse()
        .unwrap();
    let inst = app.get(served).await.unwrap();
    assert_eq!(inst.deployment_id, Some(deployment.id));
    let rec = store.get_instance(served).await.unwrap().unwrap();
    assert_eq!(rec.project_id, research);
    // Now ready, it is still the research project's alone.
    let resp = chat(&app, &ours, 1).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    // The hold and its release are on the research deployment's timeline.
    wait_until("hold and release on the timeline", WAIT, || async {
        let actions: Vec<_> = store
            .list_deployment_events(deployment.id, None, 1000)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.event.action)
            .collect();
        actions.contains(&gpufleet_domain::DeploymentAction::Hold)
            && actions.contains(&gpufleet_domain::DeploymentAction::Release)
    })
    .await;
}
