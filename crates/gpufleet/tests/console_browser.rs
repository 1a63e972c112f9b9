//! The web console in a real browser: the real `gpufleet up` with the Mock
//! provider (see `tests/common`), driven through Debian's headless Chromium
//! by `console/e2e/console.e2e.mjs` (playwright-core, never a downloaded
//! browser). Screenshots of every page land in `target/console-screenshots/`.
//!
//! Teams: `up` runs with single sign-on against the test OpenID Connect
//! issuer (`gpufleet_test_support::oidc::TestIssuer`); before the browser
//! starts, the admin token creates a project, the SSO user (by email, so
//! their first SSO sign-in links to it) and a password user, and grants
//! them roles. The script then signs in through the issuer's form, a
//! password, and the admin token.
//!
//! Needs, and fails with a clear message without (it never skips):
//! - `/usr/bin/chromium` (`apt-get install -y chromium`; or `CHROMIUM=...`);
//! - Node.js and `console/node_modules` (`npm ci` in `console/`).

#[path = "common/mod.rs"]
mod common;

use common::{TestApp, BIN};
use gpufleet_test_support::oidc::{TestIssuer, TestOidcClient, TestOidcUser};
use reqwest::Method;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// Upper bound for the whole browser script.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(420);

/// The project the team journey works in.
const PROJECT: &str = "research";
/// The single sign-on user (an admin of `PROJECT`).
const SSO_SUBJECT: &str = "sub-ada";
const SSO_EMAIL: &str = "ada@example.com";
const SSO_NAME: &str = "Ada Lovelace";
const SSO_PASSWORD: &str = "ada-at-the-issuer";
/// What the sign-in button names the issuer.
const SSO_DISPLAY: &str = "Test SSO";
const CLIENT_ID: &str = "gpufleet-console";
const CLIENT_SECRET: &str = "console-e2e-secret";
/// The password user (an operator of `PROJECT`, made a viewer mid-journey).
const PW_EMAIL: &str = "bob@example.com";
const PW_NAME: &str = "Bob Builder";
const PW_PASSWORD: &str = "bob-password-1234";
/// A user with no role, whom the SSO user grants one in the console.
const OTHER_EMAIL: &str = "carol@example.com";

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

