//! One async fn per behaviour; `main.rs` runs each on every backend.

use crate::harness::{raw_pool, Ctx};
use chrono::{DateTime, Utc};
use gpufleet_domain::{FailureReason, InstanceId, InstanceStatus, ProviderInstanceId};
use gpufleet_proto::{EngineSample, EngineStatus, GpuSample, GpuSource, Heartbeat, SystemSample};
use gpufleet_store::{
    Backend, HeartbeatOutcome, IdempotencyClaim, InsertOnce, InstanceFilter, InstanceRecord,
    KeyUse, NewInstance, NewTimelineEvent, Outcome, RegisterOutcome, Store, StoreError,
    TimelineKind, IDEMPOTENCY_KEY_TTL,
};

/// A fixed instant with whole milliseconds (the store keeps milliseconds).
fn t(offset_ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(1_750_000_000_000 + offset_ms).unwrap()
}

pub(crate) fn new_instance(created_ms: i64) -> NewInstance {
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
        deployment_id: None,
        engine_args: None,
        project_id: gpufleet_domain::ProjectId::default_project(),
        price_per_hour: None,
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
                util_pct: Some(40.0 + i as f64),
                mem_used_mib: 1000 + i as u64,
                mem_total_mib: 23034,
                temp_c: Some(55.5),
                power_w: Some(60.25),
                power_limit_w: Some(72.0),
                ..GpuSample::default()
            })
            .collect(),
        engine: EngineSample {
            status: EngineStatus::Ready,
            requests_running: 3.0,
            requests_waiting: 1.0,
            restarts: 2,
            kv_cache_usage: None,
            prompt_tokens_per_s: None,
            generation_tokens_per_s: None,
            ttft_mean_s: None,
            canary: None,
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

pub async fn an_instance_moves_to_another_project(ctx: Ctx) {
    let s = &ctx.store;
    let rec = insert_one(s, 0).await;
    let research: gpufleet_domain::ProjectId = "research".parse().unwrap();
    s.insert_project(&research, chrono::Utc::now())
        .await
        .unwrap();
    assert!(s.set_instance_project(rec.id, &research).await.unwrap());
    let moved = s.get_instance(rec.id).await.unwrap().unwrap();
    assert_eq!(moved.project_id, research);
    assert_eq!(moved.generation, rec.generation, "not a lifecycle write");
    assert!(!s
        .set_instance_project(InstanceId::new(), &research)
        .await
        .unwrap());
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
    // Until the first heartbeat the secret works again (the answer may have
    // been lost): a new token, and the earlier one stops working.
    assert_eq!(
        s.register_agent(n.id, &n.bootstrap_secret_hash, "token-2", t(20))
            .await
            .unwrap(),
        RegisterOutcome::Registered
    );
    assert_eq!(s.instance_for_token("token-1").await.unwrap(), None);
    assert_eq!(s.instance_for_token("token-2").await.unwrap(), Some(n.id));
    // Once the agent has sent a heartbeat, the secret is refused and
    // nothing is stored.
    s.record_heartbeat(&heartbeat(n.id, 1, 1), t(25))
        .await
        .unwrap();
    assert_eq!(
        s.register_agent(n.id, &n.bootstrap_secret_hash, "token-3", t(30))
            .await
            .unwrap(),
        RegisterOutcome::Rejected
    );
    assert_eq!(s.instance_for_token("token-3").await.unwrap(), None);
    assert_eq!(s.instance_for_token("token-2").await.unwrap(), Some(n.id));
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

pub async fn register_agent_concurrently_one_token_works(ctx: Ctx) {
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
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), RegisterOutcome::Registered);
    }
    // They took turns: exactly one token works, the last one handed out.
    let mut valid = 0;
    for i in 0..6 {
        if s.instance_for_token(&format!("race-token-{i}"))
            .await
            .unwrap()
            == Some(n.id)
        {
            valid += 1;
        }
    }
    assert_eq!(valid, 1);
    assert_eq!(s.agent_token_digests(n.id).await.unwrap().len(), 1);
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

