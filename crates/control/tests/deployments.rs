//! Deployments against the in-memory provider, with fake agents that
//! answer readiness probes (with their identity proof) and heartbeat, so
//! replicas reach `ready`, and can be killed.

mod common;

use chrono::Utc;
use common::*;
use gpufleet_control::{ControlError, CreateDeployment, DeploymentPatch, TrafficSource};
use gpufleet_domain::{
    DeploymentAction, DeploymentId, DeploymentSpec, DeploymentState, InstanceId, InstanceStatus,
    ReplicaBounds,
};
use gpufleet_proto::{
    identity, EngineSample, EngineStatus, GpuSource, Heartbeat, Readiness, RegisterRequest,
    SystemSample,
};
use gpufleet_providers::fault::Op;
use gpufleet_providers::{Catalog, ProviderError};
use gpufleet_store::DeploymentRecord;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const MODEL: &str = "gpufleet/sim-small";

/// Two zones; `mem-1` in both, `tiny` (1 GiB) in z1.
fn provider() -> Arc<FakeProvider> {
    use gpufleet_test_support::provider::{l4_type, zone};
    let catalog = Catalog {
        zones: vec![zone("z1", "one"), zone("z2", "two")],
        instance_types: vec![
            l4_type("mem-1", 23_034, 49_152, &["z1", "z2"]),
            l4_type("tiny", 1_024, 4_096, &["z1"]),
        ],
    };
    Arc::new(FakeProvider::new("mem", catalog))
}

fn spec(min: u32, max: u32) -> DeploymentSpec {
    serde_json::from_value(serde_json::json!({
        "placements": [
            {"provider": "mem", "zone": "z1", "instance_type": "mem-1"},
            {"provider": "mem", "zone": "z2", "instance_type": "mem-1"}
        ],
        "replicas": {"min": min, "max": max},
        "autoscaling": {"metric": "requests_in_flight", "target_per_replica": 4, "scale_down_delay": "2s"}
    }))
    .unwrap()
}

fn create(name: &str, spec: DeploymentSpec) -> CreateDeployment {
    CreateDeployment {
        project: gpufleet_domain::ProjectId::default_project(),
        name: name.into(),
        model: MODEL.parse().unwrap(),
        spec,
    }
}

/// A free port for every fake agent of one test (each machine has its own IP).
async fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn config(agent_port: u16) -> gpufleet_control::ControlConfig {
    let mut c = fast_config();
    c.agent_port = agent_port;
    c.heartbeat_interval_ms = 100;
    c.missed_heartbeats_unhealthy = 3;
    c.agent_lost_after_secs = 2;
    c.ready_probe_interval_ms = 200;
    c.canary_interval_ms = 0;
    c.drain_timeout_secs = 1;
    c.deployment_unhealthy_grace_secs = 1;
    c
}

/// Fake agents for every instance with an IP: register, answer `/readyz`,
/// heartbeat every 100 ms. `kill` stops one for good.
#[derive(Clone)]
struct Agents {
    killed: Arc<Mutex<HashSet<InstanceId>>>,
    /// Tokens per second each agent's heartbeats report.
    tps: Arc<Mutex<HashMap<InstanceId, f64>>>,
}

