//! `/api/v1/deployments` over HTTP: create (201), bad input naming the
//! field (4xx), list, get with instances, patch, events, delete (202).

mod common;

use common::*;
use gpufleet_api::views::{DeploymentList, DeploymentTimeline, DeploymentView, InstanceList};
use gpufleet_domain::{DeploymentAction, DeploymentState};
use reqwest::StatusCode;
use serde_json::{json, Value};

fn body(name: &str) -> Value {
    json!({
        "name": name,
        "model": MODEL,
        "placements": [
            {"provider": PROVIDER, "zone": ZONE, "instance_type": TYPE},
            {"provider": PROVIDER, "zone": OTHER_ZONE, "instance_type": TYPE}
        ],
        "replicas": {"min": 1, "max": 3},
        "autoscaling": {"metric": "requests_in_flight", "target_per_replica": 16, "scale_down_delay": "5m"},
        "scale_to_zero_after": "15m"
    })
}

#[tokio::test]
async fn bad_input_is_a_4xx_naming_the_field() {
    let app = TestApp::spawn().await;
    let mut cases: Vec<(Value, &str)> = Vec::new();
    let mut b = body("a");
    b["replicas"] = json!({"min": 4, "max": 2});
    cases.push((b, "replicas.min"));
    let mut b = body("a");
    b["model"] = json!("nobody/unknown");
    cases.push((b, "model"));
    let mut b = body("a");
    b["placements"][1]["instance_type"] = json!("nope");
    cases.push((b, "placements[1].instance_type"));
    let mut b = body("a");
    b["placements"][1]["zone"] = json!("zone-z");
    cases.push((b, "placements[1].zone"));
    // A 7B model (20 GB) does not fit the 8 GB type.
    let mut b = body("a");
    b["model"] = json!("Qwen/Qwen2.5-7B-Instruct");
    b["placements"][0]["instance_type"] = json!(SMALL_TYPE);
    cases.push((b, "placements[0].instance_type"));
    let mut b = body("a");
    b["autoscaling"]["scale_down_delay"] = json!("5 minutes");
    cases.push((b, "autoscaling.scale_down_delay"));
    let mut b = body("a");
    b["autoscaling"]["metric"] = json!("vibes");
    cases.push((b, "autoscaling.metric"));
    let mut b = body("a");
    b["placements"] = json!([]);
    cases.push((b, "placements"));
    let mut b = body("a");
    b["autoscaling"]["target_per_replica"] = json!(0);
    cases.push((b, "autoscaling.target_per_replica"));
    for (b, field) in cases {
        let err = expect_error(
            app.post("/api/v1/deployments", &b).await,
            StatusCode::BAD_REQUEST,
        )
        .await;
        assert_eq!(err.error.field.as_deref(), Some(field), "{err:?}");
    }
    let list: DeploymentList =
        expect_json(app.get("/api/v1/deployments").await, StatusCode::OK).await;
    assert!(list.deployments.is_empty());
    assert_eq!(app.provider.created(), 0);
}