/// sqlx 0.8's Any driver sends a NULL `f64` to PostgreSQL as a `float4`:
/// a statement first run with NULL then refused a value on the same
/// connection ("incorrect binary data format"). Prices and GPU figures go
/// from unknown to known several times.
pub async fn optional_floats_go_from_null_to_a_value(ctx: Ctx) {
    let s = &ctx.store;
    let steps = [None, None, None, Some(2.5), Some(2.5), Some(2.5)];
    for price in steps {
        let mut n = new_instance(0);
        n.price_per_hour = price;
        let rec = s.insert_instances(&[n]).await.unwrap().remove(0);
        assert_eq!(rec.price_per_hour, price);
    }
    let a = insert_one(s, 0).await;
    for (i, v) in steps.into_iter().enumerate() {
        let mut hb = heartbeat(a.id, i as u64 + 1, 1);
        let g = &mut hb.gpus[0];
        (g.util_pct, g.temp_c, g.power_w, g.power_limit_w) = (v, v, v, v);
        s.record_heartbeat(&hb, t(1_000 * i as i64)).await.unwrap();
    }
    let got = s.recent_samples(a.id, 10).await.unwrap();
    let temps: Vec<_> = got.iter().rev().map(|r| r.gpus[0].temp_c).collect();
    assert_eq!(temps, steps.to_vec());
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

// ---------------------------------------------------------------------------
// Metric history: batched ingestion, series, rollups, retention, fleet views.

use gpufleet_domain::metrics::{parse_step, RetentionConfig, Step, Tier};

/// An hour boundary (`t(0)` is not one), so minute and hour buckets line up.
const HOUR0: i64 = 1_750_000_000_000 - 1_750_000_000_000 % 3_600_000;

fn at(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(HOUR0 + ms).unwrap()
}

/// A heartbeat whose figures are derived from `v`: cpu = v, load1 = v / 10,
/// GPU g's utilisation = 2v + g, temperature = 40 + v, power = 100 + v;
/// engine KV cache = v / 100 on even v only, ttft = v / 10.
fn figure_hb(id: InstanceId, seq: u64, v: f64, gpus: usize) -> Heartbeat {
    let mut hb = heartbeat(id, seq, gpus);
    hb.system.cpu_pct = v;
    hb.system.load1 = v / 10.0;
    hb.system.mem_used_bytes = 1_000 * v as u64;
    for g in &mut hb.gpus {
        g.util_pct = Some(2.0 * v + f64::from(g.index));
        g.temp_c = Some(40.0 + v);
        g.power_w = Some(100.0 + v);
        g.mem_used_mib = 100 + v as u64;
    }
    hb.engine.kv_cache_usage = ((v as i64) % 2 == 0).then_some(v / 100.0);
    hb.engine.ttft_mean_s = Some(v / 10.0);
    hb.engine.generation_tokens_per_s = Some(v * 3.0);
    hb
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

/// A figure that may be unknown (`None`), for [`assert_close!`].
trait Figure: Copy + std::fmt::Debug {
    fn known(self) -> Option<f64>;
}
impl Figure for f64 {
    fn known(self) -> Option<f64> {
        Some(self)
    }
}
impl Figure for Option<f64> {
    fn known(self) -> Option<f64> {
        self
    }
}

/// Both known and close, or both unknown.
macro_rules! assert_close {
    ($a:expr, $b:expr $(, $($msg:tt)*)?) => {{
        let (a, b) = (Figure::known($a), Figure::known($b));
        let ok = match (a, b) {
            (Some(a), Some(b)) => close(a, b),
            (None, None) => true,
            _ => false,
        };
        assert!(ok, "{} = {a:?}, expected {b:?} {}", stringify!($a), format!("" $(, $($msg)*)?));
    }};
}

fn assert_points_close(a: &gpufleet_store::SystemPoint, b: &gpufleet_store::SystemPoint) {
    assert_eq!(a.bucket, b.bucket);
    assert_eq!(a.samples, b.samples);
    assert_close!(a.cpu_pct_avg, b.cpu_pct_avg);
    assert_close!(a.cpu_pct_max, b.cpu_pct_max);
    assert_close!(a.load1_avg, b.load1_avg);
    assert_close!(a.mem_used_bytes_avg, b.mem_used_bytes_avg);
    assert_close!(a.mem_total_bytes, b.mem_total_bytes);
    assert_close!(a.kv_cache_usage_avg.unwrap(), b.kv_cache_usage_avg.unwrap());
    assert_eq!(a.kv_cache_usage_max, b.kv_cache_usage_max);
    assert_close!(a.ttft_mean_s_avg.unwrap(), b.ttft_mean_s_avg.unwrap());
    assert_eq!(a.ttft_mean_s_max, b.ttft_mean_s_max);
    assert_close!(
        a.generation_tokens_per_s_avg.unwrap(),
        b.generation_tokens_per_s_avg.unwrap()
    );
    assert_eq!(a.prompt_tokens_per_s_avg, b.prompt_tokens_per_s_avg);
}

fn assert_gpu_points_close(a: &gpufleet_store::GpuPoint, b: &gpufleet_store::GpuPoint) {
    assert_eq!(a.bucket, b.bucket);
    assert_eq!(a.samples, b.samples);
    assert_close!(a.util_pct_avg, b.util_pct_avg);
    assert_close!(a.util_pct_max, b.util_pct_max);
    assert_close!(a.mem_used_mib_avg, b.mem_used_mib_avg);
    assert_close!(a.mem_used_mib_max, b.mem_used_mib_max);
    assert_close!(a.mem_total_mib, b.mem_total_mib);
    assert_close!(a.temp_c_avg, b.temp_c_avg);
    assert_close!(a.temp_c_max, b.temp_c_max);
    assert_close!(a.power_w_avg, b.power_w_avg);
    assert_close!(a.power_w_max, b.power_w_max);
    assert_close!(a.power_limit_w, b.power_limit_w);
}

/// Heartbeats of `id` every `every_ms` over `[start_ms, end_ms)` (relative to
/// HOUR0), figure value = index, in batches of 50.
async fn load(s: &Store, id: InstanceId, start_ms: i64, end_ms: i64, every_ms: i64, gpus: usize) {
    let batch: Vec<(Heartbeat, DateTime<Utc>)> = (0..)
        .map(|i| start_ms + i * every_ms)
        .take_while(|ms| *ms < end_ms)
        .enumerate()
        .map(|(i, ms)| (figure_hb(id, (HOUR0 + ms) as u64, i as f64, gpus), at(ms)))
        .collect();
    let chunks = batch.chunks(50).count();
    for (i, chunk) in batch.chunks(50).enumerate() {
        let out = s.record_heartbeats(chunk).await.unwrap();
        assert!(out.iter().all(|o| *o == HeartbeatOutcome::Applied));
        // Readers see staged and compacted rows alike: a longer load leaves
        // its last chunk staged, so the cases read both tables.
        if i + 1 < chunks || chunks == 1 {
            assert!(s.compact_staging().await.unwrap() >= chunk.len() as u64);
        }
    }
}

async fn rollup_all(s: &Store, tier: Tier, up_to: DateTime<Utc>) -> u64 {
    let mut rows = 0;
    for _ in 0..1000 {
        let r = s.rollup(tier, up_to).await.unwrap();
        rows += r.rows;
        if r.caught_up {
            return rows;
        }
    }
    panic!("rollup never caught up");
}

pub async fn batch_ingestion_orders_and_guards(ctx: Ctx) {
    let s = &ctx.store;
    assert!(s.record_heartbeats(&[]).await.unwrap().is_empty());
    let a = insert_one(s, 0).await;
    let b = insert_one(s, 1).await;
    s.record_heartbeat(&heartbeat(a.id, 100, 1), t(100))
        .await
        .unwrap();
    let ghost = InstanceId::new();
    let mut nan = heartbeat(a.id, 500, 1);
    nan.system.cpu_pct = f64::NAN;
    let mut huge = heartbeat(a.id, 501, 1);
    huge.gpus[0].mem_used_mib = u64::MAX;
    let mut dup_gpu = heartbeat(b.id, 502, 2);
    dup_gpu.gpus[1].index = 0;
    let mut b5 = heartbeat(b.id, 5, 2);
    b5.engine.kv_cache_usage = Some(0.25);
    b5.engine.prompt_tokens_per_s = Some(120.5);
    b5.engine.generation_tokens_per_s = Some(33.0);
    b5.engine.ttft_mean_s = Some(0.042);
    let mut a102 = heartbeat(a.id, 102, 1);
    a102.engine.status = EngineStatus::Crashed;
    let batch = vec![
        (heartbeat(a.id, 90, 1), t(200)),       // stale: 100 is stored
        (b5.clone(), t(201)),                   // applied
        (a102, t(203)),                         // applied, after 101
        (heartbeat(a.id, 101, 1), t(202)),      // applied first (lower seq)
        (heartbeat(ghost, 1, 1), t(204)),       // unknown
        (heartbeat(b.id, 5, 1), t(205)),        // stale: same seq in the batch
        (nan, t(206)),                          // invalid
        (huge, t(207)),                         // invalid
        (dup_gpu, t(208)),                      // invalid
        (heartbeat(a.id, u64::MAX, 0), t(209)), // invalid: beyond BIGINT
    ];
    let out = s.record_heartbeats(&batch).await.unwrap();
    use HeartbeatOutcome::*;
    assert_eq!(
        out,
        vec![
            Stale,
            Applied,
            Applied,
            Applied,
            UnknownInstance,
            Stale,
            Invalid,
            Invalid,
            Invalid,
            Invalid
        ]
    );
    let a_now = s.get_instance(a.id).await.unwrap().unwrap();
    assert_eq!(a_now.last_heartbeat_seq, Some(102));
    assert_eq!(a_now.last_heartbeat_at, Some(t(203)));
    assert_eq!(a_now.engine_status, Some(EngineStatus::Crashed));
    assert_eq!(a_now.generation, a.generation);
    let a_samples = s.recent_samples(a.id, 10).await.unwrap();
    assert_eq!(
        a_samples.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![102, 101, 100]
    );
    assert_eq!(a_samples[1].at, t(202));
    let b_samples = s.recent_samples(b.id, 10).await.unwrap();
    assert_eq!(b_samples.len(), 1);
    assert_eq!(b_samples[0].gpus, b5.gpus);
    assert_eq!(b_samples[0].engine, b5.engine);
    assert_eq!(b_samples[0].system, b5.system);
    assert_eq!(b_samples[0].at, t(201));

    // A second batch: the guard holds against what the first stored.
    let out = s
        .record_heartbeats(&[
            (heartbeat(a.id, 102, 1), t(300)),
            (heartbeat(b.id, 6, 0), t(301)),
        ])
        .await
        .unwrap();
    assert_eq!(out, vec![Stale, Applied]);
    // The single-heartbeat path stores the engine gauges too.
    let mut a200 = heartbeat(a.id, 200, 0);
    a200.engine.kv_cache_usage = Some(0.5);
    s.record_heartbeat(&a200, t(400)).await.unwrap();
    assert_eq!(
        s.recent_samples(a.id, 1).await.unwrap()[0]
            .engine
            .kv_cache_usage,
        Some(0.5)
    );
    // A batch larger than one statement's chunk.
    let big: Vec<_> = (0..700u64)
        .map(|i| (heartbeat(b.id, 1_000 + i, 2), t(1_000 + i as i64)))
        .collect();
    let out = s.record_heartbeats(&big).await.unwrap();
    assert!(out.iter().all(|o| *o == Applied));
    assert_eq!(s.recent_samples(b.id, 1000).await.unwrap().len(), 702);
    assert!(s.compact_staging().await.unwrap() >= 700);
    let raw = raw_pool(&ctx.url).await;
    let gpu_rows: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM gpu_samples WHERE instance_id = $1")
            .bind(b.id.to_string())
            .fetch_one(&raw)
            .await
            .unwrap();
    assert_eq!(gpu_rows, 2 + 1_400);
}

pub async fn series_from_raw_is_aligned(ctx: Ctx) {
    let s = &ctx.store;
    let a = insert_one(s, 0).await;
    let other = insert_one(s, 1).await;
    // 18 heartbeats 10 s apart from HOUR0: values 0..17, 6 per minute.
    load(s, a.id, 0, 180_000, 10_000, 2).await;
    load(s, other.id, 0, 60_000, 1_000, 1).await;
    let m = s
        .metric_series(a.id, at(0), at(180_000), Step::MINUTE, Tier::Raw)
        .await
        .unwrap();
    assert_eq!(m.step, Step::MINUTE);
    assert_eq!(m.points.len(), 3);
    for (k, p) in m.points.iter().enumerate() {
        let k = k as f64;
        assert_eq!(p.bucket, at(60_000 * k as i64));
        assert_eq!(p.samples, 6);
        assert_close!(p.cpu_pct_avg, 6.0 * k + 2.5);
        assert_close!(p.cpu_pct_max, 6.0 * k + 5.0);
        assert_close!(p.load1_avg, (6.0 * k + 2.5) / 10.0);
        assert_close!(p.mem_used_bytes_avg, 1_000.0 * (6.0 * k + 2.5));
        assert_close!(p.mem_total_bytes, (64u64 << 30) as f64);
        // KV cache only on even values: 6k, 6k+2, 6k+4.
        assert_close!(p.kv_cache_usage_avg.unwrap(), (6.0 * k + 2.0) / 100.0);
        assert_close!(p.kv_cache_usage_max.unwrap(), (6.0 * k + 4.0) / 100.0);
        assert_close!(p.ttft_mean_s_max.unwrap(), (6.0 * k + 5.0) / 10.0);
        assert_eq!(p.prompt_tokens_per_s_avg, None);
        assert_close!(p.requests_running_avg, 3.0);
    }
    assert_eq!(m.gpus.len(), 2);
    for g in &m.gpus {
        assert_eq!(g.points.len(), 3);
        let gi = f64::from(g.gpu_index);
        for (k, p) in g.points.iter().enumerate() {
            let k = k as f64;
            assert_close!(p.util_pct_avg, 2.0 * (6.0 * k + 2.5) + gi);
            assert_close!(p.util_pct_max, 2.0 * (6.0 * k + 5.0) + gi);
            assert_close!(p.temp_c_avg, 40.0 + 6.0 * k + 2.5);
            assert_close!(p.temp_c_max, 40.0 + 6.0 * k + 5.0);
            assert_close!(p.power_w_max, 100.0 + 6.0 * k + 5.0);
            assert_close!(p.power_limit_w, 72.0);
            assert_close!(p.mem_total_mib, 23034.0);
            assert_close!(p.mem_used_mib_max, 100.0 + 6.0 * k + 5.0);
        }
    }
    // A 5 s step: one sample per bucket, on 10 s boundaries.
    let fine = s
        .metric_series(a.id, at(0), at(180_000), Step::MIN, Tier::Raw)
        .await
        .unwrap();
    assert_eq!(fine.points.len(), 18);
    assert!(fine
        .points
        .iter()
        .enumerate()
        .all(|(i, p)| p.bucket == at(10_000 * i as i64)
            && p.samples == 1
            && p.cpu_pct_avg == i as f64));
    // An unaligned window: buckets stay aligned, only samples inside count.
    let part = s
        .metric_series(a.id, at(30_000), at(90_000), Step::MINUTE, Tier::Raw)
        .await
        .unwrap();
    assert_eq!(part.points.len(), 2);
    assert_eq!(part.points[0].bucket, at(0));
    assert_eq!(part.points[0].samples, 3);
    assert_close!(part.points[0].cpu_pct_avg, 4.0);
    assert_eq!(part.points[1].samples, 3);
    // A 2-minute step.
    let two = parse_step("2m").unwrap();
    let coarse = s
        .metric_series(a.id, at(0), at(180_000), two, Tier::Raw)
        .await
        .unwrap();
    assert_eq!(
        coarse.points.iter().map(|p| p.samples).collect::<Vec<_>>(),
        vec![12, 6]
    );
    // Empty and unknown.
    let empty = s
        .metric_series(a.id, at(10), at(10), Step::MINUTE, Tier::Raw)
        .await
        .unwrap();
    assert!(empty.points.is_empty() && empty.gpus.is_empty());
    let none = s
        .metric_series(
            InstanceId::new(),
            at(0),
            at(180_000),
            Step::MINUTE,
            Tier::Raw,
        )
        .await
        .unwrap();
    assert!(none.points.is_empty() && none.gpus.is_empty());
    // Too many points.
    let err = s
        .metric_series(a.id, at(0), at(86_400_000), Step::MIN, Tier::Raw)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidQuery { .. }), "{err:?}");
}

