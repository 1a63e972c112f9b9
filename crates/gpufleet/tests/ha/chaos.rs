//! The chaos test: three replicas on PostgreSQL; a client that rotates
//! between them creates and terminates 200 Mock instances (four waves of 50)
//! and sends OpenAI requests, while a random replica is killed with SIGKILL
//! and restarted every few seconds. Afterwards every instance is where it
//! was asked to be, no machine was ever duplicated, no machine or process
//! is left, every timeline is one unbroken chain, and every request was
//! answered by some replica (a retry on another replica is allowed, as a
//! client behind a load balancer would). Creates carry an
//! `Idempotency-Key`: a retry of one that a killed replica recorded but
//! never answered makes nothing twice, so no instance exists that the
//! client did not ask for.

use crate::common::MODEL;
use crate::replicas::{chain_is_complete, create_key, machines};
use gpufleet_api::views::{CreatedInstances, InstanceList, Timeline};
use gpufleet_domain::{InstanceId, InstanceStatus as S};
use gpufleet_test_support::cluster::{Cluster, ClusterOptions, TOKEN};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WAVES: usize = 4;
const PER_WAVE: u32 = 50;

/// A client of the cluster that tries the replicas in turn: a replica that
/// does not answer, or answers 5xx, is skipped for the next one.
struct Rotating {
    c: Arc<Cluster>,
    next: AtomicUsize,
    retries: AtomicUsize,
}

