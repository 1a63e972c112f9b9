mod common;

use std::time::{Duration, Instant};

use common::*;
use gpufleet_scaleway_emulator::{Availability, FaultAction, FaultRule, RateLimit};
use reqwest::{Method, StatusCode};
use serde_json::json;

const SERVERS: &str = "/instance/v1/zones/*/servers";

fn l4(name: &str) -> serde_json::Value {
    json!({"name": name, "commercial_type": "L4-1-24G", "project": PROJECT, "tags": ["faults"]})
}

async fn count_servers(env: &Env) -> usize {
    env.get(&format!("{Z}/servers?tags=faults")).await.headers["x-total-count"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn respond_server_error_and_times() {
    let env = start(|_| {}).await;
    env.emu
        .faults()
        .add(FaultRule::new("POST", SERVERS, FaultAction::ServerError { status: 503 }).times(2));
    for _ in 0..2 {
        let a = env.post(&format!("{Z}/servers"), l4("x")).await;
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(a.json()["type"], "internal_error");
    }
    assert_eq!(count_servers(&env).await, 0, "a refused call does nothing");
    assert_eq!(
        env.post(&format!("{Z}/servers"), l4("x")).await.status,
        StatusCode::CREATED
    );
    assert!(
        env.emu.faults().rules().is_empty(),
        "a rule used up goes away"
    );

    // A custom answer, with headers.
    env.emu.faults().add(
        FaultRule::new(
            "GET",
            "/instance/v1/zones/*/servers/*",
            FaultAction::Respond {
                status: 500,
                body: json!({"message": "boom"}),
                headers: vec![("X-Custom".into(), "1".into())],
            },
        )
        .times(1),
    );
    let id = env.emu.servers()[0].id.clone();
    let a = env.get(&format!("{Z}/servers/{id}")).await;
    assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(a.headers["x-custom"], "1");
    assert_eq!(a.json(), json!({"message": "boom"}));
    assert_eq!(
        env.get(&format!("{Z}/servers/{id}")).await.status,
        StatusCode::OK
    );
    env.emu.shutdown().await;
}

#[tokio::test]
async fn too_many_requests_and_quota_by_commercial_type() {
    let env = start(|_| {}).await;
    env.emu.faults().add(
        FaultRule::new(
            "POST",
            SERVERS,
            FaultAction::TooManyRequests {
                retry_after_secs: 7,
            },
        )
        .times(1),
    );
    let a = env.post(&format!("{Z}/servers"), l4("x")).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(a.headers["retry-after"], "7");
    assert_eq!(a.headers["x-ratelimit-remaining"], "0");
    assert_eq!(a.headers["x-ratelimit-reset"], "7");
    assert_eq!(a.json()["type"], "too_many_requests");

    env.emu.faults().add(
        FaultRule::new(
            "POST",
            SERVERS,
            FaultAction::QuotasExceeded {
                resource: "instances_h100_1_80g".into(),
                quota: 2,
            },
        )
        .commercial_type("H100-1-80G"),
    );
    let q = env
        .post(
            &format!("{Z}/servers"),
            json!({"name": "h", "commercial_type": "H100-1-80G"}),
        )
        .await;
    assert_eq!(q.status, StatusCode::FORBIDDEN);
    assert_eq!(q.json()["type"], "quotas_exceeded");
    assert_eq!(
        q.json()["details"],
        json!([{"resource": "instances_h100_1_80g", "quota": 2, "current": 2}])
    );
    assert_eq!(
        env.post(&format!("{Z}/servers"), l4("ok")).await.status,
        StatusCode::CREATED
    );
    env.emu.shutdown().await;
}

#[tokio::test]
async fn out_of_stock_at_poweron() {
    let env = start(|_| {}).await;
    env.emu
        .faults()
        .set_availability("L4-1-24G", Availability::Shortage);
    let s = env.create_server(l4("oos")).await;
    let id = s["id"].as_str().unwrap();
    let a = env.action(id, "poweron").await;
    assert_eq!(a.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(a.json()["type"], "out_of_stock");
    assert_eq!(env.server_state(id).await.as_deref(), Some("stopped"));
    env.emu
        .faults()
        .set_availability("L4-1-24G", Availability::Available);
    assert_eq!(env.action(id, "poweron").await.status, StatusCode::ACCEPTED);
    env.wait_state(id, Some("running")).await;

    // The injected form answers out_of_stock without doing anything.
    env.emu
        .faults()
        .add(FaultRule::new("POST", SERVERS, FaultAction::OutOfStock).times(1));
    let a = env.post(&format!("{Z}/servers"), l4("x")).await;
    assert_eq!(a.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(
        a.json(),
        json!({"type": "out_of_stock", "message": "resource is out of stock", "resource": "server"})
    );
    env.emu.shutdown().await;
}

#[tokio::test]
async fn lost_answer_and_504_after_doing_it() {
    let env = start(|_| {}).await;
    env.emu
        .faults()
        .add(FaultRule::new("POST", SERVERS, FaultAction::LoseAnswer).times(1));
    let r = env
        .try_call(Method::POST, &format!("{Z}/servers"), Some(l4("lost")))
        .await;
    assert!(r.is_err(), "no answer: {:?}", r.as_ref().map(|a| a.status));
    assert_eq!(count_servers(&env).await, 1, "the create was done");
    let log = env.emu.request_log();
    assert!(log.iter().any(|l| l.method == "POST" && l.status == 0));

    env.emu
        .faults()
        .add(FaultRule::new("POST", SERVERS, FaultAction::PerformThen504).times(1));
    let a = env.post(&format!("{Z}/servers"), l4("late")).await;
    assert_eq!(a.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(count_servers(&env).await, 2, "the create was done");
    // The emulator still answers on new connections.
    assert_eq!(
        env.post(&format!("{Z}/servers"), l4("ok")).await.status,
        StatusCode::CREATED
    );
    env.emu.shutdown().await;
}

#[tokio::test]
async fn latency_and_probability() {
    let env = start(|_| {}).await;
    let rule = env.emu.faults().add(FaultRule::new(
        "GET",
        SERVERS,
        FaultAction::Latency { ms: 300 },
    ));
    let t = Instant::now();
    assert_eq!(
        env.get(&format!("{Z}/servers")).await.status,
        StatusCode::OK
    );
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert!(env.emu.faults().remove(rule));

    env.emu.faults().add(
        FaultRule::new("GET", SERVERS, FaultAction::ServerError { status: 500 }).probability(0.0),
    );
    for _ in 0..20 {
        assert_eq!(
            env.get(&format!("{Z}/servers")).await.status,
            StatusCode::OK
        );
    }
    env.emu.faults().clear();
    env.emu.faults().add(
        FaultRule::new("GET", SERVERS, FaultAction::ServerError { status: 502 }).probability(1.0),
    );
    assert_eq!(
        env.get(&format!("{Z}/servers")).await.status,
        StatusCode::BAD_GATEWAY
    );
    env.emu.shutdown().await;
}

#[tokio::test]
async fn stuck_starting() {
    let env = start(|c| c.timings.boot = Duration::from_millis(100)).await;
    let stuck = env.create_server(l4("stuck")).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let fine = env
        .create_server(json!({"name": "fine", "commercial_type": "DEV1-S", "tags": ["faults"]}))
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Matches by the commercial type of the server named in the path.
    env.emu.faults().add(
        FaultRule::new(
            "POST",
            "/instance/v1/zones/*/servers/*/action",
            FaultAction::StuckStarting,
        )
        .commercial_type("L4-1-24G"),
    );
    assert_eq!(
        env.action(&stuck, "poweron").await.status,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        env.action(&fine, "poweron").await.status,
        StatusCode::ACCEPTED
    );
    env.wait_state(&fine, Some("running")).await;
    assert_eq!(env.server_state(&stuck).await.as_deref(), Some("starting"));
    // It can still be stopped in place.
    assert_eq!(
        env.action(&stuck, "stop_in_place").await.status,
        StatusCode::ACCEPTED
    );
    env.wait_state(&stuck, Some("stopped in place")).await;
    env.emu.shutdown().await;
}

#[tokio::test]
async fn locked_server() {
    let env = start(|_| {}).await;
    let id = env.create_server(l4("l")).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    env.emu.lock_server(&id, true);
    assert_eq!(env.server_state(&id).await.as_deref(), Some("locked"));
    let a = env.action(&id, "poweron").await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert_eq!(a.json()["type"], "locked");
    let d = env
        .call(Method::DELETE, &format!("{Z}/servers/{id}"), None)
        .await;
    assert_eq!(d.json()["type"], "locked");
    env.emu.lock_server(&id, false);
    assert_eq!(env.server_state(&id).await.as_deref(), Some("stopped"));
    env.emu.shutdown().await;
}

#[tokio::test]
async fn rate_limit_per_token() {
    let env = start(|c| {
        c.rate_limit = Some(RateLimit {
            requests_per_second: 1.0,
            burst: 3,
        })
    })
    .await;
    for left in [2, 1, 0] {
        let a = env.get(&format!("{Z}/servers")).await;
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(a.headers["x-ratelimit-limit"], "3");
        assert_eq!(
            a.headers["x-ratelimit-remaining"],
            left.to_string().as_str()
        );
    }
    let a = env.get(&format!("{Z}/servers")).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(a.headers["retry-after"], "1");
    assert_eq!(a.json()["type"], "too_many_requests");
    assert_eq!(a.json()["limit"], json!({"quota": 3, "window_seconds": 1}));
    // Another token has its own bucket (it is refused for auth, not for rate).
    let other = env
        .http
        .get(env.url(&format!("{Z}/servers")))
        .header("X-Auth-Token", "other")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), StatusCode::UNAUTHORIZED);
    // Refilled after Retry-After.
    poll(Duration::from_secs(5), || async {
        env.get(&format!("{Z}/servers")).await.status == StatusCode::OK
    })
    .await;
    env.emu.shutdown().await;
}

#[tokio::test]
async fn admin_http_api() {
    let env = start(|_| {}).await;
    let admin = |p: &str| env.url(&format!("/emulator/v1{p}"));
    let r: serde_json::Value = env
        .http
        .post(admin("/faults"))
        .json(&json!({"method": "POST", "path": SERVERS, "times": 1,
                      "action": {"kind": "quotas_exceeded", "resource": "instances_l4_1_24g", "quota": 1}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(r["id"].as_u64().is_some());
    let rules: serde_json::Value = env
        .http
        .get(admin("/faults"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        rules["rules"][0]["rule"]["action"]["kind"],
        "quotas_exceeded"
    );
    assert_eq!(
        env.post(&format!("{Z}/servers"), l4("q")).await.status,
        StatusCode::FORBIDDEN
    );
    let s = env.create_server(l4("a")).await;
    let id = s["id"].as_str().unwrap();

    let st = env
        .http
        .put(admin("/availability/L4-1-24G"))
        .json(&json!({"availability": "shortage"}))
        .send()
        .await
        .unwrap();
    assert_eq!(st.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        env.action(id, "poweron").await.json()["type"],
        "out_of_stock"
    );

    let lock = env
        .http
        .put(admin(&format!("/servers/{id}/lock")))
        .json(&json!({"locked": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(lock.status(), StatusCode::NO_CONTENT);
    assert_eq!(env.server_state(id).await.as_deref(), Some("locked"));

    env.post(&format!("{Z}/ips"), json!({"tags": ["x"]})).await;
    let state: serde_json::Value = env
        .http
        .get(admin("/state"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(state["servers"].as_array().unwrap().len(), 1);
    assert_eq!(state["ips"].as_array().unwrap().len(), 1);
    assert_eq!(state["servers"][0]["state"], "locked");

    let reqs: serde_json::Value = env
        .http
        .get(admin("/requests"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(reqs["counts"]["POST /instance/v1/zones/{zone}/servers"], 2);
    assert_eq!(
        reqs["counts"]["POST /instance/v1/zones/{zone}/servers/{id}/action"],
        1
    );
    assert_eq!(reqs["log"][0]["status"], 403);
    assert_eq!(reqs["log"][0]["commercial_type"], "L4-1-24G");
    assert_eq!(
        env.emu.request_counts()["POST /instance/v1/zones/{zone}/ips"],
        1
    );
    let del = env.http.delete(admin("/requests")).send().await.unwrap();
    assert_eq!(del.status(), StatusCode::NO_CONTENT);
    assert!(env.emu.request_counts().is_empty());
    env.emu.shutdown().await;
}