/// Every row of a rollup table, as text, in key order.
async fn dump(url: &str, table: &str) -> Vec<String> {
    let raw = raw_pool(url).await;
    let gpu = table.starts_with("gpu");
    let cols = if gpu {
        "instance_id, bucket, gpu_index, n, util_avg, util_max, mem_used_avg, mem_total, \
         temp_max, power_avg, power_limit"
    } else {
        "instance_id, bucket, n, cpu_pct_avg, cpu_pct_max, mem_used_avg, kv_cache_n, \
         kv_cache_avg, ttft_max"
    };
    let order = if gpu {
        "instance_id, bucket, gpu_index"
    } else {
        "instance_id, bucket"
    };
    let rows = sqlx::query(&format!("SELECT {cols} FROM {table} ORDER BY {order}"))
        .fetch_all(&raw)
        .await
        .unwrap();
    use sqlx::Row;
    rows.iter()
        .map(|r| {
            (0..r.len())
                .map(|i| {
                    r.try_get::<Option<f64>, _>(i)
                        .map(|v| format!("{v:?}"))
                        .or_else(|_| r.try_get::<i64, _>(i).map(|v| v.to_string()))
                        .or_else(|_| r.try_get::<String, _>(i))
                        .unwrap()
                })
                .collect::<Vec<_>>()
                .join("|")
        })
        .collect()
}