impl Rotating {
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        bearer: &str,
    ) -> (StatusCode, Value) {
        self.send_keyed(method, path, body, bearer, None).await
    }

    /// [`Rotating::send`] with an `Idempotency-Key`, the same on every try:
    /// a replica killed after it recorded the request but before it
    /// answered must not make the retry a second request.
    async fn send_keyed(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        bearer: &str,
        key: Option<&str>,
    ) -> (StatusCode, Value) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed) % self.c.replicas.len();
            let mut req = self
                .c
                .http
                .request(
                    method.clone(),
                    format!("{}{path}", self.c.replicas[i].url()),
                )
                .timeout(Duration::from_secs(10))
                .bearer_auth(bearer);
            if let Some(b) = &body {
                req = req.json(b);
            }
            if let Some(k) = key {
                req = req.header("Idempotency-Key", k);
            }
            match req.send().await {
                Ok(resp) if !resp.status().is_server_error() => {
                    let status = resp.status();
                    let v = resp.json().await.unwrap_or(Value::Null);
                    return (status, v);
                }
                Ok(_) | Err(_) => {
                    self.retries.fetch_add(1, Ordering::Relaxed);
                    assert!(
                        Instant::now() < deadline,
                        "no replica answered {method} {path} for 60 s\n{}",
                        self.c.logs()
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.send(method, path, body, TOKEN).await
    }

    async fn statuses(&self) -> BTreeMap<InstanceId, S> {
        let (st, v) = self
            .admin(
                Method::GET,
                "/api/v1/instances?include_archived=true&limit=1000",
                None,
            )
            .await;
        assert_eq!(st, StatusCode::OK);
        let list: InstanceList = serde_json::from_value(v).unwrap();
        list.instances
            .into_iter()
            .map(|x| (x.id, x.status))
            .collect()
    }

    /// What the cluster knows of `ids`: each one's timeline, and every
    /// replica's and the Mock service's log lines that name it.
    async fn explain(&self, ids: impl Iterator<Item = &String>) -> String {
        let mut logs = vec![self.c.mock_dir.join("mock.log")];
        logs.extend(self.c.replicas.iter().map(|r| r.log()));
        let mut out = String::new();
        for id in ids {
            let (_, v) = self
                .admin(
                    Method::GET,
                    &format!("/api/v1/instances/{id}/events?limit=1000"),
                    None,
                )
                .await;
            out.push_str(&format!("=== {id}: timeline\n{v:#}\n"));
            for log in &logs {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                out.push_str(&format!("--- {} ---\n", log.display()));
                for line in text.lines().filter(|l| l.contains(id.as_str())) {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
        out
    }

    async fn wait_all(&self, ids: &[InstanceId], status: S, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let all = self.statuses().await;
            let off: Vec<_> = ids
                .iter()
                .filter(|id| all.get(id) != Some(&status))
                .map(|id| (id, all.get(id).copied()))
                .collect();
            if off.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} instances not {status}: {:?}\n{}",
                off.len(),
                &off[..off.len().min(10)],
                self.c.logs()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_survive_a_sigkill_storm() {
    let _one = crate::ONE_CLUSTER_AT_A_TIME.lock().await;
    let c = Arc::new(Cluster::start(crate::common::BIN, ClusterOptions::default()).await);
    let client = Rotating {
        c: c.clone(),
        next: AtomicUsize::new(0),
        retries: AtomicUsize::new(0),
    };
    let (_, key) = create_key(&c, 0).await;

    // Kill a random replica every 2-4 s and restart it 1 s later; at least
    // one replica always runs.
    let stop = Arc::new(AtomicBool::new(false));
    let kills = Arc::new(AtomicUsize::new(0));
    let killer = {
        let (c, stop, kills) = (c.clone(), stop.clone(), kills.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(rand::random_range(2000..4000))).await;
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let i = rand::random_range(0..c.replicas.len());
                c.kill_replica(i);
                kills.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(1000)).await;
                let c2 = c.clone();
                tokio::task::spawn_blocking(move || c2.start_replica(i))
                    .await
                    .unwrap()
                    .expect("a killed replica restarts");
            }
        })
    };

    let mut all_ids: Vec<InstanceId> = Vec::new();
    let mut answered = 0usize;
    let mut sent = 0usize;
    for wave in 0..WAVES {
        let mut ids = Vec::new();
        for _ in 0..PER_WAVE / 10 {
            let key = format!("chaos-{:032x}", rand::random::<u128>());
            let (st, v) = client
                .send_keyed(
                    Method::POST,
                    "/api/v1/instances",
                    Some(
                        json!({"provider": "mock", "instance_type": crate::common::TYPE,
                        "model": MODEL, "count": 10}),
                    ),
                    TOKEN,
                    Some(&key),
                )
                .await;
            assert_eq!(st, StatusCode::ACCEPTED, "{v}");
            let created: CreatedInstances = serde_json::from_value(v).unwrap();
            ids.extend(created.instances.iter().map(|x| x.id));
        }
        client
            .wait_all(&ids, S::Ready, Duration::from_secs(240))
            .await;
        // One machine per instance, never two.
        let m = machines(&c).await;
        for id in &ids {
            assert_eq!(
                m.get(&id.to_string()),
                Some(&1),
                "wave {wave}: machines of {id}: {m:?}"
            );
        }
        for _ in 0..25 {
            sent += 1;
            let (st, v) = client
                .send(
                    Method::POST,
                    "/v1/chat/completions",
                    Some(json!({"model": MODEL, "max_tokens": 4,
                        "messages": [{"role": "user", "content": "one two three"}]})),
                    &key,
                )
                .await;
            assert_eq!(st, StatusCode::OK, "{v}");
            if v["choices"].as_array().is_some_and(|c| !c.is_empty()) {
                answered += 1;
            }
        }
        for id in &ids {
            let (st, v) = client
                .admin(Method::DELETE, &format!("/api/v1/instances/{id}"), None)
                .await;
            assert!(st.is_success(), "terminate {id}: {st} {v}");
        }
        client
            .wait_all(&ids, S::Terminated, Duration::from_secs(240))
            .await;
        all_ids.extend(ids);
        eprintln!(
            "wave {wave} done: {} instances, {} kills so far, {} client retries",
            all_ids.len(),
            kills.load(Ordering::SeqCst),
            client.retries.load(Ordering::Relaxed)
        );
    }
    stop.store(true, Ordering::SeqCst);
    killer.await.unwrap();
    for i in 0..c.replicas.len() {
        if !c.replicas[i].running() {
            c.start_replica(i).unwrap();
        }
    }

    assert!(
        kills.load(Ordering::SeqCst) >= 3,
        "the storm killed too little"
    );
    assert_eq!(answered, sent, "every OpenAI request answered");
    // Every instance where it was asked to be, and none the client did not
    // ask for (a retried create made nothing twice).
    let all = client.statuses().await;
    let unasked: Vec<_> = all.keys().filter(|id| !all_ids.contains(id)).collect();
    assert!(
        unasked.is_empty(),
        "instances nobody asked for: {unasked:?}\n{}",
        client
            .explain(
                unasked
                    .iter()
                    .map(|id| id.to_string())
                    .take(3)
                    .collect::<Vec<_>>()
                    .iter()
            )
            .await
    );
    let wrong: Vec<_> = all_ids
        .iter()
        .filter(|id| all.get(id) != Some(&S::Terminated))
        .collect();
    assert!(wrong.is_empty(), "{wrong:?}");
    // No machine and no process left.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = machines(&c).await;
        let pids = c.machine_pids();
        if m.is_empty() && pids.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            let why = client.explain(m.keys().take(3)).await;
            panic!("left behind: machines {m:?}, processes {pids:?}\n{why}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Every timeline one unbroken chain, from provisioning to terminated.
    let mut broken = BTreeSet::new();
    for id in &all_ids {
        let (st, v) = client
            .admin(
                Method::GET,
                &format!("/api/v1/instances/{id}/events?limit=1000"),
                None,
            )
            .await;
        assert_eq!(st, StatusCode::OK);
        let tl: Timeline = serde_json::from_value(v).unwrap();
        if let Err(e) = chain_is_complete(&tl) {
            broken.insert(format!("{id}: {e}"));
        }
        let last = crate::common::transitions(&tl).last().map(|t| t.1);
        if last != Some(S::Terminated) {
            broken.insert(format!("{id}: ends at {last:?}"));
        }
    }
    assert!(broken.is_empty(), "{broken:?}");
    // And background work is back to one leader per reconciler.
    let deadline = Instant::now() + Duration::from_secs(15);
    while let Err(e) = crate::replicas::each_task_led_once(&c).await {
        assert!(Instant::now() < deadline, "{e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "chaos: {} instances, {} kills, {sent} OpenAI requests answered, {} client retries",
        all_ids.len(),
        kills.load(Ordering::SeqCst),
        client.retries.load(Ordering::Relaxed)
    );
}
