//! The Mock provider with a fake agent (`/bin/sh` running `sleep`), so these
//! tests need no real agent. Every test has its own data dir and its own IP
//! pool, and terminates its machines at the end (a guard kills leftovers if a
//! test fails half-way).

use gpufleet_domain::{GpuSpec, InstanceId, ModelName, ProviderInstanceId, Zone};
use gpufleet_proto::{AgentBootstrap, EngineSpec};
use gpufleet_providers::fault::{FaultyProvider, Op};
use gpufleet_providers::mock::{MockConfig, MockError, MockProvider, MACHINE_ENV};
use gpufleet_providers::{tags, CreateRequest, MachineState, Provider, ProviderError};
use gpufleet_test_support::wait::wait_until;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(20);
/// A fake agent with a child process, like the real agent and its engine.
const FAKE_AGENT: &str = "sleep 600 & wait";
/// A fake agent that ignores SIGTERM (the ignore is inherited by `sleep`).
const STUBBORN_AGENT: &str = "trap '' TERM; sleep 600 & wait";

// ---------------------------------------------------------------- helpers

/// A /24 (or smaller) inside 127.78.0.0/16 that no other test of this run uses.
fn unique_pool(prefix_len: u8) -> String {
    static BASE: OnceLock<u32> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = *BASE.get_or_init(|| rand::random::<u8>().into());
    let octet = (base + NEXT.fetch_add(1, Ordering::SeqCst)) % 256;
    format!("127.78.{octet}.0/{prefix_len}")
}

/// A data dir plus a config for it; kills every process of its machines on drop.
struct Fixture {
    dir: tempfile::TempDir,
    config: MockConfig,
}

impl Fixture {
    fn new() -> Self {
        Self::with_agent(FAKE_AGENT)
    }

    fn with_agent(script: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = MockConfig::new(dir.path(), "/bin/sh");
        config.agent_args = vec!["-c".into(), script.into(), "fake-agent".into()];
        config.ip_pool = unique_pool(24);
        config.terminate_grace_ms = 3000;
        config.agent_restart_delay_ms = 100;
        Self { dir, config }
    }

