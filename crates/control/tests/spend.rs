//! Spend: billable intervals stamped by the write path as instances live
//! and die, and reports over hand-set intervals and usage against
//! hand-computed figures.

mod common;

use chrono::{DateTime, Duration, TimeZone, Utc};
use common::*;
use gpufleet_control::{ControlError, ControlPlane, CreateInstances, Spend};
use gpufleet_domain::spend::{GroupBy, SpendStep};
use gpufleet_domain::{FailureReason, InstanceId, InstanceStatus, ModelName, ProjectId};
use gpufleet_providers::fault::Op;
use gpufleet_providers::{ProviderError, ProviderRegistry};
use gpufleet_store::{HourlyUsage, NewInstance, Store};

fn req() -> CreateInstances {
    CreateInstances {
        provider: "mem".parse().unwrap(),
        zone: None,
        instance_type: "mem-1".into(),
        model: "gpufleet/sim-small".parse().unwrap(),
        count: 1,
    }
}

#[tokio::test]
async fn billing_starts_with_the_machine_and_ends_when_the_provider_says_it_is_gone() {
    let mem = memory_provider();
    let h = start(mem.clone(), fast_config()).await;
    let id = h.fleet.create_instances(req()).await.unwrap()[0].id;
    let created = h.fleet.get_instance(id).await.unwrap();
    assert_eq!(created.price_per_hour, Some(0.75), "the catalog's price");
    assert_eq!(created.billing_started_at, None, "no machine yet");

    let rec = wait_status(&h.fleet, id, InstanceStatus::Starting).await;
    let started = rec
        .billing_started_at
        .expect("billable once the machine exists");
    assert!(rec.provider_instance_id.is_some());
    assert!(started >= created.created_at);
    assert_eq!(rec.billing_ended_at, None);

    h.fleet.terminate_instance(id).await.unwrap();
    let rec = wait_status(&h.fleet, id, InstanceStatus::Terminated).await;
    assert_eq!(rec.billing_started_at, Some(started), "never moved");
    assert_eq!(rec.billing_ended_at, rec.terminated_at);

    let archived = h.fleet.archive_instance(id).await.unwrap();
    assert_eq!(archived.billing_started_at, Some(started));
    assert_eq!(archived.billing_ended_at, rec.billing_ended_at);

    // Its cost so far is the interval × 0.75 / h.
    let now = Utc::now();
    let ms = (rec.billing_ended_at.unwrap() - started).num_milliseconds() as f64;
    let cost = gpufleet_control::spend::instance_cost(&archived, now).unwrap();
    assert!((cost - ms * 0.75 / 3.6e6).abs() < 1e-12);
}

#[tokio::test]
async fn a_machine_made_during_a_terminate_is_billed_until_it_is_deleted() {
    let mem = memory_provider();
    let faulty = mem.faulty();
    faulty.delay(Op::Create, std::time::Duration::from_millis(400));
    let h = start(faulty.clone(), fast_config()).await;
    let id = h.fleet.create_instances(req()).await.unwrap()[0].id;
    eventually(5, "create call in flight", || async {
        (faulty.calls(Op::Create) > 0).then_some(())
    })
    .await;
    h.fleet.terminate_instance(id).await.unwrap();
    let rec = wait_status(&h.fleet, id, InstanceStatus::Terminated).await;
    let (start, end) = (rec.billing_started_at, rec.billing_ended_at);
    assert!(start.is_some(), "the machine was made: {rec:?}");
    assert!(end.is_some() && end >= start);
}

#[tokio::test]
async fn billing_ends_when_cleanup_finishes_or_the_machine_vanishes() {
    // Failed (startup timeout), then cleaned up.
    let mem = memory_provider();
    let mut cfg = fast_config();
    cfg.startup_timeout_secs = 1;
    cfg.failed_cleanup_grace_secs = 0;
    let h = start(mem.clone(), cfg).await;
    let id = h.fleet.create_instances(req()).await.unwrap()[0].id;
    let rec = eventually(10, "cleanup", || async {
        let r = h.fleet.get_instance(id).await.unwrap();
        r.cleaned_up_at.is_some().then_some(r)
    })
    .await;
    assert!(rec.billing_started_at.is_some());
    assert_eq!(rec.billing_ended_at, rec.cleaned_up_at);
    drop(h);

    // The provider says the machine is gone while it boots.
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
    let id = h.fleet.create_instances(req()).await.unwrap()[0].id;
    let rec = wait_status(&h.fleet, id, InstanceStatus::Failed).await;
    assert_eq!(rec.status_reason, Some(FailureReason::ProviderDeleted));
    assert!(rec.billing_started_at.is_some());
    assert!(rec.billing_ended_at.is_some(), "no cleanup needed: {rec:?}");
    assert!(rec.cleaned_up_at.is_none());
}

// ---- reports over hand-set intervals ----