/// A call with the admin token (a JSON body unless `body` is null);
/// panics unless the status is `want`.
async fn admin_call(app: &TestApp, method: Method, path: &str, body: Value, want: u16) -> Value {
    let mut req = app.req(method.clone(), path);
    if !body.is_null() {
        req = req.json(&body);
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    assert_eq!(status, want, "{method} {path}: {text}");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// `up` with single sign-on at `issuer`: the callback names the server's
/// own address, known once it listens, so it starts once, stops, and
/// starts again on the same port with `[auth.oidc]`.
async fn app_with_sso(issuer: &TestIssuer) -> TestApp {
    let mut app = TestApp::spawn(BIN).await;
    app.stop(Duration::from_secs(20))
        .expect("gpufleet up stops to take the [auth.oidc] setting");
    let redirect = format!("{}/auth/oidc/callback", app.base_url);
    let mut config = std::fs::read_to_string(&app.config_path).expect("read the test config");
    config.push_str(&format!(
        "\n[auth.oidc]\nissuer_url = \"{}\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret = \"{CLIENT_SECRET}\"\nredirect_url = \"{redirect}\"\ndisplay_name = \"{SSO_DISPLAY}\"\n",
        issuer.issuer_url()
    ));
    std::fs::write(&app.config_path, config).expect("write the test config");
    app.restart().await;
    issuer.allow_redirect_uri(&redirect);
    app
}

/// The team the browser signs in as: a project, the SSO user (created by
/// email before their first SSO sign-in, which links to it) as its admin,
/// a password user as its operator.
async fn make_team(app: &TestApp) {
    admin_call(
        app,
        Method::POST,
        "/api/v1/projects",
        json!({ "id": PROJECT }),
        201,
    )
    .await;
    let ada = admin_call(
        app,
        Method::POST,
        "/api/v1/users",
        json!({ "email": SSO_EMAIL, "display_name": SSO_NAME }),
        201,
    )
    .await;
    let bob = admin_call(
        app,
        Method::POST,
        "/api/v1/users",
        json!({ "email": PW_EMAIL, "display_name": PW_NAME, "password": PW_PASSWORD }),
        201,
    )
    .await;
    admin_call(
        app,
        Method::POST,
        "/api/v1/users",
        json!({ "email": OTHER_EMAIL, "display_name": "Carol" }),
        201,
    )
    .await;
    for (user, role) in [(&ada, "admin"), (&bob, "operator")] {
        let id = user["id"].as_str().expect("a user id");
        admin_call(
            app,
            Method::PUT,
            &format!("/api/v1/projects/{PROJECT}/members/{id}"),
            json!({ "role": role }),
            200,
        )
        .await;
    }
    let providers: Value = app
        .http
        .get(app.url("/api/v1/auth/providers"))
        .send()
        .await
        .expect("GET /api/v1/auth/providers")
        .json()
        .await
        .expect("providers JSON");
    assert_eq!(
        providers["oidc"]["name"], SSO_DISPLAY,
        "single sign-on is offered: {providers}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_in_a_real_browser() {
    let root = repo_root();
    let console = root.join("console");
    let chromium = prerequisites(&console);
    let shots = screenshot_dir(&root);
    std::fs::create_dir_all(&shots).expect("screenshot directory");

    let issuer = TestIssuer::start(
        vec![TestOidcUser {
            subject: SSO_SUBJECT.into(),
            email: SSO_EMAIL.into(),
            name: SSO_NAME.into(),
            password: SSO_PASSWORD.into(),
        }],
        TestOidcClient {
            client_id: CLIENT_ID.into(),
            client_secret: Some(CLIENT_SECRET.into()),
            redirect_uris: vec![],
        },
    )
    .await;
    let app = app_with_sso(&issuer).await;
    make_team(&app).await;

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
        .env("E2E_PROJECT", PROJECT)
        .env("E2E_SSO_NAME", SSO_DISPLAY)
        .env("E2E_SSO_EMAIL", SSO_EMAIL)
        .env("E2E_SSO_DISPLAY_NAME", SSO_NAME)
        .env("E2E_SSO_PASSWORD", SSO_PASSWORD)
        .env("E2E_PW_EMAIL", PW_EMAIL)
        .env("E2E_PW_NAME", PW_NAME)
        .env("E2E_PW_PASSWORD", PW_PASSWORD)
        .env("E2E_OTHER_EMAIL", OTHER_EMAIL)
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
    // The SSO sign-in linked to the user made by email: one user, now with SSO.
    let users = admin_call(&app, Method::GET, "/api/v1/users", Value::Null, 200).await;
    let ada: Vec<&Value> = users
        .as_array()
        .expect("a list of users")
        .iter()
        .filter(|u| u["email"] == SSO_EMAIL)
        .collect();
    assert!(
        ada.len() == 1 && ada[0]["sso"] == true,
        "the SSO sign-in linked to the user made by email: {users}"
    );
    assert!(
        issuer.codes_issued() >= 1 && issuer.token_requests() >= 1,
        "the browser signed in through the issuer ({} codes, {} token requests)",
        issuer.codes_issued(),
        issuer.token_requests()
    );
    for page in [
        "01-sign-in",
        "05-instances-ready",
        "09-instance-detail",
        "11-instance-archived",
        "12-deployment-detail",
        "20-sso-issuer",
        "21-sso-signed-in",
        "22-api-keys",
        "23-audit",
        "24-spend",
        "25-projects",
        "26-account",
        "28-viewer-refused",
        "29-audit-admin",
    ] {
        assert!(
            shots.join(format!("{page}.png")).is_file(),
            "screenshot {page}.png in {}",
            shots.display()
        );
    }
}
