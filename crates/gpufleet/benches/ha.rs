//! Failover benchmark (issue 13), run with `cargo bench -p gpufleet --bench ha`.
//!
//! Two `gpufleet up` replicas on a fresh PostgreSQL database sharing one
//! `gpufleet mock-provider`, with the product's default lease TTL (3 s).
//! Each run creates a batch of instances on the replica that leads the
//! provisioner, SIGKILLs it while it provisions them (mid-reconcile), and
//! times on the survivor: when it took the provisioner's lease, and when
//! every instance of the batch had left `provisioning` (its work resumed
//! and done). The killed replica is restarted between runs.
//!
//! Knobs: `GPUFLEET_BENCH_RUNS` (default 5), `GPUFLEET_BENCH_BATCH` (10).
//! Heartbeat throughput, reconciler passes with 1,000 instances and event
//! propagation are measured by `gpufleet bench heartbeats --replicas 3`.

use gpufleet_domain::{InstanceId, InstanceStatus};
use gpufleet_test_support::cluster::{Cluster, ClusterOptions};
use gpufleet_test_support::e2e::{MODEL, TYPE};
use reqwest::Method;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn leads(c: &Cluster, i: usize, task: &str) -> bool {
    c.leads(i).await.is_ok_and(|l| l.contains(task))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    let runs = env_usize("GPUFLEET_BENCH_RUNS", 5);
    let batch = env_usize("GPUFLEET_BENCH_BATCH", 10);
    let c = Cluster::start(
        env!("CARGO_BIN_EXE_gpufleet"),
        ClusterOptions {
            replicas: 2,
            proxied: vec![],
            lease_ttl_ms: 3000,
        },
    )
    .await;
    println!("failover: 2 replicas, lease TTL 3 s, {runs} runs of {batch} instances");
    let mut resumed = Vec::new();
    for run in 0..runs {
        // The provisioner's leader.
        let deadline = Instant::now() + Duration::from_secs(30);
        let leader = loop {
            if leads(&c, 0, "provisioner").await {
                break 0;
            }
            if leads(&c, 1, "provisioner").await {
                break 1;
            }
            assert!(Instant::now() < deadline, "no provisioner leader");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let survivor = 1 - leader;
        let v: Value = c
            .req(leader, Method::POST, "/api/v1/instances")
            .json(
                &json!({"provider": "mock", "instance_type": TYPE, "model": MODEL, "count": batch}),
            )
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let ids: Vec<InstanceId> = v["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["id"].as_str().unwrap().parse().unwrap())
            .collect();
        tokio::time::sleep(Duration::from_millis(30)).await;
        c.kill_replica(leader);
        let killed = Instant::now();
        let mut took_lease = None;
        loop {
            if took_lease.is_none() && leads(&c, survivor, "provisioner").await {
                took_lease = Some(killed.elapsed());
            }
            let st = c.statuses(survivor).await.unwrap_or_default();
            let left = ids
                .iter()
                .filter(|id| st.get(*id) == Some(&InstanceStatus::Provisioning))
                .count();
            if left == 0 && took_lease.is_some() {
                break;
            }
            assert!(
                killed.elapsed() < Duration::from_secs(60),
                "work never resumed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let done = killed.elapsed();
        println!(
            "run {run}: survivor took the provisioner's lease after {:.2} s; all {batch} instances provisioned {:.2} s after the kill",
            took_lease.unwrap().as_secs_f64(),
            done.as_secs_f64()
        );
        resumed.push(done.as_secs_f64());
        // Clean up and bring the killed replica back.
        for id in &ids {
            let _ = c
                .req(survivor, Method::DELETE, &format!("/api/v1/instances/{id}"))
                .send()
                .await;
        }
        c.start_replica(leader).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while c
            .statuses(survivor)
            .await
            .unwrap_or_default()
            .iter()
            .any(|(i, s)| ids.contains(i) && *s != InstanceStatus::Terminated)
        {
            assert!(Instant::now() < deadline, "cleanup did not finish");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    resumed.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "failover (kill → batch provisioned elsewhere): median {:.2} s, max {:.2} s (target ≤ 5 s)",
        resumed[resumed.len() / 2],
        resumed[resumed.len() - 1]
    );
}
