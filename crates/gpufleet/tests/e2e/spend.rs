//! Spend through the real `gpufleet up`: two instances of different types
//! run, one is terminated, `up` restarts (gracefully, then after kill -9),
//! the other is terminated; the report equals Σ (billing end − billing
//! start) × price / 3600 s of the instance views, per model, provider and
//! project; bad queries are 400 naming the field; `gpufleet spend` prints
//! the same total.

use crate::common::*;
use chrono::{DateTime, Duration as ChronoDuration, SecondsFormat, Utc};
use gpufleet_api::views::{ErrorBody, InstanceView, SpendView};
use gpufleet_domain::InstanceStatus as S;
use reqwest::{Method, StatusCode};
use std::time::Duration;

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// What the instance view says it cost: its billable interval × its price.
fn billed(v: &InstanceView) -> (f64, f64) {
    let start = v.billing_started_at.expect("billing started");
    let end = v.billing_ended_at.expect("billing ended");
    assert!(end > start, "{}: {start} .. {end}", v.id);
    let hours = (end - start).num_milliseconds() as f64 / 3.6e6;
    (hours * v.price_per_hour.expect("priced"), hours)
}

async fn spend(app: &TestApp, query: &[(&str, &str)]) -> reqwest::Response {
    app.req(Method::GET, "/api/v1/spend")
        .query(query)
        .send()
        .await
        .unwrap()
}

fn close(a: f64, b: f64, what: &str) {
    assert!((a - b).abs() < 1e-9, "{what}: {a} != {b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_adds_up_across_a_restart_and_the_cli_agrees() {
    let mut app = TestApp::spawn(BIN).await;
    let t0 = Utc::now() - ChronoDuration::minutes(1);
    let a = app.create_on("mock", TYPE, 1).await[0].id; // 0.75/h, 1 GPU
    let b = app.create_on("mock", "mock-h100-8", 1).await[0].id; // 23.00/h, 8 GPUs
    app.wait_status(&[a, b], S::Ready, Duration::from_secs(90))
        .await;

    app.terminate(a).await;
    app.wait_status(&[a], S::Terminated, Duration::from_secs(30))
        .await;
    let b_before = app.get(b).await.unwrap();
    let b_started = b_before.billing_started_at.expect("b is billable");
    assert_eq!(b_before.billing_ended_at, None);
    assert_eq!(b_before.price_per_hour, Some(23.0));
    assert!(b_before.cost_so_far.is_some_and(|c| c > 0.0));

    // A graceful restart of `up` in between: nothing is lost or moved.
    let status = app.stop(Duration::from_secs(30)).expect("up stops");
    assert!(status.success(), "{}", app.log_tail());
    app.restart().await;
    app.wait_status(&[b], S::Ready, Duration::from_secs(60))
        .await;
    // And a crash: kill -9, then a new `up` on the same data.
    app.kill9();
    app.restart().await;
    app.wait_status(&[b], S::Ready, Duration::from_secs(60))
        .await;
    assert_eq!(
        app.get(b).await.unwrap().billing_started_at,
        Some(b_started)
    );
    app.terminate(b).await;
    let views = app
        .wait_status(&[a, b], S::Terminated, Duration::from_secs(30))
        .await;
    let (va, vb) = (&views[0], &views[1]);
    assert_eq!(
        vb.billing_started_at,
        Some(b_started),
        "kept across the restart"
    );
    assert_eq!(va.billing_ended_at, va.terminated_at);
    assert_eq!(vb.billing_ended_at, vb.terminated_at);
    let (cost_a, hours_a) = billed(va);
    let (cost_b, hours_b) = billed(vb);
    close(va.cost_so_far.unwrap(), cost_a, "a's cost so far");
    close(vb.cost_so_far.unwrap(), cost_b, "b's cost so far");
    let expected = cost_a + cost_b;

    let from = rfc3339(t0);
    let to = rfc3339(Utc::now() + ChronoDuration::minutes(1));
    for group_by in ["model", "provider", "project"] {
        let resp = spend(
            &app,
            &[("from", &from), ("to", &to), ("group_by", group_by)],
        )
        .await;
        assert_eq!(resp.status(), StatusCode::OK);
        let s: SpendView = resp.json().await.unwrap();
        assert_eq!(s.currency, "EUR");
        assert_eq!(s.group_by.to_string(), group_by);
        close(s.total.cost, expected, "total");
        close(s.total.instance_hours, hours_a + hours_b, "instance hours");
        close(s.total.gpu_hours, hours_a + 8.0 * hours_b, "GPU hours");
        assert_eq!(s.unpriced_instances, 0);
        assert_eq!(s.gpu_count_unknown_instances, 0);
        let key = match group_by {
            "model" => MODEL,
            "provider" => "mock",
            _ => "default",
        };
        assert_eq!(s.groups.len(), 1, "{group_by}: {:?}", s.groups);
        assert_eq!(s.groups[0].key, key);
        close(s.groups[0].cost, expected, group_by);
        let series: f64 = s.groups[0].series.cost.iter().sum();
        close(series, expected, "the series adds up");
        assert_eq!(
            s.groups[0].series.cost.len(),
            s.groups[0].series.timestamps.len()
        );
    }
    // Another project has spent nothing.
    let s: SpendView = spend(
        &app,
        &[("from", &from), ("to", &to), ("project", "research")],
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(s.total.cost, 0.0);
    assert!(s.groups.is_empty());

    // Bad input: 400 naming the field.
    let long_ago = rfc3339(t0 - ChronoDuration::days(401));
    let cases: [(&[(&str, &str)], &str); 7] = [
        (&[("from", "yesterday")], "from"),
        (&[("to", "2025-01-31 12:00:00Z")], "to"),
        (&[("from", &to), ("to", &from)], "to"),
        (&[("from", &long_ago), ("to", &from)], "from"),
        (&[("group_by", "team")], "group_by"),
        (&[("step", "2h")], "step"),
        (&[("project", "Not A Project")], "project"),
    ];
    for (query, field) in cases {
        let resp = spend(&app, query).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{query:?}");
        let body: ErrorBody = resp.json().await.unwrap();
        assert_eq!(
            body.error.field.as_deref(),
            Some(field),
            "{query:?}: {body:?}"
        );
    }

    // The CLI: the same total, as JSON and in its table.
    let env = [
        ("GPUFLEET_ADMIN_TOKEN", app.token.as_str()),
        ("GPUFLEET_SERVER", app.base_url.as_str()),
    ];
    let args = ["spend", "--from", &from, "--to", &to, "--group-by", "model"];
    let out = gpufleet(&[&args[..], &["--json"]].concat(), &env).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s: SpendView = serde_json::from_slice(&out.stdout).unwrap();
    close(s.total.cost, expected, "CLI --json total");
    let out = gpufleet(&args, &env).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    let total = table
        .lines()
        .find(|l| l.trim_start().starts_with("TOTAL"))
        .unwrap_or_else(|| panic!("no TOTAL row in\n{table}"));
    assert_eq!(
        total.split_whitespace().nth(1),
        Some(format!("{expected:.4}").as_str()),
        "{table}"
    );
    assert!(
        table.lines().any(|l| l.trim_start().starts_with(MODEL)),
        "{table}"
    );
    // A bad flag value is refused by the server, naming the field.
    let out = gpufleet(&["spend", "--from", "yesterday"], &env).await;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("from"), "{}", text(&out.stderr));
}

/// Runs `gpufleet <args>` with a clean environment plus `env`.
async fn gpufleet(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    run_cli(args, env, "").await
}