impl Agents {
    fn spawn(h: &Harness, mem: Arc<FakeProvider>, port: u16) -> Agents {
        let agents = Agents {
            killed: Arc::new(Mutex::new(HashSet::new())),
            tps: Arc::new(Mutex::new(HashMap::new())),
        };
        let killed = agents.killed.clone();
        let tps = agents.tps.clone();
        let fleet = h.fleet.clone();
        let service = h.agents.clone();
        let stop = h.stop.clone();
        tokio::spawn(async move {
            let mut started: HashMap<InstanceId, (String, u64)> = HashMap::new();
            while !stop.is_cancelled() {
                let list = fleet
                    .list_instances(&Default::default())
                    .await
                    .unwrap_or_default();
                for r in list {
                    let dead = killed.lock().unwrap().contains(&r.id);
                    let (Some(ip), false) = (r.ip, dead) else {
                        continue;
                    };
                    if !matches!(
                        r.status,
                        InstanceStatus::Starting
                            | InstanceStatus::Ready
                            | InstanceStatus::Unhealthy
                            | InstanceStatus::Draining
                    ) {
                        continue;
                    }
                    if let std::collections::hash_map::Entry::Vacant(slot) = started.entry(r.id) {
                        let Some(req) = mem.request_for(r.id) else {
                            continue;
                        };
                        let Ok(reg) = service
                            .register_agent(RegisterRequest {
                                instance_id: r.id,
                                bootstrap_secret: req.bootstrap.bootstrap_secret.clone(),
                                agent_version: "fake".into(),
                                hostname: "fake".into(),
                            })
                            .await
                        else {
                            continue;
                        };
                        let Ok(listener) = TcpListener::bind((ip, port)).await else {
                            continue;
                        };
                        serve_readyz(listener, r.id, reg.token.clone(), killed.clone());
                        slot.insert((reg.token, 0));
                    }
                    let entry = started.get_mut(&r.id).unwrap();
                    entry.1 += 1;
                    let mut hb = heartbeat(r.id, entry.1);
                    hb.engine.generation_tokens_per_s = tps.lock().unwrap().get(&r.id).copied();
                    let _ = service.ingest_heartbeat(r.id, hb).await;
                }
                tokio::time::sleep(Duration::from_millis(80)).await;
            }
        });
        agents
    }

    fn kill(&self, id: InstanceId) {
        self.killed.lock().unwrap().insert(id);
    }
}

fn heartbeat(id: InstanceId, seq: u64) -> Heartbeat {
    Heartbeat {
        instance_id: id,
        seq,
        sent_at: Utc::now(),
        agent_version: "fake".into(),
        agent_uptime_secs: 1,
        system: SystemSample::default(),
        gpu_source: GpuSource::Simulated,
        gpus: vec![],
        engine: EngineSample {
            status: EngineStatus::Ready,
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

/// A minimal HTTP server answering `GET /readyz?challenge=...` as the agent
/// of `id` would, until the agent is killed.
fn serve_readyz(
    listener: TcpListener,
    id: InstanceId,
    token: String,
    killed: Arc<Mutex<HashSet<InstanceId>>>,
) {
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            if killed.lock().unwrap().contains(&id) {
                return;
            }
            let token = token.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let Ok(n) = sock.read(&mut buf).await else {
                    return;
                };
                let req = String::from_utf8_lossy(&buf[..n]);
                let path = req.split_whitespace().nth(1).unwrap_or("");
                let challenge = path
                    .split_once('?')
                    .map(|(_, q)| q)
                    .unwrap_or("")
                    .split('&')
                    .find_map(|kv| kv.strip_prefix(&format!("{}=", identity::CHALLENGE_PARAM)))
                    .map(str::to_string);
                let body = serde_json::to_string(&Readiness {
                    ready: true,
                    instance_id: id,
                    reason: None,
                    proof: challenge.map(|c| {
                        identity::readiness_proof(&identity::token_digest(&token), id, &c)
                    }),
                })
                .unwrap();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    });
}

/// Requests in flight per instance, set by the test.
#[derive(Default)]
struct Traffic(Mutex<HashMap<InstanceId, u64>>);
impl TrafficSource for Traffic {
    fn in_flight(&self, id: InstanceId) -> u64 {
        self.0.lock().unwrap().get(&id).copied().unwrap_or(0)
    }
}

async fn instances(h: &Harness, id: DeploymentId) -> Vec<gpufleet_store::InstanceRecord> {
    h.deployments.instances(id).await.unwrap()
}

async fn wait_ready(h: &Harness, id: DeploymentId, n: usize) -> Vec<InstanceId> {
    eventually(20, &format!("{n} ready replicas of {id}"), || async {
        let ready: Vec<_> = instances(h, id)
            .await
            .into_iter()
            .filter(|r| r.status == InstanceStatus::Ready)
            .map(|r| r.id)
            .collect();
        (ready.len() == n).then_some(ready)
    })
    .await
}

async fn timeline(h: &Harness, id: DeploymentId) -> Vec<(DeploymentAction, String)> {
    h.deployments
        .events(id, None, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.event.action, e.event.message))
        .collect()
}

