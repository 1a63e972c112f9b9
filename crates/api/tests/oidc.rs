//! OpenID Connect sign-in against the test issuer (a real HTTP server):
//! the whole authorization code + PKCE flow, and each way it must fail.

use gpufleet_api::oidc::{
    ClientSecret, IdTokenError, OidcClient, OidcConfig, OidcError, OidcIdentity, PendingLogin,
};
use gpufleet_test_support::oidc::{
    BadIdToken, SigningAlg, TestIssuer, TestOidcClient, TestOidcUser,
};
use reqwest::header::LOCATION;
use reqwest::{redirect, StatusCode, Url};
use std::collections::HashMap;

const CLIENT_ID: &str = "gpufleet";
const SECRET: &str = "s3cret:with/odd&chars";
const REDIRECT: &str = "http://127.0.0.1:1/auth/oidc/callback";

fn ada() -> TestOidcUser {
    TestOidcUser {
        subject: "u-ada".into(),
        email: "ada@example.com".into(),
        name: "Ada Lovelace".into(),
        password: "correct horse".into(),
    }
}

async fn issuer(secret: Option<&str>) -> TestIssuer {
    TestIssuer::start(
        vec![ada()],
        TestOidcClient {
            client_id: CLIENT_ID.into(),
            client_secret: secret.map(str::to_string),
            redirect_uris: vec![REDIRECT.into()],
        },
    )
    .await
}

fn config(issuer: &TestIssuer, secret: Option<&str>) -> OidcConfig {
    OidcConfig::new(
        issuer.issuer_url(),
        CLIENT_ID,
        secret.map(ClientSecret::new),
        REDIRECT,
    )
}

/// A browser that does not follow redirects: the test reads `Location`.
fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(redirect::Policy::none())
        .build()
        .unwrap()
}

/// A confidential client (Basic auth) against an issuer auto-approving Ada.
async fn setup() -> (TestIssuer, OidcClient) {
    let issuer = issuer(Some(SECRET)).await;
    issuer.auto_approve("u-ada");
    let client = OidcClient::discover(config(&issuer, Some(SECRET)), reqwest::Client::new())
        .await
        .unwrap();
    (issuer, client)
}

fn query(url: &str) -> HashMap<String, String> {
    Url::parse(url)
        .unwrap()
        .query_pairs()
        .into_owned()
        .collect()
}

/// begin → GET /authorize (auto-approved) → the callback's code and state.
async fn authorize(client: &OidcClient) -> (PendingLogin, String, String) {
    let (url, pending) = client.begin("/instances");
    let response = browser().get(&url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::FOUND);
    let location = response.headers()[LOCATION].to_str().unwrap().to_string();
    assert!(location.starts_with(REDIRECT), "{location}");
    let q = query(&location);
    (pending, q["code"].clone(), q["state"].clone())
}

async fn sign_in(client: &OidcClient) -> Result<OidcIdentity, OidcError> {
    let (pending, code, state) = authorize(client).await;
    client.finish(&pending, &code, &state).await
}

fn ada_identity(issuer: &TestIssuer) -> OidcIdentity {
    OidcIdentity {
        issuer: issuer.issuer_url().to_string(),
        subject: "u-ada".into(),
        email: Some("ada@example.com".into()),
        email_verified: true,
        name: Some("Ada Lovelace".into()),
    }
}