pub async fn rollups_match_raw_and_are_idempotent(ctx: Ctx) {
    let s = &ctx.store;
    let a = insert_one(s, 0).await;
    let b = insert_one(s, 1).await;
    // Two hours and 5 minutes of 30 s heartbeats for a (2 GPUs); a later
    // stretch for b (no GPU), with a gap.
    load(s, a.id, 0, 7_500_000, 30_000, 2).await;
    load(s, b.id, 3_000_000, 3_300_000, 15_000, 0).await;

    assert!(matches!(
        s.rollup(Tier::Raw, at(0)).await,
        Err(StoreError::InvalidQuery { .. })
    ));
    // Nothing rolls up into hours before minutes exist.
    let r = s.rollup(Tier::Hour, at(7_500_000)).await.unwrap();
    assert!(r.caught_up && r.rows == 0 && r.watermark.is_none());

    let up_to = at(7_230_000); // 2 h 0 m 30 s: the minute 2h00 is incomplete.
    let first = s.rollup(Tier::Minute, up_to).await.unwrap();
    assert!(!first.caught_up, "{first:?}");
    assert_eq!(first.from, Some(at(0)));
    rollup_all(s, Tier::Minute, up_to).await;
    assert_eq!(
        s.rollup_watermark(Tier::Minute).await.unwrap(),
        Some(at(7_200_000))
    );
    let again = s.rollup(Tier::Minute, up_to).await.unwrap();
    assert!(again.caught_up && again.rows == 0);
    let minutes = dump(&ctx.url, "samples_1m").await;
    let gpu_minutes = dump(&ctx.url, "gpu_samples_1m").await;
    assert_eq!(minutes.len(), 120 + 5);
    assert_eq!(gpu_minutes.len(), 2 * 120);

    // Minute tier = raw at a 1 m step, over the rolled-up span.
    for id in [a.id, b.id] {
        let raw = s
            .metric_series(id, at(0), at(7_200_000), Step::MINUTE, Tier::Raw)
            .await
            .unwrap();
        let rolled = s
            .metric_series(id, at(0), at(7_200_000), Step::MINUTE, Tier::Minute)
            .await
            .unwrap();
        assert_eq!(raw.points.len(), rolled.points.len());
        for (x, y) in raw.points.iter().zip(&rolled.points) {
            assert_points_close(x, y);
        }
        assert_eq!(raw.gpus.len(), rolled.gpus.len());
        for (gx, gy) in raw.gpus.iter().zip(&rolled.gpus) {
            assert_eq!(gx.points.len(), gy.points.len());
            for (x, y) in gx.points.iter().zip(&gy.points) {
                assert_gpu_points_close(x, y);
            }
        }
        // Combining minutes into 5-minute buckets equals raw at 5 m too.
        let five = parse_step("5m").unwrap();
        let raw5 = s
            .metric_series(id, at(0), at(7_200_000), five, Tier::Raw)
            .await
            .unwrap();
        let rolled5 = s
            .metric_series(id, at(0), at(7_200_000), five, Tier::Minute)
            .await
            .unwrap();
        assert_eq!(raw5.points.len(), rolled5.points.len());
        for (x, y) in raw5.points.iter().zip(&rolled5.points) {
            assert_points_close(x, y);
        }
    }
    // A finer step than the tier is served at the tier's resolution.
    let coarse = s
        .metric_series(a.id, at(0), at(600_000), Step::MIN, Tier::Minute)
        .await
        .unwrap();
    assert_eq!(coarse.step, Step::MINUTE);
    assert_eq!(coarse.points.len(), 10);

    // Idempotent: forget the watermark, roll up again, same rows.
    let raw = raw_pool(&ctx.url).await;
    sqlx::query("DELETE FROM rollup_watermarks")
        .execute(&raw)
        .await
        .unwrap();
    rollup_all(s, Tier::Minute, up_to).await;
    assert_eq!(dump(&ctx.url, "samples_1m").await, minutes);
    assert_eq!(dump(&ctx.url, "gpu_samples_1m").await, gpu_minutes);

    // Hours from minutes: two complete hours (the minute watermark is 2h00).
    rollup_all(s, Tier::Hour, at(10_000_000)).await;
    assert_eq!(
        s.rollup_watermark(Tier::Hour).await.unwrap(),
        Some(at(7_200_000))
    );
    let hours = dump(&ctx.url, "samples_1h").await;
    assert_eq!(hours.len(), 2 + 1);
    assert_eq!(dump(&ctx.url, "gpu_samples_1h").await.len(), 2 * 2);
    for id in [a.id, b.id] {
        let raw = s
            .metric_series(id, at(0), at(7_200_000), Step::HOUR, Tier::Raw)
            .await
            .unwrap();
        let rolled = s
            .metric_series(id, at(0), at(7_200_000), Step::HOUR, Tier::Hour)
            .await
            .unwrap();
        assert_eq!(raw.points.len(), rolled.points.len());
        for (x, y) in raw.points.iter().zip(&rolled.points) {
            assert_points_close(x, y);
        }
        for (gx, gy) in raw.gpus.iter().zip(&rolled.gpus) {
            for (x, y) in gx.points.iter().zip(&gy.points) {
                assert_gpu_points_close(x, y);
            }
        }
    }
    // Hour rollups are idempotent too.
    sqlx::query("DELETE FROM rollup_watermarks WHERE tier = 'hour'")
        .execute(&raw)
        .await
        .unwrap();
    rollup_all(s, Tier::Hour, at(10_000_000)).await;
    assert_eq!(dump(&ctx.url, "samples_1h").await, hours);
    // More data later: the minute rollup picks up after its watermark.
    load(s, a.id, 7_500_000, 7_560_000, 30_000, 2).await;
    rollup_all(s, Tier::Minute, at(8_000_000)).await;
    assert_eq!(dump(&ctx.url, "samples_1m").await.len(), 120 + 5 + 5 + 1);
}

async fn count(url: &str, table: &str) -> i64 {
    let raw = raw_pool(url).await;
    sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
        .fetch_one(&raw)
        .await
        .unwrap()
}

pub async fn retention_deletes_only_old_rows(ctx: Ctx) {
    let s = &ctx.store;
    let a = insert_one(s, 0).await;
    const H: i64 = 3_600_000;
    // 10 minutes at 0 h, and 10 minutes at 30 h.
    load(s, a.id, 0, 600_000, 60_000, 1).await;
    load(s, a.id, 30 * H, 30 * H + 600_000, 60_000, 1).await;
    let retention = RetentionConfig::default();
    let now = at(30 * H + 3_600_000);
    // Nothing rolled up yet: raw rows are kept whatever their age.
    let r = s.enforce_retention(&retention, now).await.unwrap();
    assert_eq!(r.raw_samples, 0);
    assert!(r.complete);
    assert_eq!(count(&ctx.url, "samples").await, 20);

    rollup_all(s, Tier::Minute, now).await;
    rollup_all(s, Tier::Hour, now).await;
    assert_eq!(count(&ctx.url, "samples_1m").await, 20);
    assert_eq!(count(&ctx.url, "samples_1h").await, 2);
    let r = s.enforce_retention(&retention, now).await.unwrap();
    assert_eq!((r.raw_samples, r.raw_gpu_samples), (10, 10));
    assert_eq!((r.minute_samples, r.hour_samples), (0, 0));
    assert_eq!(count(&ctx.url, "samples").await, 10);
    assert_eq!(count(&ctx.url, "gpu_samples").await, 10);
    let left = s.recent_samples(a.id, 100).await.unwrap();
    assert!(left.iter().all(|r| r.at >= at(30 * H)));
    // Idempotent.
    let r = s.enforce_retention(&retention, now).await.unwrap();
    assert_eq!(r.raw_samples + r.minute_samples + r.hour_samples, 0);

    // 8 days on: minute rows of hour 0 go (hour 30 is within 7 days), hour rows stay.
    let later = at(8 * 24 * H);
    let r = s.enforce_retention(&retention, later).await.unwrap();
    assert_eq!((r.minute_samples, r.minute_gpu_samples), (10, 10));
    assert_eq!(r.hour_samples, 0);
    assert_eq!(count(&ctx.url, "samples_1m").await, 10);
    assert_eq!(count(&ctx.url, "samples_1h").await, 2);
    // Raw rows past the minute watermark's reach were rolled up: all gone now.
    assert_eq!(count(&ctx.url, "samples").await, 0);
    // 91 days on: the first hour goes.
    let r = s
        .enforce_retention(&retention, at(91 * 24 * H))
        .await
        .unwrap();
    assert_eq!((r.hour_samples, r.hour_gpu_samples), (1, 1));
    assert_eq!(count(&ctx.url, "samples_1h").await, 1);
    // The rest of the minutes (rolled into hour 30) are past 7 days too.
    assert_eq!(count(&ctx.url, "samples_1m").await, 0);
    assert_eq!(r.minute_samples, 10);
}

