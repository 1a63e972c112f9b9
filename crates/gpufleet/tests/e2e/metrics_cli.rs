//! Observability from the outside: `gpufleet instances metrics --json` against
//! a live instance, and a live agent's own `/metrics` through promtool.

use crate::common::*;
use gpufleet_agent::metrics::is_upstream_lint;
use gpufleet_api::views::InstanceMetrics;
use gpufleet_domain::InstanceStatus as S;
use gpufleet_proto::GpuSource;
use gpufleet_test_support::promtool::assert_metrics_pass;
use std::net::SocketAddr;
use std::process::Output;
use std::time::Duration;

async fn gpufleet(app: &TestApp, args: &[&str]) -> Output {
    let env = [
        ("GPUFLEET_ADMIN_TOKEN", app.token.as_str()),
        ("GPUFLEET_SERVER", app.base_url.as_str()),
    ];
    run_cli(args, &env, "").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_metrics_cli_and_the_agents_prometheus_endpoint() {
    let app = TestApp::spawn(BIN).await;
    let id = app.create(1).await[0].id;
    let ready = app
        .wait_status(&[id], S::Ready, Duration::from_secs(60))
        .await;
    let ip = ready[0].ip.expect("a ready instance has an IP");

    // A few heartbeats with the engine ready.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let m = app.metrics(id).await.expect("metrics");
        let ready_samples = m
            .samples
            .iter()
            .filter(|s| s.engine.status == gpufleet_proto::EngineStatus::Ready)
            .count();
        if ready_samples >= 3 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no heartbeats: {m:?}\n{}",
            app.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // --json: the API's answer, with the history series when the server has it.
    let idtxt = id.to_string();
    let out = gpufleet(
        &app,
        &["instances", "metrics", &idtxt, "--since", "10m", "--json"],
    )
    .await;
    assert!(
        out.status.success(),
        "metrics --json: {}",
        text(&out.stderr)
    );
    let m: InstanceMetrics = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not InstanceMetrics ({e}): {}", text(&out.stdout)));
    assert_eq!(m.instance_id, id);
    let latest = m.latest.as_ref().expect("a latest sample");
    assert_eq!(
        latest.gpu_source,
        GpuSource::Simulated,
        "Mock machines simulate"
    );
    assert_eq!(latest.gpus.len(), 1, "{TYPE} has one GPU");
    let g = &latest.gpus[0];
    assert!(
        g.util_pct.is_some_and(|u| (0.0..=100.0).contains(&u)),
        "{g:?}"
    );
    assert!(
        g.mem_total_mib > 0 && g.mem_used_mib <= g.mem_total_mib,
        "{g:?}"
    );
    assert!(
        g.power_w > Some(0.0) && g.power_w <= g.power_limit_w,
        "{g:?}"
    );
    assert!(g.temp_c >= Some(35.0), "{g:?}");
    assert!((0.0..=100.0).contains(&latest.system.cpu_pct));
    if let Some(series) = &m.series {
        let filled: Vec<usize> = (0..series.timestamps.len())
            .filter(|&i| series.samples[i] > 0)
            .collect();
        assert!(!filled.is_empty(), "buckets with figures: {series:?}");
        assert_eq!(series.gpus.len(), 1, "{series:?}");
        let gs = &series.gpus[0];
        for &i in &filled {
            let util = gs.util_pct[i].expect("util in a filled bucket");
            assert!((0.0..=100.0).contains(&util), "{util}");
            let (used, total) = (
                gs.vram_used_mib[i].expect("vram"),
                gs.vram_total_mib[i].expect("total"),
            );
            assert!(used <= total && total > 0.0, "{used}/{total}");
            assert!(series.cpu_pct[i].is_some() && series.requests_running[i].is_some());
        }
    } else {
        assert!(m.samples.len() >= 3, "{m:?}");
    }

    // Without a terminal: a table.
    let out = gpufleet(&app, &["instances", "metrics", &idtxt, "--since", "10m"]).await;
    assert!(out.status.success(), "metrics: {}", text(&out.stderr));
    let table = text(&out.stdout);
    for col in [
        "TIME",
        "CPU %",
        "GPU0 UTIL %",
        "GPU0 VRAM GiB",
        "GPU0 TEMP °C",
        "RUNNING",
    ] {
        assert!(table.contains(col), "{col} in\n{table}");
    }
    assert!(table.lines().count() >= 2, "{table}");

    // The shared limits: a window under 5 minutes is refused before any request.
    let out = gpufleet(&app, &["instances", "metrics", &idtxt, "--since", "1m"]).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("shorter than the minimum"),
        "{}",
        text(&out.stderr)
    );

    // The agent's own /metrics: DCGM and node-exporter names, promtool-clean.
    let url = format!("http://{}/metrics", SocketAddr::new(ip, AGENT_PORT));
    let exposition = reqwest::get(&url)
        .await
        .expect("scrape the agent")
        .text()
        .await
        .expect("text");
    for prefix in [
        "DCGM_FI_DEV_GPU_UTIL{gpu=\"0\",",
        "DCGM_FI_DEV_FB_USED{",
        "DCGM_FI_DEV_FB_FREE{",
        "DCGM_FI_DEV_GPU_TEMP{",
        "DCGM_FI_DEV_POWER_USAGE{",
        "node_load1 ",
        "node_memory_MemAvailable_bytes ",
        "gpufleet_agent_engine_status{status=\"ready\"} 1",
    ] {
        assert!(
            exposition.lines().any(|l| l.starts_with(prefix)),
            "{prefix} in\n{exposition}"
        );
    }
    assert!(
        exposition.contains(&format!("instance_id=\"{id}\"")),
        "{exposition}"
    );
    assert!(
        exposition.contains("gpu_source=\"simulated\""),
        "{exposition}"
    );
    assert_metrics_pass(&exposition, is_upstream_lint);
}
