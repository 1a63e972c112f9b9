//! One async fn per behaviour; `main.rs` runs each on every backend.

use crate::harness::{raw_pool, Ctx};
use chrono::{DateTime, Utc};
use gpufleet_domain::{FailureReason, InstanceId, InstanceStatus, ProviderInstanceId};
use gpufleet_proto::{EngineSample, EngineStatus, GpuSample, GpuSource, Heartbeat, SystemSample};
use gpufleet_store::{
    Backend, HeartbeatOutcome, InstanceFilter, InstanceRecord, NewInstance, NewTimelineEvent,
    Outcome, RegisterOutcome, Store, StoreError, TimelineKind,
};

/// A fixed instant with whole milliseconds (the store keeps milliseconds).
fn t(offset_ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(1_750_000_000_000 + offset_ms).unwrap()
}

fn new_instance(created_ms: i64) -> NewInstance {
    let id = InstanceId::new();
    NewInstance {
        id,
        provider: "mock".parse().unwrap(),
        zone: "local-1".to_string(),
        instance_type: "L4-1-24G".to_string(),
        model: "Qwen/Qwen2.5-0.5B".parse().unwrap(),
        idempotency_key: format!("idem-{id}"),
        bootstrap_secret_hash: format!("secret-hash-{id}"),
        startup_deadline_at: t(created_ms + 600_000),
        created_at: t(created_ms),
    }
}

async fn insert_one(store: &Store, created_ms: i64) -> InstanceRecord {
    let mut v = store
        .insert_instances(&[new_instance(created_ms)])
        .await
        .unwrap();
    v.pop().unwrap()
}

fn event(id: InstanceId, at_ms: i64, action: &str) -> NewTimelineEvent {
    NewTimelineEvent {
        instance_id: id,
        at: t(at_ms),
        kind: TimelineKind::ProviderCall,
        action: action.to_string(),
        outcome: Outcome::Success,
        from_status: None,
        to_status: None,
        duration_ms: Some(42),
        error_code: None,
        message: format!("{action} done"),
        metadata: serde_json::json!({ "attempt": 1 }),
    }
}

fn heartbeat(id: InstanceId, seq: u64, gpus: usize) -> Heartbeat {
    Heartbeat {
        instance_id: id,
        seq,
        sent_at: t(seq as i64),
        agent_version: "0.1.0".to_string(),
        agent_uptime_secs: 12,
        system: SystemSample {
            cpu_pct: 12.5,
            load1: 0.5,
            load5: 0.25,
            load15: 0.125,
            mem_used_bytes: 3 << 30,
            mem_total_bytes: 64 << 30,
            disk_used_bytes: 10 << 30,
            disk_total_bytes: 200 << 30,
            net_rx_bps: 1234.5,
            net_tx_bps: 678.0,
        },
        gpu_source: GpuSource::Simulated,
        gpus: (0..gpus)
            .map(|i| GpuSample {
                index: i as u32,
                name: "NVIDIA L4".to_string(),
                uuid: if i == 0 {
                    Some(format!("GPU-{i}-{seq}"))
                } else {
                    None
                },
                util_pct: 40.0 + i as f64,
                mem_used_mib: 1000 + i as u64,
                mem_total_mib: 23034,
                temp_c: 55.5,
                power_w: 60.25,
                power_limit_w: 72.0,
            })
            .collect(),
        engine: EngineSample {
            status: EngineStatus::Ready,
            requests_running: 3.0,
            requests_waiting: 1.0,
            restarts: 2,
        },
    }
}

async fn event_count(store: &Store, id: InstanceId) -> usize {
    store.list_events(id, None, 1000).await.unwrap().len()
}