pub async fn fleet_now_and_series(ctx: Ctx) {
    let s = &ctx.store;
    let a = insert_one(s, 0).await;
    let b = insert_one(s, 1).await;
    let c = insert_one(s, 2).await;
    let d = insert_one(s, 3).await;
    insert_one(s, 4).await; // provisioning, never reported
    set_status(s, &a, InstanceStatus::Ready).await;
    set_status(s, &b, InstanceStatus::Starting).await;
    set_status(s, &c, InstanceStatus::Ready).await;
    set_status(s, &d, InstanceStatus::Terminated).await;
    let mut hbs = Vec::new();
    // a: an old heartbeat, then its latest with 2 GPUs at 10 % / 30 %.
    hbs.push((figure_hb(a.id, 1, 50.0, 2), at(0)));
    let mut a2 = heartbeat(a.id, 2, 2);
    a2.gpus[0].util_pct = Some(10.0);
    a2.gpus[1].util_pct = Some(30.0);
    hbs.push((a2, at(60_000)));
    // b: 1 GPU at 50 %, fresh.
    let mut b1 = heartbeat(b.id, 1, 1);
    b1.gpus[0].util_pct = Some(50.0);
    hbs.push((b1, at(61_000)));
    // c: stale. d: terminated.
    hbs.push((heartbeat(c.id, 1, 4), at(1_000)));
    hbs.push((heartbeat(d.id, 1, 8), at(62_000)));
    s.record_heartbeats(&hbs).await.unwrap();

    let now = s.fleet_now(at(30_000), None).await.unwrap();
    assert_eq!(now.instances, 4);
    assert_eq!(now.reporting_instances, 2);
    assert_eq!(now.gpus, 3);
    assert_close!(now.mean_gpu_util_pct.unwrap(), 30.0);
    // heartbeat(): GPU i uses 1000 + i MiB of 23034, 60.25 W of 72 W.
    assert_close!(now.vram_used_mib, 1000.0 + 1001.0 + 1000.0);
    assert_close!(now.vram_total_mib, 3.0 * 23034.0);
    assert_close!(now.power_w, 3.0 * 60.25);
    assert_close!(now.power_limit_w, 3.0 * 72.0);
    let st = |status| now.by_status.iter().find(|f| f.status == status).unwrap();
    assert!(now.by_status.iter().all(|f| !f.status.is_terminal()));
    assert_eq!(now.by_status.len(), InstanceStatus::ALL.len() - 2);
    assert_eq!(st(InstanceStatus::Ready).instances, 2);
    assert_eq!(st(InstanceStatus::Ready).reporting_instances, 1);
    assert_eq!(st(InstanceStatus::Ready).gpus, 2);
    assert_close!(st(InstanceStatus::Ready).mean_gpu_util_pct.unwrap(), 20.0);
    assert_eq!(st(InstanceStatus::Starting).gpus, 1);
    assert_eq!(st(InstanceStatus::Provisioning).instances, 1);
    assert_eq!(st(InstanceStatus::Provisioning).mean_gpu_util_pct, None);
    // Nobody fresh.
    let quiet = s.fleet_now(at(1_000_000), None).await.unwrap();
    assert_eq!((quiet.gpus, quiet.reporting_instances), (0, 0));
    assert_eq!(quiet.mean_gpu_util_pct, None);

    // Over time, at 1 m from raw: bucket 0 has a (2 GPUs of figure_hb(50):
    // 100 %, 101 %) and c (4 GPUs at 40..43 %); bucket 1 has a, b and d.
    let series = s
        .fleet_series(at(0), at(120_000), Step::MINUTE, Tier::Raw, None)
        .await
        .unwrap();
    assert_eq!(series.points.len(), 2);
    let p0 = &series.points[0];
    assert_eq!((p0.instances, p0.gpus), (2, 6));
    assert_close!(
        p0.mean_gpu_util_pct,
        (100.0 + 101.0 + 40.0 + 41.0 + 42.0 + 43.0) / 6.0
    );
    assert_close!(
        p0.vram_used_mib,
        150.0 + 150.0 + 1000.0 + 1001.0 + 1002.0 + 1003.0
    );
    assert_close!(p0.power_w, 2.0 * 150.0 + 4.0 * 60.25);
    let p1 = &series.points[1];
    assert_eq!((p1.instances, p1.gpus), (3, 2 + 1 + 8));
    assert_close!(p1.vram_total_mib, 11.0 * 23034.0);
    // The same from minute rollups.
    rollup_all(s, Tier::Minute, at(120_000)).await;
    let rolled = s
        .fleet_series(at(0), at(120_000), Step::MINUTE, Tier::Minute, None)
        .await
        .unwrap();
    assert_eq!(rolled.points.len(), 2);
    for (x, y) in series.points.iter().zip(&rolled.points) {
        assert_eq!(
            (x.bucket, x.instances, x.gpus),
            (y.bucket, y.instances, y.gpus)
        );
        assert_close!(x.mean_gpu_util_pct, y.mean_gpu_util_pct);
        assert_close!(x.vram_used_mib, y.vram_used_mib);
        assert_close!(x.power_w, y.power_w);
    }

    // Scoped to projects: b alone moves to "research".
    let research: gpufleet_domain::ProjectId = "research".parse().unwrap();
    s.insert_project(&research, at(0)).await.unwrap();
    assert!(s.set_instance_project(b.id, &research).await.unwrap());
    let only = [research];
    let scoped = s.fleet_now(at(30_000), Some(&only)).await.unwrap();
    assert_eq!(
        (scoped.instances, scoped.reporting_instances, scoped.gpus),
        (1, 1, 1)
    );
    assert_close!(scoped.mean_gpu_util_pct.unwrap(), 50.0);
    let default = [gpufleet_domain::ProjectId::default_project()];
    let rest = s.fleet_now(at(30_000), Some(&default)).await.unwrap();
    assert_eq!((rest.instances, rest.gpus), (3, 2));
    let nothing = s.fleet_now(at(30_000), Some(&[])).await.unwrap();
    assert_eq!((nothing.instances, nothing.gpus), (0, 0));
    assert!(nothing.by_status.iter().all(|f| f.instances == 0));
    for tier in [Tier::Raw, Tier::Minute] {
        let scoped = s
            .fleet_series(at(0), at(120_000), Step::MINUTE, tier, Some(&only))
            .await
            .unwrap();
        let points: Vec<_> = scoped
            .points
            .iter()
            .map(|p| (p.bucket, p.instances, p.gpus))
            .collect();
        assert_eq!(points, vec![(at(60_000), 1, 1)], "{tier:?}");
        let nothing = s
            .fleet_series(at(0), at(120_000), Step::MINUTE, tier, Some(&[]))
            .await
            .unwrap();
        assert!(nothing.points.is_empty(), "{tier:?}");
    }
}

pub async fn out_of_range_values_round_trip(ctx: Ctx) {
    let s = &ctx.store;
    let a = insert_one(s, 0).await;
    let mut odd = heartbeat(a.id, 1, 1);
    odd.system.cpu_pct = 250.0;
    odd.system.load1 = -3.0;
    odd.system.mem_used_bytes = 1 << 62; // above the total
    odd.system.net_rx_bps = 1e300;
    odd.gpus[0].util_pct = Some(150.0);
    odd.gpus[0].temp_c = Some(-40.0);
    odd.gpus[0].mem_used_mib = i64::MAX as u64;
    odd.gpus[0].power_w = Some(-1.0);
    odd.engine.kv_cache_usage = Some(7.5);
    odd.engine.ttft_mean_s = Some(-0.0);
    let mut nan = heartbeat(a.id, 2, 1);
    nan.gpus[0].temp_c = Some(f64::INFINITY);
    let mut nan_engine = heartbeat(a.id, 3, 0);
    nan_engine.engine.ttft_mean_s = Some(f64::NAN);
    let out = s
        .record_heartbeats(&[
            (odd.clone(), at(1_000)),
            (nan, at(2_000)),
            (nan_engine, at(3_000)),
        ])
        .await
        .unwrap();
    assert_eq!(
        out,
        vec![
            HeartbeatOutcome::Applied,
            HeartbeatOutcome::Invalid,
            HeartbeatOutcome::Invalid
        ]
    );
    let back = s.recent_samples(a.id, 10).await.unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].system, odd.system);
    assert_eq!(back[0].gpus, odd.gpus);
    assert_eq!(back[0].engine, odd.engine);
    let m = s
        .metric_series(a.id, at(0), at(60_000), Step::MINUTE, Tier::Raw)
        .await
        .unwrap();
    assert_eq!(m.points.len(), 1);
    assert_eq!(m.points[0].cpu_pct_max, 250.0);
    assert_eq!(m.points[0].net_rx_bps_avg, 1e300);
    assert_eq!(m.points[0].kv_cache_usage_max, Some(7.5));
    assert_eq!(m.gpus[0].points[0].util_pct_max, Some(150.0));
    assert_eq!(m.gpus[0].points[0].temp_c_avg, Some(-40.0));
    assert_close!(m.gpus[0].points[0].mem_used_mib_max, i64::MAX as f64);
    rollup_all(s, Tier::Minute, at(120_000)).await;
    let rolled = s
        .metric_series(a.id, at(0), at(60_000), Step::MINUTE, Tier::Minute)
        .await
        .unwrap();
    assert_eq!(rolled.points[0].cpu_pct_max, 250.0);
    assert_close!(rolled.gpus[0].points[0].mem_used_mib_avg, i64::MAX as f64);
    let now = s.fleet_now(at(0), None).await.unwrap();
    assert_eq!(now.gpus, 1);
}

