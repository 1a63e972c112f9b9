//! Metric history upkeep (rollups, retention) and heartbeat validation
//! through the Fleet.

mod common;

use chrono::{DateTime, Duration, DurationRound, Utc};
use common::*;
use gpufleet_control::{ControlConfig, ControlError, CreateInstances, Fleet};
use gpufleet_domain::metrics::{RetentionConfig, Step, Tier};
use gpufleet_domain::InstanceId;
use gpufleet_proto::{EngineSample, EngineStatus, GpuSample, GpuSource, Heartbeat, SystemSample};

async fn create_one(fleet: &Fleet) -> InstanceId {
    fleet
        .create_instances(CreateInstances {
            provider: "mem".parse().unwrap(),
            zone: None,
            instance_type: "mem-1".into(),
            model: "gpufleet/sim-small".parse().unwrap(),
            count: 1,
        })
        .await
        .unwrap()[0]
        .id
}

fn heartbeat(id: InstanceId, seq: u64, util: f64) -> Heartbeat {
    Heartbeat {
        instance_id: id,
        seq,
        sent_at: Utc::now(),
        agent_version: "test".into(),
        agent_uptime_secs: 1,
        system: SystemSample {
            cpu_pct: 10.0,
            mem_used_bytes: 1 << 20,
            mem_total_bytes: 1 << 30,
            ..SystemSample::default()
        },
        gpu_source: GpuSource::Simulated,
        gpus: vec![GpuSample {
            index: 0,
            name: "NVIDIA L4".into(),
            uuid: None,
            util_pct: Some(util),
            mem_used_mib: 100,
            mem_total_mib: 23_034,
            temp_c: Some(40.0 + util / 10.0),
            power_w: Some(30.0),
            power_limit_w: Some(72.0),
            ..GpuSample::default()
        }],
        engine: EngineSample {
            status: EngineStatus::Starting,
            requests_running: 0.0,
            requests_waiting: 0.0,
            restarts: 0,
            kv_cache_usage: None,
            prompt_tokens_per_s: None,
            generation_tokens_per_s: None,
            ttft_mean_s: None,
            canary: None,
        },
    }
}

fn config() -> ControlConfig {
    ControlConfig {
        metrics_rollup_interval_ms: 50,
        retention: RetentionConfig {
            raw_hours: 24,
            minute_days: 7,
            hour_days: 90,
        },
        ..fast_config()
    }
}

