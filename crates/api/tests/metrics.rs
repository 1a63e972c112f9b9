//! Metric history, fleet figures, Prometheus exposition and service
//! discovery, and heartbeat validation, through the real HTTP server.

mod common;

use chrono::{DateTime, Duration, SecondsFormat, Utc};
use common::*;
use gpufleet_api::views::*;
use gpufleet_domain::{InstanceId, InstanceStatus};
use gpufleet_proto::{paths, Heartbeat, HeartbeatAck};
use gpufleet_test_support::promtool::{assert_metrics_pass, no_lint};
use reqwest::StatusCode;

/// An instance whose agent registered; returns its id and agent token.
async fn registered(app: &TestApp) -> (InstanceId, String) {
    let id = app.create(1).await[0].id;
    let token = app.register_agent(id).await;
    (id, token)
}

async fn send(app: &TestApp, token: &str, hb: &Heartbeat) -> reqwest::Response {
    app.client
        .post(app.url(paths::HEARTBEAT))
        .bearer_auth(token)
        .json(hb)
        .send()
        .await
        .unwrap()
}

async fn samples(app: &TestApp, id: InstanceId) -> InstanceMetrics {
    expect_json(
        app.get(&format!("/api/v1/instances/{id}/metrics?limit=1000"))
            .await,
        StatusCode::OK,
    )
    .await
}

