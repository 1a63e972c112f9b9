//! The HTTP API end to end: real server on 127.0.0.1:0, real Fleet and store.

mod common;

use common::*;
use futures::StreamExt;
use gpufleet_api::views::*;
use gpufleet_domain::{InstanceId, InstanceStatus};
use gpufleet_proto::{
    paths, AgentEvent, AgentEventKind, HeartbeatAck, RegisterRequest, RegisterResponse,
};
use reqwest::{Method, StatusCode};
use serde_json::json;

fn create_body() -> serde_json::Value {
    json!({ "provider": PROVIDER, "instance_type": TYPE, "model": MODEL })
}

#[tokio::test]
async fn healthz_and_readyz_need_no_token() {
    let app = TestApp::spawn().await;
    let resp = app.client.get(app.url("/healthz")).send().await.unwrap();
    let body: serde_json::Value = expect_json(resp, StatusCode::OK).await;
    assert_eq!(body, json!({ "status": "ok" }));
    // Readiness (for load balancers) asks the database; it answers here.
    let resp = app.client.get(app.url("/readyz")).send().await.unwrap();
    let body: serde_json::Value = expect_json(resp, StatusCode::OK).await;
    assert_eq!(body, json!({ "status": "ok" }));
}

#[tokio::test]
async fn metrics_is_open_unless_a_metrics_token_is_set() {
    let app = TestApp::spawn().await;
    let resp = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    const METRICS_TOKEN: &str = "scraper-token-0123456789";
    let app = TestApp::spawn_with(|s, _| s.with_metrics_token(Some(METRICS_TOKEN.into()))).await;
    let scrape = |token: Option<&str>| {
        let mut r = app.client.get(app.url("/metrics"));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    for wrong in [None, Some("scraper-token-012345678"), Some("nope")] {
        let resp = scrape(wrong).await.unwrap();
        let body: serde_json::Value = expect_json(resp, StatusCode::UNAUTHORIZED).await;
        assert_eq!(body["error"]["code"], "unauthorized", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("metrics token"),
            "{body}"
        );
    }
    for right in [METRICS_TOKEN, ADMIN_TOKEN] {
        let resp = scrape(Some(right)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let text = resp.text().await.unwrap();
        assert!(text.contains("gpufleet_heartbeat_lag_seconds"), "{text}");
    }
}

#[tokio::test]
async fn api_routes_need_the_admin_token() {
    let app = TestApp::spawn().await;
    for (method, path) in [
        (Method::GET, "/api/v1/instances"),
        (Method::POST, "/api/v1/instances"),
        (Method::GET, "/api/v1/providers"),
        (Method::GET, "/api/v1/models"),
        (Method::GET, "/api/v1/events"),
        (Method::GET, "/api/v1/system/tasks"),
        (Method::GET, "/api/v1/openapi.json"),
    ] {
        let missing = app
            .client
            .request(method.clone(), app.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(
            missing.headers()["www-authenticate"],
            "Bearer",
            "{method} {path}"
        );
        let body = expect_error(missing, StatusCode::UNAUTHORIZED).await;
        assert_eq!(body.error.code, "unauthorized");

        let wrong = app
            .client
            .request(method.clone(), app.url(path))
            .bearer_auth("not-the-token")
            .send()
            .await
            .unwrap();
        expect_error(wrong, StatusCode::UNAUTHORIZED).await;

        let basic = app
            .client
            .request(method.clone(), app.url(path))
            .basic_auth("admin", Some(ADMIN_TOKEN))
            .send()
            .await
            .unwrap();
        expect_error(basic, StatusCode::UNAUTHORIZED).await;
    }
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json() {
    let app = TestApp::spawn().await;
    let body = expect_error(app.get("/api/v1/nope").await, StatusCode::NOT_FOUND).await;
    assert_eq!(body.error.code, "not_found");
    expect_error(
        app.client.get(app.url("/nope")).send().await.unwrap(),
        StatusCode::NOT_FOUND,
    )
    .await;
    let resp = app
        .admin(Method::PUT, "/api/v1/instances")
        .send()
        .await
        .unwrap();
    expect_error(resp, StatusCode::METHOD_NOT_ALLOWED).await;
}

#[tokio::test]
async fn instance_life_through_the_api() {
    let app = TestApp::spawn().await;
    assert!(app.list_all().await.is_empty());

    let created = app.create(2).await;
    assert_eq!(created.len(), 2);
    for v in &created {
        assert_eq!(v.status, InstanceStatus::Provisioning);
        assert_eq!(v.provider, PROVIDER);
        assert_eq!(v.instance_type, TYPE);
        assert_eq!(v.zone, ZONE, "default zone: the first offering the type");
        assert_eq!(v.model, MODEL);
        assert!(v.progress < 100);
    }
    let (a, b) = (created[0].id, created[1].id);

    // Get and list.
    assert_eq!(app.instance(a).await.id, a);
    let list: InstanceList = expect_json(app.get("/api/v1/instances").await, StatusCode::OK).await;
    let ids: Vec<_> = list.instances.iter().map(|v| v.id).collect();
    assert!(ids.contains(&a) && ids.contains(&b));
    let list: InstanceList = expect_json(
        app.get(&format!("/api/v1/instances?provider={PROVIDER}&limit=1"))
            .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(list.instances.len(), 1);
    let list: InstanceList = expect_json(
        app.get("/api/v1/instances?status=terminated,archived")
            .await,
        StatusCode::OK,
    )
    .await;
    assert!(list.instances.is_empty());

    // The provisioner takes it from here (the API never calls the provider).
    let fleet_app = &app;
    wait_for("both machines created", || async move {
        (fleet_app.provider.machine_count() == 2).then_some(())
    })
    .await;

    // A live instance cannot be archived.
    let body = expect_error(
        app.post_empty(&format!("/api/v1/instances/{b}/archive"))
            .await,
        StatusCode::CONFLICT,
    )
    .await;
    assert_eq!(body.error.code, "conflict");

    // Terminate is idempotent.
    let first: InstanceView = expect_json(
        app.delete(&format!("/api/v1/instances/{a}")).await,
        StatusCode::ACCEPTED,
    )
    .await;
    assert_eq!(first.id, a);
    assert!(matches!(
        first.status,
        InstanceStatus::Draining | InstanceStatus::Terminating | InstanceStatus::Terminated
    ));
    let second: InstanceView = expect_json(
        app.delete(&format!("/api/v1/instances/{a}")).await,
        StatusCode::ACCEPTED,
    )
    .await;
    assert_eq!(second.id, a);

    // Once terminated it can be archived, and disappears from default lists.
    wait_for("instance terminated", || async move {
        (fleet_app.instance(a).await.status == InstanceStatus::Terminated).then_some(())
    })
    .await;
    let archived: InstanceView = expect_json(
        app.post_empty(&format!("/api/v1/instances/{a}/archive"))
            .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(archived.status, InstanceStatus::Archived);
    assert_eq!(archived.progress, 100);
    let list: InstanceList = expect_json(app.get("/api/v1/instances").await, StatusCode::OK).await;
    assert!(list.instances.iter().all(|v| v.id != a));
    assert!(app.list_all().await.iter().any(|v| v.id == a));
    let list: InstanceList = expect_json(
        app.get("/api/v1/instances?status=archived").await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(
        list.instances.iter().map(|v| v.id).collect::<Vec<_>>(),
        vec![a]
    );

    // The timeline tells the story, oldest first.
    let tl: Timeline = expect_json(
        app.get(&format!("/api/v1/instances/{a}/events")).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(tl.instance_id, a);
    assert!(!tl.events.is_empty());
    assert!(tl.events.windows(2).all(|w| w[0].id < w[1].id));
    assert!(tl
        .events
        .iter()
        .any(|e| e.to_status == Some(InstanceStatus::Terminated)));
    let after = tl.events[0].id;
    let tl2: Timeline = expect_json(
        app.get(&format!(
            "/api/v1/instances/{a}/events?after={after}&limit=1"
        ))
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(tl2.events.len(), 1);
    assert!(tl2.events[0].id > after);

    // No heartbeats yet: no samples.
    let m: InstanceMetrics = expect_json(
        app.get(&format!("/api/v1/instances/{b}/metrics")).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(m.instance_id, b);
    assert!(m.latest.is_none() && m.samples.is_empty());
}

#[tokio::test]
async fn create_explicit_zone_and_count() {
    let app = TestApp::spawn().await;
    let resp = app
        .post(
            "/api/v1/instances",
            &json!({ "provider": PROVIDER, "zone": OTHER_ZONE, "instance_type": TYPE, "model": MODEL, "count": MAX_COUNT }),
        )
        .await;
    let created: CreatedInstances = expect_json(resp, StatusCode::ACCEPTED).await;
    assert_eq!(created.instances.len(), MAX_COUNT as usize);
    assert!(created.instances.iter().all(|v| v.zone == OTHER_ZONE));
}

/// POST /api/v1/instances with an `Idempotency-Key` (raw header value).
async fn create_with_key(app: &TestApp, key: &str, body: &serde_json::Value) -> reqwest::Response {
    app.admin(Method::POST, "/api/v1/instances")
        .header("Idempotency-Key", key)
        .json(body)
        .send()
        .await
        .expect("request sent")
}

async fn instance_ids(app: &TestApp) -> Vec<InstanceId> {
    let list: InstanceList = expect_json(app.get("/api/v1/instances").await, StatusCode::OK).await;
    let mut ids: Vec<_> = list.instances.iter().map(|i| i.id).collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn a_create_retried_with_its_idempotency_key_makes_nothing_more() {
    let app = TestApp::spawn().await;
    let mut body = create_body();
    body["count"] = json!(2);
    let resp = create_with_key(&app, "retry-me-1", &body).await;
    assert!(resp.headers().get("idempotent-replayed").is_none());
    let first: CreatedInstances = expect_json(resp, StatusCode::ACCEPTED).await;
    let mut made: Vec<_> = first.instances.iter().map(|i| i.id).collect();
    made.sort();
    assert_eq!(made.len(), 2);

    // The retry (the quoted form of the IETF draft is the same key): the
    // same instances, marked as replayed, and nothing new.
    let resp = create_with_key(&app, "\"retry-me-1\"", &body).await;
    assert_eq!(resp.headers()["idempotent-replayed"], "true");
    let again: CreatedInstances = expect_json(resp, StatusCode::ACCEPTED).await;
    let mut replayed: Vec<_> = again.instances.iter().map(|i| i.id).collect();
    replayed.sort();
    assert_eq!(replayed, made);
    assert_eq!(instance_ids(&app).await, made);

    // The same key with another request is refused, naming the header.
    let mut other = body.clone();
    other["count"] = json!(1);
    let err = expect_error(
        create_with_key(&app, "retry-me-1", &other).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(err.error.code, "idempotency_key_reused");
    assert_eq!(err.error.field.as_deref(), Some("Idempotency-Key"));
    assert_eq!(instance_ids(&app).await, made);

    // Malformed keys: 400 naming the header; nothing made.
    for bad in ["", "has space", &"k".repeat(256), "\"unterminated"] {
        let err = expect_error(
            create_with_key(&app, bad, &body).await,
            StatusCode::BAD_REQUEST,
        )
        .await;
        assert_eq!(
            err.error.field.as_deref(),
            Some("Idempotency-Key"),
            "{bad:?}"
        );
    }
    let resp = app
        .admin(Method::POST, "/api/v1/instances")
        .header("Idempotency-Key", "a")
        .header("Idempotency-Key", "b")
        .json(&body)
        .send()
        .await
        .unwrap();
    let err = expect_error(resp, StatusCode::BAD_REQUEST).await;
    assert_eq!(err.error.field.as_deref(), Some("Idempotency-Key"));
    assert_eq!(instance_ids(&app).await, made);

    // A new key makes new instances; no key at all, too.
    let fresh: CreatedInstances = expect_json(
        create_with_key(&app, "retry-me-2", &body).await,
        StatusCode::ACCEPTED,
    )
    .await;
    assert_eq!(fresh.instances.len(), 2);
    let plain: CreatedInstances = expect_json(
        app.post("/api/v1/instances", &body).await,
        StatusCode::ACCEPTED,
    )
    .await;
    assert_eq!(plain.instances.len(), 2);
    assert_eq!(instance_ids(&app).await.len(), 6);
}

#[tokio::test]
async fn create_rejects_bad_input_and_creates_nothing() {
    let app = TestApp::spawn().await;
    let with = |k: &str, v: serde_json::Value| {
        let mut b = create_body();
        b[k] = v;
        b
    };
    let without = |k: &str| {
        let mut b = create_body();
        b.as_object_mut().unwrap().remove(k);
        b
    };
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "malformed provider name",
            with("provider", json!("Not A Name")),
            "provider",
        ),
        (
            "unknown instance type",
            with("instance_type", json!("gpu-999g")),
            "instance_type",
        ),
        ("unknown zone", with("zone", json!("zone-zz")), "zone"),
        (
            "type not in zone",
            json!({ "provider": PROVIDER, "zone": OTHER_ZONE, "instance_type": SMALL_TYPE, "model": MODEL }),
            "zone",
        ),
        (
            "unknown model",
            with("model", json!("acme/unknown-model")),
            "model",
        ),
        (
            "malformed model",
            with("model", json!("has spaces")),
            "model",
        ),
        (
            "model too big for the GPU",
            json!({ "provider": PROVIDER, "instance_type": SMALL_TYPE, "model": "meta-llama/Llama-3.3-70B-Instruct" }),
            "model",
        ),
        ("count zero", with("count", json!(0)), "count"),
        (
            "count too big",
            with("count", json!(MAX_COUNT + 1)),
            "count",
        ),
        ("count negative", with("count", json!(-1)), "count"),
        (
            "count of the wrong type",
            with("count", json!("two")),
            "count",
        ),
        ("missing model", without("model"), "model"),
        ("missing provider", without("provider"), "provider"),
    ];
    for (what, body, field) in cases {
        let resp = app.post("/api/v1/instances", &body).await;
        let err = expect_error(resp, StatusCode::BAD_REQUEST).await;
        assert_eq!(err.error.code, "invalid_request", "{what}");
        assert_eq!(err.error.field.as_deref(), Some(field), "{what}: {err:?}");
        assert!(
            err.error.message.contains(field),
            "{what}: message should name {field}: {err:?}"
        );
    }

    // Unknown (well-formed) provider: 404, or 400 naming `provider`.
    let resp = app
        .post("/api/v1/instances", &with("provider", json!("nowhere")))
        .await;
    let status = resp.status();
    let err: ErrorBody = expect_json(resp, status).await;
    assert!(
        status == StatusCode::NOT_FOUND
            || (status == StatusCode::BAD_REQUEST
                && err.error.field.as_deref() == Some("provider")),
        "unknown provider: {status} {err:?}"
    );

    // Not JSON at all.
    let resp = app
        .admin(Method::POST, "/api/v1/instances")
        .header("content-type", "application/json")
        .body(r#"{"provider": "testcloud", "#)
        .send()
        .await
        .unwrap();
    let err = expect_error(resp, StatusCode::BAD_REQUEST).await;
    assert_eq!(err.error.code, "invalid_request");

    // Not declared as JSON.
    let resp = app
        .admin(Method::POST, "/api/v1/instances")
        .header("content-type", "text/plain")
        .body(create_body().to_string())
        .send()
        .await
        .unwrap();
    expect_error(resp, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;

    assert!(
        app.list_all().await.is_empty(),
        "no instance may have been created"
    );
    assert!(app.provider.requests().is_empty());
}

#[tokio::test]
async fn bodies_over_one_mib_are_refused() {
    let app = TestApp::spawn().await;
    let mut body = create_body();
    body["padding"] = json!("x".repeat(gpufleet_api::BODY_LIMIT_BYTES + 16));
    let resp = app.post("/api/v1/instances", &body).await;
    let err = expect_error(resp, StatusCode::PAYLOAD_TOO_LARGE).await;
    assert_eq!(err.error.code, "payload_too_large");
    assert!(app.list_all().await.is_empty());
}

#[tokio::test]
async fn bad_and_unknown_instance_ids() {
    let app = TestApp::spawn().await;
    let unknown = InstanceId::new();
    for (method, tail) in [
        (Method::GET, ""),
        (Method::DELETE, ""),
        (Method::POST, "/archive"),
        (Method::GET, "/events"),
        (Method::GET, "/metrics"),
    ] {
        let resp = app
            .admin(
                method.clone(),
                &format!("/api/v1/instances/not-an-id{tail}"),
            )
            .send()
            .await
            .unwrap();
        let err = expect_error(resp, StatusCode::BAD_REQUEST).await;
        assert_eq!(err.error.field.as_deref(), Some("id"), "{method} {tail}");

        let resp = app
            .admin(
                method.clone(),
                &format!("/api/v1/instances/{unknown}{tail}"),
            )
            .send()
            .await
            .unwrap();
        let err = expect_error(resp, StatusCode::NOT_FOUND).await;
        assert_eq!(err.error.code, "not_found", "{method} {tail}");
    }
}

#[tokio::test]
async fn bad_query_parameters_name_themselves() {
    let app = TestApp::spawn().await;
    for (query, field) in [
        ("status=ready,bogus", "status"),
        ("status=ready,%20failed", "status"),
        ("status=", "status"),
        ("limit=abc", "limit"),
        ("limit=0", "limit"),
        ("include_archived=maybe", "include_archived"),
        ("provider=Bad!", "provider"),
    ] {
        let err = expect_error(
            app.get(&format!("/api/v1/instances?{query}")).await,
            StatusCode::BAD_REQUEST,
        )
        .await;
        assert_eq!(err.error.field.as_deref(), Some(field), "{query}: {err:?}");
    }
    let id = app.create(1).await[0].id;
    for path in [
        format!("/api/v1/instances/{id}/metrics?limit=0"),
        format!("/api/v1/instances/{id}/events?after=x"),
        format!("/api/v1/instances/{id}/metrics?from=2025-01-31%2012:00:00Z"),
        format!("/api/v1/instances/{id}/metrics?to=%202025-01-31T12:00:00Z"),
    ] {
        expect_error(app.get(&path).await, StatusCode::BAD_REQUEST).await;
    }
    // Over the maximum is capped, not refused.
    let m: InstanceMetrics = expect_json(
        app.get(&format!("/api/v1/instances/{id}/metrics?limit=5000"))
            .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(m.instance_id, id);
}

#[tokio::test]
async fn catalog_routes() {
    let app = TestApp::spawn().await;
    let providers: ProviderList =
        expect_json(app.get("/api/v1/providers").await, StatusCode::OK).await;
    assert_eq!(providers.providers.len(), 1);
    let p = &providers.providers[0];
    assert_eq!(p.name, PROVIDER);
    assert_eq!(p.instance_type_count, 2);
    assert_eq!(
        p.zones.iter().map(|z| z.name.as_str()).collect::<Vec<_>>(),
        vec![ZONE, OTHER_ZONE]
    );

    let types: InstanceTypeList = expect_json(
        app.get(&format!("/api/v1/providers/{PROVIDER}/instance-types"))
            .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(types.provider, PROVIDER);
    assert_eq!(
        types
            .instance_types
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>(),
        vec![TYPE, SMALL_TYPE]
    );
    expect_error(
        app.get("/api/v1/providers/nowhere/instance-types").await,
        StatusCode::NOT_FOUND,
    )
    .await;

    let models: ModelList = expect_json(app.get("/api/v1/models").await, StatusCode::OK).await;
    let sim = models
        .models
        .iter()
        .find(|m| m.name == MODEL)
        .expect("the sim model is listed");
    assert_eq!(sim.ready_instances, 0);
}

#[tokio::test]
async fn models_count_ready_instances() {
    let app = TestApp::spawn().await;
    app.agents_ready
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let id = app.create(1).await[0].id;
    app.register_agent(id).await;
    let app = &app;
    wait_for("instance ready", || async move {
        (app.instance(id).await.status == InstanceStatus::Ready).then_some(())
    })
    .await;
    let models: ModelList = expect_json(app.get("/api/v1/models").await, StatusCode::OK).await;
    let sim = models.models.iter().find(|m| m.name == MODEL).unwrap();
    assert_eq!(sim.ready_instances, 1);
    assert!(models
        .models
        .iter()
        .filter(|m| m.name != MODEL)
        .all(|m| m.ready_instances == 0));
}

#[tokio::test]
async fn a_ready_instance_whose_agent_vouches_for_it_is_still_probed() {
    let app = TestApp::spawn().await;
    app.agents_ready
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let id = app.create(1).await[0].id;
    let token = app.register_agent(id).await;
    // Heartbeats say the engine is ready (fresh for 3 × 5 s).
    let mut hb = heartbeat(id, 1);
    hb.engine.status = gpufleet_proto::EngineStatus::Ready;
    let resp = app
        .client
        .post(app.url(paths::HEARTBEAT))
        .bearer_auth(&token)
        .json(&hb)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let app = &app;
    wait_for("instance ready", || async move {
        (app.instance(id).await.status == InstanceStatus::Ready).then_some(())
    })
    .await;
    // The agent stops answering ready while its heartbeats still vouch for
    // the engine: probes (every ready_probe_interval_ms) still notice.
    app.agents_ready
        .store(false, std::sync::atomic::Ordering::SeqCst);
    wait_for("instance unhealthy", || async move {
        (app.instance(id).await.status == InstanceStatus::Unhealthy).then_some(())
    })
    .await;
}

fn canary(ok: bool, error: Option<&str>, n: u32) -> gpufleet_proto::CanarySample {
    gpufleet_proto::CanarySample {
        ok,
        checked_at: chrono::Utc::now(),
        latency_ms: ok.then_some(4.0),
        error: error.map(String::from),
        consecutive_failures: n,
    }
}

async fn send_ready_heartbeat(
    app: &TestApp,
    token: &str,
    id: InstanceId,
    seq: u64,
    canary: Option<gpufleet_proto::CanarySample>,
) {
    let mut hb = heartbeat(id, seq);
    hb.engine.status = gpufleet_proto::EngineStatus::Ready;
    hb.engine.canary = canary;
    let resp = app
        .client
        .post(app.url(paths::HEARTBEAT))
        .bearer_auth(token)
        .json(&hb)
        .send()
        .await
        .unwrap();
    let ack: HeartbeatAck = expect_json(resp, StatusCode::OK).await;
    assert!(ack.applied);
    // The canary settings reach agents that kept their token, too.
    assert_eq!(
        (ack.canary_interval_ms, ack.canary_timeout_ms),
        (15_000, 10_000)
    );
}

async fn timeline_of(app: &TestApp, id: InstanceId) -> Vec<TimelineEntryView> {
    let tl: Timeline = expect_json(
        app.get(&format!("/api/v1/instances/{id}/events")).await,
        StatusCode::OK,
    )
    .await;
    tl.events
}

/// A ready instance whose heartbeat says the engine canary failed turns
/// unhealthy with the canary's reason on its timeline, though its agent's
/// /readyz still answers; it is ready again once the canary passes.
#[tokio::test]
async fn a_failing_engine_canary_takes_a_ready_instance_out_until_it_passes() {
    let app = TestApp::spawn().await;
    app.agents_ready
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let id = app.create(1).await[0].id;
    let token = app.register_agent(id).await;
    send_ready_heartbeat(&app, &token, id, 1, Some(canary(true, None, 0))).await;
    let app = &app;
    wait_for("instance ready", || async move {
        (app.instance(id).await.status == InstanceStatus::Ready).then_some(())
    })
    .await;

    // The engine hangs; /readyz (the fake agent) still says ready.
    let failing = canary(false, Some("no answer within 10 s"), 2);
    send_ready_heartbeat(app, &token, id, 2, Some(failing)).await;
    let inst = wait_for("instance unhealthy", || async move {
        let i = app.instance(id).await;
        (i.status == InstanceStatus::Unhealthy).then_some(i)
    })
    .await;
    let why = "engine canary failed: no answer within 10 s (2 checks in a row)";
    assert_eq!(
        inst.status_message.as_deref(),
        Some(format!("unhealthy: {why}").as_str())
    );
    let events = timeline_of(app, id).await;
    let entry = events
        .iter()
        .find(|e| e.action == "health.canary")
        .expect("the canary failure on the timeline");
    assert_eq!(
        (
            entry.outcome.as_str(),
            entry.error_code.as_deref(),
            entry.message.as_str()
        ),
        ("failed", Some("engine_canary"), why)
    );
    // The latest sample carries the canary (the console shows it).
    let m: InstanceMetrics = expect_json(
        app.get(&format!("/api/v1/instances/{id}/metrics")).await,
        StatusCode::OK,
    )
    .await;
    let latest = m.latest.expect("a latest sample");
    assert_eq!(
        latest.engine.canary.and_then(|c| c.error).as_deref(),
        Some("no answer within 10 s")
    );

    // Fresh heartbeats and a passing probe do not bring it back while the
    // canary still fails.
    send_ready_heartbeat(
        app,
        &token,
        id,
        3,
        Some(canary(false, Some("HTTP 500: boom"), 3)),
    )
    .await;
    let health_runs = || async move {
        let body: serde_json::Value =
            expect_json(app.get("/api/v1/system/tasks").await, StatusCode::OK).await;
        body["tasks"]
            .as_array()
            .and_then(|ts| ts.iter().find(|t| t["name"] == "health"))
            .and_then(|t| t["runs"].as_u64())
            .unwrap_or(0)
    };
    let before = health_runs().await;
    wait_for("three more Health passes", || async move {
        (health_runs().await >= before + 3).then_some(())
    })
    .await;
    assert_eq!(app.instance(id).await.status, InstanceStatus::Unhealthy);

    // The canary passes again: ready, and the timeline says why.
    send_ready_heartbeat(app, &token, id, 4, Some(canary(true, None, 0))).await;
    let inst = wait_for("instance ready again", || async move {
        let i = app.instance(id).await;
        (i.status == InstanceStatus::Ready).then_some(i)
    })
    .await;
    assert_eq!(
        inst.status_message.as_deref(),
        Some("healthy again: engine canary passes")
    );
    let events = timeline_of(app, id).await;
    assert!(
        events.iter().any(|e| e.action == "health.canary"
            && e.outcome == "success"
            && e.message
                .starts_with("engine canary passes again (answered in 4 ms)")),
        "{events:#?}"
    );
}

#[tokio::test]
async fn system_tasks_lists_the_reconcilers() {
    let app = TestApp::spawn().await;
    let app = &app;
    let tasks = wait_for("a reconciler run", || async move {
        let body: serde_json::Value =
            expect_json(app.get("/api/v1/system/tasks").await, StatusCode::OK).await;
        let tasks = body["tasks"].as_array().cloned().unwrap_or_default();
        tasks
            .iter()
            .any(|t| t["runs"].as_u64() > Some(0))
            .then_some(tasks)
    })
    .await;
    assert!(tasks
        .iter()
        .all(|t| t["name"].is_string() && t["period_ms"].is_u64()));
}

#[tokio::test]
async fn openapi_document_lists_the_routes() {
    let app = TestApp::spawn().await;
    let doc: serde_json::Value =
        expect_json(app.get("/api/v1/openapi.json").await, StatusCode::OK).await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for p in [
        "/api/v1/instances",
        "/api/v1/instances/{id}",
        "/api/v1/instances/{id}/archive",
        "/api/v1/instances/{id}/events",
        "/api/v1/instances/{id}/metrics",
        "/api/v1/deployments",
        "/api/v1/deployments/{id}",
        "/api/v1/deployments/{id}/events",
        "/api/v1/providers",
        "/api/v1/providers/{name}/instance-types",
        "/api/v1/models",
        "/api/v1/events",
        "/api/v1/system/tasks",
        "/healthz",
        paths::REGISTER,
        paths::HEARTBEAT,
        paths::EVENTS,
    ] {
        assert!(paths.contains_key(p), "openapi.json lacks {p}");
    }
    assert!(doc["paths"]["/api/v1/instances"]["post"]["requestBody"].is_object());
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
}

/// Reads SSE events from a response, with a deadline per event.
struct SseReader {
    stream: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: String,
}

#[derive(Debug)]
struct SseEvent {
    event: String,
    id: Option<String>,
    data: String,
}

impl SseReader {
    fn new(resp: reqwest::Response) -> Self {
        Self {
            stream: resp.bytes_stream().boxed(),
            buf: String::new(),
        }
    }

    /// The next event (comments skipped), or `None` when the stream ends.
    async fn next(&mut self) -> Option<SseEvent> {
        tokio::time::timeout(DEADLINE, async {
            loop {
                if let Some(end) = self.buf.find("\n\n") {
                    let block: String = self.buf.drain(..end + 2).collect();
                    let mut ev = SseEvent {
                        event: "message".into(),
                        id: None,
                        data: String::new(),
                    };
                    let mut any = false;
                    for line in block.lines() {
                        if let Some(v) = line.strip_prefix("event:") {
                            ev.event = v.trim().to_string();
                            any = true;
                        } else if let Some(v) = line.strip_prefix("id:") {
                            ev.id = Some(v.trim().to_string());
                        } else if let Some(v) = line.strip_prefix("data:") {
                            ev.data.push_str(v.strip_prefix(' ').unwrap_or(v));
                            any = true;
                        }
                    }
                    if any {
                        return Some(ev);
                    }
                    continue;
                }
                match self.stream.next().await {
                    Some(Ok(chunk)) => self.buf.push_str(&String::from_utf8_lossy(&chunk)),
                    Some(Err(e)) => panic!("SSE stream failed: {e}"),
                    None => return None,
                }
            }
        })
        .await
        .expect("an SSE event within the deadline")
    }
}

#[tokio::test]
async fn event_stream_sends_a_snapshot_then_changes() {
    let app = TestApp::spawn().await;
    let before = app.create(1).await[0].id;

    let resp = app.get("/api/v1/events").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut sse = SseReader::new(resp);

    let snap = sse.next().await.expect("snapshot");
    assert_eq!(snap.event, "snapshot");
    let list: InstanceList = serde_json::from_str(&snap.data).unwrap();
    assert!(list.instances.iter().any(|v| v.id == before));

    let after = app.create(1).await[0].id;
    let ev = loop {
        let ev = sse.next().await.expect("an instance event");
        assert_eq!(ev.event, "instance", "{ev:?}");
        let view: InstanceView = serde_json::from_str(&ev.data).unwrap();
        assert_eq!(ev.id.as_deref(), Some(view.generation.to_string().as_str()));
        if view.id == after {
            break view;
        }
    };
    assert_eq!(ev.model, MODEL);
}

#[tokio::test]
async fn event_stream_filters_by_instance() {
    let app = TestApp::spawn().await;
    let ids: Vec<_> = app.create(2).await.iter().map(|v| v.id).collect();
    let resp = app
        .get(&format!("/api/v1/events?instance={}", ids[1]))
        .await;
    let mut sse = SseReader::new(resp);
    let snap = sse.next().await.unwrap();
    let list: InstanceList = serde_json::from_str(&snap.data).unwrap();
    assert_eq!(
        list.instances.iter().map(|v| v.id).collect::<Vec<_>>(),
        vec![ids[1]]
    );
    // Terminating it produces events for it only.
    app.delete(&format!("/api/v1/instances/{}", ids[1])).await;
    app.delete(&format!("/api/v1/instances/{}", ids[0])).await;
    for _ in 0..2 {
        let ev = sse.next().await.unwrap();
        let view: InstanceView = serde_json::from_str(&ev.data).unwrap();
        assert_eq!(view.id, ids[1]);
    }

    let err = expect_error(
        app.get("/api/v1/events?instance=nope").await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(err.error.field.as_deref(), Some("instance"));
}

#[tokio::test]
async fn shutdown_ends_open_event_streams() {
    let app = TestApp::spawn().await;
    let resp = app.get("/api/v1/events").await;
    let mut sse = SseReader::new(resp);
    assert_eq!(sse.next().await.unwrap().event, "snapshot");
    app.shutdown().await.expect("server stops cleanly");
    assert!(sse.next().await.is_none(), "the stream ends on shutdown");
}

async fn register(app: &TestApp, id: InstanceId, secret: &str) -> reqwest::Response {
    app.client
        .post(app.url(paths::REGISTER))
        .json(&RegisterRequest {
            instance_id: id,
            bootstrap_secret: secret.to_string(),
            agent_version: "test".into(),
            hostname: "host".into(),
        })
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn agents_register_heartbeat_and_stay_in_their_lane() {
    let app = TestApp::spawn().await;
    let created = app.create(2).await;
    let (a, b) = (created[0].id, created[1].id);
    let secret = app.bootstrap_secret(a).await;

    // Wrong secret, then the right one; the right one again before any
    // heartbeat (the first answer was lost) gets a new token and the first
    // token stops working.
    expect_error(
        register(&app, a, "gfb_wrong").await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    let lost: RegisterResponse =
        expect_json(register(&app, a, &secret).await, StatusCode::OK).await;
    let reg: RegisterResponse = expect_json(register(&app, a, &secret).await, StatusCode::OK).await;
    assert!(!reg.token.is_empty());
    assert_ne!(reg.token, lost.token);
    assert!(reg.heartbeat_interval_ms > 0);
    // A's secret is not B's.
    expect_error(register(&app, b, &secret).await, StatusCode::UNAUTHORIZED).await;

    let hb = |id, seq, token: Option<&str>| {
        let req = app
            .client
            .post(app.url(paths::HEARTBEAT))
            .json(&heartbeat(id, seq));
        match token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
        .send()
    };

    expect_error(
        hb(a, 9, Some(&lost.token)).await.unwrap(),
        StatusCode::UNAUTHORIZED,
    )
    .await;
    // Own heartbeat: applied; a stale one is not.
    let ack: HeartbeatAck =
        expect_json(hb(a, 10, Some(&reg.token)).await.unwrap(), StatusCode::OK).await;
    assert!(ack.applied);
    // After the first heartbeat the secret is spent.
    expect_error(register(&app, a, &secret).await, StatusCode::UNAUTHORIZED).await;
    let ack: HeartbeatAck =
        expect_json(hb(a, 5, Some(&reg.token)).await.unwrap(), StatusCode::OK).await;
    assert!(!ack.applied);

    // Another instance's heartbeat with this token: forbidden. No token / bad token: 401.
    let err = expect_error(
        hb(b, 11, Some(&reg.token)).await.unwrap(),
        StatusCode::FORBIDDEN,
    )
    .await;
    assert_eq!(err.error.code, "forbidden");
    expect_error(hb(a, 12, None).await.unwrap(), StatusCode::UNAUTHORIZED).await;
    expect_error(
        hb(a, 12, Some("gft_nope")).await.unwrap(),
        StatusCode::UNAUTHORIZED,
    )
    .await;

    // Agent events.
    let resp = app
        .client
        .post(app.url(paths::EVENTS))
        .bearer_auth(&reg.token)
        .json(&AgentEvent {
            kind: AgentEventKind::EngineStarted,
            message: "vllm up".into(),
            at: chrono::Utc::now(),
        })
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);

    // An agent token is not an admin token.
    let resp = app
        .client
        .get(app.url("/api/v1/instances"))
        .bearer_auth(&reg.token)
        .send()
        .await
        .unwrap();
    expect_error(resp, StatusCode::UNAUTHORIZED).await;
    // The admin token is not an agent token.
    expect_error(
        hb(a, 13, Some(ADMIN_TOKEN)).await.unwrap(),
        StatusCode::UNAUTHORIZED,
    )
    .await;

    // The applied heartbeat shows up in metrics and on the instance.
    let m: InstanceMetrics = expect_json(
        app.get(&format!("/api/v1/instances/{a}/metrics")).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(m.samples.len(), 1);
    let latest = m.latest.expect("a latest sample");
    assert_eq!(latest.seq, 10);
    assert_eq!(latest.gpus.len(), 1);
    assert!(app.instance(a).await.last_heartbeat_at.is_some());

    // More samples: oldest first, latest is the newest.
    expect_json::<HeartbeatAck>(hb(a, 20, Some(&reg.token)).await.unwrap(), StatusCode::OK).await;
    let m: InstanceMetrics = expect_json(
        app.get(&format!("/api/v1/instances/{a}/metrics")).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(
        m.samples.iter().map(|s| s.seq).collect::<Vec<_>>(),
        vec![10, 20]
    );
    assert_eq!(m.latest.unwrap().seq, 20);
    let m: InstanceMetrics = expect_json(
        app.get(&format!("/api/v1/instances/{a}/metrics?limit=1"))
            .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(
        m.samples.iter().map(|s| s.seq).collect::<Vec<_>>(),
        vec![20]
    );

    // The agent's event is on the timeline.
    let tl: Timeline = expect_json(
        app.get(&format!("/api/v1/instances/{a}/events?limit=1000"))
            .await,
        StatusCode::OK,
    )
    .await;
    assert!(
        tl.events.iter().any(|e| e.kind == "agent"),
        "{:?}",
        tl.events
    );
}

#[tokio::test]
async fn agent_bodies_are_validated() {
    let app = TestApp::spawn().await;
    let resp = app
        .client
        .post(app.url(paths::REGISTER))
        .json(&json!({ "instance_id": "nope", "bootstrap_secret": "x", "agent_version": "1", "hostname": "h" }))
        .send()
        .await
        .unwrap();
    let err = expect_error(resp, StatusCode::BAD_REQUEST).await;
    assert_eq!(err.error.field.as_deref(), Some("instance_id"));
}

/// Runs of the reconciler `name` so far.
async fn task_runs(app: &TestApp, name: &str) -> u64 {
    let body: serde_json::Value =
        expect_json(app.get("/api/v1/system/tasks").await, StatusCode::OK).await;
    body["tasks"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| t["name"] == name)
        .and_then(|t| t["runs"].as_u64())
        .unwrap_or(0)
}

#[tokio::test]
async fn an_instance_never_turns_ready_on_another_agents_word() {
    // Every machine of the test provider has the same address, where the
    // fake agent answers as the last registered agent: instance `a`'s.
    let app = TestApp::spawn().await;
    app.agents_ready
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let created = app.create(2).await;
    let (a, b) = (created[0].id, created[1].id);
    app.register_agent(a).await;
    let app = &app;
    wait_for("a ready", || async move {
        (app.instance(a).await.status == InstanceStatus::Ready).then_some(())
    })
    .await;
    // b's probes reach a's agent, which cannot prove to be b's.
    let runs = task_runs(app, "health").await;
    wait_for("three more health passes", || async move {
        (task_runs(app, "health").await >= runs + 3).then_some(())
    })
    .await;
    assert_eq!(app.instance(b).await.status, InstanceStatus::Starting);
}