#[tokio::test]
async fn rollups_fill_the_coarser_tiers_and_retention_trims_raw() {
    let h = start(memory_provider(), config()).await;
    let id = create_one(&h.fleet).await;
    let store = h.fleet.store();
    // Ten minutes of history 30 hours ago (past raw retention) and ten
    // minutes 2 hours ago, one heartbeat per 5 s, as if received then.
    // On a minute boundary, so that every minute bucket holds twelve
    // samples, both utilisations among them (from an unaligned start, the
    // first bucket could hold one 20 % sample alone).
    let now = Utc::now().duration_trunc(Duration::minutes(1)).unwrap();
    let mut batch: Vec<(Heartbeat, DateTime<Utc>)> = Vec::new();
    let mut seq = 0;
    for start in [now - Duration::hours(30), now - Duration::hours(2)] {
        for i in 0..120 {
            seq += 1;
            let util = if i % 2 == 0 { 20.0 } else { 60.0 };
            batch.push((heartbeat(id, seq, util), start + Duration::seconds(5 * i)));
        }
    }
    let outcomes = store.record_heartbeats(&batch).await.unwrap();
    assert_eq!(outcomes.len(), 240);

    // The reconciler rolls both stretches up, then deletes the old raw rows.
    let old = (now - Duration::hours(31), now - Duration::hours(29));
    eventually(30, "raw rows past retention to be deleted", || async {
        let raw = store
            .metric_series(id, old.0, old.1, Step::MINUTE, Tier::Raw)
            .await
            .unwrap();
        raw.points.is_empty().then_some(())
    })
    .await;
    let minutes = store
        .metric_series(id, old.0, old.1, Step::MINUTE, Tier::Minute)
        .await
        .unwrap();
    let n: i64 = minutes.points.iter().map(|p| p.samples).sum();
    assert_eq!(n, 120, "every old sample is in the minute tier");
    let gpu = &minutes.gpus[0];
    let util_avg = gpu
        .points
        .iter()
        .map(|p| p.util_pct_avg.expect("known") * p.samples as f64)
        .sum::<f64>()
        / 120.0;
    assert!((util_avg - 40.0).abs() < 1e-9, "{util_avg}");
    assert!(gpu.points.iter().all(|p| p.util_pct_max == Some(60.0)));

    let hours = eventually(30, "the hour tier to hold both stretches", || async {
        let s = store
            .metric_series(id, now - Duration::hours(31), now, Step::HOUR, Tier::Hour)
            .await
            .unwrap();
        (s.points.iter().map(|p| p.samples).sum::<i64>() == 240).then_some(s)
    })
    .await;
    assert!(hours.gpus[0]
        .points
        .iter()
        .all(|p| p.temp_c_max == Some(46.0) && p.power_limit_w == Some(72.0)));
    // The recent raw rows stay.
    let recent = store
        .metric_series(id, now - Duration::hours(3), now, Step::MINUTE, Tier::Raw)
        .await
        .unwrap();
    assert_eq!(recent.points.iter().map(|p| p.samples).sum::<i64>(), 120);

    // Through History: a 31-hour window at 1 h reads the hour tier.
    let s = h
        .history
        .metric_series(id, now - Duration::hours(31), now, Some(Step::HOUR))
        .await
        .unwrap();
    assert_eq!(s.tier, Tier::Hour);
    // A 5 s step around 30 h ago: raw is gone there, so minute rollups.
    let s = h
        .history
        .metric_series(id, old.0, old.1, Some(Step::MIN))
        .await
        .unwrap();
    assert_eq!(s.tier, Tier::Minute);
    assert!(!s.points.is_empty());

    // The run that rolled up is counted once it has returned, which may be
    // after its writes were read above.
    eventually(30, "the rollup reconciler to count its run", || async {
        let task = h
            .tasks
            .statuses()
            .into_iter()
            .find(|t| t.name == "metrics_rollup")
            .expect("the rollup reconciler is registered");
        (task.runs > 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn impossible_heartbeats_are_rejected_before_the_store() {
    let h = start(memory_provider(), fast_config()).await;
    let id = create_one(&h.fleet).await;
    let check = |mutate: fn(&mut Heartbeat), want: &'static str| {
        let agents = h.agents.clone();
        async move {
            let mut hb = heartbeat(id, 5, 50.0);
            mutate(&mut hb);
            match agents.ingest_heartbeat(id, hb).await {
                Err(ControlError::InvalidHeartbeat(e)) => assert_eq!(e.field, want),
                other => panic!("{want}: {other:?}"),
            }
        }
    };
    check(|h| h.gpus[0].util_pct = Some(f64::NAN), "gpus[0].util_pct").await;
    check(|h| h.gpus[0].util_pct = Some(100.5), "gpus[0].util_pct").await;
    check(|h| h.gpus[0].temp_c = Some(f64::INFINITY), "gpus[0].temp_c").await;
    check(|h| h.gpus[0].mem_used_mib = 99_999, "gpus[0].mem_used_mib").await;
    check(|h| h.system.net_tx_bps = -1.0, "system.net_tx_bps").await;
    check(
        |h| {
            let mut g = h.gpus[0].clone();
            g.index = 1;
            h.gpus.push(g);
        },
        "gpus",
    )
    .await;
    let rec = h.fleet.get_instance(id).await.unwrap();
    assert_eq!(rec.last_heartbeat_seq, None);
    assert!(h.fleet.instance_samples(id, 10).await.unwrap().is_empty());

    // A good one goes through the batching writer and is applied.
    let ack = h
        .agents
        .ingest_heartbeat(id, heartbeat(id, 6, 50.0))
        .await
        .unwrap();
    assert!(ack.applied);
    assert_eq!(h.fleet.instance_samples(id, 10).await.unwrap().len(), 1);
}

#[tokio::test]
async fn concurrent_heartbeats_are_batched_and_each_gets_its_outcome() {
    let h = start(memory_provider(), fast_config()).await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(create_one(&h.fleet).await);
    }
    let mut calls = Vec::new();
    for (n, id) in ids.iter().enumerate() {
        for seq in [10u64, 5] {
            let agents = h.agents.clone();
            let id = *id;
            calls.push(tokio::spawn(async move {
                let r = agents
                    .ingest_heartbeat(id, heartbeat(id, seq + n as u64 * 100, 10.0))
                    .await;
                (seq, r)
            }));
        }
    }
    let mut applied = 0;
    for c in calls {
        let (_, r) = c.await.unwrap();
        if r.unwrap().applied {
            applied += 1;
        }
    }
    // Per instance: seq 10 (+n·100) always applies; seq 5 applies only if it came first.
    assert!((20..=40).contains(&applied), "{applied}");
    for id in ids {
        let rec = h.fleet.get_instance(id).await.unwrap();
        assert_eq!(rec.last_heartbeat_seq.map(|s| s % 100), Some(10));
    }
}

#[tokio::test]
async fn stopping_ingest_moves_what_is_staged_and_refuses_later_heartbeats() {
    // Moves only at shutdown: a long interval and a high threshold.
    let mut cfg = fast_config();
    cfg.ingest.compact_interval_ms = 3_600_000;
    cfg.ingest.compact_heartbeats = 1_000_000;
    let h = start(memory_provider(), cfg).await;
    let id = create_one(&h.fleet).await;
    for seq in 1..=5 {
        let ack = h
            .agents
            .ingest_heartbeat(id, heartbeat(id, seq, 20.0))
            .await
            .unwrap();
        assert!(ack.applied);
    }
    let store = h.fleet.store();
    assert_eq!(store.staged_heartbeats().await.unwrap(), 5);

    h.agents.stop_ingest().await;
    assert_eq!(store.staged_heartbeats().await.unwrap(), 0);
    assert_eq!(h.fleet.instance_samples(id, 10).await.unwrap().len(), 5);
    match h.agents.ingest_heartbeat(id, heartbeat(id, 6, 20.0)).await {
        Err(ControlError::Unavailable { .. }) => {}
        other => panic!("expected Unavailable after stop_ingest, got {other:?}"),
    }
    // Stopping twice is harmless.
    h.agents.stop_ingest().await;
}
