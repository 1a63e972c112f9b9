//! Life-cycle benchmark (issue 2's performance targets), run with
//! `cargo bench -p gpufleet --bench lifecycle`.
//!
//! Starts the real `gpufleet up` (release build) with the Mock provider's
//! delays and the simulated model load at zero, then measures:
//! 1. create → ready latency of one instance at a time (server-side
//!    `ready_at - created_at`, and client-observed), N runs, median and p90;
//! 2. 100 instances created at once: time until all are ready;
//! 3. the control plane's resident memory with 100 instances running;
//! 4. terminate all: time until all are terminated.
//!
//! Knobs: `GPUFLEET_BENCH_SINGLE` (runs for 1, default 15),
//! `GPUFLEET_BENCH_BULK` (instances for 2–4, default 100).

#[path = "../tests/common/mod.rs"]
mod common;

use common::{TestApp, MODEL, TYPE};
use gpufleet_api::views::{CreatedInstances, InstanceView};
use gpufleet_domain::InstanceStatus;
use reqwest::Method;
use std::time::{Duration, Instant};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

async fn create(app: &TestApp, count: u32) -> Vec<InstanceView> {
    let body = serde_json::json!({"provider": "mock", "instance_type": TYPE, "model": MODEL, "count": count});
    let resp = app
        .req(Method::POST, "/api/v1/instances")
        .json(&body)
        .send()
        .await
        .expect("create request");
    assert_eq!(
        resp.status(),
        202,
        "create failed: {}",
        resp.text().await.unwrap_or_default()
    );
    resp.json::<CreatedInstances>()
        .await
        .expect("create body")
        .instances
}

/// Polls the list every 10 ms until every id is in `want` (or fails).
async fn wait_all(
    app: &TestApp,
    ids: &[gpufleet_domain::InstanceId],
    want: InstanceStatus,
    limit: Duration,
) -> Vec<InstanceView> {
    let deadline = Instant::now() + limit;
    loop {
        let list = app.list(true).await.expect("list");
        let mine: Vec<_> = list.into_iter().filter(|i| ids.contains(&i.id)).collect();
        if let Some(f) = mine.iter().find(|i| i.status == InstanceStatus::Failed) {
            panic!(
                "instance {} failed: {:?} {:?}",
                f.id, f.status_reason, f.status_message
            );
        }
        if mine.len() == ids.len() && mine.iter().all(|i| i.status == want) {
            return mine;
        }
        assert!(Instant::now() < deadline, "not all {want} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::main]
async fn main() {
    let singles = env_usize("GPUFLEET_BENCH_SINGLE", 15);
    let bulk = env_usize("GPUFLEET_BENCH_BULK", 100) as u32;
    let app = TestApp::spawn_with(
        common::BIN,
        common::Options {
            bench: true,
            ..Default::default()
        },
    )
    .await;
    let pid = app.pid().expect("control plane pid");
    println!(
        "gpufleet lifecycle bench: control plane pid {pid}, pool {}",
        app.ip_pool
    );
    println!("idle RSS: {} KiB", rss_kib(pid).unwrap_or(0));

    // 1. One at a time.
    let mut server_ms = Vec::new();
    let mut client_ms = Vec::new();
    for _ in 0..singles {
        let t0 = Instant::now();
        let created = create(&app, 1).await;
        let ids: Vec<_> = created.iter().map(|i| i.id).collect();
        let ready = wait_all(&app, &ids, InstanceStatus::Ready, Duration::from_secs(30)).await;
        client_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        let r = &ready[0];
        let ready_at = r.ready_at.expect("ready_at");
        server_ms.push((ready_at - r.created_at).num_microseconds().unwrap_or(0) as f64 / 1000.0);
        app.terminate(r.id).await;
        wait_all(
            &app,
            &ids,
            InstanceStatus::Terminated,
            Duration::from_secs(30),
        )
        .await;
    }
    server_ms.sort_by(f64::total_cmp);
    client_ms.sort_by(f64::total_cmp);
    println!(
        "create -> ready, one instance, {singles} runs: server-side median {:.0} ms, p90 {:.0} ms; client-observed median {:.0} ms, p90 {:.0} ms",
        percentile(&server_ms, 0.5),
        percentile(&server_ms, 0.9),
        percentile(&client_ms, 0.5),
        percentile(&client_ms, 0.9)
    );

    // 2. Many at once.
    let t0 = Instant::now();
    let created = create(&app, bulk).await;
    let ids: Vec<_> = created.iter().map(|i| i.id).collect();
    let ready = wait_all(&app, &ids, InstanceStatus::Ready, Duration::from_secs(300)).await;
    let all_ready = t0.elapsed();
    let mut per: Vec<f64> = ready
        .iter()
        .map(|r| (r.ready_at.expect("ready_at") - r.created_at).num_milliseconds() as f64)
        .collect();
    per.sort_by(f64::total_cmp);
    println!(
        "{bulk} instances created at once: all ready after {:.2} s (per instance create -> ready: median {:.0} ms, max {:.0} ms)",
        all_ready.as_secs_f64(),
        percentile(&per, 0.5),
        percentile(&per, 1.0)
    );
    // Let heartbeats flow for a few intervals before reading memory.
    let settle = Instant::now() + Duration::from_secs(3);
    while Instant::now() < settle {
        app.list(false).await.expect("list");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "control plane RSS with {bulk} ready instances: {} KiB",
        rss_kib(pid).unwrap_or(0)
    );

    // 4. Terminate all.
    let t0 = Instant::now();
    for id in &ids {
        app.terminate(*id).await;
    }
    wait_all(
        &app,
        &ids,
        InstanceStatus::Terminated,
        Duration::from_secs(300),
    )
    .await;
    println!(
        "{bulk} instances terminated after {:.2} s",
        t0.elapsed().as_secs_f64()
    );
}
