//! Ingestion and metric-query benchmark, on SQLite (a temp file) and
//! PostgreSQL (a fresh database).
//!
//! `cargo bench -p gpufleet-store --bench ingest`. Knobs (environment):
//! - `BENCH_AGENTS` (1000): simulated agents, each heartbeat = system + 1 GPU.
//! - `BENCH_BATCH` (250): heartbeats per `record_heartbeats` call.
//! - `BENCH_SECONDS` (8): length of the sustained-ingestion run per backend.
//! - `BENCH_PACED_RATE` (2000) and `BENCH_PACED_SECONDS` (4): a paced run at
//!   that many heartbeats per second, batches every 50 ms: call latency.
//! - `BENCH_QUERY_ITERS` (40): timed runs of each 24-hour series query.
//! - `BENCH_BACKENDS` (`sqlite,postgres`).
//! - `GPUFLEET_BENCH_POSTGRES_URL` (default `GPUFLEET_TEST_POSTGRES_URL`, then
//!   `postgres://postgres@127.0.0.1:5432/postgres`): a server where the
//!   benchmark may create (and then drops) a database.

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use gpufleet_domain::metrics::{parse_step, RetentionConfig, Tier};
use gpufleet_domain::InstanceId;
use gpufleet_proto::{EngineSample, EngineStatus, GpuSample, GpuSource, Heartbeat, SystemSample};
use gpufleet_store::{HeartbeatOutcome, NewInstance, Store};
use sqlx::{Connection, Executor, PgConnection};
use std::time::{Duration, Instant};

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn new_instance(now: DateTime<Utc>) -> NewInstance {
    let id = InstanceId::new();
    NewInstance {
        id,
        provider: "mock".parse().unwrap(),
        zone: "local-1".to_string(),
        instance_type: "L4-1-24G".to_string(),
        model: "Qwen/Qwen2.5-0.5B".parse().unwrap(),
        idempotency_key: format!("idem-{id}"),
        bootstrap_secret_hash: format!("hash-{id}"),
        startup_deadline_at: now + ChronoDuration::minutes(10),
        created_at: now,
        deployment_id: None,
        engine_args: None,
        project_id: gpufleet_domain::ProjectId::default_project(),
        price_per_hour: None,
    }
}

