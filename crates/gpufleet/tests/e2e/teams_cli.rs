//! Teams from the command line, against the real `gpufleet up`: the admin
//! token makes a project and a user and grants a role; the user logs in
//! (a personal access token kept in a 0600 credentials file), works in
//! their project, is refused what their role does not allow (with a hint),
//! and logs out (the token is revoked). The audit log shows it all.

use crate::common::*;
use std::process::Output;

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        text(&out.stderr),
        text(&out.stdout)
    );
    text(&out.stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_logs_in_works_in_their_project_and_logs_out() {
    let app = TestApp::spawn(BIN).await;
    let server = app.base_url.as_str();
    let home = tempfile::tempdir().unwrap();
    let creds = home.path().join("credentials.json");
    let creds = creds.to_str().unwrap();
    let admin = [
        ("GPUFLEET_ADMIN_TOKEN", app.token.as_str()),
        ("GPUFLEET_SERVER", server),
        ("GPUFLEET_CREDENTIALS", creds),
    ];
    let user = [("GPUFLEET_SERVER", server), ("GPUFLEET_CREDENTIALS", creds)];

    ok(
        &run_cli(&["projects", "create", "research"], &admin, "").await,
        "create project",
    );
    ok(
        &run_cli(
            &[
                "users",
                "create",
                "--email",
                "ann@example.com",
                "--name",
                "Ann",
                "--password-stdin",
            ],
            &admin,
            "correct horse battery staple\n",
        )
        .await,
        "create user",
    );
    ok(
        &run_cli(
            &[
                "projects",
                "grant",
                "research",
                "--user",
                "ann@example.com",
                "--role",
                "operator",
            ],
            &admin,
            "",
        )
        .await,
        "grant",
    );

    // A wrong password: refused, nothing saved.
    let out = run_cli(
        &["login", "--email", "ann@example.com", "--password-stdin"],
        &user,
        "not the password at all\n",
    )
    .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("wrong email or password"),
        "{}",
        text(&out.stderr)
    );
    assert!(!std::path::Path::new(creds).exists());

    let out = ok(
        &run_cli(
            &["login", "--email", "ann@example.com", "--password-stdin"],
            &user,
            "correct horse battery staple\n",
        )
        .await,
        "login",
    );
    assert!(out.contains("logged in"), "{out}");
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(creds).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the credentials file is the user's alone");
    let saved = std::fs::read_to_string(creds).unwrap();
    assert!(
        saved.contains("gfp_") && !saved.contains("correct horse"),
        "{saved}"
    );

    let who = ok(&run_cli(&["whoami"], &user, "").await, "whoami");
    assert!(
        who.contains("ann@example.com") && who.contains("research: operator"),
        "{who}"
    );

    // Work in the project; the only one, so it need not be named.
    ok(
        &run_cli(&create_instances_args(&[]), &user, "").await,
        "create instance",
    );
    let list = ok(
        &run_cli(&["instances", "list", "--json"], &user, "").await,
        "list",
    );
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let ours = list["instances"].as_array().unwrap();
    assert_eq!(ours.len(), 1);
    // The admin token sees it in `research`.
    let all = app.list(false).await.unwrap();
    assert_eq!(all.len(), 1);

    // What the role does not allow: refused, with a hint.
    let out = run_cli(&["projects", "create", "other"], &user, "").await;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("403") && err.contains("hint:"), "{err}");

    // The audit log, as the admin token sees it.
    let audit = ok(
        &run_cli(&["audit", "--actor", "ann@example.com"], &admin, "").await,
        "audit",
    );
    for action in [
        "auth.sign_in",
        "token.create",
        "instance.create",
        "project.create",
    ] {
        assert!(audit.contains(action), "{action} missing from:\n{audit}");
    }
    assert!(audit.contains("denied"), "{audit}");

    // Logging out revokes the token.
    let token = serde_json::from_str::<serde_json::Value>(&saved).unwrap()[server]["token"]
        .as_str()
        .unwrap()
        .to_string();
    ok(&run_cli(&["logout"], &user, "").await, "logout");
    let r = app
        .http
        .get(format!("{server}/api/v1/auth/me"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let out = run_cli(&["whoami"], &user, "").await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("gpufleet login"),
        "{}",
        text(&out.stderr)
    );

    // Neither the password nor the token is anywhere in clear: not in the
    // log, not in the database (digests and an argon2 hash only).
    let log = std::fs::read_to_string(app.data_dir.join("up.log")).unwrap_or_default();
    let mut places = vec![("the log", log.into_bytes())];
    if let Some(path) = app.db.url().strip_prefix("sqlite://") {
        let path = path.split('?').next().unwrap_or(path);
        for file in [path.to_string(), format!("{path}-wal")] {
            if let Ok(bytes) = std::fs::read(&file) {
                places.push(("the database", bytes));
            }
        }
    }
    assert!(
        places.len() > 1 || !app.db.url().starts_with("sqlite"),
        "no database file read"
    );
    for (place, bytes) in &places {
        let hay = String::from_utf8_lossy(bytes);
        for secret in ["correct horse battery staple", token.as_str()] {
            assert!(!hay.contains(secret), "{place} holds a secret in clear");
        }
    }
}