/// The timeline once `pred` holds for it. The keeper writes a pass's events
/// after that pass's actions, so what the instances show may lead the
/// timeline by one pass.
async fn timeline_once(
    h: &Harness,
    id: DeploymentId,
    what: &str,
    pred: impl Fn(&[(DeploymentAction, String)]) -> bool,
) -> Vec<(DeploymentAction, String)> {
    eventually(10, what, || async {
        let t = timeline(h, id).await;
        pred(&t).then_some(t)
    })
    .await
}

fn live(list: &[gpufleet_store::InstanceRecord]) -> usize {
    list.iter()
        .filter(|r| {
            matches!(
                r.status,
                InstanceStatus::Provisioning
                    | InstanceStatus::Booting
                    | InstanceStatus::Starting
                    | InstanceStatus::Ready
                    | InstanceStatus::Unhealthy
            )
        })
        .count()
}

#[tokio::test]
async fn bad_specs_name_the_field_and_create_nothing() {
    let mem = provider();
    let h = start(mem.clone(), config(free_port().await)).await;
    let mut cases: Vec<(CreateDeployment, &str)> = Vec::new();
    let mut c = create("a", spec(3, 2));
    cases.push((c.clone(), "replicas.min"));
    c = create("a", spec(1, 2));
    c.model = "nobody/unknown".parse().unwrap();
    cases.push((c, "model"));
    let mut s = spec(1, 2);
    s.placements[1].instance_type = "nope".into();
    cases.push((create("a", s), "placements[1].instance_type"));
    let mut s = spec(1, 2);
    s.placements[1].zone = "z9".into();
    cases.push((create("a", s), "placements[1].zone"));
    let mut s = spec(1, 2);
    s.placements[0].provider = "other".parse().unwrap();
    cases.push((create("a", s), "placements[0].provider"));
    // Qwen 7B (20 GB) does not fit a 1 GiB GPU.
    let mut s = spec(1, 2);
    s.placements[0].instance_type = "tiny".into();
    let mut c = create("a", s);
    c.model = "Qwen/Qwen2.5-7B-Instruct".parse().unwrap();
    cases.push((c, "placements[0].instance_type"));
    cases.push((create("Bad_Name", spec(1, 2)), "name"));
    for (req, field) in cases {
        match h.deployments.create(req).await {
            Err(ControlError::InvalidSpec(e)) => assert_eq!(e.field, field, "{e}"),
            other => panic!("expected a spec error naming {field}, got {other:?}"),
        }
    }
    assert!(h.deployments.list(true).await.unwrap().is_empty());
    assert_eq!(mem.created(), 0);

    // A name is taken while its deployment lives.
    h.deployments
        .create(create("taken", spec(1, 1)))
        .await
        .unwrap();
    assert!(matches!(
        h.deployments.create(create("taken", spec(1, 1))).await,
        Err(ControlError::Conflict { .. })
    ));
}

#[tokio::test]
async fn replicas_reach_min_and_carry_the_deployment_id() {
    let mem = provider();
    let port = free_port().await;
    let h = start(mem.clone(), config(port)).await;
    let _agents = Agents::spawn(&h, mem.clone(), port);
    let d = h
        .deployments
        .create(create("two", spec(2, 4)))
        .await
        .unwrap();
    let ready = wait_ready(&h, d.id, 2).await;
    for id in &ready {
        let r = h.fleet.get_instance(*id).await.unwrap();
        assert_eq!(r.deployment_id, Some(d.id));
        assert_eq!(r.zone, "z1", "the first placement");
    }
    let rec: DeploymentRecord = eventually(10, "status says 2 of 2 ready", || async {
        let r = h.deployments.get(d.id).await.unwrap();
        (r.status.ready == 2).then_some(r)
    })
    .await;
    assert_eq!(rec.desired_replicas, 2);
    assert!(
        rec.status.summary.starts_with("2 of 2 ready"),
        "{}",
        rec.status.summary
    );
    let t = timeline(&h, d.id).await;
    assert_eq!(t[0].0, DeploymentAction::Created);
    assert!(
        t.iter()
            .any(|(a, m)| *a == DeploymentAction::ScaleUp && m.contains("z1")),
        "{t:?}"
    );
    // Steady: no more instances than asked for.
    assert_eq!(mem.created(), 2);
}

