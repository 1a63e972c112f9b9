//! One instance's whole life, five at a time: create → ready (with samples
//! and a timeline), agent death → unhealthy → ready, terminate, archive.

use crate::common::*;
use gpufleet_domain::{InstanceId, InstanceStatus as S};
use std::net::SocketAddr;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_instances_live_and_die() {
    let app = TestApp::spawn(BIN).await;

    // Five concurrent POSTs.
    let creates = (0..5).map(|_| app.create(1));
    let created: Vec<_> = futures::future::join_all(creates)
        .await
        .into_iter()
        .flatten()
        .collect();
    let ids: Vec<InstanceId> = created.iter().map(|v| v.id).collect();
    assert_eq!(ids.len(), 5);
    for v in &created {
        assert_eq!(
            v.status,
            S::Provisioning,
            "a new instance starts provisioning"
        );
        assert_eq!(v.provider, "mock");
        assert_eq!(v.instance_type, TYPE);
    }

    let ready = app
        .wait_status(&ids, S::Ready, Duration::from_secs(60))
        .await;
    let mut ips = Vec::new();
    for v in &ready {
        assert_eq!(v.progress, 100, "{} is ready at 100%", v.id);
        let ip =
            v.ip.unwrap_or_else(|| panic!("{} is ready without an IP", v.id));
        assert!(
            ip.to_string()
                .starts_with(app.ip_pool.trim_end_matches("0/24")),
            "{ip} from {}",
            app.ip_pool
        );
        ips.push(ip);
    }
    let mut unique = ips.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 5, "every machine has its own IP: {ips:?}");

    // System and GPU samples arrive.
    for id in &ids {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let m = loop {
            let m = app.metrics(*id).await.expect("metrics");
            if m.latest.as_ref().is_some_and(|s| !s.gpus.is_empty()) {
                break m;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no GPU sample for {id}: {m:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let s = m.latest.expect("latest sample");
        assert!(!m.samples.is_empty(), "recent samples listed");
        assert!(
            s.system.mem_total_bytes > 0 && s.system.mem_used_bytes <= s.system.mem_total_bytes,
            "{:?}",
            s.system
        );
        assert!(
            s.system.disk_total_bytes > 0,
            "disk figures: {:?}",
            s.system
        );
        assert!(
            (0.0..=100.0 * 64.0).contains(&s.system.cpu_pct),
            "cpu: {:?}",
            s.system
        );
        let g = &s.gpus[0];
        assert_eq!(s.gpus.len(), 1, "mock-l4-1 has one GPU");
        assert_eq!(g.name, "NVIDIA L4");
        assert!(
            g.util_pct.is_some_and(|u| (0.0..=100.0).contains(&u)),
            "{g:?}"
        );
        assert!(
            g.mem_total_mib > 0 && g.mem_used_mib <= g.mem_total_mib,
            "{g:?}"
        );
        assert!(
            g.temp_c > Some(0.0) && g.power_w > Some(0.0) && g.power_limit_w > Some(0.0),
            "{g:?}"
        );
    }

    // Each timeline explains the way to ready.
    for id in &ids {
        let tl = app.timeline(*id).await.expect("timeline");
        let tr = transitions(&tl);
        assert!(
            contains_in_order(
                &tr,
                &[
                    (S::Provisioning, S::Booting),
                    (S::Booting, S::Starting),
                    (S::Starting, S::Ready)
                ]
            ),
            "{id} transitions: {tr:?}"
        );
        let create = tl
            .events
            .iter()
            .find(|e| e.action == "provider.create" && e.outcome == "success")
            .unwrap_or_else(|| {
                panic!(
                    "{id}: no successful provider.create on the timeline: {:#?}",
                    tl.events
                )
            });
        assert!(
            create.duration_ms.is_some(),
            "provider.create has a duration: {create:?}"
        );
    }

    // Kill one agent: unhealthy, then ready again once the Mock restarts it.
    let victim = ids[0];
    let pids = agent_pids(&victim.to_string());
    assert_eq!(pids.len(), 1, "one agent process for {victim}: {pids:?}");
    kill9(pids[0]);
    app.wait_status(&[victim], S::Unhealthy, Duration::from_secs(20))
        .await;
    app.wait_status(&[victim], S::Ready, Duration::from_secs(30))
        .await;
    let tr = transitions(&app.timeline(victim).await.unwrap());
    assert!(
        contains_in_order(
            &tr,
            &[
                (S::Starting, S::Ready),
                (S::Ready, S::Unhealthy),
                (S::Unhealthy, S::Ready)
            ]
        ),
        "ready → unhealthy → ready on the timeline: {tr:?}"
    );
    eventually(
        Duration::from_secs(10),
        "the victim has exactly one new agent",
        || {
            let now = agent_pids(&victim.to_string());
            now.len() == 1 && now[0] != pids[0]
        },
    )
    .await;

    // Terminate all: terminated, processes and listeners gone.
    for id in &ids {
        app.terminate(*id).await;
    }
    app.terminate(ids[1]).await; // idempotent
    let done = app
        .wait_status(&ids, S::Terminated, Duration::from_secs(30))
        .await;
    for (v, ip) in done.iter().zip(&ips) {
        assert!(v.terminated_at.is_some(), "{} has terminated_at", v.id);
        let id = v.id.to_string();
        eventually(
            Duration::from_secs(10),
            &format!("{id}'s processes are gone"),
            || agent_pids(&id).is_empty() && engine_pids(*ip).is_empty(),
        )
        .await;
        assert!(
            tcp_closed(SocketAddr::new(*ip, AGENT_PORT)),
            "agent listener of {id} at {ip} closed"
        );
        assert!(
            tcp_closed(SocketAddr::new(*ip, ENGINE_PORT)),
            "engine listener of {id} at {ip} closed"
        );
    }

    // Archive: hidden from the default list, shown on request.
    for id in &ids {
        let status = app.archive(*id).await;
        assert!(status.is_success(), "archive {id}: {status}");
    }
    let visible = app.list(false).await.unwrap();
    assert!(
        visible.iter().all(|v| !ids.contains(&v.id)),
        "archived instances are hidden: {visible:?}"
    );
    let all = app.list(true).await.unwrap();
    for id in &ids {
        let v = all
            .iter()
            .find(|v| v.id == *id)
            .unwrap_or_else(|| panic!("{id} listed with include_archived"));
        assert_eq!(v.status, S::Archived);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archiving_a_live_instance_is_a_conflict() {
    let app = TestApp::spawn(BIN).await;
    let id = app.create(1).await[0].id;
    let status = app.archive(id).await;
    assert_eq!(
        status,
        reqwest::StatusCode::CONFLICT,
        "a provisioning instance cannot be archived"
    );
    app.terminate(id).await;
    app.wait_status(&[id], S::Terminated, Duration::from_secs(30))
        .await;
    assert!(app.archive(id).await.is_success());
}
