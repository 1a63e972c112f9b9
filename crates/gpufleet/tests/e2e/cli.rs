//! The client commands against a running control plane.

use crate::common::*;
use gpufleet_api::views::InstanceList;
use gpufleet_domain::InstanceStatus as S;
use std::process::Output;

/// Runs `gpufleet <args>` with a clean environment plus `env`.
async fn gpufleet(args: &[&str], env: &[(&str, &str)]) -> Output {
    run_cli(args, env, "").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_creates_waits_lists_and_explains_missing_tokens() {
    let app = TestApp::spawn(BIN).await;
    let server = app.base_url.as_str();
    let env = [
        ("GPUFLEET_ADMIN_TOKEN", app.token.as_str()),
        ("GPUFLEET_SERVER", server),
    ];

    let out = gpufleet(
        &create_instances_args(&["--wait", "--timeout", "90s"]),
        &env,
    )
    .await;
    assert!(
        out.status.success(),
        "create --wait failed: {}\n{}",
        text(&out.stderr),
        app.log_tail()
    );
    let list = app.list(false).await.unwrap();
    assert_eq!(list.len(), 1, "one instance created");
    assert_eq!(
        list[0].status,
        S::Ready,
        "create --wait returned once ready"
    );
    let id = list[0].id.to_string();

    let out = gpufleet(&["instances", "list"], &env).await;
    assert!(out.status.success(), "list: {}", text(&out.stderr));
    let table = text(&out.stdout);
    assert!(
        table.contains("STATUS") && table.contains("MODEL"),
        "table header: {table}"
    );
    let row = table
        .lines()
        .find(|l| l.contains(&id))
        .unwrap_or_else(|| panic!("{id} not in\n{table}"));
    assert!(
        row.contains("ready") && row.contains(TYPE) && row.contains("100%"),
        "row: {row}"
    );

    let out = gpufleet(&["instances", "list", "--json"], &env).await;
    assert!(out.status.success(), "list --json: {}", text(&out.stderr));
    let parsed: InstanceList = serde_json::from_slice(&out.stdout).expect("list --json parses");
    assert_eq!(parsed.instances[0].id.to_string(), id);

    let out = gpufleet(&["instances", "get", &id, "--json"], &env).await;
    assert!(out.status.success(), "get --json: {}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("get --json parses");
    assert_eq!(v["status"], "ready");

    let out = gpufleet(&["instances", "events", &id], &env).await;
    assert!(out.status.success(), "events: {}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("provider.create"),
        "timeline table: {}",
        text(&out.stdout)
    );

    for args in [
        &["providers", "list"][..],
        &["providers", "types", "mock"],
        &["models", "--json"],
    ] {
        let out = gpufleet(args, &env).await;
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    }

    let out = gpufleet(
        &["instances", "terminate", &id, "--wait", "--timeout", "60s"],
        &env,
    )
    .await;
    assert!(
        out.status.success(),
        "terminate --wait: {}",
        text(&out.stderr)
    );
    assert_eq!(app.get(list[0].id).await.unwrap().status, S::Terminated);

    // No token anywhere: non-zero exit and a hint naming the fix.
    let empty = tempfile::tempdir().unwrap();
    let out = gpufleet(
        &["instances", "list"],
        &[
            ("GPUFLEET_SERVER", server),
            ("GPUFLEET_DATA_DIR", empty.path().to_str().unwrap()),
        ],
    )
    .await;
    assert!(!out.status.success(), "list without a token must fail");
    let err = text(&out.stderr);
    assert!(
        err.contains("GPUFLEET_ADMIN_TOKEN") && err.contains("--token"),
        "hint: {err}"
    );
    assert!(
        err.contains(&empty.path().join("admin-token").display().to_string()),
        "names the file: {err}"
    );

    // The token from the data directory works.
    let dir = app.data_dir.to_str().unwrap();
    let out = gpufleet(
        &["instances", "list", "--data-dir", dir],
        &[("GPUFLEET_SERVER", server)],
    )
    .await;
    assert!(
        out.status.success(),
        "token from --data-dir: {}",
        text(&out.stderr)
    );

    // A wrong token and a dead server are explained.
    let out = gpufleet(
        &["instances", "list", "--token", "gfa_wrong"],
        &[("GPUFLEET_SERVER", server)],
    )
    .await;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("401"), "{}", text(&out.stderr));
    let out = gpufleet(
        &[
            "instances",
            "list",
            "--server",
            "http://127.0.0.1:1",
            "--token",
            "x",
        ],
        &[],
    )
    .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("is `gpufleet up` running at http://127.0.0.1:1"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_deployments_create_scale_get_and_delete() {
    use gpufleet_api::views::{DeploymentList, DeploymentView};
    let app = TestApp::spawn(BIN).await;
    let env = [
        ("GPUFLEET_ADMIN_TOKEN", app.token.as_str()),
        ("GPUFLEET_SERVER", app.base_url.as_str()),
    ];
    let placement = format!("mock/local-1/{TYPE}");
    let out = gpufleet(
        &[
            "deployments",
            "create",
            "sim",
            "--model",
            MODEL,
            "--placement",
            &placement,
            "--min",
            "1",
            "--max",
            "3",
            "--scale-down-delay",
            "1m",
            "--wait",
            "--timeout",
            "90s",
            "--json",
        ],
        &env,
    )
    .await;
    assert!(
        out.status.success(),
        "create --wait failed: {}\n{}",
        text(&out.stderr),
        app.log_tail()
    );
    let d: DeploymentView =
        serde_json::from_slice(&out.stdout).expect("--json prints the deployment");
    assert_eq!(d.status.ready, 1, "create --wait returned once ready");
    assert_eq!(d.autoscaling.scale_down_delay.to_string(), "1m");

    // Bad input names the field and hints at the fix.
    let out = gpufleet(
        &[
            "deployments",
            "create",
            "bad",
            "--model",
            MODEL,
            "--placement",
            "mock/local-1/nope",
        ],
        &env,
    )
    .await;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("placements[0].instance_type") && err.contains("hint:"),
        "{err}"
    );

    // Scale by name, waiting for the second replica.
    let out = gpufleet(
        &[
            "deployments",
            "scale",
            "sim",
            "--min",
            "2",
            "--wait",
            "--timeout",
            "90s",
        ],
        &env,
    )
    .await;
    assert!(out.status.success(), "scale: {}", text(&out.stderr));
    let out = gpufleet(&["deployments", "get", "sim"], &env).await;
    let shown = text(&out.stdout);
    assert!(shown.contains("2 of 2 ready"), "{shown}");

    let out = gpufleet(&["deployments", "list", "--json"], &env).await;
    let list: DeploymentList = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.deployments.len(), 1);
    let out = gpufleet(&["deployments", "list"], &env).await;
    assert!(text(&out.stdout).contains("sim"), "{}", text(&out.stdout));

    let out = gpufleet(
        &["deployments", "delete", "sim", "--wait", "--timeout", "90s"],
        &env,
    )
    .await;
    assert!(out.status.success(), "delete --wait: {}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("deleted"),
        "{}",
        text(&out.stdout)
    );
    for i in app.list(false).await.unwrap() {
        assert_eq!(i.status, S::Terminated, "{}", i.id);
    }
    let out = gpufleet(&["deployments", "get", "sim"], &env).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("gpufleet deployments list"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_sets_and_changes_api_key_limits() {
    let app = TestApp::spawn(BIN).await;
    let env = [
        ("GPUFLEET_ADMIN_TOKEN", app.token.as_str()),
        ("GPUFLEET_SERVER", app.base_url.as_str()),
    ];
    let out = gpufleet(
        &[
            "api-keys", "create", "--json", "--name", "ci", "--rpm", "60", "--budget", "2.5",
        ],
        &env,
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (&created["rpm"], &created["tpm"], &created["monthly_budget"]),
        (&60.into(), &serde_json::Value::Null, &2.5.into())
    );
    let id = created["id"].as_str().unwrap();
    let out = gpufleet(
        &["api-keys", "limits", id, "--rpm", "none", "--tpm", "1000"],
        &env,
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(
        said.contains("rpm -, tpm 1000, monthly budget 2.5"),
        "{said}"
    );
    let out = gpufleet(&["api-keys", "limits", id, "--rpm", "0"], &env).await;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("rpm"), "{}", text(&out.stderr));
    let out = gpufleet(&["api-keys", "list"], &env).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list = text(&out.stdout);
    assert!(list.contains("BUDGET") && list.contains("1000"), "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_runs_once_per_idempotency_key() {
    let app = TestApp::spawn(BIN).await;
    let server = app.base_url.as_str();
    let env = [
        ("GPUFLEET_ADMIN_TOKEN", app.token.as_str()),
        ("GPUFLEET_SERVER", server),
    ];
    let create = |key: &'static str| async move {
        let out = gpufleet(
            &create_instances_args(&["--count", "2", "--idempotency-key", key, "--json"]),
            &env,
        )
        .await;
        assert!(out.status.success(), "create: {}", text(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut ids: Vec<String> = v["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    };
    let first = create("rerun-1").await;
    assert_eq!(first.len(), 2);
    // Run again (a script retrying after a lost answer): the same two.
    assert_eq!(create("rerun-1").await, first);
    assert_eq!(app.list(false).await.unwrap().len(), 2);

    // A malformed key is refused before anything is sent, naming the flag.
    let out = gpufleet(
        &create_instances_args(&["--idempotency-key", "has space"]),
        &env,
    )
    .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--idempotency-key"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(app.list(false).await.unwrap().len(), 2);

    // A server that cannot be reached: retried with the same key, then a
    // clear error.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let out = gpufleet(
        &create_instances_args(&[]),
        &[
            ("GPUFLEET_ADMIN_TOKEN", app.token.as_str()),
            ("GPUFLEET_SERVER", nowhere.as_str()),
        ],
    )
    .await;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert_eq!(
        err.matches("with the same Idempotency-Key").count(),
        2,
        "{err}"
    );
    assert!(err.contains("cannot connect to"), "{err}");
}
