//! SIGTERM stops `up` cleanly; its machines keep running and the next `up`
//! re-adopts them.

use crate::common::*;
use gpufleet_domain::{InstanceId, InstanceStatus as S};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_then_up_again_readopts_running_machines() {
    let mut app = TestApp::spawn(BIN).await;
    let ids: Vec<InstanceId> = app.create(2).await.iter().map(|v| v.id).collect();
    app.wait_status(&ids, S::Ready, Duration::from_secs(60))
        .await;
    let agents: Vec<i32> = ids
        .iter()
        .map(|id| {
            let p = agent_pids(&id.to_string());
            assert_eq!(p.len(), 1, "one agent for {id}: {p:?}");
            p[0]
        })
        .collect();

    let status = app
        .stop(Duration::from_secs(20))
        .expect("up stops on SIGTERM");
    assert!(
        status.success(),
        "up exits 0 on SIGTERM: {status}\n{}",
        app.log_tail()
    );
    for (id, pid) in ids.iter().zip(&agents) {
        assert_eq!(
            agent_pids(&id.to_string()),
            vec![*pid],
            "{id}'s agent keeps running while up is down"
        );
    }

    app.restart().await;
    let views = app
        .wait_until(
            &ids,
            Duration::from_secs(30),
            "ready with fresh heartbeats",
            |vs| {
                vs.iter().all(|v| {
                    v.status == S::Ready
                        && v.last_heartbeat_at
                            .is_some_and(|t| t > chrono::Utc::now() - chrono::Duration::seconds(2))
                })
            },
        )
        .await;
    for (v, pid) in views.iter().zip(&agents) {
        assert_eq!(
            agent_pids(&v.id.to_string()),
            vec![*pid],
            "{} re-adopted, not restarted",
            v.id
        );
        assert!(v.status_reason.is_none());
    }
    let tr = transitions(&app.timeline(ids[0]).await.unwrap());
    assert!(
        !tr.iter().any(|(_, to)| *to == S::Failed),
        "no failure across the restart: {tr:?}"
    );
}