/// Everything a reader can ask of raw samples, for comparing before and
/// after a compaction.
async fn raw_views(
    s: &Store,
    ids: &[InstanceId],
) -> (
    Vec<Vec<gpufleet_store::SampleRecord>>,
    Vec<gpufleet_store::MetricSeries>,
    gpufleet_store::FleetNow,
    gpufleet_store::FleetSeries,
) {
    let mut recent = Vec::new();
    let mut series = Vec::new();
    for id in ids {
        recent.push(s.recent_samples(*id, 100).await.unwrap());
        series.push(
            s.metric_series(
                *id,
                at(0),
                at(300_000),
                Step::from_millis(10_000).unwrap(),
                Tier::Raw,
            )
            .await
            .unwrap(),
        );
    }
    let now = s.fleet_now(at(0), None).await.unwrap();
    let fleet = s
        .fleet_series(at(0), at(300_000), Step::MINUTE, Tier::Raw, None)
        .await
        .unwrap();
    (recent, series, now, fleet)
}

pub async fn staged_samples_read_the_same_before_and_after_compaction(ctx: Ctx) {
    let s = &ctx.store;
    let a = insert_one(s, 0).await;
    let b = insert_one(s, 1).await;
    set_status(s, &a, InstanceStatus::Ready).await;
    set_status(s, &b, InstanceStatus::Ready).await;
    let ids = [a.id, b.id];
    // Nothing staged yet; compacting nothing is fine.
    assert_eq!(s.staged_heartbeats().await.unwrap(), 0);
    assert_eq!(s.compact_staging().await.unwrap(), 0);

    // A first batch, then a single heartbeat: both staged.
    let mut batch = Vec::new();
    for seq in 1..=6u64 {
        batch.push((figure_hb(a.id, seq, seq as f64, 2), at(seq as i64 * 15_000)));
        batch.push((
            figure_hb(b.id, seq, 2.0 * seq as f64, 1),
            at(seq as i64 * 15_000 + 1),
        ));
    }
    s.record_heartbeats(&batch).await.unwrap();
    assert_eq!(s.staged_heartbeats().await.unwrap(), 12);
    s.record_heartbeat(&figure_hb(a.id, 7, 7.0, 2), at(105_000))
        .await
        .unwrap();
    let before = raw_views(s, &ids).await;
    assert_eq!(before.0[0].len(), 7, "both calls' samples of a");
    assert_eq!(before.0[0][0].seq, 7);
    assert_eq!(
        before.0[0][1].gpus.len(),
        2,
        "GPU rows come from staging too"
    );
    assert_eq!(before.2.gpus, 3, "latest GPUs of both instances");
    assert!(!before.1[0].points.is_empty());

    // One partition at a time: only its instances' rows move.
    let part_of = |id: InstanceId| gpufleet_store::staging_part(&id.to_string());
    let moved = s.compact_staging_part(part_of(a.id)).await.unwrap();
    if part_of(a.id) == part_of(b.id) {
        assert_eq!(moved, 13);
    } else {
        assert_eq!(moved, 7, "a's seven staged heartbeats, not b's");
        assert_eq!(s.staged_heartbeats().await.unwrap(), 6);
    }
    assert_eq!(
        raw_views(s, &ids).await,
        before,
        "half moved reads the same"
    );
    s.compact_staging().await.unwrap();
    assert_eq!(s.staged_heartbeats().await.unwrap(), 0);
    assert_eq!(raw_views(s, &ids).await, before);

    // Newer heartbeats staged on top of compacted ones: readers merge both,
    // and the seq guard still holds across the two tables.
    let out = s
        .record_heartbeats(&[
            (figure_hb(a.id, 8, 8.0, 2), at(120_000)),
            (figure_hb(a.id, 7, 0.0, 2), at(121_000)),
            (figure_hb(b.id, 7, 14.0, 1), at(122_000)),
        ])
        .await
        .unwrap();
    assert_eq!(
        out,
        vec![
            HeartbeatOutcome::Applied,
            HeartbeatOutcome::Stale,
            HeartbeatOutcome::Applied
        ]
    );
    let mixed = raw_views(s, &ids).await;
    assert_eq!(mixed.0[0].len(), 8);
    assert_eq!(mixed.0[0][0].seq, 8);
    assert_eq!(mixed.0[1][0].seq, 7);
    // Minute rollups read both tables; compacting changes nothing.
    rollup_all(s, Tier::Minute, at(180_000)).await;
    let rolled = s
        .metric_series(a.id, at(0), at(180_000), Step::MINUTE, Tier::Minute)
        .await
        .unwrap();
    let raw = s
        .metric_series(a.id, at(0), at(180_000), Step::MINUTE, Tier::Raw)
        .await
        .unwrap();
    assert_eq!(rolled.points.len(), raw.points.len());
    assert_eq!(rolled.points.iter().map(|p| p.samples).sum::<i64>(), 8);
    assert_eq!(s.compact_staging().await.unwrap(), 2);
    assert_eq!(raw_views(s, &ids).await, mixed);
}

/// The heartbeat writer's session: its own connection on PostgreSQL, a
/// pooled one on SQLite; writes and moves like the store's own calls, and
/// after `close` the store still works.
pub async fn ingest_session_writes_moves_and_closes(ctx: Ctx) {
    let s = &ctx.store;
    let a = insert_one(s, 0).await;
    set_status(s, &a, InstanceStatus::Ready).await;
    let mut session = gpufleet_store::IngestSession::new(s.clone());
    let batch: Vec<_> = (1..=4u64)
        .map(|seq| (figure_hb(a.id, seq, seq as f64, 1), at(seq as i64 * 15_000)))
        .collect();
    let out = session.record_heartbeats(&batch).await.unwrap();
    assert_eq!(out.len(), 4);
    assert_eq!(
        s.staged_heartbeats().await.unwrap(),
        4,
        "visible to the pool"
    );
    let part = gpufleet_store::staging_part(&a.id.to_string());
    assert_eq!(session.compact_staging_part(part).await.unwrap(), 4);
    assert_eq!(s.staged_heartbeats().await.unwrap(), 0);
    // A stale seq is still guarded on the session's connection.
    let out = session
        .record_heartbeats(&[(figure_hb(a.id, 2, 0.0, 1), at(90_000))])
        .await
        .unwrap();
    assert_eq!(out, vec![HeartbeatOutcome::Stale]);
    session.close().await;
    assert_eq!(s.recent_samples(a.id, 10).await.unwrap().len(), 4);
    // Closed sessions open a connection again on use.
    session
        .record_heartbeats(&[(figure_hb(a.id, 5, 5.0, 1), at(95_000))])
        .await
        .unwrap();
    session.close().await;
    assert_eq!(s.recent_samples(a.id, 10).await.unwrap().len(), 5);
}