#[tokio::test]
async fn a_failed_replica_is_replaced_first_and_never_beyond_max() {
    // min 2, max 3: room for the replacement before the old one goes.
    let mem = provider();
    let port = free_port().await;
    let h = start(mem.clone(), config(port)).await;
    let agents = Agents::spawn(&h, mem.clone(), port);
    let d = h
        .deployments
        .create(create("heal", spec(2, 3)))
        .await
        .unwrap();
    let ready = wait_ready(&h, d.id, 2).await;

    // Watch the live count all along: never above max.
    let watch_h = h.deployments.clone();
    let over = Arc::new(Mutex::new(0usize));
    let over2 = over.clone();
    let watcher = tokio::spawn(async move {
        loop {
            let list = watch_h.instances(d.id).await.unwrap();
            let n = live(&list);
            {
                let mut m = over2.lock().unwrap();
                *m = (*m).max(n);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });

    let victim = ready[0];
    agents.kill(victim);
    // It turns unhealthy, then past the grace period it is replaced: a new
    // replica becomes ready, then the old one is terminated.
    let replacement = eventually(30, "a replacement ready", || async {
        instances(&h, d.id)
            .await
            .into_iter()
            .find(|r| !ready.contains(&r.id) && r.status == InstanceStatus::Ready)
            .map(|r| r.id)
    })
    .await;
    let old = eventually(30, "the old replica gone", || async {
        let r = h.fleet.get_instance(victim).await.unwrap();
        matches!(
            r.status,
            InstanceStatus::Terminating | InstanceStatus::Terminated | InstanceStatus::Failed
        )
        .then_some(r)
    })
    .await;
    // The replacement was ready before the old one was asked to terminate,
    // unless it had already failed on its own (agent lost).
    let repl = h.fleet.get_instance(replacement).await.unwrap();
    if let Some(t) = old.terminate_requested_at {
        assert!(
            repl.ready_at.unwrap() <= t,
            "replacement ready before removal"
        );
    }
    watcher.abort();
    assert!(*over.lock().unwrap() <= 3, "never beyond max (3)");
    timeline_once(&h, d.id, "the victim's replacement", |t| {
        t.iter()
            .any(|(a, m)| *a == DeploymentAction::Replace && m.contains(&victim.to_string()))
    })
    .await;
}

#[tokio::test]
async fn out_of_capacity_falls_back_to_the_next_placement() {
    let mem = provider();
    let faulty = mem.faulty();
    faulty.fail_next(
        Op::Create,
        1,
        ProviderError::OutOfCapacity {
            message: "no L4 left".into(),
        },
    );
    let port = free_port().await;
    let h = start(faulty.clone(), config(port)).await;
    let _agents = Agents::spawn(&h, mem.clone(), port);
    let d = h
        .deployments
        .create(create("fallback", spec(1, 2)))
        .await
        .unwrap();
    let ready = wait_ready(&h, d.id, 1).await;
    let r = h.fleet.get_instance(ready[0]).await.unwrap();
    assert_eq!(r.zone, "z2", "the second placement");
    let failed = instances(&h, d.id)
        .await
        .into_iter()
        .find(|r| r.status == InstanceStatus::Failed)
        .expect("the first replica failed");
    assert_eq!(failed.zone, "z1");
    let t = timeline(&h, d.id).await;
    let fb = t
        .iter()
        .find(|(a, _)| *a == DeploymentAction::Fallback)
        .unwrap_or_else(|| panic!("no fallback on the timeline: {t:?}"));
    assert!(fb.1.contains("z1") && fb.1.contains("z2"), "{}", fb.1);
}

#[tokio::test]
async fn scales_up_on_load_at_once_and_down_only_after_the_delay() {
    let mem = provider();
    let port = free_port().await;
    let h = start(mem.clone(), config(port)).await;
    let traffic = Arc::new(Traffic::default());
    h.fleet.set_traffic_source(traffic.clone());
    let _agents = Agents::spawn(&h, mem.clone(), port);
    let d = h
        .deployments
        .create(create("auto", spec(1, 4)))
        .await
        .unwrap();
    let ready = wait_ready(&h, d.id, 1).await;

    // 10 in flight over one replica, target 4: 3 replicas.
    traffic.0.lock().unwrap().insert(ready[0], 10);
    let rec = eventually(5, "desired 3", || async {
        let r = h.deployments.get(d.id).await.unwrap();
        (r.desired_replicas == 3).then_some(r)
    })
    .await;
    assert_eq!(rec.desired_replicas, 3);
    let all = wait_ready(&h, d.id, 3).await;

    // Load gone: the desire drops only after scale_down_delay (2 s).
    traffic.0.lock().unwrap().clear();
    let dropped_at = std::time::Instant::now();
    let rec = eventually(10, "desired back to 1", || async {
        let r = h.deployments.get(d.id).await.unwrap();
        (r.desired_replicas == 1).then_some(r)
    })
    .await;
    assert!(
        dropped_at.elapsed() >= Duration::from_millis(1_800),
        "scaled down after {:?}, before the delay",
        dropped_at.elapsed()
    );
    assert_eq!(rec.desired_replicas, 1);
    eventually(10, "two replicas removed", || async {
        let list = instances(&h, d.id).await;
        (live(&list) == 1).then_some(())
    })
    .await;
    let t = timeline_once(&h, d.id, "two scale-downs", |t| {
        t.iter()
            .filter(|(a, _)| *a == DeploymentAction::ScaleDown)
            .count()
            >= 2
    })
    .await;
    assert!(
        t.iter()
            .any(|(a, m)| *a == DeploymentAction::DesiredChanged && m.contains("1 → 3")),
        "{t:?}"
    );
    assert_eq!(all.len(), 3);
}

#[tokio::test]
async fn patch_changes_bounds_and_checks_placements() {
    let mem = provider();
    let port = free_port().await;
    let h = start(mem.clone(), config(port)).await;
    let _agents = Agents::spawn(&h, mem.clone(), port);
    let d = h
        .deployments
        .create(create("patch", spec(1, 3)))
        .await
        .unwrap();
    wait_ready(&h, d.id, 1).await;
    let p = h
        .deployments
        .patch(
            d.id,
            DeploymentPatch {
                replicas: Some(ReplicaBounds { min: 2, max: 3 }),
                name: Some("patched".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(p.name, "patched");
    wait_ready(&h, d.id, 2).await;
    let bad = h
        .deployments
        .patch(
            d.id,
            DeploymentPatch {
                replicas: Some(ReplicaBounds { min: 4, max: 3 }),
                ..Default::default()
            },
        )
        .await;
    assert!(matches!(bad, Err(ControlError::InvalidSpec(e)) if e.field == "replicas.min"));
    // New placements are checked like a new deployment's.
    let mut placements = spec(1, 1).placements;
    placements[1].zone = "nowhere".into();
    let bad = h
        .deployments
        .patch(
            d.id,
            DeploymentPatch {
                placements: Some(placements),
                ..Default::default()
            },
        )
        .await;
    assert!(
        matches!(&bad, Err(ControlError::InvalidSpec(e)) if e.field == "placements[1].zone"),
        "{bad:?}"
    );
    // New engine args roll the replicas over too: started with them.
    h.deployments
        .patch(
            d.id,
            DeploymentPatch {
                engine_args: Some(Some(vec!["--x".into()])),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    eventually(30, "replicas with the new engine args", || async {
        let list = instances(&h, d.id).await;
        let ready: Vec<_> = list
            .iter()
            .filter(|r| r.status == InstanceStatus::Ready)
            .collect();
        (ready.len() == 2
            && ready
                .iter()
                .all(|r| r.engine_args.as_deref() == Some(&["--x".to_string()][..]))
            && live(&list) == 2)
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_rolling_update_brings_up_the_new_before_draining_the_old() {
    let mem = provider();
    let port = free_port().await;
    let h = start(mem.clone(), config(port)).await;
    let _agents = Agents::spawn(&h, mem.clone(), port);
    let mut s = spec(2, 2);
    s.placements.truncate(1); // z1 only
    let d = h.deployments.create(create("roll", s)).await.unwrap();
    let old = wait_ready(&h, d.id, 2).await;
    let z2 = spec(1, 1).placements[1].clone();
    h.deployments
        .patch(
            d.id,
            DeploymentPatch {
                placements: Some(vec![z2.clone()]),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    // Watch it: never fewer than 2 ready, never more than max + 1 live.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let list = instances(&h, d.id).await;
        let ready = list
            .iter()
            .filter(|r| r.status == InstanceStatus::Ready)
            .count();
        assert!(ready >= 2, "{ready} ready during the update");
        assert!(live(&list) <= 3, "{} live", live(&list));
        let done = list
            .iter()
            .filter(|r| r.status == InstanceStatus::Ready)
            .all(|r| r.zone == z2.zone && !old.contains(&r.id))
            && live(&list) == 2;
        if done {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not rolled over: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t = timeline_once(&h, d.id, "both old replicas drained", |t| {
        t.iter()
            .filter(|(a, m)| *a == DeploymentAction::Replace && m.contains("rolling update"))
            .count()
            >= 2
    })
    .await;
    assert!(
        t.iter()
            .any(|(a, m)| *a == DeploymentAction::Updated && m.contains("rolling update")),
        "{t:?}"
    );
}

#[tokio::test]
async fn delete_drains_then_terminates_every_instance() {
    let mem = provider();
    let port = free_port().await;
    let h = start(mem.clone(), config(port)).await;
    let _agents = Agents::spawn(&h, mem.clone(), port);
    let d = h
        .deployments
        .create(create("gone", spec(2, 2)))
        .await
        .unwrap();
    wait_ready(&h, d.id, 2).await;
    let rec = h.deployments.delete(d.id).await.unwrap();
    assert_eq!(rec.state, DeploymentState::Deleting);
    let rec = eventually(20, "deployment deleted", || async {
        let r = h.deployments.get(d.id).await.unwrap();
        (r.state == DeploymentState::Deleted).then_some(r)
    })
    .await;
    assert!(rec.deleted_at.is_some());
    for r in instances(&h, d.id).await {
        assert_eq!(r.status, InstanceStatus::Terminated, "{}", r.id);
    }
    assert_eq!(mem.machine_count(), 0);
    assert!(h.deployments.list(false).await.unwrap().is_empty());
    let t = timeline(&h, d.id).await;
    assert_eq!(t.last().unwrap().0, DeploymentAction::Deleted);
    // The name is free again.
    h.deployments
        .create(create("gone", spec(1, 1)))
        .await
        .unwrap();
}

#[tokio::test]
async fn at_max_an_unhealthy_replica_goes_before_its_replacement_never_beyond_max() {
    let mem = provider();
    let port = free_port().await;
    let h = start(mem.clone(), config(port)).await;
    let agents = Agents::spawn(&h, mem.clone(), port);
    let d = h
        .deployments
        .create(create("full", spec(2, 2)))
        .await
        .unwrap();
    let ready = wait_ready(&h, d.id, 2).await;
    let watch_h = h.deployments.clone();
    let over = Arc::new(Mutex::new(0usize));
    let over2 = over.clone();
    let watcher = tokio::spawn(async move {
        loop {
            let n = live(&watch_h.instances(d.id).await.unwrap());
            {
                let mut m = over2.lock().unwrap();
                *m = (*m).max(n);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    agents.kill(ready[0]);
    let now_ready = wait_ready_excluding(&h, d.id, 2, ready[0]).await;
    assert!(now_ready.iter().any(|id| !ready.contains(id)));
    watcher.abort();
    assert!(*over.lock().unwrap() <= 2, "never beyond max (2)");
}

async fn wait_ready_excluding(
    h: &Harness,
    id: DeploymentId,
    n: usize,
    not: InstanceId,
) -> Vec<InstanceId> {
    eventually(
        30,
        &format!("{n} ready replicas of {id} without {not}"),
        || async {
            let ready: Vec<_> = instances(h, id)
                .await
                .into_iter()
                .filter(|r| r.status == InstanceStatus::Ready && r.id != not)
                .map(|r| r.id)
                .collect();
            (ready.len() == n).then_some(ready)
        },
    )
    .await
}

#[tokio::test]
async fn idle_deployments_scale_to_zero_and_demand_brings_them_back() {
    let mem = provider();
    let port = free_port().await;
    let h = start(mem.clone(), config(port)).await;
    let traffic = Arc::new(Traffic::default());
    h.fleet.set_traffic_source(traffic.clone());
    let _agents = Agents::spawn(&h, mem.clone(), port);
    let mut s = spec(1, 2);
    s.scale_to_zero_after = Some("2s".parse().unwrap());
    let d = h.deployments.create(create("idle", s)).await.unwrap();
    let ready = wait_ready(&h, d.id, 1).await;

    // A request in flight keeps it up, however old the last demand.
    traffic.0.lock().unwrap().insert(ready[0], 1);
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(h.deployments.get(d.id).await.unwrap().desired_replicas, 1);
    traffic.0.lock().unwrap().clear();
    let idle_from = std::time::Instant::now();

    // Idle for 2 s: down to zero, every replica drained away, and the
    // status says so (from the pass after the decision on).
    eventually(10, "scaled to zero", || async {
        let r = h.deployments.get(d.id).await.unwrap();
        let list = instances(&h, d.id).await;
        let said = r
            .status
            .conditions
            .iter()
            .any(|c| c.contains("scaled to zero"));
        (r.desired_replicas == 0 && live(&list) == 0 && said).then_some(())
    })
    .await;
    assert!(idle_from.elapsed() >= Duration::from_millis(1_500));

    // A request arrives: the demand wakes it, at once, to its minimum.
    assert!(h.fleet.note_demand(MODEL).await.unwrap());
    assert!(!h.fleet.note_demand("nobody/deploys-this").await.unwrap());
    let back = wait_ready(&h, d.id, 1).await;
    assert!(!back.contains(&ready[0]), "a new replica");
    let t = timeline(&h, d.id).await;
    for want in ["(scale to zero)", "(scale from zero)"] {
        assert!(
            t.iter()
                .any(|(a, m)| *a == DeploymentAction::DesiredChanged && m.contains(want)),
            "{want}: {t:?}"
        );
    }
}

#[tokio::test]
async fn scales_on_tokens_per_second_from_the_heartbeats() {
    let mem = provider();
    let port = free_port().await;
    let h = start(mem.clone(), config(port)).await;
    let agents = Agents::spawn(&h, mem.clone(), port);
    let mut s = spec(1, 4);
    s.autoscaling.metric = gpufleet_domain::ScalingMetric::TokensPerSecond;
    s.autoscaling.target_per_replica = 100.0;
    let d = h.deployments.create(create("tps", s)).await.unwrap();
    let ready = wait_ready(&h, d.id, 1).await;
    // 250 tokens/s on one replica, 100 per replica wanted: 3.
    agents.tps.lock().unwrap().insert(ready[0], 250.0);
    eventually(10, "desired 3", || async {
        let r = h.deployments.get(d.id).await.unwrap();
        (r.desired_replicas == 3).then_some(())
    })
    .await;
    let t = timeline(&h, d.id).await;
    assert!(
        t.iter()
            .any(|(a, m)| *a == DeploymentAction::DesiredChanged && m.contains("tokens_per_second")),
        "{t:?}"
    );
}