fn heartbeat(id: InstanceId, seq: u64, at: DateTime<Utc>, x: f64) -> Heartbeat {
    Heartbeat {
        instance_id: id,
        seq,
        sent_at: at,
        agent_version: "0.1.0".to_string(),
        agent_uptime_secs: seq,
        system: SystemSample {
            cpu_pct: 20.0 + x,
            load1: 1.0,
            load5: 1.0,
            load15: 1.0,
            mem_used_bytes: 12 << 30,
            mem_total_bytes: 64 << 30,
            disk_used_bytes: 50 << 30,
            disk_total_bytes: 200 << 30,
            net_rx_bps: 1e6 + x,
            net_tx_bps: 5e5,
        },
        gpu_source: GpuSource::Simulated,
        gpus: vec![GpuSample {
            index: 0,
            name: "NVIDIA L4".to_string(),
            uuid: Some(format!("GPU-{id}")),
            util_pct: Some(50.0 + x),
            mem_used_mib: 18_000,
            mem_total_mib: 23_034,
            temp_c: Some(60.0 + x / 10.0),
            power_w: Some(55.0 + x),
            power_limit_w: Some(72.0),
            ..GpuSample::default()
        }],
        engine: EngineSample {
            status: EngineStatus::Ready,
            requests_running: 4.0,
            requests_waiting: 1.0,
            restarts: 0,
            kv_cache_usage: Some(0.4),
            prompt_tokens_per_s: Some(800.0),
            generation_tokens_per_s: Some(150.0 + x),
            ttft_mean_s: Some(0.08),
            canary: None,
        },
    }
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

async fn run(store: &Store, label: &str) {
    let agents = env_num("BENCH_AGENTS", 1000) as usize;
    let batch = env_num("BENCH_BATCH", 250).max(1) as usize;
    let seconds = env_num("BENCH_SECONDS", 8);
    let paced_rate = env_num("BENCH_PACED_RATE", 2000);
    let paced_seconds = env_num("BENCH_PACED_SECONDS", 4);
    let iters = env_num("BENCH_QUERY_ITERS", 40).max(1) as usize;

    let now = Utc::now();
    let mut ids = Vec::with_capacity(agents);
    for chunk in (0..agents).collect::<Vec<_>>().chunks(500) {
        let news: Vec<_> = chunk.iter().map(|_| new_instance(now)).collect();
        for r in store
            .insert_instances(&news)
            .await
            .expect("insert instances")
        {
            ids.push(r.id);
        }
    }
    let mut seqs = vec![0u64; agents];
    let mut next_agent = 0usize;
    let mut make_batch = |n: usize| -> Vec<(Heartbeat, DateTime<Utc>)> {
        let at = Utc::now();
        (0..n)
            .map(|k| {
                let a = next_agent;
                next_agent = (next_agent + 1) % agents;
                seqs[a] += 1;
                (heartbeat(ids[a], seqs[a], at, (k % 17) as f64), at)
            })
            .collect()
    };

    // Sustained: back-to-back batches, as a saturated batching writer.
    let mut lat = Vec::new();
    let mut total = 0usize;
    let start = Instant::now();
    let mut in_store = Duration::ZERO;
    while start.elapsed() < Duration::from_secs(seconds) {
        let b = make_batch(batch);
        let t = Instant::now();
        let out = store
            .record_heartbeats(&b)
            .await
            .expect("record_heartbeats");
        let d = t.elapsed();
        in_store += d;
        lat.push(d);
        assert!(out.iter().all(|o| *o == HeartbeatOutcome::Applied));
        total += b.len();
    }
    let wall = start.elapsed().as_secs_f64();
    lat.sort();
    println!(
        "[{label}] sustained: {total} heartbeats in {wall:.1} s = {:.0}/s wall ({:.0}/s in the store), \
         batch {batch}, {agents} agents; batch latency p50 {:.1} ms, p99 {:.1} ms",
        total as f64 / wall,
        total as f64 / in_store.as_secs_f64(),
        pct(&lat, 0.5),
        pct(&lat, 0.99)
    );

    // Paced: `paced_rate`/s, one batch per 50 ms tick.
    if paced_rate > 0 && paced_seconds > 0 {
        let per_tick = ((paced_rate as f64) / 20.0).round().max(1.0) as usize;
        let mut lat = Vec::new();
        let mut ticker = tokio::time::interval(Duration::from_millis(50));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(paced_seconds) {
            ticker.tick().await;
            let b = make_batch(per_tick);
            let t = Instant::now();
            store
                .record_heartbeats(&b)
                .await
                .expect("record_heartbeats");
            lat.push(t.elapsed());
        }
        lat.sort();
        println!(
            "[{label}] paced {paced_rate}/s ({per_tick} per 50 ms batch): store call p50 {:.2} ms, \
             p99 {:.2} ms, max {:.2} ms",
            pct(&lat, 0.5),
            pct(&lat, 0.99),
            pct(&lat, 1.0)
        );
    }

    // 24 h of 5 s samples for one instance, ending now, then rollups.
    let id = ids[0];
    let end = Utc::now();
    let from = end - ChronoDuration::hours(24);
    let n = 24 * 3600 / 5;
    let t = Instant::now();
    let base_seq = 1_000_000_000u64;
    let history: Vec<_> = (0..n)
        .map(|i| {
            let at = from + ChronoDuration::seconds(5 * i as i64);
            (heartbeat(id, base_seq + i as u64, at, (i % 23) as f64), at)
        })
        .collect();
    // The instance already has newer seqs from the runs above: use a fresh one.
    let qid = {
        let rec = store
            .insert_instances(&[new_instance(from)])
            .await
            .expect("insert");
        rec[0].id
    };
    let history: Vec<_> = history
        .into_iter()
        .map(|(mut hb, at)| {
            hb.instance_id = qid;
            (hb, at)
        })
        .collect();
    for chunk in history.chunks(500) {
        store.record_heartbeats(chunk).await.expect("preload");
    }
    let _ = id;
    println!(
        "[{label}] preloaded {n} samples (24 h at 5 s) in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let mut calls = 0;
    for tier in [Tier::Minute, Tier::Hour] {
        loop {
            calls += 1;
            let r = store.rollup(tier, end).await.expect("rollup");
            if r.caught_up {
                break;
            }
        }
    }
    println!(
        "[{label}] rolled up everything (minute + hour, {calls} calls) in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    let retention = RetentionConfig::default();
    for (step, tier) in [
        ("1m", None),
        ("5m", None),
        ("5m", Some(Tier::Raw)),
        ("1h", None),
    ] {
        let step = parse_step(step).unwrap();
        let tier = tier.unwrap_or_else(|| {
            Tier::for_query(
                step,
                from.timestamp_millis(),
                end.timestamp_millis(),
                &retention,
            )
        });
        let mut lat = Vec::with_capacity(iters);
        let mut points = 0;
        for _ in 0..iters {
            let t = Instant::now();
            let s = store
                .metric_series(qid, from, end, step, tier)
                .await
                .expect("metric_series");
            lat.push(t.elapsed());
            points = s.points.len();
        }
        lat.sort();
        println!(
            "[{label}] 24 h series, step {step}, tier {tier}: {points} points; p50 {:.2} ms, p99 {:.2} ms",
            pct(&lat, 0.5),
            pct(&lat, 0.99)
        );
    }
    let t = Instant::now();
    let fleet = store
        .fleet_now(Utc::now() - ChronoDuration::minutes(5), None)
        .await
        .expect("fleet_now");
    println!(
        "[{label}] fleet_now over {} instances: {:.2} ms",
        fleet.instances,
        t.elapsed().as_secs_f64() * 1e3
    );
}

#[tokio::main]
async fn main() {
    let backends = std::env::var("BENCH_BACKENDS").unwrap_or_else(|_| "sqlite,postgres".into());
    // `cargo bench` passes `--bench`; nothing else to parse.
    if backends.split(',').any(|b| b.trim() == "sqlite") {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("bench.db").display());
        let store = Store::connect(&url).await.expect("connect SQLite");
        run(&store, "sqlite").await;
        store.close().await;
    }
    if backends.split(',').any(|b| b.trim() == "postgres") {
        let admin_url = std::env::var("GPUFLEET_BENCH_POSTGRES_URL")
            .or_else(|_| std::env::var("GPUFLEET_TEST_POSTGRES_URL"))
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string());
        let mut admin = match PgConnection::connect(&admin_url).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("[postgres] SKIPPED: cannot connect to {admin_url}: {e}");
                return;
            }
        };
        let name = format!("gpufleet_bench_{}", uuid::Uuid::new_v4().simple());
        admin
            .execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .expect("create database");
        let (base, query) = match admin_url.split_once('?') {
            Some((b, q)) => (b, format!("?{q}")),
            None => (admin_url.as_str(), String::new()),
        };
        let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
        let host_end = base[scheme_end..]
            .find('/')
            .map(|i| scheme_end + i)
            .unwrap_or(base.len());
        let url = format!("{}/{name}{query}", &base[..host_end]);
        let store = Store::connect(&url).await.expect("connect PostgreSQL");
        run(&store, "postgres").await;
        store.close().await;
        let _ = admin
            .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
            .await;
    }
}