    fn open(&self) -> Arc<MockProvider> {
        MockProvider::open(self.config.clone()).expect("open mock provider")
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir(self.dir.path().join("machines")) else {
            return;
        };
        for entry in entries.flatten() {
            let id = entry.file_name().to_string_lossy().into_owned();
            for pid in pids_with_marker(&id) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

fn request(key: &str) -> CreateRequest {
    request_with_tags(key, &[])
}

fn request_with_tags(key: &str, extra: &[(&str, &str)]) -> CreateRequest {
    let instance_id = InstanceId::new();
    let mut tag_map = BTreeMap::from([
        (tags::CLUSTER.to_string(), "test-cluster".to_string()),
        (tags::INSTANCE.to_string(), instance_id.to_string()),
    ]);
    for (k, v) in extra {
        tag_map.insert(k.to_string(), v.to_string());
    }
    CreateRequest {
        instance_id,
        idempotency_key: key.to_string(),
        zone: "local-1".to_string(),
        instance_type: "mock-l4-1".to_string(),
        tags: tag_map,
        bootstrap: AgentBootstrap {
            instance_id,
            control_plane_url: "http://127.0.0.1:9".to_string(),
            bootstrap_secret: format!("secret-{key}"),
            model: "sim-model".parse::<ModelName>().expect("model name"),
            agent_port: 7070,
            engine: EngineSpec::Sim {
                port: 8000,
                model_load_delay_ms: 0,
            },
            gpu: GpuSpec {
                model: "NVIDIA L4".to_string(),
                count: 1,
                vram_mib: 23034,
                power_limit_w: 72.0,
            },
            control_plane_ca_pem: None,
            engine_args: vec![],
        },
        model_size_mib: 0,
        first_attempt: false,
    }
}

async fn wait_running(p: &MockProvider, id: &ProviderInstanceId) {
    wait_until("the machine runs", DEADLINE, || async {
        matches!(p.get(id).await, Ok(m) if m.state == MachineState::Running && p.agent_pid(id).is_some())
    })
    .await;
}

async fn wait_gone(p: &MockProvider, id: &ProviderInstanceId) {
    wait_until("the machine is gone", DEADLINE, || async {
        matches!(p.get(id).await, Err(ProviderError::NotFound { .. }))
    })
    .await;
}

/// Lets the supervisor look at the world `n` more times.
async fn wait_ticks(p: &MockProvider, n: u64) {
    let target = p.supervisor_ticks() + n;
    wait_until("the supervisor ticked", DEADLINE, || async {
        p.supervisor_ticks() >= target
    })
    .await;
}

/// Terminates every machine and waits until all are gone, then shuts down.
async fn cleanup(p: &MockProvider) {
    let machines = p.list(&BTreeMap::new()).await.expect("list");
    for m in &machines {
        p.terminate(&m.id).await.expect("terminate");
    }
    for m in &machines {
        wait_gone(p, &m.id).await;
    }
    p.shutdown().await;
}

fn proc_stat(pid: i32) -> Option<(char, i32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = text[text.rfind(')')? + 1..].split_whitespace();
    let state = fields.next()?.chars().next()?;
    let pgrp = fields.nth(1)?.parse().ok()?;
    Some((state, pgrp))
}

/// Whether `pid` runs (exists and is not a zombie).
fn running(pid: i32) -> bool {
    proc_stat(pid).is_some_and(|(state, _)| !matches!(state, 'Z' | 'X'))
}

fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// Running members of process group `pgid`.
fn group_members(pgid: i32) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|pid| proc_stat(*pid).is_some_and(|(s, g)| g == pgid && !matches!(s, 'Z' | 'X')))
        .collect()
}

fn pids_with_marker(machine_id: &str) -> Vec<i32> {
    let marker = format!("{MACHINE_ENV}={machine_id}");
    all_pids()
        .into_iter()
        .filter(|pid| {
            running(*pid)
                && std::fs::read(format!("/proc/{pid}/environ"))
                    .is_ok_and(|env| env.split(|b| *b == 0).any(|e| e == marker.as_bytes()))
        })
        .collect()
}

/// Running processes with `arg` as one of their command-line arguments.
fn pids_with_arg(arg: &str) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|pid| {
            running(*pid)
                && std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == arg.as_bytes()))
        })
        .collect()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn create_boots_a_machine_with_an_ip_and_a_process_group() {
    let mut fx = Fixture::new();
    fx.config.ip_delay_ms = 400;
    fx.config.boot_delay_ms = 400;
    let p = fx.open();
    let req = request("boot");
    let m = p.create(&req).await.expect("create");
    assert!(
        m.id.as_str().starts_with("mock-") && m.id.as_str().len() == 17,
        "{}",
        m.id
    );
    assert_eq!(m.state, MachineState::Pending);
    assert_eq!(m.ip, None, "the IP shows only after ip_delay_ms");
    assert_eq!(
        (m.zone.as_str(), m.instance_type.as_str()),
        ("local-1", "mock-l4-1")
    );
    assert_eq!(m.tags, req.tags);

    wait_running(&p, &m.id).await;
    let m = p.get(&m.id).await.expect("get");
    let pool_net = fx.config.ip_pool.trim_end_matches(".0/24");
    assert_eq!(
        m.ip,
        Some(format!("{pool_net}.1").parse::<IpAddr>().expect("ip"))
    );

    // A live process group: the agent leads it, its child is in it.
    let pid = p.agent_pid(&m.id).expect("agent pid");
    assert!(running(pid));
    wait_until("the agent's child runs", DEADLINE, || async {
        group_members(pid).len() >= 2
    })
    .await;
    let mut members = group_members(pid);
    members.sort_unstable();
    assert_eq!(p.machine_pids(&m.id), members);
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let dir = p.machine_dir(&m.id);
    let want: Vec<String> = [
        "/bin/sh",
        "-c",
        FAKE_AGENT,
        "fake-agent",
        "--instance-id",
        &req.instance_id.to_string(),
        "--bootstrap-file",
        &dir.join("bootstrap.json").to_string_lossy(),
        "--bind",
        &format!("{pool_net}.1"),
        "--data-dir",
        &dir.to_string_lossy(),
        "",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(args, want);
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).expect("cwd");
    assert_eq!(cwd, dir);

    // The user data, readable only by us; the record.
    let bootstrap_path = dir.join("bootstrap.json");
    let mode = std::fs::metadata(&bootstrap_path)
        .expect("bootstrap")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let bootstrap: AgentBootstrap =
        serde_json::from_str(&read(&bootstrap_path)).expect("bootstrap json");
    assert_eq!(bootstrap, req.bootstrap);
    let record: serde_json::Value =
        serde_json::from_str(&read(&dir.join("machine.json"))).expect("machine.json");
    assert_eq!(record["state"], "running");
    assert_eq!(record["agent_pid"], pid);
    assert_eq!(record["spawned"], true);
    assert_eq!(record["idempotency_key"], "boot");
    assert!(read(&dir.join("agent.log")).contains("starting agent"));

    cleanup(&p).await;
}