pub async fn migrations_are_idempotent(ctx: Ctx) {
    let a = insert_one(&ctx.store, 0).await;
    // Connecting again runs the migrator again: nothing to do, data kept.
    let again = Store::connect(&ctx.url).await.expect("second connect");
    assert_eq!(again.get_instance(a.id).await.unwrap(), Some(a));
    let third = Store::connect(&ctx.url).await.expect("third connect");
    assert_eq!(third.backend(), ctx.store.backend());
    let expected = if ctx.url.starts_with("sqlite") {
        Backend::Sqlite
    } else {
        Backend::Postgres
    };
    assert_eq!(ctx.store.backend(), expected);
    again.close().await;
    third.close().await;
}

pub async fn cluster_id_is_stable(ctx: Ctx) {
    let first = ctx.store.cluster_id().await.unwrap();
    assert!(!first.is_empty());
    assert_eq!(ctx.store.cluster_id().await.unwrap(), first);
    let other = Store::connect(&ctx.url).await.unwrap();
    assert_eq!(other.cluster_id().await.unwrap(), first);
    other.close().await;
}

pub async fn insert_and_get(ctx: Ctx) {
    let s = &ctx.store;
    let n1 = new_instance(0);
    let n2 = new_instance(1);
    let recs = s.insert_instances(&[n1.clone(), n2.clone()]).await.unwrap();
    assert_eq!(recs.len(), 2);
    let r = &recs[0];
    assert_eq!(r.id, n1.id);
    assert_eq!(r.provider, n1.provider);
    assert_eq!(r.zone, n1.zone);
    assert_eq!(r.instance_type, n1.instance_type);
    assert_eq!(r.model, n1.model);
    assert_eq!(r.idempotency_key, n1.idempotency_key);
    assert_eq!(r.status, InstanceStatus::Provisioning);
    assert_eq!(r.status_reason, None);
    assert_eq!(r.generation, 1);
    assert_eq!(r.provision_attempts, 0);
    assert_eq!(r.milestones, Default::default());
    assert_eq!(r.created_at, n1.created_at);
    assert_eq!(r.updated_at, n1.created_at);
    assert_eq!(r.status_changed_at, n1.created_at);
    assert_eq!(r.startup_deadline_at, n1.startup_deadline_at);
    assert_eq!(r.last_heartbeat_seq, None);
    assert_eq!(r.engine_status, None);
    assert_eq!(s.get_instance(n1.id).await.unwrap().as_ref(), Some(r));
    assert_eq!(
        s.get_instance(n2.id).await.unwrap().as_ref(),
        Some(&recs[1])
    );
    assert_eq!(s.get_instance(InstanceId::new()).await.unwrap(), None);
    // Each insert opens the timeline.
    let events = s.list_events(n1.id, None, 10).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(
        events[0].event.to_status,
        Some(InstanceStatus::Provisioning)
    );
    assert_eq!(events[0].event.kind, TimelineKind::Transition);
    assert!(s.insert_instances(&[]).await.unwrap().is_empty());
}

pub async fn insert_rejects_duplicate_id_atomically(ctx: Ctx) {
    let s = &ctx.store;
    let a = insert_one(s, 0).await;
    let fresh = new_instance(1);
    let mut dup = new_instance(2);
    dup.id = a.id;
    let err = s.insert_instances(&[fresh.clone(), dup]).await.unwrap_err();
    assert!(matches!(err, StoreError::Query(_)), "{err:?}");
    // The whole batch rolled back.
    assert_eq!(s.get_instance(fresh.id).await.unwrap(), None);
    assert_eq!(event_count(s, fresh.id).await, 0);
}

/// Moves `rec` to `status` through a CAS update.
async fn set_status(s: &Store, rec: &InstanceRecord, status: InstanceStatus) -> InstanceRecord {
    let mut next = rec.clone();
    next.status = status;
    s.update_instance(&next, &[]).await.unwrap()
}