/// Moves running while heartbeats are staged from other connections lose
/// and duplicate nothing: every heartbeat ends up in `samples` exactly once.
pub async fn moves_beside_concurrent_staging_keep_every_heartbeat(ctx: Ctx) {
    let s = &ctx.store;
    // Two instances of one partition: a move checks both instances' rows
    // (PostgreSQL: foreign-key locks on both) while batches naming both
    // lock them too; the two must not deadlock.
    let part = |r: &InstanceRecord| gpufleet_store::staging_part(&r.id.to_string());
    let mut made: Vec<InstanceRecord> = Vec::new();
    let (a, b) = loop {
        let r = insert_one(s, made.len() as i64).await;
        if let Some(other) = made.iter().find(|m| part(m) == part(&r)) {
            break (other.clone(), r);
        }
        made.push(r);
    };
    set_status(s, &a, InstanceStatus::Ready).await;
    set_status(s, &b, InstanceStatus::Ready).await;
    // Two writers: one stages a before b in each batch, the other b
    // before a (arrival order is the partition's row order). Seqs come
    // from one counter; one that loses the race to a higher one is stale.
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(1));
    let writers: Vec<_> = [(a.id, b.id), (b.id, a.id)]
        .into_iter()
        .map(|(first, second)| {
            let s = s.clone();
            let next = next.clone();
            tokio::spawn(async move {
                let mut applied = std::collections::HashMap::<InstanceId, u64>::new();
                for _ in 0..40 {
                    let seq = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let t = seq as i64 * 1_000;
                    let out = s
                        .record_heartbeats(&[
                            (figure_hb(first, seq, 1.0, 2), at(t)),
                            (figure_hb(second, seq, 1.0, 2), at(t + 1)),
                        ])
                        .await
                        .unwrap();
                    for (id, o) in [first, second].into_iter().zip(out) {
                        if o == HeartbeatOutcome::Applied {
                            *applied.entry(id).or_default() += 1;
                        }
                    }
                }
                applied
            })
        })
        .collect();
    let mover = {
        let s = s.clone();
        let p = part(&a);
        tokio::spawn(async move {
            let mut moved = 0;
            for _ in 0..40 {
                moved += s.compact_staging_part(p).await.unwrap();
                tokio::task::yield_now().await;
            }
            moved
        })
    };
    let mut applied = std::collections::HashMap::<InstanceId, u64>::new();
    for w in writers {
        for (id, n) in w.await.unwrap() {
            *applied.entry(id).or_default() += n;
        }
    }
    let moved_during = mover.await.unwrap();
    let moved_after = s.compact_staging().await.unwrap();
    assert!(applied[&a.id] > 0 && applied[&b.id] > 0);
    assert_eq!(
        moved_during + moved_after,
        applied.values().sum::<u64>(),
        "every applied heartbeat moved once"
    );
    assert_eq!(s.staged_heartbeats().await.unwrap(), 0);
    for id in [a.id, b.id] {
        let samples = s.recent_samples(id, 1000).await.unwrap();
        assert_eq!(samples.len() as u64, applied[&id], "{id}");
        assert!(samples.iter().all(|x| x.gpus.len() == 2));
    }
}

/// `latest_samples`: each wanted instance's sample of its last applied
/// seq, with its GPUs, whether staged or moved; other statuses and
/// instances without heartbeats are left out.
pub async fn latest_samples_of_many_instances(ctx: Ctx) {
    let s = &ctx.store;
    let a = insert_one(s, 0).await;
    let b = insert_one(s, 1).await;
    let c = insert_one(s, 2).await;
    let quiet = insert_one(s, 3).await;
    for r in [&a, &b, &quiet] {
        set_status(s, r, InstanceStatus::Ready).await;
    }
    set_status(s, &c, InstanceStatus::Draining).await;
    let mut batch = Vec::new();
    for seq in 1..=3u64 {
        batch.push((figure_hb(a.id, seq, seq as f64, 2), at(seq as i64 * 1_000)));
        batch.push((
            figure_hb(b.id, seq, 10.0 * seq as f64, 1),
            at(seq as i64 * 1_000 + 1),
        ));
        batch.push((figure_hb(c.id, seq, 5.0, 1), at(seq as i64 * 1_000 + 2)));
    }
    s.record_heartbeats(&batch).await.unwrap();
    // a's rows moved, b's still staged.
    s.compact_staging_part(gpufleet_store::staging_part(&a.id.to_string()))
        .await
        .unwrap();
    let mut latest = s.latest_samples(&[InstanceStatus::Ready]).await.unwrap();
    latest.sort_by_key(|x| x.instance_id.to_string());
    let mut want = vec![(a.id, 3.0, 2usize), (b.id, 30.0, 1usize)];
    want.sort_by_key(|w| w.0.to_string());
    assert_eq!(latest.len(), 2, "c is draining, quiet has no heartbeat");
    for (got, (id, cpu, gpus)) in latest.iter().zip(want) {
        assert_eq!(got.instance_id, id);
        assert_eq!(got.seq, 3);
        assert_eq!(got.system.cpu_pct, cpu);
        assert_eq!(got.gpus.len(), gpus);
        assert!(got.gpus.windows(2).all(|w| w[0].index < w[1].index));
        // The same as the single-instance reader.
        assert_eq!(&s.recent_samples(id, 1).await.unwrap()[0], got);
    }
    let both = s
        .latest_samples(&[InstanceStatus::Ready, InstanceStatus::Draining])
        .await
        .unwrap();
    assert_eq!(both.len(), 3);
    assert!(s.latest_samples(&[]).await.unwrap().is_empty());
}

/// GPU figures NVML could not give are NULL all the way: raw samples keep
/// `None`, means are over the known values only, and a bucket where nothing
/// was known is `None` (not 0) in raw series, minute and hour rollups alike;
/// the fleet's mean utilisation ignores GPUs that do not report it.
pub async fn unknown_gpu_figures_stay_unknown_through_rollups(ctx: Ctx) {
    let s = &ctx.store;
    let a = insert_one(s, 0).await;
    // 2 h of 30 s heartbeats, 2 GPUs: GPU 0 reports utilisation on even
    // heartbeats only (MIG toggled, say); GPU 1 is off the bus throughout.
    let batch: Vec<(Heartbeat, DateTime<Utc>)> = (0..240)
        .map(|i: i64| {
            let mut hb = figure_hb(a.id, (HOUR0 + i * 30_000) as u64, i as f64, 2);
            if i % 2 == 1 {
                hb.gpus[0].util_pct = None;
            }
            let g1 = &mut hb.gpus[1];
            g1.util_pct = None;
            g1.temp_c = None;
            g1.power_w = None;
            g1.power_limit_w = None;
            (hb, at(i * 30_000))
        })
        .collect();
    for chunk in batch.chunks(50) {
        let out = s.record_heartbeats(chunk).await.unwrap();
        assert!(out.iter().all(|o| *o == HeartbeatOutcome::Applied));
    }
    let back = s.recent_samples(a.id, 2).await.unwrap();
    assert_eq!(back[0].gpus[1].util_pct, None);
    assert_eq!(back[0].gpus[1].power_limit_w, None);
    assert_eq!(
        back[0].gpus[0].util_pct, None,
        "the last heartbeat (odd) had none"
    );
    assert_eq!(back[1].gpus[0].util_pct, Some(2.0 * 238.0));

    let raw = s
        .metric_series(a.id, at(0), at(7_200_000), Step::MINUTE, Tier::Raw)
        .await
        .unwrap();
    // Minute k holds heartbeats 2k (util known: 2·2k) and 2k+1 (unknown).
    let g0 = &raw.gpus[0].points;
    assert_eq!(g0.len(), 120);
    assert_close!(g0[3].util_pct_avg, Some(2.0 * 6.0));
    assert_close!(g0[3].temp_c_avg, Some(40.0 + 6.5));
    let g1 = &raw.gpus[1].points;
    assert!(g1.iter().all(|p| p.util_pct_avg.is_none()
        && p.util_pct_max.is_none()
        && p.temp_c_avg.is_none()
        && p.power_w_max.is_none()
        && p.power_limit_w.is_none()));
    assert!(g1.iter().all(|p| p.samples == 2 && p.mem_total_mib > 0.0));

    rollup_all(s, Tier::Minute, at(7_200_000)).await;
    rollup_all(s, Tier::Hour, at(7_200_000)).await;
    for (step, tier) in [(Step::MINUTE, Tier::Minute), (Step::HOUR, Tier::Hour)] {
        let raw = s
            .metric_series(a.id, at(0), at(7_200_000), step, Tier::Raw)
            .await
            .unwrap();
        let rolled = s
            .metric_series(a.id, at(0), at(7_200_000), step, tier)
            .await
            .unwrap();
        for (gx, gy) in raw.gpus.iter().zip(&rolled.gpus) {
            assert_eq!(gx.points.len(), gy.points.len(), "{tier:?}");
            for (x, y) in gx.points.iter().zip(&gy.points) {
                assert_gpu_points_close(x, y);
            }
        }
    }
    let hour = s
        .metric_series(a.id, at(0), at(3_600_000), Step::HOUR, Tier::Hour)
        .await
        .unwrap();
    // Hour 0: heartbeats 0..120, util known on even i: mean of 2i.
    let even_mean = (0..120).step_by(2).map(|i| 2.0 * i as f64).sum::<f64>() / 60.0;
    assert_close!(hour.gpus[0].points[0].util_pct_avg, Some(even_mean));
    assert_eq!(hour.gpus[1].points[0].util_pct_avg, None);

    // The fleet now: GPU 1's unknown utilisation does not count as 0 %.
    let mut last = heartbeat(a.id, (HOUR0 + 10_000_000) as u64, 2);
    last.gpus[0].util_pct = Some(80.0);
    last.gpus[1].util_pct = None;
    last.gpus[1].power_w = None;
    s.record_heartbeats(&[(last, at(7_300_000))]).await.unwrap();
    let now = s.fleet_now(at(7_200_000), None).await.unwrap();
    assert_eq!(now.gpus, 2);
    assert_close!(now.mean_gpu_util_pct, Some(80.0));
    assert_close!(now.power_w, 60.25);
}

