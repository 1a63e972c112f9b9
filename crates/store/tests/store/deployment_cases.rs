//! Deployments: insert, read, compare-and-swap, the live-name rule, their
//! timeline, and the instances that carry their id.

use crate::harness::Ctx;
use chrono::{DateTime, Utc};
use gpufleet_domain::{
    DeploymentAction, DeploymentId, DeploymentSpec, DeploymentState, InstanceId,
};
use gpufleet_store::{NewDeployment, NewDeploymentEvent, NewInstance, Outcome, StoreError};

fn t(offset_ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(1_750_000_000_000 + offset_ms).unwrap()
}

fn spec() -> DeploymentSpec {
    serde_json::from_value(serde_json::json!({
        "placements": [
            {"provider": "mock", "zone": "local-1", "instance_type": "L4-1-24G"},
            {"provider": "mock", "zone": "local-2", "instance_type": "L4-1-24G"}
        ],
        "replicas": {"min": 1, "max": 4},
        "autoscaling": {"metric": "queue_length", "target_per_replica": 4, "scale_down_delay": "30s"}
    }))
    .unwrap()
}

fn new_deployment(name: &str, at: i64) -> NewDeployment {
    NewDeployment {
        id: DeploymentId::new(),
        name: name.to_string(),
        model: "Qwen/Qwen2.5-0.5B".parse().unwrap(),
        spec: spec(),
        desired_replicas: 1,
        created_at: t(at),
        project_id: gpufleet_domain::ProjectId::default_project(),
    }
}

fn event(id: DeploymentId, at: i64, action: DeploymentAction) -> NewDeploymentEvent {
    NewDeploymentEvent {
        deployment_id: id,
        at: t(at),
        action,
        outcome: Outcome::Success,
        message: format!("{action} because"),
        metadata: serde_json::json!({ "n": at }),
    }
}

pub async fn deployments_insert_get_list_and_live_names(ctx: Ctx) {
    let s = ctx.store;
    let a = new_deployment("qwen", 0);
    let rec = s
        .insert_deployment(&a, &[event(a.id, 0, DeploymentAction::Created)])
        .await
        .unwrap();
    assert_eq!(rec.id, a.id);
    assert_eq!(rec.spec, spec());
    assert_eq!(rec.state, DeploymentState::Active);
    assert_eq!(rec.generation, 1);
    assert_eq!(rec.desired_replicas, 1);
    assert_eq!(rec.created_at, t(0));
    assert_eq!(s.get_deployment(a.id).await.unwrap(), Some(rec.clone()));
    assert_eq!(s.get_deployment(DeploymentId::new()).await.unwrap(), None);

    // The name is taken while the deployment is not deleted.
    let dup = new_deployment("qwen", 1);
    match s.insert_deployment(&dup, &[]).await {
        Err(StoreError::NameTaken { name }) => assert_eq!(name, "qwen"),
        other => panic!("expected NameTaken, got {other:?}"),
    }
    assert_eq!(s.get_deployment(dup.id).await.unwrap(), None);

    // Renaming another one onto it is refused too.
    let b = new_deployment("llama", 2);
    let b = s.insert_deployment(&b, &[]).await.unwrap();
    let mut renamed = b.clone();
    renamed.name = "qwen".into();
    assert!(matches!(
        s.update_deployment(&renamed, &[], None).await,
        Err(StoreError::NameTaken { .. })
    ));

    // Once deleted, the name is free again; lists leave deleted ones out.
    let mut gone = rec.clone();
    gone.state = DeploymentState::Deleted;
    gone.deleted_at = Some(t(10));
    s.update_deployment(&gone, &[], None).await.unwrap();
    let again = new_deployment("qwen", 20);
    s.insert_deployment(&again, &[]).await.unwrap();
    let live: Vec<_> = s
        .list_deployments(false)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(live, vec![b.id, again.id]);
    assert_eq!(s.list_deployments(true).await.unwrap().len(), 3);
}