pub async fn list_filters_and_orders(ctx: Ctx) {
    let s = &ctx.store;
    // Two share a created_at: ties break by id, descending.
    let a = insert_one(s, 0).await;
    let b = insert_one(s, 1000).await;
    let c = insert_one(s, 1000).await;
    let mut other = new_instance(2000);
    other.provider = "scaleway".parse().unwrap();
    let d = s.insert_instances(&[other]).await.unwrap().pop().unwrap();
    let b = set_status(s, &b, InstanceStatus::Booting).await;

    let all = s.list_instances(&InstanceFilter::default()).await.unwrap();
    let ids: Vec<_> = all.iter().map(|r| r.id).collect();
    let (hi, lo) = if c.id > b.id {
        (c.id, b.id)
    } else {
        (b.id, c.id)
    };
    assert_eq!(ids, vec![d.id, hi, lo, a.id]);

    let booting = s
        .list_instances(&InstanceFilter {
            statuses: vec![InstanceStatus::Booting],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(booting, vec![b.clone()]);

    let two = s
        .list_instances(&InstanceFilter {
            statuses: vec![InstanceStatus::Booting, InstanceStatus::Provisioning],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(two.len(), 4);

    let scaleway = s
        .list_instances(&InstanceFilter {
            provider: Some("scaleway".parse().unwrap()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(scaleway, vec![d.clone()]);

    let mock_provisioning = s
        .list_instances(&InstanceFilter {
            statuses: vec![InstanceStatus::Provisioning],
            provider: Some("mock".parse().unwrap()),
            limit: Some(10),
            ..Default::default()
        })
        .await
        .unwrap();
    let ids: Vec<_> = mock_provisioning.iter().map(|r| r.id).collect();
    assert_eq!(ids, vec![c.id, a.id]);

    let limited = s
        .list_instances(&InstanceFilter {
            limit: Some(2),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        limited.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![d.id, hi]
    );
    let none = s
        .list_instances(&InstanceFilter {
            limit: Some(-5),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(none.is_empty());
}

pub async fn list_archived_handling(ctx: Ctx) {
    let s = &ctx.store;
    let a = insert_one(s, 0).await;
    let b = insert_one(s, 1).await;
    let a = set_status(s, &a, InstanceStatus::Terminated).await;
    let a = set_status(s, &a, InstanceStatus::Archived).await;

    let default = s.list_instances(&InstanceFilter::default()).await.unwrap();
    assert_eq!(default, vec![b.clone()]);
    let with = s
        .list_instances(&InstanceFilter {
            include_archived: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(with, vec![b.clone(), a.clone()]);
    let only = s
        .list_instances(&InstanceFilter {
            statuses: vec![InstanceStatus::Archived],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(only, vec![a.clone()]);
    // Statuses that leave out archived win over include_archived.
    let provisioning = s
        .list_instances(&InstanceFilter {
            statuses: vec![InstanceStatus::Provisioning],
            include_archived: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(provisioning, vec![b]);
}

pub async fn update_cas_succeeds_and_bumps_generation(ctx: Ctx) {
    let s = &ctx.store;
    let rec = insert_one(s, 0).await;
    let mut next = rec.clone();
    next.status = InstanceStatus::Failed;
    next.status_reason = Some(FailureReason::StartupTimeout);
    next.status_message = Some("no agent after 10 minutes".to_string());
    next.milestones.provider_created = true;
    next.milestones.ip_assigned = true;
    next.provider_instance_id = Some(ProviderInstanceId::new("mock-abc"));
    next.ip = Some("10.0.0.7".parse().unwrap());
    next.provision_attempts = 3;
    next.next_attempt_at = Some(t(5_000));
    next.startup_deadline_at = t(700_000);
    next.updated_at = t(9_000);
    next.status_changed_at = t(9_000);
    next.ready_at = Some(t(8_000));
    next.terminate_requested_at = Some(t(8_500));
    next.terminated_at = Some(t(8_600));
    next.cleanup_started_at = Some(t(8_700));
    next.cleaned_up_at = Some(t(8_800));
    // Ignored by update_instance: heartbeat columns and creation-time columns.
    next.last_heartbeat_seq = Some(99);
    next.last_heartbeat_at = Some(t(1));
    next.engine_status = Some(EngineStatus::Ready);
    next.zone = "elsewhere".to_string();

    let mut ev = event(rec.id, 9_000, "status.change");
    ev.kind = TimelineKind::Transition;
    ev.outcome = Outcome::Failed;
    ev.from_status = Some(InstanceStatus::Provisioning);
    ev.to_status = Some(InstanceStatus::Failed);
    ev.error_code = Some("startup_timeout".to_string());
    let stored = s.update_instance(&next, &[ev.clone()]).await.unwrap();

    let mut expected = next.clone();
    expected.generation = rec.generation + 1;
    expected.last_heartbeat_seq = None;
    expected.last_heartbeat_at = None;
    expected.engine_status = None;
    expected.zone = rec.zone.clone();
    assert_eq!(stored, expected);
    assert_eq!(
        s.get_instance(rec.id).await.unwrap(),
        Some(expected.clone())
    );

    let events = s.list_events(rec.id, None, 10).await.unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[1].event, ev);

    // The returned record is the next CAS token.
    let mut again = stored.clone();
    again.status = InstanceStatus::Archived;
    let stored2 = s.update_instance(&again, &[]).await.unwrap();
    assert_eq!(stored2.generation, rec.generation + 2);
    assert_eq!(stored2.status, InstanceStatus::Archived);
    assert_eq!(stored2.ip, Some("10.0.0.7".parse().unwrap()));
}

pub async fn update_stale_generation_conflicts_and_writes_nothing(ctx: Ctx) {
    let s = &ctx.store;
    let rec = insert_one(s, 0).await;
    let winner = set_status(s, &rec, InstanceStatus::Booting).await;
    let events_before = event_count(s, rec.id).await;

    let mut stale = rec.clone(); // still generation 1
    stale.status = InstanceStatus::Failed;
    stale.status_message = Some("should not land".to_string());
    let err = s
        .update_instance(&stale, &[event(rec.id, 5, "should.not.land")])
        .await
        .unwrap_err();
    match err {
        StoreError::Conflict { id, expected } => {
            assert_eq!(id, rec.id);
            assert_eq!(expected, rec.generation);
        }
        other => panic!("expected Conflict, got {other:?}"),
    }
    assert_eq!(s.get_instance(rec.id).await.unwrap(), Some(winner.clone()));
    assert_eq!(event_count(s, rec.id).await, events_before);

    // A generation from the future conflicts too.
    let mut future = winner.clone();
    future.generation += 5;
    assert!(matches!(
        s.update_instance(&future, &[]).await,
        Err(StoreError::Conflict { .. })
    ));
}

pub async fn update_missing_instance_is_not_found(ctx: Ctx) {
    let s = &ctx.store;
    let rec = insert_one(s, 0).await;
    let mut ghost = rec.clone();
    ghost.id = InstanceId::new();
    let err = s.update_instance(&ghost, &[]).await.unwrap_err();
    assert!(
        matches!(err, StoreError::NotFound { id } if id == ghost.id),
        "{err:?}"
    );
}

pub async fn concurrent_updates_one_wins(ctx: Ctx) {
    let s = ctx.store.clone();
    let rec = insert_one(&s, 0).await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let s = s.clone();
        let mut next = rec.clone();
        next.status_message = Some(format!("writer {i}"));
        tasks.push(tokio::spawn(async move {
            s.update_instance(&next, &[event(next.id, i, "race")]).await
        }));
    }
    let mut wins = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(r) => {
                wins += 1;
                assert_eq!(r.generation, rec.generation + 1);
            }
            Err(StoreError::Conflict { .. }) => {}
            Err(other) => panic!("unexpected error {other:?}"),
        }
    }
    assert_eq!(wins, 1);
    assert_eq!(event_count(&s, rec.id).await, 2); // created + the winner's
}

pub async fn timeline_append_list_and_paging(ctx: Ctx) {
    let s = &ctx.store;
    let a = insert_one(s, 0).await;
    let b = insert_one(s, 0).await;
    let mut batch = Vec::new();
    for i in 0..5 {
        let mut e = event(a.id, 10 + i, &format!("step.{i}"));
        if i == 2 {
            e.kind = TimelineKind::Probe;
            e.outcome = Outcome::Waiting;
            e.duration_ms = None;
            e.error_code = Some("no_ip".to_string());
            e.metadata = serde_json::json!({ "nested": { "ips": ["10.0.0.1"] }, "n": null });
        }
        batch.push(e);
    }
    s.append_events(&batch).await.unwrap();
    s.append_events(&[event(b.id, 10, "other.instance")])
        .await
        .unwrap();
    s.append_events(&[]).await.unwrap();

    let all = s.list_events(a.id, None, 100).await.unwrap();
    assert_eq!(all.len(), 6);
    assert!(
        all.windows(2).all(|w| w[0].id < w[1].id),
        "oldest first, ids increasing"
    );
    assert_eq!(all[0].event.action, "instance.created");
    for (stored, sent) in all[1..].iter().zip(&batch) {
        assert_eq!(&stored.event, sent);
    }

    let page1 = s.list_events(a.id, None, 2).await.unwrap();
    let page2 = s.list_events(a.id, Some(page1[1].id), 2).await.unwrap();
    let page3 = s.list_events(a.id, Some(page2[1].id), 2).await.unwrap();
    let page4 = s.list_events(a.id, Some(page3[1].id), 2).await.unwrap();
    let paged: Vec<_> = [page1, page2, page3].concat();
    assert_eq!(paged, all);
    assert!(page4.is_empty());
    assert!(s.list_events(a.id, None, 0).await.unwrap().is_empty());

    let other = s.list_events(b.id, None, 100).await.unwrap();
    assert_eq!(other.len(), 2);
    assert!(other.iter().all(|e| e.event.instance_id == b.id));

    // Events for an unknown instance are refused (foreign key), atomically.
    let ghost = InstanceId::new();
    let err = s
        .append_events(&[event(a.id, 99, "kept.out"), event(ghost, 99, "ghost")])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Query(_)), "{err:?}");
    assert_eq!(event_count(s, a.id).await, 6);
}

pub async fn register_agent_once(ctx: Ctx) {
    let s = &ctx.store;
    let n = new_instance(0);
    s.insert_instances(std::slice::from_ref(&n)).await.unwrap();
    let gen_before = s.get_instance(n.id).await.unwrap().unwrap().generation;
    assert_eq!(
        s.register_agent(n.id, &n.bootstrap_secret_hash, "token-1", t(10))
            .await
            .unwrap(),
        RegisterOutcome::Registered
    );
    assert_eq!(s.instance_for_token("token-1").await.unwrap(), Some(n.id));
    // Second use of the same secret is refused and stores nothing.
    assert_eq!(
        s.register_agent(n.id, &n.bootstrap_secret_hash, "token-2", t(20))
            .await
            .unwrap(),
        RegisterOutcome::Rejected
    );
    assert_eq!(s.instance_for_token("token-2").await.unwrap(), None);
    assert_eq!(s.instance_for_token("token-1").await.unwrap(), Some(n.id));
    // Registration is not a lifecycle write.
    assert_eq!(
        s.get_instance(n.id).await.unwrap().unwrap().generation,
        gen_before
    );
}

pub async fn register_agent_wrong_secret_rejected(ctx: Ctx) {
    let s = &ctx.store;
    let n = new_instance(0);
    let other = new_instance(1);
    s.insert_instances(&[n.clone(), other.clone()])
        .await
        .unwrap();
    for bad in ["nope", "", &other.bootstrap_secret_hash] {
        assert_eq!(
            s.register_agent(n.id, bad, "token-bad", t(10))
                .await
                .unwrap(),
            RegisterOutcome::Rejected,
            "{bad:?}"
        );
    }
    assert_eq!(
        s.register_agent(
            InstanceId::new(),
            &n.bootstrap_secret_hash,
            "token-ghost",
            t(10)
        )
        .await
        .unwrap(),
        RegisterOutcome::Rejected
    );
    assert_eq!(s.instance_for_token("token-bad").await.unwrap(), None);
    assert_eq!(s.instance_for_token("token-ghost").await.unwrap(), None);
    // The right secret still works after failed attempts.
    assert_eq!(
        s.register_agent(n.id, &n.bootstrap_secret_hash, "token-good", t(10))
            .await
            .unwrap(),
        RegisterOutcome::Registered
    );
}

pub async fn register_agent_concurrently_one_wins(ctx: Ctx) {
    let s = ctx.store.clone();
    let n = new_instance(0);
    s.insert_instances(std::slice::from_ref(&n)).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..6 {
        let s = s.clone();
        let secret = n.bootstrap_secret_hash.clone();
        tasks.push(tokio::spawn(async move {
            s.register_agent(n.id, &secret, &format!("race-token-{i}"), t(i))
                .await
        }));
    }
    let mut registered = 0;
    for task in tasks {
        if task.await.unwrap().unwrap() == RegisterOutcome::Registered {
            registered += 1;
        }
    }
    assert_eq!(registered, 1);
}

pub async fn tokens_lookup_and_revoke(ctx: Ctx) {
    let s = &ctx.store;
    let a = new_instance(0);
    let b = new_instance(1);
    s.insert_instances(&[a.clone(), b.clone()]).await.unwrap();
    s.register_agent(a.id, &a.bootstrap_secret_hash, "tok-a", t(5))
        .await
        .unwrap();
    s.register_agent(b.id, &b.bootstrap_secret_hash, "tok-b", t(5))
        .await
        .unwrap();
    assert_eq!(s.instance_for_token("tok-a").await.unwrap(), Some(a.id));
    assert_eq!(s.instance_for_token("tok-b").await.unwrap(), Some(b.id));
    assert_eq!(s.instance_for_token("unknown").await.unwrap(), None);

    s.revoke_tokens(a.id, t(100)).await.unwrap();
    assert_eq!(s.instance_for_token("tok-a").await.unwrap(), None);
    assert_eq!(s.instance_for_token("tok-b").await.unwrap(), Some(b.id));
    // Idempotent.
    s.revoke_tokens(a.id, t(200)).await.unwrap();
    s.revoke_tokens(InstanceId::new(), t(200)).await.unwrap();
    assert_eq!(s.instance_for_token("tok-a").await.unwrap(), None);
}

pub async fn heartbeat_applied_then_stale_ignored(ctx: Ctx) {
    let s = &ctx.store;
    let rec = insert_one(s, 0).await;
    let hb = heartbeat(rec.id, 1_000, 1);
    assert_eq!(
        s.record_heartbeat(&hb, t(1_005)).await.unwrap(),
        HeartbeatOutcome::Applied
    );
    let after = s.get_instance(rec.id).await.unwrap().unwrap();
    assert_eq!(after.last_heartbeat_seq, Some(1_000));
    assert_eq!(after.last_heartbeat_at, Some(t(1_005)));
    assert_eq!(after.engine_status, Some(EngineStatus::Ready));
    assert_eq!(s.recent_samples(rec.id, 10).await.unwrap().len(), 1);

    // Equal and lower seqs are stale: no column change, no sample.
    for seq in [1_000, 999, 0] {
        let mut old = heartbeat(rec.id, seq, 1);
        old.engine.status = EngineStatus::Crashed;
        assert_eq!(
            s.record_heartbeat(&old, t(2_000)).await.unwrap(),
            HeartbeatOutcome::Stale,
            "seq {seq}"
        );
    }
    assert_eq!(s.get_instance(rec.id).await.unwrap().unwrap(), after);
    assert_eq!(s.recent_samples(rec.id, 10).await.unwrap().len(), 1);

    let mut newer = heartbeat(rec.id, 1_001, 0);
    newer.engine.status = EngineStatus::Starting;
    assert_eq!(
        s.record_heartbeat(&newer, t(3_000)).await.unwrap(),
        HeartbeatOutcome::Applied
    );
    let latest = s.get_instance(rec.id).await.unwrap().unwrap();
    assert_eq!(latest.last_heartbeat_seq, Some(1_001));
    assert_eq!(latest.last_heartbeat_at, Some(t(3_000)));
    assert_eq!(latest.engine_status, Some(EngineStatus::Starting));
    assert_eq!(s.recent_samples(rec.id, 10).await.unwrap().len(), 2);
}

pub async fn heartbeat_does_not_bump_generation_and_update_keeps_heartbeat_columns(ctx: Ctx) {
    let s = &ctx.store;
    let rec = insert_one(s, 0).await;
    s.record_heartbeat(&heartbeat(rec.id, 7, 0), t(50))
        .await
        .unwrap();
    let after_hb = s.get_instance(rec.id).await.unwrap().unwrap();
    assert_eq!(after_hb.generation, rec.generation);
    // The record read before the heartbeat is still a valid CAS token, and
    // its (empty) heartbeat columns do not erase the stored ones.
    let updated = set_status(s, &rec, InstanceStatus::Booting).await;
    assert_eq!(updated.last_heartbeat_seq, Some(7));
    assert_eq!(updated.last_heartbeat_at, Some(t(50)));
    assert_eq!(updated.engine_status, Some(EngineStatus::Ready));
}

pub async fn heartbeat_for_unknown_instance_is_not_found(ctx: Ctx) {
    let ghost = InstanceId::new();
    let err = ctx
        .store
        .record_heartbeat(&heartbeat(ghost, 1, 1), t(0))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::NotFound { id } if id == ghost),
        "{err:?}"
    );
    // A seq beyond BIGINT cannot be stored.
    let rec = insert_one(&ctx.store, 0).await;
    let err = ctx
        .store
        .record_heartbeat(&heartbeat(rec.id, u64::MAX, 0), t(0))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Query(sqlx::Error::Encode(_))),
        "{err:?}"
    );
    assert_eq!(
        ctx.store
            .get_instance(rec.id)
            .await
            .unwrap()
            .unwrap()
            .last_heartbeat_seq,
        None
    );
}

pub async fn samples_with_gpus_round_trip(ctx: Ctx) {
    let s = &ctx.store;
    let a = insert_one(s, 0).await;
    let b = insert_one(s, 1).await;
    let sent: Vec<Heartbeat> = vec![
        heartbeat(a.id, 100, 2),
        heartbeat(a.id, 200, 0),
        heartbeat(a.id, 300, 4),
    ];
    for (i, hb) in sent.iter().enumerate() {
        s.record_heartbeat(hb, t(1_000 * i as i64)).await.unwrap();
    }
    s.record_heartbeat(&heartbeat(b.id, 150, 3), t(5))
        .await
        .unwrap();

    let got = s.recent_samples(a.id, 10).await.unwrap();
    assert_eq!(
        got.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![300, 200, 100]
    );
    for (rec, (i, hb)) in got.iter().rev().zip(sent.iter().enumerate()) {
        assert_eq!(rec.instance_id, a.id);
        assert_eq!(rec.seq, hb.seq as i64);
        assert_eq!(rec.at, t(1_000 * i as i64));
        assert_eq!(rec.system, hb.system);
        assert_eq!(rec.gpu_source, hb.gpu_source);
        assert_eq!(rec.gpus, hb.gpus);
        assert_eq!(rec.engine, hb.engine);
    }
    let newest_two = s.recent_samples(a.id, 2).await.unwrap();
    assert_eq!(newest_two, got[..2].to_vec());
    assert!(s.recent_samples(a.id, 0).await.unwrap().is_empty());
    let bs = s.recent_samples(b.id, 10).await.unwrap();
    assert_eq!(bs.len(), 1);
    assert_eq!(bs[0].gpus.len(), 3);
    assert!(s
        .recent_samples(InstanceId::new(), 10)
        .await
        .unwrap()
        .is_empty());
}

pub async fn count_by_status_counts_everything(ctx: Ctx) {
    let s = &ctx.store;
    let empty = s.count_by_status().await.unwrap();
    assert_eq!(empty.len(), InstanceStatus::ALL.len());
    assert!(empty.iter().all(|(_, n)| *n == 0));

    let a = insert_one(s, 0).await;
    let b = insert_one(s, 1).await;
    insert_one(s, 2).await;
    set_status(s, &a, InstanceStatus::Ready).await;
    let b = set_status(s, &b, InstanceStatus::Terminated).await;
    set_status(s, &b, InstanceStatus::Archived).await;

    let counts = s.count_by_status().await.unwrap();
    assert_eq!(
        counts.iter().map(|(st, _)| *st).collect::<Vec<_>>(),
        InstanceStatus::ALL.to_vec()
    );
    let get = |st| counts.iter().find(|(s, _)| *s == st).unwrap().1;
    assert_eq!(get(InstanceStatus::Provisioning), 1);
    assert_eq!(get(InstanceStatus::Ready), 1);
    assert_eq!(get(InstanceStatus::Archived), 1);
    assert_eq!(get(InstanceStatus::Terminated), 0);
    assert_eq!(counts.iter().map(|(_, n)| n).sum::<i64>(), 3);
}

pub async fn corrupt_status_is_an_error(ctx: Ctx) {
    let s = &ctx.store;
    let good = insert_one(s, 0).await;
    let bad = insert_one(s, 1).await;
    let raw = raw_pool(&ctx.url).await;
    sqlx::query("UPDATE instances SET status = 'exploded' WHERE id = $1")
        .bind(bad.id.to_string())
        .execute(&raw)
        .await
        .unwrap();
    raw.close().await;

    let err = s.get_instance(bad.id).await.unwrap_err();
    match &err {
        StoreError::Corrupt { what } => {
            assert!(what.contains("exploded"), "{what}");
            assert!(what.contains(&bad.id.to_string()), "{what}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(matches!(
        s.list_instances(&InstanceFilter {
            include_archived: true,
            ..Default::default()
        })
        .await,
        Err(StoreError::Corrupt { .. })
    ));
    assert!(matches!(
        s.count_by_status().await,
        Err(StoreError::Corrupt { .. })
    ));
    // Other rows stay readable.
    assert_eq!(s.get_instance(good.id).await.unwrap(), Some(good));
}

pub async fn corrupt_event_is_an_error(ctx: Ctx) {
    let s = &ctx.store;
    let rec = insert_one(s, 0).await;
    let raw = raw_pool(&ctx.url).await;
    sqlx::query("UPDATE instance_events SET metadata = '{not json' WHERE instance_id = $1")
        .bind(rec.id.to_string())
        .execute(&raw)
        .await
        .unwrap();
    assert!(matches!(
        s.list_events(rec.id, None, 10).await,
        Err(StoreError::Corrupt { .. })
    ));
    sqlx::query(
        "UPDATE instance_events SET metadata = '{}', kind = 'mystery' WHERE instance_id = $1",
    )
    .bind(rec.id.to_string())
    .execute(&raw)
    .await
    .unwrap();
    assert!(matches!(
        s.list_events(rec.id, None, 10).await,
        Err(StoreError::Corrupt { .. })
    ));
    sqlx::query("UPDATE instances SET milestone_ip_assigned = 7, status = 'ready' WHERE id = $1")
        .bind(rec.id.to_string())
        .execute(&raw)
        .await
        .unwrap();
    raw.close().await;
    assert!(matches!(
        s.get_instance(rec.id).await,
        Err(StoreError::Corrupt { .. })
    ));
}
