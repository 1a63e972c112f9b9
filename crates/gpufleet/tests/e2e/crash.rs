//! kill -9 of the control plane while instances boot: a new `up` on the same
//! data directory finishes the job, with exactly one agent per instance and
//! nothing leaked after terminate.

use crate::common::*;
use gpufleet_domain::{InstanceId, InstanceStatus as S};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_while_booting_then_restart_finishes_the_job() {
    let mut app = TestApp::spawn_with(
        BIN,
        Options {
            boot_delay_ms: 1500,
            ..Default::default()
        },
    )
    .await;
    let ids: Vec<InstanceId> = app.create(3).await.iter().map(|v| v.id).collect();

    // Wait until the provider made all three machines (their agents are not
    // started yet: the mock boot delay is 1.5 s), then crash.
    app.wait_until(
        &ids,
        Duration::from_secs(30),
        "all machines are created",
        |vs| {
            vs.iter()
                .all(|v| matches!(v.status, S::Booting | S::Starting))
        },
    )
    .await;
    let machines_before = app.machine_dirs().len();
    assert_eq!(machines_before, 3, "one machine per instance");
    let booted = ids
        .iter()
        .filter(|id| !agent_pids(&id.to_string()).is_empty())
        .count();
    app.kill9();
    assert_eq!(
        booted, 0,
        "the crash should hit while machines boot (increase the boot delay?)"
    );

    app.restart().await;
    let ready = app
        .wait_status(&ids, S::Ready, Duration::from_secs(60))
        .await;
    assert_eq!(app.machine_dirs().len(), 3, "no machine was created twice");
    for id in &ids {
        let pids = agent_pids(&id.to_string());
        assert_eq!(pids.len(), 1, "exactly one agent for {id}: {pids:?}");
    }
    // Still exactly one a few heartbeats later (no duplicate spawned late).
    app.wait_until(
        &ids,
        Duration::from_secs(10),
        "heartbeats after restart",
        |vs| {
            vs.iter().all(|v| {
                v.last_heartbeat_at
                    .is_some_and(|t| t > chrono::Utc::now() - chrono::Duration::seconds(2))
            })
        },
    )
    .await;
    for id in &ids {
        assert_eq!(
            agent_pids(&id.to_string()).len(),
            1,
            "exactly one agent for {id}"
        );
    }

    for id in &ids {
        app.terminate(*id).await;
    }
    app.wait_status(&ids, S::Terminated, Duration::from_secs(30))
        .await;
    for v in &ready {
        let id = v.id.to_string();
        let ip = v.ip.expect("ready instance has an IP");
        eventually(
            Duration::from_secs(10),
            &format!("no process of {id} left"),
            || agent_pids(&id).is_empty() && engine_pids(ip).is_empty(),
        )
        .await;
    }
}

/// kill -9 of the control plane in the middle of a deployment's scale-up:
/// the next `up` converges to the declared replicas with no duplicate
/// instance or machine and no orphan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_mid_scale_then_restart_converges_without_duplicates() {
    use serde_json::{json, Value};
    let mut app = TestApp::spawn_with(
        BIN,
        Options {
            boot_delay_ms: 1500,
            ..Default::default()
        },
    )
    .await;
    let resp = app
        .req(reqwest::Method::POST, "/api/v1/deployments")
        .json(&json!({
            "name": "crashy",
            "model": MODEL,
            "placements": [{"provider": "mock", "zone": "local-1", "instance_type": TYPE}],
            "replicas": {"min": 3, "max": 3},
            "autoscaling": {"metric": "requests_in_flight", "target_per_replica": 1000, "scale_down_delay": "5m"}
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::CREATED);
    let id = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let instances = |app: &TestApp| {
        let (http, url, token) = (
            app.http.clone(),
            app.url(&format!("/api/v1/deployments/{id}")),
            app.token.clone(),
        );
        async move {
            let v: Value = http
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["instances"].as_array().cloned().unwrap_or_default()
        }
    };
    // Crash once the replicas exist but before any of them booted.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let list = instances(&app).await;
        if list.len() == 3 && list.iter().all(|i| i["status"] != "provisioning") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no scale-up: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.kill9();
    app.restart().await;

    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let ready = loop {
        let list = instances(&app).await;
        let ready: Vec<Value> = list
            .iter()
            .filter(|i| i["status"] == "ready")
            .cloned()
            .collect();
        if ready.len() == 3 {
            assert_eq!(list.len(), 3, "no duplicate replica: {list:?}");
            break ready;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not converged: {list:?}\n{}",
            app.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(app.machine_dirs().len(), 3, "one machine per replica");
    for i in &ready {
        let iid = i["id"].as_str().unwrap();
        assert_eq!(agent_pids(iid).len(), 1, "exactly one agent for {iid}");
    }
    // Nothing else lives on: the fleet holds exactly these three.
    let all = app.list(false).await.unwrap();
    assert_eq!(all.len(), 3, "no orphan instance: {all:?}");
}
