//! The fault-injecting wrapper (`providers::fault`) around the shared
//! in-memory provider (`gpufleet_test_support`): each rule fires exactly as
//! documented and never reaches the provider underneath when it fails a call.

use gpufleet_domain::{GpuSpec, InstanceId, ModelName, ProviderInstanceId};
use gpufleet_proto::{AgentBootstrap, EngineSpec};
use gpufleet_providers::fault::{FaultyProvider, Op};
use gpufleet_providers::{Catalog, CreateRequest, Provider, ProviderError};
use gpufleet_test_support::provider::{FakeProvider, Ips};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

fn request(key: &str) -> CreateRequest {
    let instance_id = InstanceId::new();
    CreateRequest {
        instance_id,
        idempotency_key: key.to_string(),
        zone: "z".to_string(),
        instance_type: "t".to_string(),
        tags: BTreeMap::new(),
        bootstrap: AgentBootstrap {
            instance_id,
            control_plane_url: "http://127.0.0.1:1".to_string(),
            bootstrap_secret: "s".to_string(),
            model: "m".parse::<ModelName>().expect("model"),
            agent_port: 7070,
            engine: EngineSpec::Sim {
                port: 8000,
                model_load_delay_ms: 0,
            },
            gpu: GpuSpec {
                model: "g".to_string(),
                count: 1,
                vram_mib: 1,
                power_limit_w: 1.0,
            },
            control_plane_ca_pem: None,
            engine_args: vec![],
        },
        model_size_mib: 0,
        first_attempt: false,
    }
}

fn retryable(msg: &str) -> ProviderError {
    ProviderError::retryable(msg)
}

/// An in-memory provider with an empty catalog and no IPs, and the wrapper.
fn setup() -> (Arc<FakeProvider>, FaultyProvider) {
    let catalog = Catalog {
        zones: vec![],
        instance_types: vec![],
    };
    let memory = Arc::new(FakeProvider::new("memory", catalog).with_ips(Ips::None));
    let faulty = FaultyProvider::new(memory.clone());
    (memory, faulty)
}

#[tokio::test]
async fn without_rules_it_passes_through_and_counts() {
    let (_, p) = setup();
    assert_eq!(p.name().as_str(), "memory");
    let m = p.create(&request("a")).await.expect("create");
    assert_eq!(p.get(&m.id).await.expect("get"), m);
    assert_eq!(p.list(&BTreeMap::new()).await.expect("list").len(), 1);
    p.catalog().await.expect("catalog");
    p.terminate(&m.id).await.expect("terminate");
    for op in Op::ALL {
        assert_eq!(p.calls(op), 1, "{op}");
    }
}

#[tokio::test]
async fn fail_nth_fails_exactly_that_call_without_reaching_the_provider() {
    let (memory, p) = setup();
    p.fail_nth(
        Op::Create,
        2,
        ProviderError::OutOfCapacity {
            message: "none".into(),
        },
    );
    p.create(&request("a")).await.expect("first");
    let err = p.create(&request("b")).await.expect_err("second fails");
    assert_eq!(err.code(), "out_of_capacity");
    p.create(&request("c")).await.expect("third");
    assert_eq!(p.calls(Op::Create), 3);
    assert_eq!(memory.created(), 2);
    // A call number already passed never fires.
    p.fail_nth(Op::Create, 1, retryable("late"));
    p.create(&request("d")).await.expect("fourth");
}

#[tokio::test]
async fn fail_next_fails_count_calls_then_recovers() {
    let (_, p) = setup();
    p.fail_next(Op::Get, 2, retryable("503"));
    let id = ProviderInstanceId::new("nope");
    assert_eq!(p.get(&id).await, Err(retryable("503")));
    assert_eq!(p.get(&id).await, Err(retryable("503")));
    assert_eq!(
        p.get(&id).await,
        Err(ProviderError::NotFound { id: id.clone() })
    );
    assert_eq!(p.calls(Op::Get), 3);
    // Other ops are unaffected.
    p.fail_next(Op::List, 1, retryable("x"));
    p.catalog().await.expect("catalog unaffected");
    assert!(p.list(&BTreeMap::new()).await.is_err());
    assert!(p.list(&BTreeMap::new()).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn delay_slows_every_call_of_the_op() {
    let (_, p) = setup();
    p.delay(Op::Catalog, Duration::from_secs(30));
    let start = tokio::time::Instant::now();
    p.catalog().await.expect("catalog");
    assert!(start.elapsed() >= Duration::from_secs(30));
    let start = tokio::time::Instant::now();
    p.list(&BTreeMap::new()).await.expect("list");
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "other ops are not delayed"
    );
    p.delay(Op::Catalog, Duration::ZERO);
    let start = tokio::time::Instant::now();
    p.catalog().await.expect("catalog");
    assert!(start.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn create_succeeds_but_errors_leaves_the_machine_behind() {
    let (memory, p) = setup();
    p.create_succeeds_but_errors(1);
    let err = p
        .create(&request("k"))
        .await
        .expect_err("reported as failed");
    assert!(err.is_retryable());
    assert_eq!(memory.created(), 1, "the machine exists");
    // The retry with the same key finds it; nothing is created twice.
    let m = p.create(&request("k")).await.expect("retry");
    assert_eq!(memory.created(), 1);
    assert_eq!(p.list(&BTreeMap::new()).await.expect("list"), vec![m]);
}

#[tokio::test]
async fn vanish_deletes_underneath_and_the_machine_stays_gone() {
    let (memory, p) = setup();
    let keep = p.create(&request("keep")).await.expect("create");
    let gone = p.create(&request("gone")).await.expect("create");
    p.vanish(&gone.id).await.expect("vanish");
    assert!(memory.get(&gone.id).await.is_err(), "terminated underneath");
    assert_eq!(
        p.get(&gone.id).await,
        Err(ProviderError::NotFound {
            id: gone.id.clone()
        })
    );
    assert_eq!(p.list(&BTreeMap::new()).await.expect("list"), vec![keep]);
    p.terminate(&gone.id)
        .await
        .expect("terminate of a vanished machine is a no-op");
    assert_eq!(
        p.calls(Op::Terminate),
        1,
        "vanish itself is not a counted call"
    );
}

#[tokio::test]
async fn clear_removes_rules() {
    let (_, p) = setup();
    p.fail_next(Op::Catalog, 5, retryable("x"));
    p.fail_nth(Op::Catalog, 2, retryable("y"));
    p.create_succeeds_but_errors(3);
    p.clear();
    p.catalog().await.expect("catalog");
    p.catalog().await.expect("catalog");
    p.create(&request("a")).await.expect("create");
}