#[tokio::test]
async fn create_is_idempotent_also_across_a_reopen() {
    let fx = Fixture::new();
    let p = fx.open();
    let req = request("same-key");
    let first = p.create(&req).await.expect("create");
    let second = p.create(&req).await.expect("create again");
    assert_eq!(first.id, second.id);
    wait_running(&p, &first.id).await;
    let pid = p.agent_pid(&first.id).expect("pid");
    p.shutdown().await;

    let p = fx.open();
    let third = p.create(&req).await.expect("create after reopen");
    assert_eq!(third.id, first.id);
    assert_eq!(third.state, MachineState::Running);
    wait_ticks(&p, 3).await;
    assert_eq!(p.list(&BTreeMap::new()).await.expect("list").len(), 1);
    assert_eq!(p.agent_pid(&first.id), Some(pid));
    let instance = req.instance_id.to_string();
    assert_eq!(pids_with_arg(&instance), vec![pid], "exactly one agent");

    // The same key with a different request is refused, not silently replayed.
    let mut other = req.clone();
    other.instance_type = "mock-a100-1".to_string();
    match p.create(&other).await {
        Err(ProviderError::InvalidRequest {
            field: "idempotency_key",
            ..
        }) => {}
        got => panic!("expected InvalidRequest on idempotency_key, got {got:?}"),
    }
    cleanup(&p).await;
}

#[tokio::test]
async fn concurrent_creates_get_distinct_ips_and_one_machine_per_key() {
    let mut fx = Fixture::new();
    fx.config.boot_delay_ms = 600_000; // no processes needed here
    let p = fx.open();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            p.create(&request(&format!("k{i}"))).await
        }));
    }
    let same = request("shared");
    for _ in 0..10 {
        let p = p.clone();
        let req = same.clone();
        tasks.push(tokio::spawn(async move { p.create(&req).await }));
    }
    let mut ips = BTreeSet::new();
    let mut ids = BTreeSet::new();
    for task in tasks {
        let m = task.await.expect("join").expect("create");
        ids.insert(m.id);
        ips.insert(m.ip.expect("ip_delay_ms is 0"));
    }
    assert_eq!(ids.len(), 21, "20 keys plus one shared key");
    assert_eq!(ips.len(), 21, "distinct IPs");
    assert_eq!(p.list(&BTreeMap::new()).await.expect("list").len(), 21);
    cleanup(&p).await;
}

