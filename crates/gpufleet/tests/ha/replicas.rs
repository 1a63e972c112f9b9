//! Replicas share the work and see each other's changes; a killed replica's
//! work is taken over; a replica cut off from the database stops acting and
//! rejoins; SQLite refuses a second replica; a key's requests per minute
//! hold across replicas.

use crate::common::{transitions, MODEL, TYPE};
use futures::StreamExt;
use gpufleet_api::views::{CreatedInstances, Timeline};
use gpufleet_domain::{InstanceId, InstanceStatus as S};
use gpufleet_test_support::cluster::{spawn_logged, Cluster, ClusterOptions};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

/// The reconcilers every replica runs, each under its own lease.
pub fn tasks() -> impl Iterator<Item = &'static str> {
    gpufleet_control::TaskName::ALL.iter().map(|t| t.as_str())
}

/// Create `count` instances through replica `i`.
pub async fn create(c: &Cluster, i: usize, count: u32) -> anyhow::Result<Vec<InstanceId>> {
    create_keyed(c, i, count, None).await
}

/// [`create`] with an `Idempotency-Key`.
pub async fn create_keyed(
    c: &Cluster,
    i: usize,
    count: u32,
    key: Option<&str>,
) -> anyhow::Result<Vec<InstanceId>> {
    let mut req = c
        .req(i, Method::POST, "/api/v1/instances")
        .json(&json!({"provider": "mock", "instance_type": TYPE, "model": MODEL, "count": count}));
    if let Some(k) = key {
        req = req.header("Idempotency-Key", k);
    }
    let resp = req.send().await?;
    anyhow::ensure!(
        resp.status() == StatusCode::ACCEPTED,
        "create on replica {i}: {}",
        resp.status()
    );
    let created: CreatedInstances = resp.json().await?;
    Ok(created.instances.iter().map(|v| v.id).collect())
}

