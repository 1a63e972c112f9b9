//! The web console in a real browser: the real `gpufleet up` with the Mock
//! provider (see `tests/common`), driven through Debian's headless Chromium
//! by `console/e2e/console.e2e.mjs` (playwright-core, never a downloaded
//! browser). Screenshots of every page land in `target/console-screenshots/`.
//!
//! Needs, and fails with a clear message without (it never skips):
//! - `/usr/bin/chromium` (`apt-get install -y chromium`; or `CHROMIUM=...`);
//! - Node.js and `console/node_modules` (`npm ci` in `console/`).

#[path = "common/mod.rs"]
mod common;

use common::{TestApp, BIN};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// Upper bound for the whole browser script.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root")
}

fn screenshot_dir(root: &Path) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let target = if target.is_absolute() {
        target
    } else {
        root.join(target)
    };
    target.join("console-screenshots")
}

/// Fails (does not skip) when the browser test cannot run here.
fn prerequisites(console: &Path) -> String {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).is_file(),
        "the console browser test needs Chromium at {chromium}, which is missing: \
         install Debian's package with `apt-get install -y chromium` (or set CHROMIUM to a Chromium binary)"
    );
    let node = std::process::Command::new("node").arg("--version").output();
    assert!(
        node.as_ref().is_ok_and(|o| o.status.success()),
        "the console browser test needs Node.js (`node` on PATH, version 20 or later): {node:?}"
    );
    assert!(
        console.join("node_modules/playwright-core").is_dir(),
        "the console browser test needs console/node_modules: run `npm ci` in {}",
        console.display()
    );
    chromium
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_in_a_real_browser() {
    let root = repo_root();
    let console = root.join("console");
    let chromium = prerequisites(&console);
    let shots = screenshot_dir(&root);
    std::fs::create_dir_all(&shots).expect("screenshot directory");

    let app = TestApp::spawn(BIN).await;

    // The console must be served by `up` itself, at `/`.
    let resp = app.http.get(app.url("/")).send().await.expect("GET /");
    let status = resp.status();
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = resp.text().await.unwrap_or_default();
    assert!(
        status.is_success() && ctype.starts_with("text/html") && body.contains(r#"<div id="app">"#),
        "`gpufleet up` does not serve the console at /: got {status} {ctype}: {}\n\
         (the API router must be merged with gpufleet_console::router())",
        body.chars().take(300).collect::<String>()
    );

    let mut cmd = tokio::process::Command::new("node");
    cmd.arg("e2e/console.e2e.mjs")
        .current_dir(&console)
        .env("GPUFLEET_URL", &app.base_url)
        .env("GPUFLEET_TOKEN", &app.token)
        .env("CHROMIUM", &chromium)
        .env("SCREENSHOT_DIR", &shots)
        .env("E2E_TIMEOUT_MS", "90000")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().expect("spawn node e2e/console.e2e.mjs");
    let out = match tokio::time::timeout(SCRIPT_TIMEOUT, child.wait_with_output()).await {
        Ok(out) => out.expect("wait for the browser script"),
        Err(_) => panic!(
            "the browser script ran longer than {SCRIPT_TIMEOUT:?}; screenshots in {}\ncontrol plane log:\n{}",
            shots.display(),
            app.log_tail()
        ),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the browser script failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n--- control plane log\n{}",
        out.status,
        app.log_tail()
    );
    assert!(
        stdout.contains("console e2e: OK"),
        "the browser script did not finish:\n{stdout}\n{stderr}"
    );
    for page in [
        "01-sign-in",
        "05-instances-ready",
        "09-instance-detail",
        "11-instance-archived",
        "12-deployment-detail",
    ] {
        assert!(
            shots.join(format!("{page}.png")).is_file(),
            "screenshot {page}.png in {}",
            shots.display()
        );
    }
}
