//! Single sign-on through the real routes, against the test OpenID Connect
//! issuer: `/auth/oidc/login` → the issuer (authorization code + PKCE) →
//! `/auth/oidc/callback` → a session. The first sign-in creates the user
//! with no role; a project admin's grant then gives them one. A tampered
//! pending-login cookie, a replayed callback and a refusal at the issuer
//! sign nobody in, and each lands in the audit log.

mod common;

use common::*;
use gpufleet_api::oidc::{ClientSecret, OidcConfig};
use gpufleet_test_support::oidc::{TestIssuer, TestOidcClient, TestOidcUser};
use reqwest::{redirect, StatusCode};
use serde_json::{json, Value};
use std::sync::Arc;

const CLIENT_ID: &str = "gpufleet";
const SECRET: &str = "s3cret-of-the-client";

async fn issuer() -> TestIssuer {
    TestIssuer::start(
        vec![TestOidcUser {
            subject: "sub-ann".into(),
            email: "ann@example.com".into(),
            name: "Ann".into(),
            password: "pw-of-ann".into(),
        }],
        TestOidcClient {
            client_id: CLIENT_ID.into(),
            client_secret: Some(SECRET.into()),
            redirect_uris: vec![],
        },
    )
    .await
}

async fn app_with(issuer: &TestIssuer) -> TestApp {
    let url = issuer.issuer_url().to_string();
    let app = TestApp::spawn_with(|state, base| {
        let config = OidcConfig::new(
            url,
            CLIENT_ID,
            Some(ClientSecret::new(SECRET)),
            format!("{base}/auth/oidc/callback"),
        );
        state.with_sign_in(
            std::time::Duration::from_secs(3600),
            true,
            false,
            Some(config),
        )
    })
    .await;
    issuer.allow_redirect_uri(&app.url("/auth/oidc/callback"));
    app
}

/// A browser: keeps cookies, follows no redirect by itself.
fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .redirect(redirect::Policy::none())
        .build()
        .unwrap()
}

/// GET `url` and read its JSON.
async fn get_json(b: &reqwest::Client, url: impl reqwest::IntoUrl) -> Value {
    b.get(url).send().await.unwrap().json().await.unwrap()
}

fn location(r: &reqwest::Response) -> String {
    r.headers()
        .get("location")
        .unwrap_or_else(|| panic!("no Location in {}", r.status()))
        .to_str()
        .unwrap()
        .to_string()
}

/// Start at gpufleet, pass the issuer (auto-approved), and return the
/// callback URL the issuer sent the browser to.
async fn through_the_issuer(app: &TestApp, b: &reqwest::Client) -> String {
    let r = b
        .get(app.url("/auth/oidc/login?return_to=/deployments"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FOUND);
    let to_issuer = location(&r);
    assert!(
        to_issuer.contains("code_challenge_method=S256"),
        "{to_issuer}"
    );
    let r = b.get(&to_issuer).send().await.unwrap();
    assert!(r.status().is_redirection(), "{}", r.status());
    location(&r)
}

#[tokio::test]
async fn sign_in_with_sso_creates_the_user_then_a_grant_gives_a_role() {
    let issuer = issuer().await;
    let app = app_with(&issuer).await;
    let providers = get_json(&app.client, app.url("/api/v1/auth/providers")).await;
    assert_eq!(providers["oidc"]["login_url"], "/auth/oidc/login");
    assert_eq!(providers["password"], true);

    issuer.auto_approve("sub-ann");
    let b = browser();
    let callback = through_the_issuer(&app, &b).await;
    assert!(
        callback.starts_with(&app.url("/auth/oidc/callback?")),
        "{callback}"
    );
    let r = b.get(&callback).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FOUND);
    assert_eq!(location(&r), "/deployments");
    let me: Value = get_json(&b, app.url("/api/v1/auth/me")).await;
    assert_eq!(me["kind"], "user");
    assert_eq!(me["user"]["email"], "ann@example.com");
    assert_eq!(me["user"]["sso"], true);
    assert_eq!(me["memberships"], json!([]));
    let ann = me["user"]["id"].as_str().unwrap().to_string();

    // No role yet: nothing to see, nothing to create.
    let list: Value = get_json(&b, app.url("/api/v1/instances")).await;
    assert_eq!(list["instances"], json!([]));

    // A grant, then the same session has the role at once.
    let r = app
        .admin(
            reqwest::Method::PUT,
            &format!("/api/v1/projects/default/members/{ann}"),
        )
        .json(&json!({"role": "operator"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let me: Value = get_json(&b, app.url("/api/v1/auth/me")).await;
    assert_eq!(
        me["memberships"],
        json!([{"project_id": "default", "role": "operator"}])
    );

    // Replaying the callback signs nobody in (the code is spent and the
    // pending login is gone).
    let r = b.get(&callback).send().await.unwrap();
    assert!(r.status().is_client_error(), "{}", r.status());

    // Signing in again finds the same user.
    let b2 = browser();
    let callback = through_the_issuer(&app, &b2).await;
    let r = b2.get(&callback).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FOUND);
    let me2: Value = get_json(&b2, app.url("/api/v1/auth/me")).await;
    assert_eq!(me2["user"]["id"], ann.as_str());
    let users: Value = app.get("/api/v1/users").await.json().await.unwrap();
    assert_eq!(users.as_array().unwrap().len(), 1);

    // Both sign-ins and the refused replay are in the audit log.
    let page: Value = app
        .get("/api/v1/audit?action=auth.sign_in")
        .await
        .json()
        .await
        .unwrap();
    let outcomes: Vec<&str> = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, vec!["success", "denied", "success"]);
}

#[tokio::test]
async fn a_tampered_or_missing_pending_login_or_a_refusal_signs_nobody_in() {
    let issuer = Arc::new(issuer().await);
    let app = app_with(&issuer).await;
    issuer.auto_approve("sub-ann");

    // The callback in another browser (no pending login): refused.
    let b = browser();
    let callback = through_the_issuer(&app, &b).await;
    let stranger = browser();
    let r = stranger.get(&callback).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(r.headers().get("set-cookie").is_none());

    // A pending-login cookie changed by hand: refused.
    let r = app
        .client
        .get(&callback)
        .header("cookie", "gpufleet_oidc=eyJzdGF0ZSI6IngifQ.00")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    // The issuer said no.
    let r = b
        .get(app.url("/auth/oidc/callback?error=access_denied&state=x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    // Only a same-site path may be returned to.
    let r = b
        .get(app.url("/auth/oidc/login?return_to=https://evil.example/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["field"], "return_to");

    let me = b.get(app.url("/api/v1/auth/me")).send().await.unwrap();
    assert_eq!(me.status(), 401);
    let users: Value = app.get("/api/v1/users").await.json().await.unwrap();
    assert_eq!(users, json!([]));
}

#[tokio::test]
async fn without_sso_its_routes_say_so() {
    let app = TestApp::spawn().await;
    let providers = get_json(&app.client, app.url("/api/v1/auth/providers")).await;
    assert_eq!(providers["oidc"], Value::Null);
    let r = app
        .client
        .get(app.url("/auth/oidc/login"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}