/// Waits until replica `i` lists every one of `ids` in `status`.
pub async fn wait_all(c: &Cluster, i: usize, ids: &[InstanceId], status: S, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(all) = c.statuses(i).await {
            if ids.iter().all(|id| all.get(id) == Some(&status)) {
                return;
            }
            if Instant::now() > deadline {
                let off: Vec<_> = ids
                    .iter()
                    .filter(|id| all.get(id) != Some(&status))
                    .map(|id| format!("{id}: {:?}", all.get(id)))
                    .collect();
                panic!(
                    "timed out waiting for {status} on replica {i}: {off:?}\n{}",
                    c.logs()
                );
            }
        } else if Instant::now() > deadline {
            panic!("replica {i} does not answer\n{}", c.logs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Each reconciler is led by exactly one of the running replicas.
pub async fn each_task_led_once(c: &Cluster) -> Result<(), String> {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for r in c.replicas.iter().filter(|r| r.running()) {
        let led = c.leads(r.index).await.map_err(|e| e.to_string())?;
        for t in led {
            *counts.entry(t).or_default() += 1;
        }
    }
    for t in tasks() {
        let n = counts.get(t).copied().unwrap_or(0);
        if n != 1 {
            return Err(format!("{t} led by {n} replicas: {counts:?}"));
        }
    }
    Ok(())
}

/// A timeline's transitions are one unbroken chain from `provisioning`.
pub fn chain_is_complete(tl: &Timeline) -> Result<(), String> {
    let steps = transitions(tl);
    let mut at = S::Provisioning;
    for (from, to) in &steps {
        if *from != at {
            return Err(format!("transition {from}→{to} while at {at}: {steps:?}"));
        }
        at = *to;
    }
    Ok(())
}

pub async fn timeline(c: &Cluster, i: usize, id: InstanceId) -> anyhow::Result<Timeline> {
    Ok(serde_json::from_value(
        c.get_json(i, &format!("/api/v1/instances/{id}/events?limit=1000"))
            .await?,
    )?)
}

/// Machines the Mock service holds, by instance id (a duplicate shows as two).
pub async fn machines(c: &Cluster) -> BTreeMap<String, usize> {
    let list: Vec<Value> = c
        .http
        .post(format!("{}/provider/v1/machines/search", c.mock_url))
        .json(&json!({"tags": {}}))
        .send()
        .await
        .expect("mock service answers")
        .json()
        .await
        .expect("machine list");
    let mut out = BTreeMap::new();
    for m in list {
        if let Some(id) = m["tags"]["gpufleet-instance"].as_str() {
            *out.entry(id.to_string()).or_default() += 1;
        }
    }
    out
}

/// Create an API key through replica `i`; returns (id, secret).
pub async fn create_key(c: &Cluster, i: usize) -> (String, String) {
    create_key_with(c, i, json!({"name": "ha"})).await
}

/// Create the API key `body` describes through replica `i`; returns (id, secret).
pub async fn create_key_with(c: &Cluster, i: usize, body: Value) -> (String, String) {
    let v: Value = c
        .req(i, Method::POST, "/api/v1/api-keys")
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    (
        v["id"].as_str().unwrap().to_string(),
        v["key"].as_str().unwrap().to_string(),
    )
}

/// One chat completion through replica `i`.
pub async fn chat(c: &Cluster, i: usize, key: &str) -> reqwest::Result<reqwest::Response> {
    c.http
        .post(format!("{}/v1/chat/completions", c.replicas[i].url()))
        .bearer_auth(key)
        .json(&json!({"model": MODEL, "max_tokens": 4,
            "messages": [{"role": "user", "content": "one two three"}]}))
        .send()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_share_work_and_every_change() {
    let _one = crate::ONE_CLUSTER_AT_A_TIME.lock().await;
    let c = Cluster::start(crate::common::BIN, ClusterOptions::default()).await;

    // SSE on replica 2 sees what replica 0 creates.
    let sse = c
        .req(2, Method::GET, "/api/v1/events")
        .send()
        .await
        .expect("SSE on replica 2");
    assert_eq!(sse.status(), StatusCode::OK);
    let mut sse_body = sse.bytes_stream();

    let ids = create_keyed(&c, 0, 3, Some("share-work")).await.unwrap();
    // The client retries through another replica with the same key: the
    // same instances, nothing more.
    let retried = create_keyed(&c, 1, 3, Some("share-work")).await.unwrap();
    assert_eq!(retried, ids, "a retry through replica 1 made new instances");
    wait_all(&c, 1, &ids, S::Ready, Duration::from_secs(120)).await;

    let mut seen_ready: HashSet<InstanceId> = HashSet::new();
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen_ready.len() < ids.len() {
        let chunk =
            tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), sse_body.next())
                .await
                .unwrap_or_else(|_| {
                    panic!("replica 2's SSE did not show all ready: {seen_ready:?}")
                })
                .expect("SSE open")
                .expect("SSE chunk");
        text.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = text.find("\n\n") {
            let event: String = text.drain(..end + 2).collect();
            if let Some(data) = event.lines().find_map(|l| l.strip_prefix("data:")) {
                if let Ok(v) = serde_json::from_str::<Value>(data.trim()) {
                    if v["status"] == json!("ready") {
                        if let Some(id) = v["id"].as_str().and_then(|s| s.parse().ok()) {
                            seen_ready.insert(id);
                        }
                    }
                }
            }
        }
    }

    // Background work runs on exactly one replica per reconciler.
    each_task_led_once(&c).await.unwrap();
    // One machine per instance.
    let m = machines(&c).await;
    assert_eq!(m.len(), 3, "{m:?}");
    assert!(m.values().all(|&n| n == 1), "{m:?}");

    // The router of every replica routes; a revocation on one replica is
    // honoured by the others long before their key cache's 30 s TTL.
    let (key_id, key) = create_key(&c, 0).await;
    for i in 0..3 {
        let resp = chat(&c, i, &key).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "replica {i}");
    }
    let resp = c
        .req(1, Method::DELETE, &format!("/api/v1/api-keys/{key_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let revoked = Instant::now();
    let deadline = revoked + Duration::from_secs(5);
    for i in [0, 2] {
        loop {
            let st = chat(&c, i, &key).await.unwrap().status();
            if st == StatusCode::UNAUTHORIZED {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "replica {i} still accepts a key revoked on replica 1 ({st})"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    eprintln!(
        "revocation honoured everywhere after {:?}",
        revoked.elapsed()
    );

    // Requests per minute hold across replicas: replica 1 counts what
    // replica 0 admitted (as shared through the database about every
    // second), so it admits at most what arrives before it has read that,
    // not a minute's worth of its own.
    const RPM: u64 = 30;
    let (_, limited) = create_key_with(&c, 0, json!({"name": "ha-limited", "rpm": RPM})).await;
    for n in 0..RPM {
        let resp = chat(&c, 0, &limited).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "request {n} on replica 0");
    }
    let resp = chat(&c, 0, &limited).await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut admitted_elsewhere = 0;
    loop {
        let resp = chat(&c, 1, &limited).await.unwrap();
        if resp.status() == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(
                resp.headers()["x-ratelimit-remaining-requests"],
                "0",
                "{:?}",
                resp.headers()
            );
            break;
        }
        assert_eq!(resp.status(), StatusCode::OK);
        admitted_elsewhere += 1;
        assert!(
            Instant::now() < deadline,
            "replica 1 never counted replica 0's requests"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("replica 1 admitted {admitted_elsewhere} before it counted replica 0's {RPM}");
    assert!(
        admitted_elsewhere < RPM,
        "replica 1 admitted a whole minute's worth ({admitted_elsewhere}) on its own"
    );

    // Terminated through yet another replica; machines and processes go.
    for id in &ids {
        let resp = c
            .req(2, Method::DELETE, &format!("/api/v1/instances/{id}"))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{}", resp.status());
    }
    wait_all(&c, 0, &ids, S::Terminated, Duration::from_secs(60)).await;
    for id in &ids {
        chain_is_complete(&timeline(&c, 1, *id).await.unwrap()).unwrap();
    }
    assert!(machines(&c).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_replicas_work_is_taken_over() {
    let _one = crate::ONE_CLUSTER_AT_A_TIME.lock().await;
    let c = Cluster::start(
        crate::common::BIN,
        ClusterOptions {
            replicas: 2,
            ..Default::default()
        },
    )
    .await;
    let mut leader = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while leader.is_none() {
        for i in 0..2 {
            if c.leads(i).await.unwrap().contains("provisioner") {
                leader = Some(i);
            }
        }
        assert!(
            Instant::now() < deadline,
            "no replica leads the provisioner"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dead = leader.unwrap();
    let alive = 1 - dead;
    c.kill_replica(dead);
    let killed = Instant::now();
    let ids = create(&c, alive, 2).await.unwrap();
    wait_all(&c, alive, &ids, S::Ready, Duration::from_secs(120)).await;
    let took_over = c.leads(alive).await.unwrap();
    for t in tasks() {
        assert!(took_over.contains(t), "{t} not taken over: {took_over:?}");
    }
    eprintln!(
        "work of the killed replica resumed; all ready {:?} after the kill",
        killed.elapsed()
    );
    // The dead replica comes back as a follower; nothing doubles.
    c.start_replica(dead).unwrap();
    let back = Instant::now() + Duration::from_secs(10);
    loop {
        if each_task_led_once(&c).await.is_ok() {
            break;
        }
        assert!(Instant::now() < back, "{:?}", each_task_led_once(&c).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = machines(&c).await;
    assert_eq!(m.len(), 2, "{m:?}");
    assert!(m.values().all(|&n| n == 1), "{m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partitioned_replica_stops_acting_and_rejoins() {
    let _one = crate::ONE_CLUSTER_AT_A_TIME.lock().await;
    let c = Cluster::start(
        crate::common::BIN,
        ClusterOptions {
            replicas: 2,
            proxied: vec![0],
            ..Default::default()
        },
    )
    .await;
    // Replica 0 started first: it takes the leases.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !c.leads(0).await.unwrap().contains("provisioner") {
        assert!(
            Instant::now() < deadline,
            "replica 0 never led the provisioner"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = create(&c, 0, 2).await.unwrap();
    wait_all(&c, 1, &before, S::Ready, Duration::from_secs(120)).await;

    // Cut replica 0 off from the database: connections hang, nothing fails fast.
    c.proxy(0).stall();
    let cut = Instant::now();
    let deadline = cut + Duration::from_secs(30);
    loop {
        let led = c.leads(1).await.unwrap();
        if tasks().all(|t| led.contains(t)) {
            break;
        }
        assert!(Instant::now() < deadline, "replica 1 leads only {led:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "replica 1 took over every lease {:?} after the partition",
        cut.elapsed()
    );
    let during = create(&c, 1, 2).await.unwrap();
    wait_all(&c, 1, &during, S::Ready, Duration::from_secs(120)).await;
    for id in &before {
        let resp = c
            .req(1, Method::DELETE, &format!("/api/v1/instances/{id}"))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success());
    }
    wait_all(&c, 1, &before, S::Terminated, Duration::from_secs(60)).await;

    // Back: replica 0 follows, serves, and nothing was done twice.
    c.proxy(0).resume();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = match c.statuses(0).await {
            Ok(all) => {
                during.iter().all(|id| all.get(id) == Some(&S::Ready))
                    && before.iter().all(|id| all.get(id) == Some(&S::Terminated))
            }
            Err(_) => false,
        };
        if ok && each_task_led_once(&c).await.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replica 0 did not rejoin\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let m = machines(&c).await;
    assert_eq!(m.len(), 2, "{m:?}");
    assert!(
        during.iter().all(|id| m.get(&id.to_string()) == Some(&1)),
        "{m:?}"
    );
    for id in before.iter().chain(&during) {
        let tl = timeline(&c, 0, *id).await.unwrap();
        chain_is_complete(&tl).unwrap();
        let creates = tl
            .events
            .iter()
            .filter(|e| e.action == "provider.create" && e.outcome == "success")
            .count();
        assert_eq!(creates, 1, "{id}: {:?}", transitions(&tl));
    }
}

#[tokio::test]
async fn sqlite_serves_one_replica() {
    let _one = crate::ONE_CLUSTER_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("up.log");
    let up = || {
        let mut cmd = std::process::Command::new(crate::common::BIN);
        cmd.args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path());
        cmd
    };
    let (mut first, _) =
        spawn_logged(&mut up(), &log, "gpufleet listening on ").expect("the first replica starts");
    let out = up().env_remove("GPUFLEET_DATABASE_URL").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("SQLite serves one replica"), "{err}");
    assert!(err.contains("--database postgres://"), "{err}");
    // The first one is untouched and still serves.
    assert!(first.try_wait().unwrap().is_none());
    let _ = first.kill();
    let _ = first.wait();
    let (mut again, _) = spawn_logged(&mut up(), &log, "gpufleet listening on ")
        .expect("the lock goes with its holder");
    let _ = again.kill();
    let _ = again.wait();
}