#[tokio::test]
async fn create_list_get_patch_events_delete() {
    let app = TestApp::spawn().await;
    let d: DeploymentView = expect_json(
        app.post("/api/v1/deployments", &body("qwen")).await,
        StatusCode::CREATED,
    )
    .await;
    assert!(d.id.to_string().starts_with("d-"));
    assert_eq!(d.name, "qwen");
    assert_eq!(d.state, DeploymentState::Active);
    assert_eq!(d.replicas.max, 3);
    assert_eq!(d.autoscaling.scale_down_delay.to_string(), "5m");
    // The document's shape, as the issue writes it.
    let raw: Value = expect_json(
        app.get(&format!("/api/v1/deployments/{}", d.id)).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(raw["autoscaling"]["scale_down_delay"], "5m");
    assert_eq!(raw["scale_to_zero_after"], "15m");
    assert_eq!(raw["placements"][1]["zone"], OTHER_ZONE);

    // A second one with the same name: 409.
    expect_error(
        app.post("/api/v1/deployments", &body("qwen")).await,
        StatusCode::CONFLICT,
    )
    .await;

    // Its replica is created, carrying the deployment's id.
    let inst = wait_for("the deployment's instance", || async {
        let l: InstanceList = expect_json(app.get("/api/v1/instances").await, StatusCode::OK).await;
        l.instances
            .into_iter()
            .find(|i| i.deployment_id == Some(d.id))
    })
    .await;
    assert_eq!(inst.zone, ZONE);
    let got: DeploymentView = expect_json(
        app.get(&format!("/api/v1/deployments/{}", d.id)).await,
        StatusCode::OK,
    )
    .await;
    let instances = got.instances.expect("get lists its instances");
    assert!(instances.iter().any(|i| i.id == inst.id));

    let list: DeploymentList =
        expect_json(app.get("/api/v1/deployments").await, StatusCode::OK).await;
    assert_eq!(list.deployments.len(), 1);
    assert!(list.deployments[0].instances.is_none());

    // PATCH: bounds and name apply at once.
    let patched: DeploymentView = expect_json(
        app.patch(
            &format!("/api/v1/deployments/{}", d.id),
            &json!({"replicas": {"min": 1, "max": 5}, "name": "qwen-big"}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(
        (patched.name.as_str(), patched.replicas.max),
        ("qwen-big", 5)
    );
    let err = expect_error(
        app.patch(
            &format!("/api/v1/deployments/{}", d.id),
            &json!({"replicas": {"min": 6, "max": 5}}),
        )
        .await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(err.error.field.as_deref(), Some("replicas.min"));
    // New placements or engine args start a rolling update.
    let rolled: DeploymentView = expect_json(
        app.patch(
            &format!("/api/v1/deployments/{}", d.id),
            &json!({"placements": [{"provider": PROVIDER, "zone": OTHER_ZONE, "instance_type": TYPE}],
                    "engine_args": ["--max-model-len", "4096"]}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(rolled.placements[0].zone, OTHER_ZONE);
    assert_eq!(
        rolled.engine_args.as_deref(),
        Some(&["--max-model-len".to_string(), "4096".to_string()][..])
    );

    // DELETE: 202, then deleted once the instance is terminated.
    let deleting: DeploymentView = expect_json(
        app.delete(&format!("/api/v1/deployments/{}", d.id)).await,
        StatusCode::ACCEPTED,
    )
    .await;
    assert_eq!(deleting.state, DeploymentState::Deleting);
    wait_for("the deployment deleted", || async {
        let d: DeploymentView = expect_json(
            app.get(&format!("/api/v1/deployments/{}", d.id)).await,
            StatusCode::OK,
        )
        .await;
        (d.state == DeploymentState::Deleted).then_some(())
    })
    .await;
    let list: DeploymentList =
        expect_json(app.get("/api/v1/deployments").await, StatusCode::OK).await;
    assert!(list.deployments.is_empty());
    let list: DeploymentList = expect_json(
        app.get("/api/v1/deployments?include_deleted=true").await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(list.deployments.len(), 1);

    let t: DeploymentTimeline = expect_json(
        app.get(&format!("/api/v1/deployments/{}/events", d.id))
            .await,
        StatusCode::OK,
    )
    .await;
    let actions: Vec<_> = t.events.iter().map(|e| e.action).collect();
    for a in [
        DeploymentAction::Created,
        DeploymentAction::ScaleUp,
        DeploymentAction::Updated,
        DeploymentAction::DeleteRequested,
        DeploymentAction::Deleted,
    ] {
        assert!(actions.contains(&a), "{a} missing: {actions:?}");
    }

    // Unknown and malformed ids.
    let err = expect_error(
        app.get("/api/v1/deployments/d-0192f5a0c3b47d1e9a4b5c6d7e8f9a0b")
            .await,
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_eq!(err.error.code, "not_found");
    let err = expect_error(
        app.get("/api/v1/deployments/i-0192f5a0c3b47d1e9a4b5c6d7e8f9a0b")
            .await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(err.error.field.as_deref(), Some("id"));
}

#[tokio::test]
async fn metrics_carry_deployment_figures() {
    let app = TestApp::spawn().await;
    let d: DeploymentView = expect_json(
        app.post("/api/v1/deployments", &body("metered")).await,
        StatusCode::CREATED,
    )
    .await;
    let text = wait_for("deployment gauges on /metrics", || async {
        let t = app.get("/metrics").await.text().await.unwrap();
        t.contains(&format!("gpufleet_deployment_replicas{{deployment_id=\"{}\",name=\"metered\",state=\"desired\"}} 1", d.id))
            .then_some(t)
    })
    .await;
    assert!(
        text.contains("gpufleet_deployment_decisions_total{action=\"created\"}"),
        "{text}"
    );
}