/// 2025-01-31T00:00:00Z + h hours + m minutes.
fn at(h: i64, m: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 1, 31, 0, 0, 0).unwrap() + Duration::hours(h) + Duration::minutes(m)
}

async fn billed(
    store: &Store,
    project: &str,
    model: &str,
    price: Option<f64>,
    start: DateTime<Utc>,
    end: Option<DateTime<Utc>>,
) -> InstanceId {
    let id = InstanceId::new();
    // The project must exist (PostgreSQL checks the foreign key).
    store
        .insert_project(&project.parse().unwrap(), start)
        .await
        .unwrap();
    let new = NewInstance {
        id,
        provider: "mem".parse().unwrap(),
        zone: "z1".into(),
        instance_type: "mem-1".into(),
        model: model.parse().unwrap(),
        idempotency_key: format!("k-{id}"),
        bootstrap_secret_hash: "0".repeat(64),
        startup_deadline_at: start + Duration::hours(1),
        created_at: start - Duration::minutes(1),
        deployment_id: None,
        engine_args: None,
        project_id: project.parse().unwrap(),
        price_per_hour: price,
    };
    let mut rec = store.insert_instances(&[new]).await.unwrap().remove(0);
    rec.billing_started_at = Some(start);
    rec.billing_ended_at = end;
    store.update_instance(&rec, &[]).await.unwrap();
    id
}

fn usage(
    hour: DateTime<Utc>,
    instance: InstanceId,
    project: &str,
    model: &str,
    prompt: u64,
    completion: u64,
) -> HourlyUsage {
    HourlyUsage {
        hour,
        key_id: None,
        instance_id: instance,
        project_id: project.parse().unwrap(),
        model: model.parse().unwrap(),
        deployment_id: None,
        requests: 1,
        errors: 0,
        prompt_tokens: prompt,
        completion_tokens: completion,
        cost: 0.0,
    }
}

fn close(a: f64, b: f64, what: &str) {
    assert!((a - b).abs() < 1e-9, "{what}: {a} != {b}");
}

const SMALL: &str = "gpufleet/sim-small";
const BIG: &str = "gpufleet/sim-big";

/// A control plane over a fresh database, its reconcilers not started
/// (nothing touches the hand-made rows).
async fn unstarted() -> (TestDb, ControlPlane) {
    let db = TestDb::fresh().await;
    let store = Store::connect(db.url()).await.unwrap();
    let mut reg = ProviderRegistry::new();
    reg.register(memory_provider());
    let control = ControlPlane::build(store, reg, fast_config())
        .await
        .unwrap();
    (db, control)
}

