//! kill -9 of the control plane while instances boot: a new `up` on the same
//! data directory finishes the job, with exactly one agent per instance and
//! nothing leaked after terminate.

use crate::common::*;
use gpufleet_domain::{InstanceId, InstanceStatus as S};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_while_booting_then_restart_finishes_the_job() {
    let mut app = TestApp::spawn_with(
        BIN,
        Options {
            boot_delay_ms: 1500,
            ..Default::default()
        },
    )
    .await;
    let ids: Vec<InstanceId> = app.create(3).await.iter().map(|v| v.id).collect();

    // Wait until the provider made all three machines (their agents are not
    // started yet: the mock boot delay is 1.5 s), then crash.
    app.wait_until(
        &ids,
        Duration::from_secs(30),
        "all machines are created",
        |vs| {
            vs.iter()
                .all(|v| matches!(v.status, S::Booting | S::Starting))
        },
    )
    .await;
    let machines_before = app.machine_dirs().len();
    assert_eq!(machines_before, 3, "one machine per instance");
    let booted = ids
        .iter()
        .filter(|id| !agent_pids(&id.to_string()).is_empty())
        .count();
    app.kill9();
    assert_eq!(
        booted, 0,
        "the crash should hit while machines boot (increase the boot delay?)"
    );

    app.restart().await;
    let ready = app
        .wait_status(&ids, S::Ready, Duration::from_secs(60))
        .await;
    assert_eq!(app.machine_dirs().len(), 3, "no machine was created twice");
    for id in &ids {
        let pids = agent_pids(&id.to_string());
        assert_eq!(pids.len(), 1, "exactly one agent for {id}: {pids:?}");
    }
    // Still exactly one a few heartbeats later (no duplicate spawned late).
    app.wait_until(
        &ids,
        Duration::from_secs(10),
        "heartbeats after restart",
        |vs| {
            vs.iter().all(|v| {
                v.last_heartbeat_at
                    .is_some_and(|t| t > chrono::Utc::now() - chrono::Duration::seconds(2))
            })
        },
    )
    .await;
    for id in &ids {
        assert_eq!(
            agent_pids(&id.to_string()).len(),
            1,
            "exactly one agent for {id}"
        );
    }

    for id in &ids {
        app.terminate(*id).await;
    }
    app.wait_status(&ids, S::Terminated, Duration::from_secs(30))
        .await;
    for v in &ready {
        let id = v.id.to_string();
        let ip = v.ip.expect("ready instance has an IP");
        eventually(
            Duration::from_secs(10),
            &format!("no process of {id} left"),
            || agent_pids(&id).is_empty() && engine_pids(ip).is_empty(),
        )
        .await;
    }
}