#[tokio::test]
async fn the_whole_flow_signs_ada_in() {
    let (issuer, client) = setup().await;
    let (url, pending) = client.begin("/instances");
    let q = query(&url);
    assert!(url.starts_with(&format!("{}/authorize?", issuer.issuer_url())));
    assert_eq!(q["response_type"], "code");
    assert_eq!(q["client_id"], CLIENT_ID);
    assert_eq!(q["redirect_uri"], REDIRECT);
    assert_eq!(q["scope"], "openid email profile");
    assert_eq!(q["state"], pending.state);
    assert_eq!(q["nonce"], pending.nonce);
    assert_eq!(q["code_challenge_method"], "S256");
    assert!(!q.contains_key("code_verifier"));
    assert!((43..=128).contains(&pending.code_verifier.len()));
    assert_eq!(pending.return_to, "/instances");
    // The pending login survives a cookie's round trip.
    let sealed = serde_json::to_string(&pending).unwrap();
    let pending: PendingLogin = serde_json::from_str(&sealed).unwrap();

    let response = browser().get(&url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::FOUND);
    let callback = query(response.headers()[LOCATION].to_str().unwrap());
    assert_eq!(callback["state"], pending.state);
    let identity = client
        .finish(&pending, &callback["code"], &callback["state"])
        .await
        .unwrap();
    assert_eq!(identity, ada_identity(&issuer));
    assert_eq!(issuer.token_requests(), 1);
    assert_eq!(issuer.discovery_requests(), 1);
    assert_eq!(issuer.jwks_requests(), 1, "the JWKS is cached");

    // A second sign-in uses the cached keys.
    sign_in(&client).await.unwrap();
    assert_eq!(issuer.jwks_requests(), 1);
}

#[tokio::test]
async fn the_client_authenticates_as_the_issuer_allows() {
    // An issuer that lists client_secret_basic (or nothing: the default)
    // gets Basic; one that lists only client_secret_post gets the form.
    let (issuer, client) = setup().await;
    sign_in(&client).await.unwrap();
    assert_eq!(
        issuer.last_client_auth().as_deref(),
        Some("client_secret_basic")
    );
    let issuer = self::issuer(Some(SECRET)).await;
    issuer.auto_approve("u-ada");
    issuer.only_client_auth(&["client_secret_post"]);
    let client = OidcClient::discover(config(&issuer, Some(SECRET)), reqwest::Client::new())
        .await
        .unwrap();
    let who = sign_in(&client).await.unwrap();
    assert_eq!(who.email.as_deref(), Some("ada@example.com"));
    assert_eq!(
        issuer.last_client_auth().as_deref(),
        Some("client_secret_post")
    );
}

#[tokio::test]
async fn an_issuer_silent_on_email_verified_is_trusted_only_when_configured() {
    // As Microsoft Entra ID: an email, no email_verified.
    let issuer = issuer(Some(SECRET)).await;
    issuer.auto_approve("u-ada");
    issuer.omit_email_verified();
    let client = OidcClient::discover(config(&issuer, Some(SECRET)), reqwest::Client::new())
        .await
        .unwrap();
    let who = sign_in(&client).await.unwrap();
    assert_eq!(who.email.as_deref(), Some("ada@example.com"));
    assert!(
        !who.email_verified,
        "not verified unless the issuer says so"
    );
    let mut trusting = config(&issuer, Some(SECRET));
    trusting.trust_email = true;
    let client = OidcClient::discover(trusting, reqwest::Client::new())
        .await
        .unwrap();
    assert_eq!(sign_in(&client).await.unwrap(), ada_identity(&issuer));
}

#[tokio::test]
async fn a_public_client_with_rs256_tokens_signs_in() {
    let issuer = issuer(None).await;
    issuer.auto_approve("u-ada");
    issuer.sign_with(SigningAlg::Rs256);
    let client = OidcClient::discover(config(&issuer, None), reqwest::Client::new())
        .await
        .unwrap();
    assert_eq!(sign_in(&client).await.unwrap(), ada_identity(&issuer));
}

#[tokio::test]
async fn a_wrong_state_is_refused_before_the_code_is_redeemed() {
    let (issuer, client) = setup().await;
    let (pending, code, _) = authorize(&client).await;
    let (_, other) = client.begin("/");
    for state in [other.state.as_str(), "", "x"] {
        let err = client.finish(&pending, &code, state).await.unwrap_err();
        assert!(matches!(err, OidcError::StateMismatch), "{err:?}");
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
    }
    // A pending login without a state matches nothing, not even "".
    let mut blank = pending.clone();
    blank.state.clear();
    let err = client.finish(&blank, &code, "").await.unwrap_err();
    assert!(matches!(err, OidcError::StateMismatch), "{err:?}");
    assert_eq!(issuer.token_requests(), 0);
}