#[tokio::test]
async fn reports_equal_hand_computed_figures() {
    let (_db, control) = unstarted().await;
    let store = control.store.clone();
    // A: default, small, 2.40/h, 10:20–11:05 (45 min) = 1.80: 1.60 in the
    //    10:00 bucket, 0.20 in 11:00.
    let a = billed(
        &store,
        "default",
        SMALL,
        Some(2.4),
        at(10, 20),
        Some(at(11, 5)),
    )
    .await;
    // B: research, big, 6.00/h, from 09:00, still running at "now" 12:30:
    //    10:00–12:30 in range = 15.00 (6, 6, 3).
    let b = billed(&store, "research", BIG, Some(6.0), at(9, 0), None).await;
    // C: research, big, no price (an old row), 10:00–10:30: 0, 0.5 h.
    billed(&store, "research", BIG, None, at(10, 0), Some(at(10, 30))).await;
    // D: over before the range.
    billed(
        &store,
        "default",
        SMALL,
        Some(100.0),
        at(8, 0),
        Some(at(9, 30)),
    )
    .await;
    store
        .add_hourly_usage(&[
            usage(at(9, 0), b, "research", BIG, 999, 999), // before the range
            usage(at(10, 0), a, "default", SMALL, 300_000, 100_000),
            usage(at(11, 0), a, "default", SMALL, 100_000, 100_000),
            usage(at(12, 0), b, "research", BIG, 1_000_000, 1_000_000),
            usage(at(13, 0), b, "research", BIG, 5, 5), // after the range
        ])
        .await
        .unwrap();
    let spend = &control.spend;
    let (from, to, now) = (at(10, 0), at(13, 0), at(12, 30));

    let r = spend
        .report(from, to, GroupBy::Project, Some(SpendStep::Hour), None, now)
        .await
        .unwrap();
    assert_eq!(r.timestamps, vec![at(10, 0), at(11, 0), at(12, 0)]);
    close(r.total.cost, 16.8, "total cost");
    close(r.total.instance_hours, 3.75, "instance hours");
    close(r.total.gpu_hours, 3.75, "gpu hours (1 GPU per mem-1)");
    assert_eq!(r.total.prompt_tokens, 1_400_000);
    assert_eq!(r.total.completion_tokens, 1_200_000);
    close(
        r.total.cost_per_million_tokens().unwrap(),
        16.8 / 2.6,
        "total cpm",
    );
    assert_eq!(r.unpriced_instances, 1);
    assert_eq!(r.gpu_count_unknown_instances, 0);
    let keys: Vec<&str> = r.groups.iter().map(|g| g.key.as_str()).collect();
    assert_eq!(keys, ["research", "default"], "most expensive first");
    let research = &r.groups[0];
    close(research.figures.cost, 15.0, "research");
    close(research.figures.instance_hours, 3.0, "research hours");
    close(
        research.figures.cost_per_million_tokens().unwrap(),
        7.5,
        "research cpm",
    );
    for (got, want) in research.cost_series.iter().zip([6.0, 6.0, 3.0]) {
        close(*got, want, "research series");
    }
    let default = &r.groups[1];
    close(default.figures.cost, 1.8, "default");
    assert_eq!(default.figures.tokens(), 600_000);
    close(
        default.figures.cost_per_million_tokens().unwrap(),
        3.0,
        "default cpm",
    );
    for (got, want) in default.cost_series.iter().zip([1.6, 0.2, 0.0]) {
        close(*got, want, "default series");
    }

    // By model and provider; one daily bucket.
    let r = spend
        .report(from, to, GroupBy::Model, Some(SpendStep::Day), None, now)
        .await
        .unwrap();
    assert_eq!(r.timestamps, vec![at(0, 0)]);
    let by: Vec<(&str, f64)> = r
        .groups
        .iter()
        .map(|g| (g.key.as_str(), g.figures.cost))
        .collect();
    assert_eq!(by.len(), 2);
    assert_eq!(by[0].0, BIG);
    close(by[0].1, 15.0, "big");
    close(r.groups[1].cost_series[0], 1.8, "small's one bucket");
    let r = spend
        .report(from, to, GroupBy::Provider, None, None, now)
        .await
        .unwrap();
    assert_eq!(r.step, SpendStep::Hour);
    assert_eq!(r.groups.len(), 1);
    assert_eq!(r.groups[0].key, "mem");
    assert_eq!(
        r.groups[0].figures.tokens(),
        2_600_000,
        "tokens reach the provider through the instance"
    );
    let r = spend
        .report(from, to, GroupBy::Deployment, None, None, now)
        .await
        .unwrap();
    assert_eq!(r.groups.len(), 1);
    assert_eq!(r.groups[0].key, gpufleet_control::spend::NO_DEPLOYMENT);

    // One project only.
    let research: ProjectId = "research".parse().unwrap();
    let r = spend
        .report(from, to, GroupBy::Model, None, Some(&[research]), now)
        .await
        .unwrap();
    close(r.total.cost, 15.0, "research only");
    assert_eq!(r.total.tokens(), 2_000_000);
    assert_eq!(r.groups.len(), 1);

    // A range cutting A's interval: 10:30–10:50 = 20 min at 2.40 = 0.80.
    let r = spend
        .report(at(10, 30), at(10, 50), GroupBy::Model, None, None, now)
        .await
        .unwrap();
    let small = r.groups.iter().find(|g| g.key == SMALL).unwrap();
    close(small.figures.cost, 0.8, "cut");

    // The model's measured price over the trailing day (from 12:00 the day
    // before): A's 1.80 and D's 1.5 h × 100 = 150, over A's 0.6 M tokens.
    let small: ModelName = SMALL.parse().unwrap();
    let cpm = spend
        .cost_per_million_tokens(&small, Duration::hours(24), now)
        .await
        .unwrap();
    close(cpm.unwrap(), 151.8 / 0.6, "small over 24 h");
    let none = spend
        .cost_per_million_tokens(&"nobody/none".parse().unwrap(), Duration::hours(24), now)
        .await
        .unwrap();
    assert_eq!(none, None);

    // Without a catalog, GPU counts are unknown (and said so).
    let bare = Spend::new(store.clone());
    let r = bare
        .report(from, to, GroupBy::Project, None, None, now)
        .await
        .unwrap();
    assert_eq!(r.gpu_count_unknown_instances, 3);
    assert_eq!(r.total.gpu_hours, 0.0);
    close(r.total.cost, 16.8, "same cost");
}

#[tokio::test]
async fn bad_ranges_name_the_field() {
    let (_db, control) = unstarted().await;
    let now = at(12, 0);
    let cases = [
        (at(10, 0), at(10, 0), None, "to"),
        (at(10, 0), at(9, 0), None, "to"),
        (at(0, 0) - Duration::days(401), at(0, 0), None, "from"),
        (
            at(0, 0) - Duration::days(100),
            at(0, 0),
            Some(SpendStep::Hour),
            "step",
        ),
    ];
    for (from, to, step, field) in cases {
        match control
            .spend
            .report(from, to, GroupBy::Project, step, None, now)
            .await
        {
            Err(ControlError::InvalidInput { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{from}..{to}: expected an error naming {field}, got {other:?}"),
        }
    }
}