type Mutation = fn(&mut Heartbeat);

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[tokio::test]
async fn metric_series_come_from_real_heartbeats() {
    let app = TestApp::spawn().await;
    let (id, token) = registered(&app).await;
    for seq in 1..=3 {
        let mut hb = heartbeat(id, seq);
        hb.gpus[0].util_pct = Some(20.0 * seq as f64);
        hb.system.mem_used_bytes = 1 << 29;
        let ack: HeartbeatAck = expect_json(send(&app, &token, &hb).await, StatusCode::OK).await;
        assert!(ack.applied);
    }

    // Without from/to/step: the console's shape, no series.
    let m = samples(&app, id).await;
    assert_eq!(m.samples.len(), 3);
    assert!(m.series.is_none());

    // With a window: aligned series, per GPU.
    let to = Utc::now() + Duration::seconds(10);
    let from = to - Duration::minutes(10);
    let m: InstanceMetrics = expect_json(
        app.get(&format!(
            "/api/v1/instances/{id}/metrics?from={}&to={}&step=5s",
            rfc3339(from),
            rfc3339(to)
        ))
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(m.latest.as_ref().unwrap().seq, 3);
    let s = m.series.expect("series");
    assert_eq!((s.tier.as_str(), s.step.as_str()), ("raw", "5s"));
    assert!(s.timestamps.len() >= 120 && s.timestamps.len() <= 121);
    assert!(s
        .timestamps
        .windows(2)
        .all(|w| w[1] - w[0] == Duration::seconds(5)));
    assert_eq!(s.samples.iter().sum::<i64>(), 3);
    assert_eq!(s.cpu_pct.len(), s.timestamps.len());
    let cpu: Vec<f64> = s.cpu_pct.iter().flatten().copied().collect();
    assert!(!cpu.is_empty() && cpu.iter().all(|c| (*c - 12.5).abs() < 1e-9));
    let mem: Vec<f64> = s.mem_pct.iter().flatten().copied().collect();
    assert!(mem.iter().all(|m| (*m - 50.0).abs() < 1e-9), "{mem:?}");
    assert_eq!(s.gpus.len(), 1);
    let g = &s.gpus[0];
    assert_eq!(g.util_pct.len(), s.timestamps.len());
    let util_max = g
        .util_pct_max
        .iter()
        .flatten()
        .fold(0.0f64, |a, b| a.max(*b));
    assert_eq!(util_max, 60.0);
    assert!(g.vram_total_mib.iter().flatten().all(|v| *v == 24_576.0));
    assert!(g.power_limit_w.iter().flatten().all(|v| *v == 72.0));

    // Only a step: the last hour. A 1 m step reads the minute rollups.
    let m: InstanceMetrics = expect_json(
        app.get(&format!("/api/v1/instances/{id}/metrics?step=1m"))
            .await,
        StatusCode::OK,
    )
    .await;
    let s = m.series.unwrap();
    assert_eq!((s.tier.as_str(), s.step.as_str()), ("minute", "1m"));
    assert!(s.timestamps.len() >= 60 && s.timestamps.len() <= 61);

    // A day, default step: 1 m buckets.
    let m: InstanceMetrics = expect_json(
        app.get(&format!(
            "/api/v1/instances/{id}/metrics?from={}",
            rfc3339(Utc::now() - Duration::hours(24))
        ))
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(m.series.unwrap().step, "1m");
}

#[tokio::test]
async fn metric_queries_are_validated_naming_the_field() {
    let app = TestApp::spawn().await;
    let (id, _) = registered(&app).await;
    let now = Utc::now();
    let q = |query: String| {
        let app = &app;
        async move {
            expect_error(
                app.get(&format!("/api/v1/instances/{id}/metrics?{query}"))
                    .await,
                StatusCode::BAD_REQUEST,
            )
            .await
            .error
        }
    };
    let e = q("from=yesterday".into()).await;
    assert_eq!(e.field.as_deref(), Some("from"));
    assert!(e.message.contains("RFC 3339"), "{}", e.message);
    let e = q("to=2025-13-01T00:00:00Z".into()).await;
    assert_eq!(e.field.as_deref(), Some("to"));
    let e = q("step=7s".into()).await;
    assert_eq!(e.field.as_deref(), Some("step"));
    assert!(e.message.contains("5s, 10s"), "{}", e.message);
    let e = q("step=fast".into()).await;
    assert_eq!(e.field.as_deref(), Some("step"));
    // Too short, too long, empty.
    let e = q(format!(
        "from={}&to={}",
        rfc3339(now - Duration::minutes(1)),
        rfc3339(now)
    ))
    .await;
    assert_eq!(e.field.as_deref(), Some("from"));
    assert!(e.message.contains("5 minutes"), "{}", e.message);
    let e = q(format!(
        "from={}&to={}",
        rfc3339(now - Duration::days(31)),
        rfc3339(now)
    ))
    .await;
    assert_eq!(e.field.as_deref(), Some("from"));
    assert!(e.message.contains("30 days"), "{}", e.message);
    let e = q(format!(
        "from={}&to={}",
        rfc3339(now),
        rfc3339(now - Duration::hours(1))
    ))
    .await;
    assert_eq!(e.field.as_deref(), Some("to"));
    // A day in 5 s steps is too many points: the message says which step fits.
    let e = q(format!("from={}&step=5s", rfc3339(now - Duration::days(1)))).await;
    assert_eq!(e.field.as_deref(), Some("step"));
    assert!(
        e.message.contains("1500") && e.message.contains("1m"),
        "{}",
        e.message
    );
    let e = q("limit=0".into()).await;
    assert_eq!(e.field.as_deref(), Some("limit"));
}

#[tokio::test]
async fn impossible_heartbeats_are_refused_and_nothing_is_stored() {
    let app = TestApp::spawn().await;
    let (id, token) = registered(&app).await;
    let ok: HeartbeatAck =
        expect_json(send(&app, &token, &heartbeat(id, 1)).await, StatusCode::OK).await;
    assert!(ok.applied);
    let before = app.instance(id).await.last_heartbeat_at;

    let cases: Vec<(&str, Mutation)> = vec![
        ("gpus[0].util_pct", |h| h.gpus[0].util_pct = Some(150.0)),
        ("gpus[0].util_pct", |h| h.gpus[0].util_pct = Some(-5.0)),
        ("gpus[0].mem_used_mib", |h| h.gpus[0].mem_used_mib = 30_000),
        ("system.mem_used_bytes", |h| {
            h.system.mem_used_bytes = 2 << 30
        }),
        ("system.cpu_pct", |h| h.system.cpu_pct = -1.0),
        ("engine.requests_running", |h| {
            h.engine.requests_running = -2.0
        }),
        // The catalog says 1 GPU and the last sample had 1: 2 has no reason.
        ("gpus", |h| {
            let mut g = h.gpus[0].clone();
            g.index = 1;
            h.gpus.push(g);
        }),
    ];
    for (i, (field, mutate)) in cases.iter().enumerate() {
        let mut hb = heartbeat(id, 10 + i as u64);
        mutate(&mut hb);
        let err = expect_error(send(&app, &token, &hb).await, StatusCode::BAD_REQUEST).await;
        assert_eq!(
            err.error.field.as_deref(),
            Some(*field),
            "{}",
            err.error.message
        );
        assert_eq!(err.error.code, "invalid_request");
    }
    // NaN cannot even be written in JSON: refused before anything else.
    let mut raw = serde_json::to_string(&heartbeat(id, 50)).unwrap();
    raw = raw.replace("\"util_pct\":40.0", "\"util_pct\":NaN");
    assert!(raw.contains("NaN"));
    let resp = app
        .client
        .post(app.url(paths::HEARTBEAT))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(raw)
        .send()
        .await
        .unwrap();
    expect_error(resp, StatusCode::BAD_REQUEST).await;

    let m = samples(&app, id).await;
    assert_eq!(m.samples.iter().map(|s| s.seq).collect::<Vec<_>>(), vec![1]);
    assert_eq!(app.instance(id).await.last_heartbeat_at, before);

    // A clamped figure is stored clamped.
    let mut hb = heartbeat(id, 60);
    hb.system.cpu_pct = 100.3;
    expect_json::<HeartbeatAck>(send(&app, &token, &hb).await, StatusCode::OK).await;
    let m = samples(&app, id).await;
    assert_eq!(m.latest.unwrap().system.cpu_pct, 100.0);
}

#[tokio::test]
async fn oversized_heartbeats_get_413() {
    let app = TestApp::spawn().await;
    let (id, token) = registered(&app).await;
    let mut hb = heartbeat(id, 1);
    hb.agent_version = "x".repeat(gpufleet_api::AGENT_BODY_LIMIT_BYTES);
    let err = expect_error(send(&app, &token, &hb).await, StatusCode::PAYLOAD_TOO_LARGE).await;
    assert_eq!(err.error.code, "payload_too_large");
    assert!(
        err.error.message.contains("262144"),
        "{}",
        err.error.message
    );
    assert!(samples(&app, id).await.samples.is_empty());
}

#[tokio::test]
async fn fleet_figures_now_and_over_a_window() {
    let app = TestApp::spawn().await;
    let (a, ta) = registered(&app).await;
    let (b, tb) = registered(&app).await;
    let mut hb = heartbeat(a, 1);
    hb.gpus[0].util_pct = Some(30.0);
    expect_json::<HeartbeatAck>(send(&app, &ta, &hb).await, StatusCode::OK).await;
    let mut hb = heartbeat(b, 1);
    hb.gpus[0].util_pct = Some(50.0);
    expect_json::<HeartbeatAck>(send(&app, &tb, &hb).await, StatusCode::OK).await;

    let f: FleetMetricsView = expect_json(
        app.get("/api/v1/metrics/fleet?window=1h").await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(f.now.instances, 2);
    assert_eq!(f.now.gpus, 2);
    assert_eq!(f.now.mean_gpu_util_pct, Some(40.0));
    assert_eq!(f.now.vram_total_mib, 2.0 * 24_576.0);
    assert_eq!(f.now.power_w, 80.0);
    assert_eq!(f.now.billable_instances, 2);
    assert_eq!(
        f.now.price_per_hour,
        vec![PriceView {
            currency: "EUR".into(),
            amount: 1.5
        }]
    );
    assert!(f
        .now
        .by_status
        .iter()
        .all(|s| s.status != InstanceStatus::Terminated));
    assert_eq!(f.series.step, "5s");
    assert_eq!(f.series.gpus.len(), f.series.timestamps.len());
    assert_eq!(f.series.gpus.iter().flatten().max(), Some(&2));

    let f: FleetMetricsView =
        expect_json(app.get("/api/v1/metrics/fleet").await, StatusCode::OK).await;
    assert_eq!(f.series.tier, "raw");
    for bad in ["1m", "31d", "soon", "0d", "0s", "999999999d"] {
        let err = expect_error(
            app.get(&format!("/api/v1/metrics/fleet?window={bad}"))
                .await,
            StatusCode::BAD_REQUEST,
        )
        .await;
        assert_eq!(err.error.field.as_deref(), Some("window"), "{bad}");
    }
    expect_error(
        app.client
            .get(app.url("/api/v1/metrics/fleet"))
            .send()
            .await
            .unwrap(),
        StatusCode::UNAUTHORIZED,
    )
    .await;
}

#[tokio::test]
async fn prometheus_targets_list_ready_agents() {
    let app = TestApp::spawn().await;
    let (id, _) = registered(&app).await;
    let empty: Vec<ScrapeTargetGroup> =
        expect_json(app.get("/api/v1/prometheus/targets").await, StatusCode::OK).await;
    assert!(empty.is_empty());
    app.agents_ready
        .store(true, std::sync::atomic::Ordering::SeqCst);
    wait_for("the instance to be ready", || async {
        (app.instance(id).await.status == InstanceStatus::Ready).then_some(())
    })
    .await;
    let targets: Vec<ScrapeTargetGroup> =
        expect_json(app.get("/api/v1/prometheus/targets").await, StatusCode::OK).await;
    assert_eq!(targets.len(), 1);
    let port = app.fleet.config().agent_port;
    assert_eq!(targets[0].targets, vec![format!("127.0.0.1:{port}")]);
    let l = &targets[0].labels;
    assert_eq!(l["gpufleet_instance_id"], id.to_string());
    assert_eq!(l["gpufleet_provider"], PROVIDER);
    assert_eq!(l["gpufleet_instance_type"], TYPE);
    assert_eq!(l["gpufleet_model"], MODEL);
    expect_error(
        app.client
            .get(app.url("/api/v1/prometheus/targets"))
            .send()
            .await
            .unwrap(),
        StatusCode::UNAUTHORIZED,
    )
    .await;
}

#[tokio::test]
async fn prometheus_exposition_passes_promtool() {
    let app = TestApp::spawn().await;
    let (a, ta) = registered(&app).await;
    let (b, tb) = registered(&app).await;
    for seq in 1..=3 {
        expect_json::<HeartbeatAck>(send(&app, &ta, &heartbeat(a, seq)).await, StatusCode::OK)
            .await;
        expect_json::<HeartbeatAck>(send(&app, &tb, &heartbeat(b, seq)).await, StatusCode::OK)
            .await;
    }
    // A refused one and a stale one, so those outcomes show too.
    let mut bad = heartbeat(a, 9);
    bad.gpus[0].util_pct = Some(101.0);
    expect_error(send(&app, &ta, &bad).await, StatusCode::BAD_REQUEST).await;
    expect_json::<HeartbeatAck>(send(&app, &ta, &heartbeat(a, 2)).await, StatusCode::OK).await;
    wait_for("a reconciler run", || async {
        app.driver
            .statuses()
            .iter()
            .all(|t| t.runs > 0)
            .then_some(())
    })
    .await;

    // Tokens served by `a` this hour, so its model has a cost per million.
    let rec = app.fleet.get_instance(a).await.unwrap();
    assert!(rec.billing_started_at.is_some() && rec.price_per_hour.is_some());
    app.fleet
        .store()
        .add_hourly_usage(&[gpufleet_store::HourlyUsage {
            hour: Utc::now(),
            key_id: None,
            instance_id: a,
            project_id: rec.project_id.clone(),
            model: rec.model.clone(),
            deployment_id: None,
            requests: 1,
            errors: 0,
            prompt_tokens: 1000,
            completion_tokens: 500,
            cost: 0.0,
        }])
        .await
        .unwrap();

    // No token needed.
    let resp = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    let text = resp.text().await.unwrap();
    for needle in [
        "# TYPE gpufleet_instances gauge",
        "gpufleet_instances{status=\"",
        "# TYPE gpufleet_reconciler_runs_total counter",
        "gpufleet_reconciler_runs_total{task=\"provisioner\"}",
        "gpufleet_reconciler_duration_seconds_bucket{",
        "gpufleet_reconciler_errors_total{task=\"health\"}",
        "gpufleet_provider_call_duration_seconds_count{provider=\"testcloud\",op=\"create\"}",
        "gpufleet_heartbeat_lag_seconds_count 8",
        "gpufleet_heartbeats_total{outcome=\"applied\"} 6",
        "gpufleet_heartbeats_total{outcome=\"rejected\"} 1",
        "gpufleet_heartbeats_total{outcome=\"stale\"} 1",
        "gpufleet_http_request_duration_seconds_bucket{",
        "route=\"/internal/v1/agent/heartbeat\"",
        &format!("gpufleet_instance_gpu_utilization_percent{{instance_id=\"{a}\""),
        "gpufleet_instance_gpu_power_watts{",
        "gpufleet_instance_gpu_memory_total_bytes{",
        "# TYPE gpufleet_instance_cost_per_hour gauge",
        &format!("gpufleet_instance_cost_per_hour{{instance_id=\"{a}\",project=\"default\",provider=\"testcloud\""),
        "# TYPE gpufleet_spend_month_to_date gauge",
        "gpufleet_spend_month_to_date{project=\"default\"} ",
        "# TYPE gpufleet_model_cost_per_million_tokens gauge",
        &format!("gpufleet_model_cost_per_million_tokens{{model=\"{}\"}} ", rec.model),
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    // Strict: the control plane's own names carry no lint to excuse.
    assert_metrics_pass(&text, no_lint);

    // The Grafana dashboard uses only names this exposition has.
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/grafana/gpufleet-fleet.json"
    ))
    .expect("deploy/grafana/gpufleet-fleet.json");
    let json: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    assert!(json["panels"].as_array().is_some_and(|p| !p.is_empty()));
    let mut names = 0;
    for (at, _) in dashboard.match_indices("gpufleet_") {
        let rest = &dashboard[at..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let name = &rest[..end];
        // Label matchers (`gpufleet_provider=~...`), legend templates
        // (`{{gpufleet_instance_id}}`) and the dashboard's uid are not metrics.
        if rest[end..].starts_with('=') || rest[end..].starts_with("}}") || name == "gpufleet_fleet"
        {
            continue;
        }
        names += 1;
        assert!(
            text.contains(name),
            "the dashboard uses {name}, which /metrics lacks"
        );
    }
    assert!(names > 10);

    // OpenMetrics on request.
    let resp = app
        .client
        .get(app.url("/metrics"))
        .header("accept", "application/openmetrics-text; version=1.0.0")
        .send()
        .await
        .unwrap();
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let om = resp.text().await.unwrap();
    assert!(om.ends_with("# EOF\n"), "{om}");
}