/// The latest heartbeat's engine canary is kept on the instance and given
/// with its latest sample; a heartbeat without one clears it.
pub async fn engine_canary_of_the_latest_heartbeat(ctx: Ctx) {
    let s = &ctx.store;
    let rec = set_status(s, &insert_one(s, 0).await, InstanceStatus::Booting).await;
    let rec = set_status(s, &rec, InstanceStatus::Starting).await;
    let rec = set_status(s, &rec, InstanceStatus::Ready).await;
    let failing = gpufleet_proto::CanarySample {
        ok: false,
        checked_at: t(1_000),
        latency_ms: None,
        error: Some("no answer within 10 s".into()),
        consecutive_failures: 3,
    };
    let mut hb = heartbeat(rec.id, 1_000, 1);
    hb.engine.canary = Some(failing.clone());
    s.record_heartbeat(&hb, t(1_005)).await.unwrap();
    let got = s.engine_canaries(&[InstanceStatus::Ready]).await.unwrap();
    assert_eq!(got.get(&rec.id), Some(&failing));
    assert!(s
        .engine_canaries(&[InstanceStatus::Unhealthy])
        .await
        .unwrap()
        .is_empty());
    let recent = s.recent_samples(rec.id, 10).await.unwrap();
    assert_eq!(recent[0].engine.canary.as_ref(), Some(&failing));
    let latest = s.latest_samples(&[InstanceStatus::Ready]).await.unwrap();
    assert_eq!(latest[0].engine.canary.as_ref(), Some(&failing));
    // A stale heartbeat changes nothing.
    let mut stale = heartbeat(rec.id, 999, 1);
    stale.engine.canary = None;
    s.record_heartbeat(&stale, t(1_010)).await.unwrap();
    assert_eq!(
        s.engine_canaries(&[InstanceStatus::Ready])
            .await
            .unwrap()
            .get(&rec.id),
        Some(&failing)
    );

    // The next one passes: the older sample keeps no canary (not history).
    let passing = gpufleet_proto::CanarySample {
        ok: true,
        checked_at: t(2_000),
        latency_ms: Some(12.5),
        error: None,
        consecutive_failures: 0,
    };
    let mut hb = heartbeat(rec.id, 1_001, 1);
    hb.engine.canary = Some(passing.clone());
    s.record_heartbeat(&hb, t(2_005)).await.unwrap();
    let recent = s.recent_samples(rec.id, 10).await.unwrap();
    assert_eq!(recent[0].engine.canary.as_ref(), Some(&passing));
    assert_eq!(recent[1].engine.canary, None);

    // No canary (engine restarting, canary off, older agent): cleared.
    s.record_heartbeat(&heartbeat(rec.id, 1_002, 1), t(3_005))
        .await
        .unwrap();
    assert!(s
        .engine_canaries(&[InstanceStatus::Ready])
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        s.recent_samples(rec.id, 10).await.unwrap()[0].engine.canary,
        None
    );
}

fn claim(project: &str, key: &str, digest: &str) -> IdempotencyClaim {
    IdempotencyClaim {
        scope: "instances.create",
        project: project.parse().unwrap(),
        key: key.to_string(),
        request_digest: digest.to_string(),
    }
}

fn inserted(r: InsertOnce) -> Vec<InstanceId> {
    match r {
        InsertOnce::Inserted(v) => v.into_iter().map(|r| r.id).collect(),
        InsertOnce::Used(KeyUse { ids, .. }) => {
            panic!("expected an insert, the key was used for {ids:?}")
        }
    }
}

async fn instance_count(s: &Store) -> usize {
    s.list_instances(&InstanceFilter::default())
        .await
        .unwrap()
        .len()
}

pub async fn an_idempotency_key_inserts_once(ctx: Ctx) {
    let s = &ctx.store;
    let k = claim("default", "key-1", "digest-a");
    let first = inserted(
        s.insert_instances_once(&[new_instance(0), new_instance(1)], &k)
            .await
            .unwrap(),
    );
    assert_eq!(first.len(), 2);

    // The same key and request again: nothing new, the first batch named.
    let again = s
        .insert_instances_once(&[new_instance(2)], &k)
        .await
        .unwrap();
    match again {
        InsertOnce::Used(KeyUse { ids, same_request }) => {
            assert_eq!(ids, first);
            assert!(same_request);
        }
        other => panic!("{other:?}"),
    }
    // The same key with another request: refused, nothing new either.
    match s
        .insert_instances_once(&[new_instance(3)], &claim("default", "key-1", "digest-b"))
        .await
        .unwrap()
    {
        InsertOnce::Used(KeyUse { ids, same_request }) => {
            assert_eq!(ids, first);
            assert!(!same_request);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(instance_count(s).await, 2);

    // Another project or another scope: another key.
    s.insert_project(&"research".parse().unwrap(), t(0))
        .await
        .unwrap();
    let mut elsewhere = new_instance(4);
    elsewhere.project_id = "research".parse().unwrap();
    assert_eq!(
        inserted(
            s.insert_instances_once(&[elsewhere], &claim("research", "key-1", "digest-a"))
                .await
                .unwrap()
        )
        .len(),
        1
    );
    let mut other_scope = claim("default", "key-1", "digest-a");
    other_scope.scope = "other.create";
    inserted(
        s.insert_instances_once(&[new_instance(5)], &other_scope)
            .await
            .unwrap(),
    );
    assert_eq!(instance_count(s).await, 4);

    // A key older than its lifetime is forgotten: the same key makes anew,
    // and the expired row is replaced.
    let raw = raw_pool(&ctx.url).await;
    let day_and_more = IDEMPOTENCY_KEY_TTL.as_millis() as i64 + 60_000;
    sqlx::query(
        "UPDATE idempotency_keys SET created_at = created_at - $1 \
         WHERE scope = 'instances.create' AND project_id = 'default' AND key = 'key-1'",
    )
    .bind(day_and_more)
    .execute(&raw)
    .await
    .unwrap();
    let anew = inserted(
        s.insert_instances_once(&[new_instance(6)], &k)
            .await
            .unwrap(),
    );
    assert_ne!(anew, first);
    match s
        .insert_instances_once(&[new_instance(7)], &k)
        .await
        .unwrap()
    {
        InsertOnce::Used(KeyUse { ids, .. }) => assert_eq!(ids, anew),
        other => panic!("{other:?}"),
    }
    assert_eq!(instance_count(s).await, 5);
}

pub async fn concurrent_uses_of_an_idempotency_key_insert_once(ctx: Ctx) {
    let s = &ctx.store;
    let k = claim("default", "together", "digest");
    let tries: Vec<_> = (0..8)
        .map(|i| {
            let (s, k) = (s.clone(), k.clone());
            tokio::spawn(async move {
                s.insert_instances_once(&[new_instance(i), new_instance(100 + i)], &k)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut made = Vec::new();
    let mut named = Vec::new();
    for t in tries {
        match t.await.unwrap() {
            InsertOnce::Inserted(v) => made.push(v.into_iter().map(|r| r.id).collect::<Vec<_>>()),
            InsertOnce::Used(KeyUse { ids, same_request }) => {
                assert!(same_request);
                named.push(ids);
            }
        }
    }
    assert_eq!(made.len(), 1, "exactly one request inserts: {made:?}");
    assert!(
        named.iter().all(|ids| *ids == made[0]),
        "{named:?} vs {made:?}"
    );
    assert_eq!(instance_count(s).await, 2);
}