pub async fn deployment_updates_are_compare_and_swap(ctx: Ctx) {
    let s = ctx.store;
    let n = new_deployment("cas", 0);
    let rec = s.insert_deployment(&n, &[]).await.unwrap();

    let mut next = rec.clone();
    next.desired_replicas = 3;
    next.status.ready = 2;
    next.status.summary = "2 of 3 ready".into();
    next.spec.replicas.max = 8;
    next.updated_at = t(5);
    let stored = s
        .update_deployment(&next, &[event(n.id, 5, DeploymentAction::ScaleUp)], None)
        .await
        .unwrap();
    assert_eq!(stored.generation, 2);
    assert_eq!(stored.desired_replicas, 3);
    assert_eq!(stored.status.summary, "2 of 3 ready");
    assert_eq!(stored.spec.replicas.max, 8);
    assert_eq!(stored.updated_at, t(5));
    assert_eq!(stored.created_at, t(0));

    // A write from the old generation loses and writes nothing.
    let mut stale = rec.clone();
    stale.desired_replicas = 1;
    match s
        .update_deployment(&stale, &[event(n.id, 6, DeploymentAction::ScaleDown)], None)
        .await
    {
        Err(StoreError::DeploymentConflict { id, expected }) => {
            assert_eq!((id, expected), (n.id, 1));
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    let now = s.get_deployment(n.id).await.unwrap().unwrap();
    assert_eq!((now.generation, now.desired_replicas), (2, 3));
    let events = s.list_deployment_events(n.id, None, 100).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event.action, DeploymentAction::ScaleUp);

    let mut missing = rec;
    missing.id = DeploymentId::new();
    assert!(matches!(
        s.update_deployment(&missing, &[], None).await,
        Err(StoreError::DeploymentNotFound { .. })
    ));
}

pub async fn deployment_timeline_appends_and_pages(ctx: Ctx) {
    let s = ctx.store;
    let n = new_deployment("timeline", 0);
    s.insert_deployment(&n, &[event(n.id, 0, DeploymentAction::Created)])
        .await
        .unwrap();
    let other = new_deployment("other", 0);
    s.insert_deployment(&other, &[event(other.id, 0, DeploymentAction::Created)])
        .await
        .unwrap();
    s.append_deployment_events(&[
        event(n.id, 1, DeploymentAction::ScaleUp),
        event(n.id, 2, DeploymentAction::Fallback),
        event(n.id, 3, DeploymentAction::Replace),
    ])
    .await
    .unwrap();
    let all = s.list_deployment_events(n.id, None, 100).await.unwrap();
    let actions: Vec<_> = all.iter().map(|e| e.event.action).collect();
    assert_eq!(
        actions,
        vec![
            DeploymentAction::Created,
            DeploymentAction::ScaleUp,
            DeploymentAction::Fallback,
            DeploymentAction::Replace
        ]
    );
    assert_eq!(all[2].event.metadata, serde_json::json!({ "n": 2 }));
    assert_eq!(all[2].event.message, "fallback because");
    let page = s
        .list_deployment_events(n.id, Some(all[1].id), 1)
        .await
        .unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].id, all[2].id);
    assert!(s
        .list_deployment_events(n.id, None, -1)
        .await
        .unwrap()
        .is_empty());
}

pub async fn instances_carry_their_deployment(ctx: Ctx) {
    let s = ctx.store;
    let d = new_deployment("owner", 0);
    s.insert_deployment(&d, &[]).await.unwrap();
    let mk = |dep: Option<DeploymentId>, at: i64| {
        let id = InstanceId::new();
        NewInstance {
            id,
            provider: "mock".parse().unwrap(),
            zone: "local-1".into(),
            instance_type: "L4-1-24G".into(),
            model: "Qwen/Qwen2.5-0.5B".parse().unwrap(),
            idempotency_key: format!("k-{id}"),
            bootstrap_secret_hash: format!("h-{id}"),
            startup_deadline_at: t(at + 600_000),
            created_at: t(at),
            deployment_id: dep,
            engine_args: dep.map(|_| vec!["--max-model-len".to_string(), "4096".to_string()]),
            project_id: gpufleet_domain::ProjectId::default_project(),
            price_per_hour: None,
        }
    };
    let recs = s
        .insert_instances(&[mk(Some(d.id), 1), mk(None, 2), mk(Some(d.id), 3)])
        .await
        .unwrap();
    assert_eq!(recs[0].deployment_id, Some(d.id));
    assert_eq!(
        recs[0].engine_args.as_deref(),
        Some(&["--max-model-len".to_string(), "4096".to_string()][..]),
        "engine args are kept"
    );
    assert_eq!(recs[1].engine_args, None);
    assert_eq!(recs[1].deployment_id, None);
    assert_eq!(
        s.get_instance(recs[2].id)
            .await
            .unwrap()
            .unwrap()
            .deployment_id,
        Some(d.id)
    );
    let mine: Vec<_> = s
        .list_deployment_instances(d.id)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(mine, vec![recs[0].id, recs[2].id]);
    // A lifecycle write keeps it.
    let mut next = recs[0].clone();
    next.status_message = Some("x".into());
    let after = s.update_instance(&next, &[]).await.unwrap();
    assert_eq!(after.deployment_id, Some(d.id));
}

pub async fn model_demand_moves_forward_only_and_survives_updates(ctx: Ctx) {
    let s = ctx.store;
    let a = new_deployment("demand", 0);
    let model = a.model.to_string();
    assert!(!s.model_has_deployment(&model).await.unwrap());
    let rec = s.insert_deployment(&a, &[]).await.unwrap();
    assert_eq!(rec.demand_at, None);
    assert!(s.model_has_deployment(&model).await.unwrap());
    assert!(!s.model_has_deployment("other/model").await.unwrap());
    assert_eq!(s.note_model_demand(&model, t(5_000)).await.unwrap(), 1);
    assert_eq!(
        s.note_model_demand(&model, t(1_000)).await.unwrap(),
        0,
        "never back"
    );
    let rec = s.get_deployment(a.id).await.unwrap().unwrap();
    assert_eq!(rec.demand_at, Some(t(5_000)));
    assert_eq!(rec.generation, 1, "no generation bump");
    // A compare-and-swap write of the keeper keeps it.
    let mut next = rec.clone();
    next.desired_replicas = 3;
    next.demand_at = None;
    s.update_deployment(&next, &[], None).await.unwrap();
    let rec = s.get_deployment(a.id).await.unwrap().unwrap();
    assert_eq!((rec.desired_replicas, rec.demand_at), (3, Some(t(5_000))));
}