#[tokio::test]
async fn terminate_kills_the_whole_group_and_frees_the_ip() {
    let fx = Fixture::new();
    let p = fx.open();
    let first_req = request("t");
    let m = p.create(&first_req).await.expect("create");
    wait_running(&p, &m.id).await;
    let pid = p.agent_pid(&m.id).expect("pid");
    wait_until("the agent's child runs", DEADLINE, || async {
        group_members(pid).len() >= 2
    })
    .await;
    let pids = group_members(pid);

    p.terminate(&m.id).await.expect("terminate");
    match p.get(&m.id).await {
        Ok(got) => assert_eq!(got.state, MachineState::Stopping),
        Err(ProviderError::NotFound { .. }) => {}
        Err(e) => panic!("unexpected {e}"),
    }
    p.terminate(&m.id).await.expect("terminate is idempotent");
    wait_gone(&p, &m.id).await;
    for pid in &pids {
        assert!(!running(*pid), "process {pid} of the machine still runs");
    }
    assert!(pids_with_marker(m.id.as_str()).is_empty());
    p.terminate(&m.id)
        .await
        .expect("terminate of a deleted machine is Ok");
    assert!(p.list(&BTreeMap::new()).await.expect("list").is_empty());
    assert_eq!(p.agent_pid(&m.id), None);

    let next = p.create(&request("t2")).await.expect("create");
    assert_eq!(next.ip, m.ip, "the freed IP is the lowest free one again");

    // Replaying the deleted machine's create does not make a second one.
    let replay = p.create(&first_req).await.expect("replay");
    assert_eq!(
        (replay.id, replay.state, replay.ip),
        (m.id.clone(), MachineState::Stopped, None)
    );
    assert!(matches!(
        p.get(&m.id).await,
        Err(ProviderError::NotFound { .. })
    ));
    cleanup(&p).await;
}

#[tokio::test]
async fn an_agent_ignoring_sigterm_is_killed_after_the_grace_period() {
    let mut fx = Fixture::with_agent(STUBBORN_AGENT);
    fx.config.terminate_grace_ms = 1000;
    let p = fx.open();
    let m = p.create(&request("stubborn")).await.expect("create");
    wait_running(&p, &m.id).await;
    let pid = p.agent_pid(&m.id).expect("pid");
    wait_until("the agent's child runs", DEADLINE, || async {
        group_members(pid).len() >= 2
    })
    .await;
    let pids = group_members(pid);

    let start = Instant::now();
    p.terminate(&m.id).await.expect("terminate");
    // Well inside the grace period, TERM was ignored: still stopping.
    wait_until("SIGTERM was sent", DEADLINE, || async {
        read(&p.machine_dir(&m.id).join("agent.log")).contains("SIGTERM")
    })
    .await;
    assert_eq!(
        p.get(&m.id).await.expect("still there").state,
        MachineState::Stopping
    );
    assert!(pids.iter().all(|pid| running(*pid)), "TERM is ignored");

    wait_gone(&p, &m.id).await;
    assert!(
        start.elapsed() >= Duration::from_millis(1000),
        "SIGKILL only after the grace"
    );
    for pid in &pids {
        assert!(!running(*pid), "process {pid} survived SIGKILL");
    }
    assert!(read(&p.machine_dir(&m.id).join("agent.log")).contains("SIGKILL"));
    cleanup(&p).await;
}

#[tokio::test]
async fn a_killed_agent_is_restarted_by_the_supervisor() {
    let fx = Fixture::new();
    let p = fx.open();
    let m = p.create(&request("restart")).await.expect("create");
    wait_running(&p, &m.id).await;
    let old = p.agent_pid(&m.id).expect("pid");
    wait_until("the agent's child runs", DEADLINE, || async {
        group_members(old).len() >= 2
    })
    .await;
    let old_group = group_members(old);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the agent");
    wait_until("a new agent runs", DEADLINE, || async {
        p.agent_pid(&m.id)
            .is_some_and(|pid| pid != old && running(pid))
    })
    .await;
    let new = p.agent_pid(&m.id).expect("pid");
    assert_eq!(
        p.get(&m.id).await.expect("get").state,
        MachineState::Running
    );
    // The old agent's leftover child went with it, like systemd's control-group kill mode.
    wait_until("the old group is gone", DEADLINE, || async {
        old_group.iter().all(|pid| !running(*pid))
    })
    .await;
    assert!(read(&p.machine_dir(&m.id).join("agent.log")).contains("restarting"));
    let record: serde_json::Value =
        serde_json::from_str(&read(&p.machine_dir(&m.id).join("machine.json"))).expect("record");
    assert_eq!(record["agent_pid"], new);
    assert_eq!(record["spawn_count"], 2);
    cleanup(&p).await;
}

