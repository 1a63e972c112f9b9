//! A deployment on the Mock provider with real agents and engines: two
//! replicas become ready; one replica's agent and engine are killed (and
//! kept dead, as a lost machine would be) while a client sends chat
//! requests through the router; the keeper starts a replacement, which
//! becomes ready, and removes the dead one, and no request fails.

use crate::common::*;
use crate::router::create_key;
use gpufleet_api::views::DeploymentView;
use gpufleet_domain::{DeploymentAction, InstanceId, InstanceStatus as S};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

async fn deployment(app: &TestApp, id: &str) -> DeploymentView {
    let resp = app
        .req(Method::GET, &format!("/api/v1/deployments/{id}"))
        .send()
        .await
        .expect("GET deployment");
    assert_eq!(resp.status(), StatusCode::OK);
    resp.json().await.expect("deployment JSON")
}

/// `POST /api/v1/deployments` with `body`: 201 and the deployment.
async fn create_deployment(app: &TestApp, body: Value) -> DeploymentView {
    let resp = app
        .req(Method::POST, "/api/v1/deployments")
        .json(&body)
        .send()
        .await
        .expect("POST deployment");
    assert_eq!(resp.status(), StatusCode::CREATED);
    resp.json().await.expect("deployment JSON")
}

async fn wait_deployment(
    app: &TestApp,
    id: &str,
    timeout: Duration,
    what: &str,
    cond: impl Fn(&DeploymentView) -> bool,
) -> DeploymentView {
    let deadline = Instant::now() + timeout;
    loop {
        let d = deployment(app, id).await;
        if cond(&d) {
            return d;
        }
        if Instant::now() >= deadline {
            panic!(
                "timed out after {timeout:?} waiting until {what}; last: {} {:?}\nlog:\n{}",
                d.status.summary,
                d.instances
                    .iter()
                    .flatten()
                    .map(|i| format!("{} {}", i.id, i.status))
                    .collect::<Vec<_>>(),
                app.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ready_ids(d: &DeploymentView) -> Vec<InstanceId> {
    d.instances
        .iter()
        .flatten()
        .filter(|i| i.status == S::Ready)
        .map(|i| i.id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_replica_is_replaced_while_requests_keep_succeeding() {
    let app = TestApp::spawn_with(
        BIN,
        Options {
            control_toml: "deployment_unhealthy_grace_secs = 1\nagent_lost_after_secs = 30\n"
                .into(),
            extra_toml: "[router]\nconnect_timeout_ms = 500\nbreaker_failure_threshold = 2\nbreaker_cooldown_ms = 500\n".into(),
            ..Default::default()
        },
    )
    .await;
    let created = create_deployment(&app, json!({
            "name": "sim",
            "model": MODEL,
            "placements": [{"provider": "mock", "zone": "local-1", "instance_type": TYPE}],
            "replicas": {"min": 2, "max": 3},
            "autoscaling": {"metric": "requests_in_flight", "target_per_replica": 1000, "scale_down_delay": "5m"}
        })).await;
    let id = created.id.to_string();
    let d = wait_deployment(
        &app,
        &id,
        Duration::from_secs(60),
        "2 replicas ready",
        |d| ready_ids(d).len() == 2,
    )
    .await;
    let before = ready_ids(&d);
    for i in d.instances.iter().flatten() {
        assert_eq!(
            i.deployment_id,
            Some(created.id),
            "instances carry the deployment id"
        );
    }

    // A client sending chat requests through the router all along.
    let (_, key) = create_key(&app, "deployments", None).await;
    let Clients {
        stop,
        ok,
        failures,
        task: client,
    } = Clients::spawn(&app, &key, 1);
    let warmup = Instant::now();
    while ok.load(Ordering::SeqCst) < 5 {
        assert!(
            warmup.elapsed() < Duration::from_secs(20),
            "no request succeeded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // SIGKILL one replica's agent and engine, and keep them dead (a lost
    // machine: the Mock supervisor would restart the agent).
    let victim = before[0];
    let victim_ip = d
        .instances
        .iter()
        .flatten()
        .find(|i| i.id == victim)
        .and_then(|i| i.ip)
        .expect("victim IP");
    let killer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                for pid in agent_pids(&victim.to_string())
                    .into_iter()
                    .chain(engine_pids(victim_ip))
                {
                    kill9(pid);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    // A replacement becomes ready; then the dead replica is removed.
    let d = wait_deployment(
        &app,
        &id,
        Duration::from_secs(60),
        "a replacement ready and the victim gone",
        |d| {
            let ready = ready_ids(d);
            let replacement = ready.iter().any(|i| !before.contains(i));
            let victim_gone = d.instances.iter().flatten().any(|i| {
                i.id == victim && matches!(i.status, S::Terminating | S::Terminated | S::Failed)
            });
            replacement && victim_gone && ready.len() >= 2
        },
    )
    .await;
    // Requests go on a little with the replacement serving.
    let served = ok.load(Ordering::SeqCst);
    while ok.load(Ordering::SeqCst) < served + 10 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::SeqCst);
    client.await.unwrap();
    killer.await.unwrap();

    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {failures:?}",
        failures.len(),
        failures.len() as u64 + ok.load(Ordering::SeqCst)
    );
    assert!(ready_ids(&d).len() >= 2);
    eprintln!(
        "{} requests succeeded; victim {victim}: {:?}",
        ok.load(Ordering::SeqCst),
        d.instances
            .iter()
            .flatten()
            .find(|i| i.id == victim)
            .map(|i| (i.status, i.status_message.clone()))
    );

    // The timeline says why.
    let resp = app
        .req(Method::GET, &format!("/api/v1/deployments/{id}/events"))
        .send()
        .await
        .unwrap();
    let t: gpufleet_api::views::DeploymentTimeline = resp.json().await.unwrap();
    assert!(
        t.events
            .iter()
            .any(|e| e.action == DeploymentAction::Replace
                && e.message.contains(&victim.to_string())),
        "{:?}",
        t.events.iter().map(|e| &e.message).collect::<Vec<_>>()
    );
}

/// Scale to zero and back: an idle deployment drains to no replica; the
/// next request through the router is held while a replica boots, then
/// answered; a request past the hold bounds gets a 503 with Retry-After.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_deployment_scales_to_zero_and_the_next_request_wakes_it() {
    let app = TestApp::spawn_with(
        BIN,
        Options {
            extra_toml: "[router]\nusage_flush_interval_ms = 200\n".into(),
            ..Default::default()
        },
    )
    .await;
    let created = create_deployment(&app, json!({
            "name": "lazy",
            "model": MODEL,
            "placements": [{"provider": "mock", "zone": "local-1", "instance_type": TYPE}],
            "replicas": {"min": 1, "max": 2},
            "autoscaling": {"metric": "requests_in_flight", "target_per_replica": 1000, "scale_down_delay": "5m"},
            "scale_to_zero_after": "3s"
        })).await;
    let id = created.id.to_string();
    wait_deployment(&app, &id, Duration::from_secs(60), "1 replica ready", |d| {
        ready_ids(d).len() == 1
    })
    .await;
    let (_, key) = create_key(&app, "lazy", None).await;
    let chat = |key: String| {
        let http = app.http.clone();
        let url = app.url("/v1/chat/completions");
        async move {
            http.post(url)
                .bearer_auth(key)
                .json(&json!({"model": MODEL, "max_tokens": 3,
                              "messages": [{"role": "user", "content": "wake up"}]}))
                .timeout(Duration::from_secs(120))
                .send()
                .await
                .expect("router answers")
        }
    };
    assert_eq!(chat(key.clone()).await.status(), StatusCode::OK);

    // Idle for 3 s: no replica left.
    let zero = wait_deployment(&app, &id, Duration::from_secs(60), "scaled to zero", |d| {
        d.status.desired == 0
            && d.status
                .conditions
                .iter()
                .any(|c| c.contains("scaled to zero"))
            && d.instances
                .iter()
                .flatten()
                .all(|i| matches!(i.status, S::Terminated | S::Archived))
    })
    .await;
    assert!(
        zero.status
            .conditions
            .iter()
            .any(|c| c.contains("scaled to zero")),
        "{:?}",
        zero.status
    );

    // The next request is held while a replica boots, then answered.
    let t = Instant::now();
    let resp = chat(key.clone()).await;
    let waited = t.elapsed();
    assert_eq!(resp.status(), StatusCode::OK, "{:?}", resp.text().await);
    let d = deployment(&app, &id).await;
    assert_eq!(ready_ids(&d).len(), 1);
    let fresh = d
        .instances
        .iter()
        .flatten()
        .find(|i| i.status == S::Ready)
        .unwrap();
    let boot = (fresh.ready_at.unwrap() - fresh.created_at)
        .to_std()
        .unwrap_or_default();
    println!(
        "scale from zero: answered after {waited:?}; the replica took {boot:?} from created to ready; \
         the rest ({:?}) is the router's and the keeper's",
        waited.saturating_sub(boot)
    );
    // Every decision on the timeline, the router's hold and release too
    // (written in the background).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events: Value = app
            .get_json(&format!("/api/v1/deployments/{id}/events"))
            .await;
        let text = events.to_string();
        let missing: Vec<&str> = [
            "(scale to zero)",
            "(scale from zero)",
            "are held",
            "the held requests go on",
        ]
        .into_iter()
        .filter(|w| !text.contains(w))
        .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing:?} not on the timeline: {text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Client tasks sending chat requests through the router until `stop`:
/// answers counted in `ok`, anything else kept in `failures`.
struct Clients {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Clients {
    /// `n` concurrent clients; odd ones stream.
    fn spawn(app: &TestApp, key: &str, n: usize) -> Clients {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::<String>::new()));
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let (http, url, key) = (
                    app.http.clone(),
                    app.url("/v1/chat/completions"),
                    key.to_string(),
                );
                let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
                let stream = i % 2 == 1;
                tokio::spawn(async move {
                    while !stop.load(Ordering::SeqCst) {
                        let r = http
                            .post(&url)
                            .bearer_auth(&key)
                            .json(&json!({
                                "model": MODEL,
                                "max_tokens": 4,
                                "stream": stream,
                                "messages": [{"role": "user", "content": "one two three"}]
                            }))
                            .send()
                            .await;
                        match r {
                            Ok(resp) if resp.status().is_success() => {
                                let text = resp.text().await.unwrap_or_default();
                                let good = if stream {
                                    text.trim_end().ends_with("data: [DONE]")
                                } else {
                                    serde_json::from_str::<Value>(&text).is_ok_and(|b| {
                                        b["choices"][0]["message"]["content"].is_string()
                                    })
                                };
                                if good {
                                    ok.fetch_add(1, Ordering::SeqCst);
                                } else {
                                    failures.lock().unwrap().push(format!("bad body {text}"));
                                }
                            }
                            Ok(resp) => {
                                let status = resp.status();
                                let text = resp.text().await.unwrap_or_default();
                                failures.lock().unwrap().push(format!("{status}: {text}"));
                            }
                            Err(e) => failures.lock().unwrap().push(e.to_string()),
                        }
                    }
                })
            })
            .collect();
        let task = tokio::spawn(async move {
            for t in tasks {
                let _ = t.await;
            }
        });
        Clients {
            stop,
            ok,
            failures,
            task,
        }
    }
}

/// A rolling update under load: the deployment moves to another zone; the
/// new replicas come up before the old ones drain, and no request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_update_under_load_fails_no_request() {
    let app = TestApp::spawn(BIN).await;
    let created = create_deployment(&app, json!({
            "name": "roll",
            "model": MODEL,
            "placements": [{"provider": "mock", "zone": "local-1", "instance_type": TYPE}],
            "replicas": {"min": 2, "max": 2},
            "autoscaling": {"metric": "requests_in_flight", "target_per_replica": 1000, "scale_down_delay": "5m"}
        })).await;
    let id = created.id.to_string();
    let d = wait_deployment(
        &app,
        &id,
        Duration::from_secs(60),
        "2 replicas ready",
        |d| ready_ids(d).len() == 2,
    )
    .await;
    let old = ready_ids(&d);
    let (_, key) = create_key(&app, "roll", None).await;
    let clients = Clients::spawn(&app, &key, 4);
    let warmup = Instant::now();
    while clients.ok.load(Ordering::SeqCst) < 20 {
        assert!(
            warmup.elapsed() < Duration::from_secs(20),
            "no request succeeded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let resp = app
        .req(Method::PATCH, &format!("/api/v1/deployments/{id}"))
        .json(&json!({"placements": [{"provider": "mock", "zone": "local-2", "instance_type": TYPE}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{:?}", resp.text().await);
    wait_deployment(
        &app,
        &id,
        Duration::from_secs(90),
        "rolled over to local-2",
        |d| {
            let all = d.instances.iter().flatten();
            let ready: Vec<_> = all.clone().filter(|i| i.status == S::Ready).collect();
            ready.len() == 2
                && ready
                    .iter()
                    .all(|i| i.zone == "local-2" && !old.contains(&i.id))
                && all
                    .filter(|i| old.contains(&i.id))
                    .all(|i| matches!(i.status, S::Terminated | S::Terminating))
        },
    )
    .await;
    let served = clients.ok.load(Ordering::SeqCst);
    while clients.ok.load(Ordering::SeqCst) < served + 20 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    clients.stop.store(true, Ordering::SeqCst);
    clients.task.await.unwrap();
    let failures = clients.failures.lock().unwrap().clone();
    println!(
        "rolling update: {} requests answered, {} failed",
        clients.ok.load(Ordering::SeqCst),
        failures.len()
    );
    assert!(failures.is_empty(), "failed requests: {failures:?}");
}

/// A burst of real load against the simulator: the replicas rise within
/// seconds, then fall back once the load has been gone for the
/// scale-down delay (and not before).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_load_raises_the_replicas_then_they_fall_after_the_delay() {
    let app = TestApp::spawn(BIN).await;
    let created = create_deployment(&app, json!({
            "name": "burst",
            "model": MODEL,
            "placements": [{"provider": "mock", "zone": "local-1", "instance_type": TYPE}],
            "replicas": {"min": 1, "max": 3},
            "autoscaling": {"metric": "requests_in_flight", "target_per_replica": 2, "scale_down_delay": "3s"}
        })).await;
    let id = created.id.to_string();
    let d = wait_deployment(&app, &id, Duration::from_secs(60), "1 replica ready", |d| {
        ready_ids(d).len() == 1
    })
    .await;
    let ip = d.instances.iter().flatten().find_map(|i| i.ip).unwrap();
    // Slow tokens, so requests stay in flight.
    let resp = app
        .http
        .patch(format!("http://{ip}:{ENGINE_PORT}/admin/config"))
        .json(&json!({"itl_ms": 20.0}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let (_, key) = create_key(&app, "burst", None).await;
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let load: Vec<_> = (0..8)
        .map(|_| {
            let (http, url, key) = (
                app.http.clone(),
                app.url("/v1/chat/completions"),
                key.clone(),
            );
            let (stop, ok) = (stop.clone(), ok.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let r = http
                        .post(&url)
                        .bearer_auth(&key)
                        .json(&json!({"model": MODEL, "stream": true, "max_tokens": 100,
                                      "messages": [{"role": "user", "content": "go"}]}))
                        .send()
                        .await;
                    if let Ok(r) = r {
                        if r.status().is_success() && r.bytes().await.is_ok() {
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            })
        })
        .collect();
    let burst = Instant::now();
    wait_deployment(
        &app,
        &id,
        Duration::from_secs(60),
        "3 replicas ready",
        |d| d.status.desired == 3 && ready_ids(d).len() == 3,
    )
    .await;
    println!(
        "3 replicas ready {:?} after the burst began",
        burst.elapsed()
    );
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.await.unwrap();
    }
    assert!(ok.load(Ordering::SeqCst) > 0);
    let quiet = Instant::now();
    wait_deployment(
        &app,
        &id,
        Duration::from_secs(60),
        "back to 1 replica",
        |d| d.status.desired == 1 && ready_ids(d).len() == 1,
    )
    .await;
    let after = quiet.elapsed();
    println!("back to 1 replica {after:?} after the load stopped");
    assert!(
        after >= Duration::from_millis(2_500),
        "scaled down after {after:?}, before the 3 s delay"
    );
}

/// New engine arguments roll the replicas over: the new engine runs with
/// them (the simulator's own flags here: its time to first token).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn new_engine_args_roll_the_replicas_over() {
    let app = TestApp::spawn(BIN).await;
    let created = create_deployment(&app, json!({
            "name": "args",
            "model": MODEL,
            "placements": [{"provider": "mock", "zone": "local-1", "instance_type": TYPE}],
            "replicas": {"min": 1, "max": 1},
            "autoscaling": {"metric": "requests_in_flight", "target_per_replica": 1000, "scale_down_delay": "5m"}
        })).await;
    let id = created.id.to_string();
    let d = wait_deployment(&app, &id, Duration::from_secs(60), "1 replica ready", |d| {
        ready_ids(d).len() == 1
    })
    .await;
    let old = ready_ids(&d);
    let resp = app
        .req(Method::PATCH, &format!("/api/v1/deployments/{id}"))
        .json(&json!({"engine_args": ["--ttft-ms", "40"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let d = wait_deployment(&app, &id, Duration::from_secs(60), "rolled over", |d| {
        let r = ready_ids(d);
        r.len() == 1
            && !old.contains(&r[0])
            && d.instances
                .iter()
                .flatten()
                .filter(|i| old.contains(&i.id))
                .all(|i| matches!(i.status, S::Terminated | S::Terminating | S::Draining))
    })
    .await;
    let ip = d
        .instances
        .iter()
        .flatten()
        .find(|i| i.status == S::Ready)
        .and_then(|i| i.ip)
        .unwrap();
    let knobs: Value = app
        .http
        .get(format!("http://{ip}:{ENGINE_PORT}/admin/config"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(knobs["ttft_ms"], 40.0, "{knobs}");
}

/// The first placement's zone is sold out (the Mock provider's
/// `zone_capacity`): the replica is made in the second placement, and the
/// fallback is on the deployment's timeline.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sold_out_first_placement_falls_back_to_the_second() {
    let app = TestApp::spawn_with(
        BIN,
        Options {
            extra_toml: "[mock.zone_capacity]\n\"local-1\" = 0\n".into(),
            ..Default::default()
        },
    )
    .await;
    let created = create_deployment(&app, json!({
            "name": "fallback",
            "model": MODEL,
            "placements": [
                {"provider": "mock", "zone": "local-1", "instance_type": TYPE},
                {"provider": "mock", "zone": "local-2", "instance_type": TYPE}
            ],
            "replicas": {"min": 1, "max": 1},
            "autoscaling": {"metric": "requests_in_flight", "target_per_replica": 1000, "scale_down_delay": "5m"}
        })).await;
    let id = created.id.to_string();
    let d = wait_deployment(
        &app,
        &id,
        Duration::from_secs(60),
        "a replica ready in local-2",
        |d| {
            d.instances
                .iter()
                .flatten()
                .any(|i| i.status == S::Ready && i.zone == "local-2")
        },
    )
    .await;
    let failed: Vec<_> = d
        .instances
        .iter()
        .flatten()
        .filter(|i| i.zone == "local-1")
        .collect();
    assert!(
        failed.iter().all(|i| i.status == S::Failed),
        "the sold-out zone's attempts failed: {failed:?}"
    );
    let events: Value = app
        .get_json(&format!("/api/v1/deployments/{id}/events"))
        .await;
    assert!(
        events["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "fallback"
                && e["message"].as_str().unwrap_or("").contains("local-2")),
        "{events}"
    );
}
