//! The reconcilers against an in-memory provider wrapped in fault injection.

mod common;

use chrono::Utc;
use common::*;
use gpufleet_control::{ControlError, CreateInstances, Fleet};
use gpufleet_domain::{FailureReason, InstanceId, InstanceStatus};
use gpufleet_proto::{
    EngineSample, EngineStatus, GpuSource, Heartbeat, RegisterRequest, SystemSample,
};
use gpufleet_providers::fault::Op;
use gpufleet_providers::{tags, ProviderError};
use std::collections::BTreeMap;
use std::time::Duration;

fn req(count: u32) -> CreateInstances {
    CreateInstances {
        provider: "mem".parse().unwrap(),
        zone: None,
        instance_type: "mem-1".into(),
        model: "gpufleet/sim-small".parse().unwrap(),
        count,
    }
}

async fn create_one(fleet: &Fleet) -> InstanceId {
    fleet.create_instances(req(1)).await.unwrap()[0].id
}

fn heartbeat(id: InstanceId, seq: u64) -> Heartbeat {
    Heartbeat {
        instance_id: id,
        seq,
        sent_at: Utc::now(),
        agent_version: "test".into(),
        agent_uptime_secs: 1,
        system: SystemSample::default(),
        gpu_source: GpuSource::Simulated,
        gpus: vec![],
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

#[tokio::test]
async fn provisions_and_discovers_the_ip() {
    let mem = memory_provider();
    let h = start(mem.clone(), fast_config()).await;
    let id = create_one(&h.fleet).await;
    let rec = wait_status(&h.fleet, id, InstanceStatus::Starting).await;
    assert!(rec.ip.is_some());
    assert!(rec.milestones.provider_created && rec.milestones.ip_assigned);
    let events = h.fleet.instance_events(id, None, 100).await.unwrap();
    let create = events
        .iter()
        .find(|e| e.event.action == "provider.create" && e.event.duration_ms.is_some())
        .expect("create call on the timeline");
    assert!(create.event.duration_ms.unwrap() >= 0);
    let transitions: Vec<_> = events.iter().filter_map(|e| e.event.to_status).collect();
    assert_eq!(
        transitions,
        vec![
            InstanceStatus::Provisioning,
            InstanceStatus::Booting,
            InstanceStatus::Starting
        ]
    );
    // The machine carries our tags.
    let m = mem.machines().into_iter().next().unwrap();
    assert_eq!(m.tags.get(tags::INSTANCE), Some(&id.to_string()));
    assert_eq!(
        m.tags.get(tags::CLUSTER).map(String::as_str),
        Some(h.fleet.cluster_id())
    );
}

#[tokio::test]
async fn retries_reuse_the_idempotency_key_and_create_once() {
    let mem = memory_provider();
    let faulty = mem.faulty();
    faulty.fail_next(Op::Create, 2, ProviderError::retryable("503"));
    let h = start(faulty.clone(), fast_config()).await;
    let id = create_one(&h.fleet).await;
    let rec = wait_status(&h.fleet, id, InstanceStatus::Starting).await;
    assert_eq!(rec.provision_attempts, 3);
    assert_eq!(mem.machine_count(), 1);
    let keys: Vec<_> = mem
        .requests()
        .into_iter()
        .map(|r| r.idempotency_key)
        .collect();
    assert!(keys.iter().all(|k| *k == rec.idempotency_key), "{keys:?}");
}

#[tokio::test]
async fn a_client_retry_with_its_key_is_answered_even_while_the_catalog_is_down() {
    let mem = memory_provider();
    let faulty = mem.faulty();
    let h = start(faulty.clone(), fast_config()).await;
    let project = gpufleet_domain::ProjectId::default_project();
    let once = |count: u32, key: &str| {
        h.fleet
            .create_instances_once(project.clone(), req(count), key.to_string())
    };
    let first = once(2, "client-key-1").await.unwrap();
    assert!(!first.replayed);
    let ids: Vec<_> = first.instances.iter().map(|r| r.id).collect();

    // The provider's catalog goes away: a new create cannot be checked, but
    // the retry of a recorded one is answered from its key.
    faulty.fail_next(
        Op::Catalog,
        1_000_000,
        ProviderError::retryable("catalog down"),
    );
    let again = once(2, "client-key-1").await.unwrap();
    assert!(again.replayed);
    assert_eq!(
        again.instances.iter().map(|r| r.id).collect::<Vec<_>>(),
        ids
    );
    assert!(matches!(
        once(1, "client-key-1").await,
        Err(ControlError::IdempotencyKeyReused { .. })
    ));
    assert!(matches!(
        once(2, "client-key-2").await,
        Err(ControlError::ProviderUnavailable { .. })
    ));
    faulty.clear();
    let listed = h
        .fleet
        .list_instances(&gpufleet_store::InstanceFilter::default())
        .await
        .unwrap();
    assert_eq!(listed.len(), 2, "only the first request made instances");
}

#[tokio::test]
async fn create_that_succeeded_but_reported_failure_is_not_duplicated() {
    let mem = memory_provider();
    let faulty = mem.faulty();
    faulty.create_succeeds_but_errors(1);
    let h = start(faulty.clone(), fast_config()).await;
    let id = create_one(&h.fleet).await;
    wait_status(&h.fleet, id, InstanceStatus::Starting).await;
    assert_eq!(
        mem.machine_count(),
        1,
        "exactly one machine despite the error"
    );
    assert!(faulty.calls(Op::Create) >= 2);
}

#[tokio::test]
async fn out_of_capacity_and_exhausted_retries_fail_with_reasons() {
    let mem = memory_provider();
    let faulty = mem.faulty();
    faulty.fail_next(
        Op::Create,
        1,
        ProviderError::OutOfCapacity {
            message: "no L4 left".into(),
        },
    );
    let h = start(faulty.clone(), fast_config()).await;
    let a = create_one(&h.fleet).await;
    let rec = wait_status(&h.fleet, a, InstanceStatus::Failed).await;
    assert_eq!(rec.status_reason, Some(FailureReason::OutOfCapacity));

    faulty.fail_next(Op::Create, 100, ProviderError::retryable("timeout"));
    let b = create_one(&h.fleet).await;
    let rec = wait_status(&h.fleet, b, InstanceStatus::Failed).await;
    assert_eq!(rec.status_reason, Some(FailureReason::ProvisionFailed));
    assert_eq!(
        rec.provision_attempts,
        h.fleet.config().provision_max_attempts as i32
    );
    let failed_calls = h
        .fleet
        .instance_events(b, None, 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| {
            e.event.action == "provider.create"
                && e.event.error_code.as_deref() == Some("retryable")
        })
        .count();
    assert_eq!(
        failed_calls,
        h.fleet.config().provision_max_attempts as usize
    );
    assert_eq!(mem.machine_count(), 0);
}

#[tokio::test]
async fn terminate_during_a_slow_create_leaks_nothing() {
    let mem = memory_provider();
    let faulty = mem.faulty();
    faulty.delay(Op::Create, Duration::from_millis(400));
    let h = start(faulty.clone(), fast_config()).await;
    let id = create_one(&h.fleet).await;
    eventually(5, "create call in flight", || async {
        (faulty.calls(Op::Create) > 0).then_some(())
    })
    .await;
    let rec = h.fleet.terminate_instance(id).await.unwrap();
    assert_eq!(rec.status, InstanceStatus::Terminating);
    let rec = wait_status(&h.fleet, id, InstanceStatus::Terminated).await;
    assert!(rec.terminated_at.is_some());
    assert_eq!(
        mem.machine_count(),
        0,
        "the machine created meanwhile was deleted"
    );
    // Idempotent.
    assert_eq!(
        h.fleet.terminate_instance(id).await.unwrap().status,
        InstanceStatus::Terminated
    );
    let archived = h.fleet.archive_instance(id).await.unwrap();
    assert_eq!(archived.status, InstanceStatus::Archived);
}

#[tokio::test]
async fn archive_refuses_live_instances() {
    let mem = memory_provider();
    let h = start(mem.clone(), fast_config()).await;
    let id = create_one(&h.fleet).await;
    wait_status(&h.fleet, id, InstanceStatus::Starting).await;
    assert!(matches!(
        h.fleet.archive_instance(id).await,
        Err(ControlError::Conflict { .. })
    ));
    assert_eq!(
        h.fleet.get_instance(id).await.unwrap().status,
        InstanceStatus::Starting
    );
}

#[tokio::test]
async fn startup_timeout_then_late_heartbeat_recovers() {
    let mem = memory_provider();
    let mut cfg = fast_config();
    cfg.startup_timeout_secs = 1;
    let h = start(mem.clone(), cfg).await;
    let id = create_one(&h.fleet).await;
    let rec = wait_status(&h.fleet, id, InstanceStatus::Failed).await;
    assert_eq!(rec.status_reason, Some(FailureReason::StartupTimeout));
    assert_eq!(
        mem.machine_count(),
        1,
        "not cleaned up before the grace period"
    );

    let secret = mem.request_for(id).unwrap().bootstrap.bootstrap_secret;
    let reg = h
        .agents
        .register_agent(RegisterRequest {
            instance_id: id,
            bootstrap_secret: secret.clone(),
            agent_version: "t".into(),
            hostname: "h".into(),
        })
        .await
        .unwrap();
    let who = h.agents.authenticate_agent(&reg.token).await.unwrap();
    assert_eq!(who, id);
    let ack = h
        .agents
        .ingest_heartbeat(id, heartbeat(id, 10))
        .await
        .unwrap();
    // The secret is spent once the agent has sent a heartbeat.
    let again = h
        .agents
        .register_agent(RegisterRequest {
            instance_id: id,
            bootstrap_secret: secret,
            agent_version: "t".into(),
            hostname: "h".into(),
        })
        .await;
    assert!(matches!(again, Err(ControlError::Unauthorized { .. })));
    assert!(ack.applied);
    let rec = h.fleet.get_instance(id).await.unwrap();
    assert_eq!(rec.status, InstanceStatus::Starting);
    assert_eq!(rec.status_reason, None);
    assert!(rec.startup_deadline_at > Utc::now());
    // A stale heartbeat is ignored.
    let ack = h
        .agents
        .ingest_heartbeat(id, heartbeat(id, 9))
        .await
        .unwrap();
    assert!(!ack.applied);
    assert_eq!(
        h.fleet.get_instance(id).await.unwrap().last_heartbeat_seq,
        Some(10)
    );
}

#[tokio::test]
async fn an_agent_token_only_works_for_its_own_instance() {
    let mem = memory_provider();
    let h = start(mem.clone(), fast_config()).await;
    let a = create_one(&h.fleet).await;
    let b = create_one(&h.fleet).await;
    eventually(5, "create requests", || async {
        (mem.request_for(a).is_some() && mem.request_for(b).is_some()).then_some(())
    })
    .await;
    let secret = mem.request_for(a).unwrap().bootstrap.bootstrap_secret;
    let reg = h
        .agents
        .register_agent(RegisterRequest {
            instance_id: a,
            bootstrap_secret: secret,
            agent_version: "t".into(),
            hostname: "h".into(),
        })
        .await
        .unwrap();
    let who = h.agents.authenticate_agent(&reg.token).await.unwrap();
    let r = h.agents.ingest_heartbeat(who, heartbeat(b, 1)).await;
    assert!(matches!(r, Err(ControlError::Forbidden { .. })));
    assert_eq!(
        h.fleet.get_instance(b).await.unwrap().last_heartbeat_seq,
        None
    );
    // A bootstrap secret of one instance does not register another.
    let secret_a = mem.request_for(a).unwrap().bootstrap.bootstrap_secret;
    let r = h
        .agents
        .register_agent(RegisterRequest {
            instance_id: b,
            bootstrap_secret: secret_a,
            agent_version: "t".into(),
            hostname: "h".into(),
        })
        .await;
    assert!(matches!(r, Err(ControlError::Unauthorized { .. })));
}

#[tokio::test]
async fn failed_instances_are_cleaned_up_after_the_grace_period() {
    let mem = memory_provider();
    let mut cfg = fast_config();
    cfg.startup_timeout_secs = 1;
    cfg.failed_cleanup_grace_secs = 0;
    let h = start(mem.clone(), cfg).await;
    let id = create_one(&h.fleet).await;
    let rec = eventually(10, "cleanup", || async {
        let r = h.fleet.get_instance(id).await.unwrap();
        r.cleaned_up_at.is_some().then_some(r)
    })
    .await;
    assert_eq!(rec.status, InstanceStatus::Failed);
    assert!(rec.cleanup_started_at.is_some());
    assert_eq!(mem.machine_count(), 0);
    assert_eq!(
        h.fleet.archive_instance(id).await.unwrap().status,
        InstanceStatus::Archived
    );
}

#[tokio::test]
async fn orphaned_machines_tagged_with_our_cluster_are_reaped() {
    let mem = memory_provider();
    let h = start(mem.clone(), fast_config()).await;
    let mut ours = BTreeMap::new();
    ours.insert(tags::CLUSTER.to_string(), h.fleet.cluster_id().to_string());
    ours.insert(tags::INSTANCE.to_string(), InstanceId::new().to_string());
    let orphan = mem.insert_foreign(ours);
    let mut theirs = BTreeMap::new();
    theirs.insert(tags::CLUSTER.to_string(), "someone-else".to_string());
    let foreign = mem.insert_foreign(theirs);
    eventually(10, "orphan reaped", || async {
        (!mem.has_machine(&orphan)).then_some(())
    })
    .await;
    assert!(
        mem.has_machine(&foreign),
        "machines of other clusters are left alone"
    );
}

#[tokio::test]
async fn machine_vanishing_while_booting_fails_the_instance() {
    let mem = memory_provider();
    let faulty = mem.faulty();
    faulty.fail_next(
        Op::Get,
        1000,
        ProviderError::NotFound {
            id: gpufleet_domain::ProviderInstanceId::new("x"),
        },
    );
    let h = start(faulty.clone(), fast_config()).await;
    let id = create_one(&h.fleet).await;
    let rec = wait_status(&h.fleet, id, InstanceStatus::Failed).await;
    assert_eq!(rec.status_reason, Some(FailureReason::ProviderDeleted));
}

#[tokio::test]
async fn bad_create_requests_change_nothing() {
    let mem = memory_provider();
    let h = start(mem.clone(), fast_config()).await;
    let cases: Vec<(CreateInstances, &str)> = vec![
        (
            CreateInstances {
                provider: "nope".parse().unwrap(),
                ..req(1)
            },
            "provider",
        ),
        (
            CreateInstances {
                instance_type: "huge".into(),
                ..req(1)
            },
            "instance_type",
        ),
        (
            CreateInstances {
                zone: Some("mars-1".into()),
                ..req(1)
            },
            "zone",
        ),
        (
            CreateInstances {
                model: "unknown/model".parse().unwrap(),
                ..req(1)
            },
            "model",
        ),
        (
            CreateInstances {
                model: "meta-llama/Llama-3.3-70B-Instruct".parse().unwrap(),
                ..req(1)
            },
            "model",
        ),
        (req(0), "count"),
        (req(10_000), "count"),
    ];
    for (r, field) in cases {
        match h.fleet.create_instances(r).await {
            Err(ControlError::InvalidInput { field: f, message }) => {
                assert_eq!(f, field, "{message}");
                assert!(!message.is_empty());
            }
            other => panic!("expected invalid {field}, got {other:?}"),
        }
    }
    let all = h.fleet.list_instances(&Default::default()).await.unwrap();
    assert!(all.is_empty());
}