#[tokio::test]
async fn an_old_pending_login_is_refused() {
    let (issuer, client) = setup().await;
    let (mut pending, code, state) = authorize(&client).await;
    pending.created_at -= 11 * 60 * 1000;
    let err = client.finish(&pending, &code, &state).await.unwrap_err();
    assert!(matches!(err, OidcError::LoginExpired), "{err:?}");
    assert_eq!(issuer.token_requests(), 0);
}

#[tokio::test]
async fn a_replayed_code_is_refused_by_the_issuer() {
    let (issuer, client) = setup().await;
    let (pending, code, state) = authorize(&client).await;
    client.finish(&pending, &code, &state).await.unwrap();
    let err = client.finish(&pending, &code, &state).await.unwrap_err();
    match &err {
        OidcError::TokenEndpoint { status, error, .. } => {
            assert_eq!((*status, error.as_str()), (400, "invalid_grant"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(err.status(), StatusCode::BAD_REQUEST);
    assert_eq!(issuer.token_requests(), 2);
}

#[tokio::test]
async fn a_wrong_pkce_verifier_is_a_token_endpoint_error() {
    let (_issuer, client) = setup().await;
    let (mut pending, code, state) = authorize(&client).await;
    let (_, other) = client.begin("/");
    pending.code_verifier = other.code_verifier;
    let err = client.finish(&pending, &code, &state).await.unwrap_err();
    match &err {
        OidcError::TokenEndpoint {
            status,
            error,
            description,
        } => {
            assert_eq!((*status, error.as_str()), (400, "invalid_grant"));
            assert!(description.as_deref().unwrap().contains("PKCE"), "{err}");
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("invalid_grant"), "{err}");
}

#[tokio::test]
async fn a_wrong_client_secret_is_invalid_client() {
    let issuer = issuer(Some(SECRET)).await;
    issuer.auto_approve("u-ada");
    let client = OidcClient::discover(config(&issuer, Some("nope")), reqwest::Client::new())
        .await
        .unwrap();
    let err = sign_in(&client).await.unwrap_err();
    match &err {
        OidcError::TokenEndpoint { status, error, .. } => {
            assert_eq!((*status, error.as_str()), (401, "invalid_client"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
}

async fn refused(how: BadIdToken) -> IdTokenError {
    let (issuer, client) = setup().await;
    issuer.break_next_id_token(how);
    let err = sign_in(&client).await.unwrap_err();
    assert_eq!(err.status(), StatusCode::UNAUTHORIZED, "{err}");
    match err {
        OidcError::InvalidIdToken(why) => why,
        other => panic!("{how:?}: {other:?}"),
    }
}

#[tokio::test]
async fn bad_id_tokens_are_refused_saying_why() {
    assert_eq!(refused(BadIdToken::Expired).await, IdTokenError::Expired);
    assert_eq!(
        refused(BadIdToken::WrongAudience).await,
        IdTokenError::WrongAudience
    );
    assert_eq!(
        refused(BadIdToken::WrongNonce).await,
        IdTokenError::NonceMismatch
    );
    assert_eq!(
        refused(BadIdToken::WrongIssuer).await,
        IdTokenError::WrongIssuer
    );
    assert_eq!(
        refused(BadIdToken::IssuedInFuture).await,
        IdTokenError::IssuedInFuture
    );
    assert_eq!(
        refused(BadIdToken::SeveralAudiencesWithoutAzp).await,
        IdTokenError::WrongAuthorizedParty { azp: None }
    );
    assert_eq!(
        refused(BadIdToken::ForgedSignature).await,
        IdTokenError::BadSignature
    );
    assert_eq!(
        refused(BadIdToken::AlgNone).await,
        IdTokenError::UnsupportedAlgorithm("none".into())
    );
    assert_eq!(
        refused(BadIdToken::Hs256).await,
        IdTokenError::UnsupportedAlgorithm("HS256".into())
    );
}

#[tokio::test]
async fn a_forged_rs256_signature_is_refused() {
    let (issuer, client) = setup().await;
    issuer.sign_with(SigningAlg::Rs256);
    issuer.break_next_id_token(BadIdToken::ForgedSignature);
    let err = sign_in(&client).await.unwrap_err();
    assert!(
        matches!(err, OidcError::InvalidIdToken(IdTokenError::BadSignature)),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_token_by_an_unknown_key_is_refused_after_one_jwks_refetch() {
    let (issuer, client) = setup().await;
    assert_eq!(issuer.jwks_requests(), 1);
    issuer.break_next_id_token(BadIdToken::UnknownKey);
    let err = sign_in(&client).await.unwrap_err();
    assert!(
        matches!(
            err,
            OidcError::InvalidIdToken(IdTokenError::UnknownKey { kid: Some(_) })
        ),
        "{err:?}"
    );
    assert_eq!(issuer.jwks_requests(), 2, "one refetch for the unknown kid");

    // Another unknown kid within 30 s: no second refetch.
    issuer.break_next_id_token(BadIdToken::UnknownKey);
    let err = sign_in(&client).await.unwrap_err();
    assert!(
        matches!(
            err,
            OidcError::InvalidIdToken(IdTokenError::UnknownKey { .. })
        ),
        "{err:?}"
    );
    assert_eq!(issuer.jwks_requests(), 2);
    // Known keys still work.
    sign_in(&client).await.unwrap();
}

#[tokio::test]
async fn a_rotated_key_is_fetched_when_first_seen() {
    let (issuer, client) = setup().await;
    sign_in(&client).await.unwrap();
    issuer.rotate_keys();
    assert_eq!(sign_in(&client).await.unwrap(), ada_identity(&issuer));
    assert_eq!(issuer.jwks_requests(), 2);
}

#[tokio::test]
async fn discovery_naming_another_issuer_is_refused() {
    let issuer = issuer(None).await;
    issuer.advertise_issuer("https://evil.example");
    let err = OidcClient::discover(config(&issuer, None), reqwest::Client::new())
        .await
        .unwrap_err();
    match &err {
        OidcError::IssuerMismatch {
            expected,
            advertised,
        } => {
            assert_eq!(expected, issuer.issuer_url());
            assert_eq!(advertised, "https://evil.example");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(issuer.jwks_requests(), 0);
}

#[tokio::test]
async fn a_trailing_slash_is_not_the_same_issuer() {
    let issuer = issuer(None).await;
    let mut config = config(&issuer, None);
    config.issuer_url.push('/');
    let err = OidcClient::discover(config, reqwest::Client::new())
        .await
        .unwrap_err();
    assert!(matches!(err, OidcError::IssuerMismatch { .. }), "{err:?}");
    // The discovery URL itself was right: the issuer answered.
    assert_eq!(issuer.discovery_requests(), 1);
}

#[tokio::test]
async fn an_issuer_that_is_not_there_is_unreachable() {
    let url = {
        let issuer = issuer(None).await;
        issuer.issuer_url().to_string()
        // Dropped: its port no longer answers.
    };
    let config = OidcConfig::new(url, CLIENT_ID, None, REDIRECT);
    let err = OidcClient::discover(config, reqwest::Client::new())
        .await
        .unwrap_err();
    assert!(
        matches!(err, OidcError::IssuerUnreachable { .. }),
        "{err:?}"
    );
    assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
}

#[tokio::test]
async fn a_bad_config_is_refused_before_any_request() {
    let issuer = issuer(None).await;
    let mut config = config(&issuer, None);
    config.scopes = vec!["email".into()];
    let err = OidcClient::discover(config, reqwest::Client::new())
        .await
        .unwrap_err();
    match err {
        OidcError::Config(e) => assert_eq!(e.field, "scopes"),
        other => panic!("{other:?}"),
    }
    assert_eq!(issuer.discovery_requests(), 0);
}

#[test]
fn the_oidc_table_reads_from_toml() {
    #[derive(serde::Deserialize)]
    struct File {
        oidc: OidcConfig,
    }
    let file: File = toml::from_str(
        r#"
        [oidc]
        issuer_url = "https://id.example.com"
        client_id = "gpufleet"
        client_secret = "s3cret"
        redirect_url = "https://gpufleet.example.com/auth/oidc/callback"
        "#,
    )
    .unwrap();
    let c = file.oidc;
    c.validate().unwrap();
    assert_eq!(c.client_secret.as_ref().unwrap().expose(), "s3cret");
    assert_eq!(c.scopes, ["openid", "email", "profile"]);
    assert_eq!(c.display_name, "Single sign-on");
    assert!(!format!("{c:?}").contains("s3cret"));

    let typo = toml::from_str::<File>(
        r#"
        [oidc]
        issuer_url = "https://id.example.com"
        client_id = "gpufleet"
        redirect_uri = "https://gpufleet.example.com/auth/oidc/callback"
        "#,
    );
    let message = typo.err().unwrap().to_string();
    assert!(message.contains("redirect_uri"), "{message}");
}

/// The browser path: the issuer's sign-in form, posted with the wrong and
/// then the right password.
#[tokio::test]
async fn the_sign_in_form_takes_the_password() {
    let issuer = issuer(Some(SECRET)).await;
    let client = OidcClient::discover(config(&issuer, Some(SECRET)), reqwest::Client::new())
        .await
        .unwrap();
    let (url, pending) = client.begin("/deployments");
    let response = browser().get(&url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let page = response.text().await.unwrap();
    for needle in [
        r#"name="username""#,
        r#"name="password""#,
        ">Sign in</button>",
    ] {
        assert!(page.contains(needle), "{needle} in {page}");
    }
    assert_eq!(issuer.codes_issued(), 0);

    // The form carries the authorization request's parameters along.
    let form: Vec<(String, String)> = query(&url).into_iter().collect();
    let post = |password: &str| {
        let mut form = form.clone();
        form.push(("username".into(), "ada@example.com".into()));
        form.push(("password".into(), password.into()));
        browser()
            .post(format!("{}/authorize", issuer.issuer_url()))
            .form(&form)
            .send()
    };
    let wrong = post("wrong horse").await.unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert!(wrong.headers().get(LOCATION).is_none());
    assert!(wrong
        .text()
        .await
        .unwrap()
        .contains("Invalid username or password."));
    assert_eq!(issuer.codes_issued(), 0);

    let right = post("correct horse").await.unwrap();
    assert_eq!(right.status(), StatusCode::FOUND);
    let callback = query(right.headers()[LOCATION].to_str().unwrap());
    let identity = client
        .finish(&pending, &callback["code"], &callback["state"])
        .await
        .unwrap();
    assert_eq!(identity, ada_identity(&issuer));
}

#[tokio::test]
async fn the_issuer_refuses_unregistered_redirects_and_missing_pkce() {
    let issuer = issuer(None).await;
    issuer.auto_approve("u-ada");
    let client = OidcClient::discover(config(&issuer, None), reqwest::Client::new())
        .await
        .unwrap();
    let (url, _) = client.begin("/");
    let url = Url::parse(&url).unwrap();
    let params: Vec<(String, String)> = url.query_pairs().into_owned().collect();
    let with = |replace: &str, value: Option<&str>| {
        let mut u = url.clone();
        u.query_pairs_mut().clear();
        for (k, v) in &params {
            if k != replace {
                u.query_pairs_mut().append_pair(k, v);
            }
        }
        if let Some(value) = value {
            u.query_pairs_mut().append_pair(replace, value);
        }
        u.to_string()
    };
    // An unregistered redirect URI: an error page, never a redirect there.
    let r = browser()
        .get(with("redirect_uri", Some("http://evil.example/cb")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(r.headers().get(LOCATION).is_none());
    // No PKCE: back to the client with an error.
    let r = browser()
        .get(with("code_challenge_method", Some("plain")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FOUND);
    let q = query(r.headers()[LOCATION].to_str().unwrap());
    assert_eq!(q["error"], "invalid_request");
    assert_eq!(issuer.codes_issued(), 0);
    // The redirect URI can be allowed later.
    issuer.allow_redirect_uri("http://127.0.0.1:2/cb");
    let r = browser()
        .get(with("redirect_uri", Some("http://127.0.0.1:2/cb")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FOUND);
    assert_eq!(issuer.codes_issued(), 1);
}