#[tokio::test]
async fn reopen_adopts_live_machines_and_reports_dead_ones_gone() {
    let fx = Fixture::new();
    let p = fx.open();
    let alive = p.create(&request("alive")).await.expect("create");
    let dead = p.create(&request("dead")).await.expect("create");
    wait_running(&p, &alive.id).await;
    wait_running(&p, &dead.id).await;
    let alive_pid = p.agent_pid(&alive.id).expect("pid");
    let dead_pid = p.agent_pid(&dead.id).expect("pid");
    p.shutdown().await;

    // While nobody supervises, one machine dies.
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(dead_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the group");
    wait_until(
        "the dead machine's processes are gone",
        DEADLINE,
        || async { group_members(dead_pid).is_empty() },
    )
    .await;

    let p = fx.open();
    assert_eq!(
        p.agent_pid(&alive.id),
        Some(alive_pid),
        "adopted, not respawned"
    );
    assert_eq!(
        p.get(&alive.id).await.expect("alive").state,
        MachineState::Running
    );
    assert!(matches!(
        p.get(&dead.id).await,
        Err(ProviderError::NotFound { .. })
    ));
    wait_ticks(&p, 3).await;
    assert_eq!(p.agent_pid(&alive.id), Some(alive_pid));
    assert!(running(alive_pid));
    assert_eq!(
        pids_with_arg(&alive.tags[tags::INSTANCE]),
        vec![alive_pid],
        "one agent"
    );
    let listed: Vec<_> = p
        .list(&BTreeMap::new())
        .await
        .expect("list")
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(listed, vec![alive.id.clone()]);

    // The gone machine's IP is free again.
    let next = p.create(&request("next")).await.expect("create");
    assert_eq!(next.ip, dead.ip);
    cleanup(&p).await;
}

#[tokio::test]
async fn a_machine_still_booting_at_shutdown_boots_after_reopen() {
    let mut fx = Fixture::new();
    fx.config.boot_delay_ms = 1500;
    let p = fx.open();
    let m = p.create(&request("late")).await.expect("create");
    assert_eq!(m.state, MachineState::Pending);
    p.shutdown().await;
    assert_eq!(p.agent_pid(&m.id), None, "not booted before the shutdown");

    let p = fx.open();
    assert_eq!(
        p.get(&m.id).await.expect("get").state,
        MachineState::Pending
    );
    wait_running(&p, &m.id).await;
    let pid = p.agent_pid(&m.id).expect("pid");
    assert!(running(pid));
    cleanup(&p).await;
}

#[tokio::test]
async fn list_filters_by_tags() {
    let mut fx = Fixture::new();
    fx.config.boot_delay_ms = 600_000;
    let p = fx.open();
    let a = p
        .create(&request_with_tags("a", &[("team", "red")]))
        .await
        .expect("a");
    let b = p
        .create(&request_with_tags(
            "b",
            &[("team", "red"), ("tier", "gold")],
        ))
        .await
        .expect("b");
    let c = p
        .create(&request_with_tags("c", &[("team", "blue")]))
        .await
        .expect("c");
    let ids = |tags: &[(&str, &str)]| {
        let p = p.clone();
        let filter: BTreeMap<String, String> = tags
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        async move {
            let mut ids: Vec<_> = p
                .list(&filter)
                .await
                .expect("list")
                .into_iter()
                .map(|m| m.id)
                .collect();
            ids.sort();
            ids
        }
    };
    let sorted = |mut v: Vec<ProviderInstanceId>| {
        v.sort();
        v
    };
    assert_eq!(
        ids(&[]).await,
        sorted(vec![a.id.clone(), b.id.clone(), c.id.clone()])
    );
    assert_eq!(ids(&[(tags::CLUSTER, "test-cluster")]).await.len(), 3);
    assert_eq!(
        ids(&[("team", "red")]).await,
        sorted(vec![a.id.clone(), b.id.clone()])
    );
    assert_eq!(
        ids(&[("team", "red"), ("tier", "gold")]).await,
        vec![b.id.clone()]
    );
    assert_eq!(
        ids(&[("team", "green")]).await,
        Vec::<ProviderInstanceId>::new()
    );
    assert_eq!(
        ids(&[(tags::INSTANCE, &c.tags[tags::INSTANCE])]).await,
        vec![c.id.clone()]
    );

    p.terminate(&a.id).await.expect("terminate");
    wait_gone(&p, &a.id).await;
    assert_eq!(ids(&[("team", "red")]).await, vec![b.id.clone()]);
    cleanup(&p).await;
}

#[tokio::test]
async fn bad_zone_or_instance_type_is_an_invalid_request() {
    let mut fx = Fixture::new();
    fx.config.zones.push(Zone {
        name: "local-3".into(),
        description: "Empty".into(),
    });
    let p = fx.open();
    let field = |r: Result<_, ProviderError>| match r {
        Err(ProviderError::InvalidRequest { field, .. }) => field,
        other => panic!("expected InvalidRequest, got {other:?}"),
    };
    let mut req = request("z");
    req.zone = "mars-1".into();
    assert_eq!(field(p.create(&req).await), "zone");
    let mut req = request("t");
    req.instance_type = "mock-tpu-1".into();
    assert_eq!(field(p.create(&req).await), "instance_type");
    let mut req = request("not-here");
    req.zone = "local-3".into();
    assert_eq!(
        field(p.create(&req).await),
        "instance_type",
        "type not offered in that zone"
    );
    let mut req = request("mismatch");
    req.bootstrap.instance_id = InstanceId::new();
    assert_eq!(field(p.create(&req).await), "bootstrap");
    assert!(p.list(&BTreeMap::new()).await.expect("list").is_empty());

    let catalog = p.catalog().await.expect("catalog");
    let zones: Vec<_> = catalog.zones.iter().map(|z| z.name.as_str()).collect();
    assert_eq!(zones, ["local-1", "local-2", "local-3"]);
    assert_eq!(
        catalog
            .instance_type("mock-a100-1")
            .expect("a100")
            .gpu
            .vram_mib,
        81920
    );
    assert_eq!(p.name().as_str(), "mock");
    cleanup(&p).await;
}

#[tokio::test]
async fn an_exhausted_pool_is_out_of_capacity() {
    let mut fx = Fixture::new();
    fx.config.ip_pool = unique_pool(30); // two usable addresses
    fx.config.boot_delay_ms = 600_000;
    let p = fx.open();
    let first = p.create(&request("1")).await.expect("first");
    p.create(&request("2")).await.expect("second");
    match p.create(&request("3")).await {
        Err(ProviderError::OutOfCapacity { message }) => {
            assert!(message.contains("ip_pool"), "{message}")
        }
        other => panic!("expected OutOfCapacity, got {other:?}"),
    }
    p.terminate(&first.id).await.expect("terminate");
    wait_gone(&p, &first.id).await;
    let third = p.create(&request("3")).await.expect("room again");
    assert_eq!(third.ip, first.ip);
    cleanup(&p).await;
}

#[tokio::test]
async fn an_agent_that_cannot_start_is_retried_and_logged() {
    let mut fx = Fixture::new();
    fx.config.agent_program = fx.dir.path().join("no-such-agent");
    let p = fx.open();
    let m = p.create(&request("broken")).await.expect("create");
    let log = p.machine_dir(&m.id).join("agent.log");
    wait_until("the failure is logged twice", DEADLINE, || async {
        std::fs::read_to_string(&log)
            .is_ok_and(|l| l.matches("cannot start the agent").count() >= 2)
    })
    .await;
    assert_eq!(
        p.get(&m.id).await.expect("get").state,
        MachineState::Pending
    );
    assert_eq!(p.agent_pid(&m.id), None);
    cleanup(&p).await;
}

#[tokio::test]
async fn open_refuses_bad_config_and_a_second_opener() {
    let fx = Fixture::new();
    let mut bad = fx.config.clone();
    bad.ip_pool = "127.77.0.0/40".into();
    assert!(matches!(MockProvider::open(bad), Err(MockError::IpPool(_))));
    let mut bad = fx.config.clone();
    bad.ip_pool = "10.0.0.0/24".into();
    let err = MockProvider::open(bad).err().expect("not loopback");
    assert!(err.to_string().contains("127.0.0.0/8"), "{err}");
    let mut bad = fx.config.clone();
    bad.instance_types[0].zones.push("nowhere".into());
    assert!(matches!(
        MockProvider::open(bad),
        Err(MockError::Catalog { .. })
    ));

    let p = fx.open();
    assert!(matches!(
        MockProvider::open(fx.config.clone()),
        Err(MockError::Locked { .. })
    ));
    p.shutdown().await;
    let p = fx.open();
    p.shutdown().await;
    assert!(p
        .create(&request("late"))
        .await
        .is_err_and(|e| e.is_retryable()));
}

#[test]
fn open_outside_a_runtime_is_an_error() {
    let fx = Fixture::new();
    assert!(matches!(
        MockProvider::open(fx.config.clone()),
        Err(MockError::NoRuntime)
    ));
}

#[tokio::test]
async fn fault_wrapper_over_the_mock() {
    let fx = Fixture::new();
    let mock = fx.open();
    let p = FaultyProvider::new(mock.clone());

    // "The API said it failed but the VM exists": the retry finds the same machine.
    p.create_succeeds_but_errors(1);
    let req = request("lie");
    assert!(p
        .create(&req)
        .await
        .expect_err("reported failed")
        .is_retryable());
    let m = p.create(&req).await.expect("retry");
    assert_eq!(mock.list(&BTreeMap::new()).await.expect("list").len(), 1);
    assert_eq!(p.calls(Op::Create), 2);
    wait_running(&mock, &m.id).await;
    let pid = mock.agent_pid(&m.id).expect("pid");

    // Deleted out of band: gone at once through the wrapper, and for real underneath.
    p.vanish(&m.id).await.expect("vanish");
    assert!(matches!(
        p.get(&m.id).await,
        Err(ProviderError::NotFound { .. })
    ));
    assert!(p.list(&BTreeMap::new()).await.expect("list").is_empty());
    wait_gone(&mock, &m.id).await;
    assert!(!running(pid));

    p.fail_next(Op::Terminate, 1, ProviderError::retryable("503"));
    assert!(p.terminate(&m.id).await.is_err());
    p.terminate(&m.id).await.expect("terminate");
    cleanup(&mock).await;
}

#[tokio::test]
async fn addresses_another_process_listens_on_are_skipped() {
    let fx = Fixture::new();
    let p = fx.open();
    let pool_net = fx.config.ip_pool.trim_end_matches(".0/24").to_string();
    // Another fleet's agent holds the first address's agent port.
    let first: IpAddr = format!("{pool_net}.1").parse().expect("ip");
    let _stranger = std::net::TcpListener::bind((first, 7070)).expect("bind the stranger");
    let m = p.create(&request("skip")).await.expect("create");
    wait_running(&p, &m.id).await;
    let ip = p.get(&m.id).await.expect("get").ip;
    assert_eq!(
        ip,
        Some(format!("{pool_net}.2").parse::<IpAddr>().expect("ip")),
        "the address in use is never handed out"
    );
    cleanup(&p).await;
}
