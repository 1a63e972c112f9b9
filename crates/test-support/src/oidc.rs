//! A small OpenID Connect issuer for tests: a real HTTP server on
//! `127.0.0.1:0` (its own tokio task) with discovery, a JWKS, a sign-in form
//! at `/authorize` and a token endpoint that checks one-time codes, PKCE
//! (S256 only), the client's credentials and its redirect URI.
//!
//! ID tokens are signed with an ES256 key made per run (ring) or, after
//! [`TestIssuer::sign_with`]`(`[`SigningAlg::Rs256`]`)`, with a fixed RSA test
//! key committed below (it protects nothing). The knobs for tests:
//! [`auto_approve`](TestIssuer::auto_approve) (no form: `/authorize`
//! redirects straight back with a code, so reqwest can follow it),
//! [`break_next_id_token`](TestIssuer::break_next_id_token),
//! [`rotate_keys`](TestIssuer::rotate_keys),
//! [`advertise_issuer`](TestIssuer::advertise_issuer), and counters of the
//! requests served.

use axum::extract::{Form, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a code may wait to be redeemed.
pub const CODE_LIFETIME: Duration = Duration::from_secs(60);
/// An ID token's lifetime (`exp - iat`).
pub const ID_TOKEN_LIFETIME: Duration = Duration::from_secs(600);

/// A user who can sign in (as `username` = `email` or `subject`).
#[derive(Debug, Clone)]
pub struct TestOidcUser {
    pub subject: String,
    pub email: String,
    pub name: String,
    pub password: String,
}

/// The one client registered at the issuer.
#[derive(Debug, Clone)]
pub struct TestOidcClient {
    pub client_id: String,
    /// `None`: a public client (client_id in the form, PKCE only).
    pub client_secret: Option<String>,
    /// Compared exactly.
    pub redirect_uris: Vec<String>,
}

/// Which key signs the ID tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigningAlg {
    Es256,
    Rs256,
}

/// How [`TestIssuer::break_next_id_token`] spoils the next ID token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadIdToken {
    /// `aud` is another client.
    WrongAudience,
    /// `exp` ten minutes ago (past any leeway).
    Expired,
    /// `iat` ten minutes ahead.
    IssuedInFuture,
    /// `nonce` is not the one the client sent.
    WrongNonce,
    /// `iss` is another issuer.
    WrongIssuer,
    /// `aud` is [client, other] and there is no `azp`.
    SeveralAudiencesWithoutAzp,
    /// Signed by a key the JWKS never publishes, under its own `kid`.
    UnknownKey,
    /// The current key's `kid`, but not its signature.
    ForgedSignature,
    /// `alg: none`, no signature.
    AlgNone,
    /// `alg: HS256`, keyed with the client secret (or `secret`): the
    /// algorithm-confusion forgery.
    Hs256,
}

/// The running issuer; dropping it stops the server.
pub struct TestIssuer {
    url: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestIssuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Shared {
    url: String,
    users: Vec<TestOidcUser>,
    client: TestOidcClient,
    rng: SystemRandom,
    rsa: RsaKey,
    state: Mutex<Mutable>,
    discovery_requests: AtomicU64,
    jwks_requests: AtomicU64,
    token_requests: AtomicU64,
    codes_issued: AtomicU64,
}

struct Mutable {
    es: EsKey,
    alg: SigningAlg,
    extra_redirect_uris: HashSet<String>,
    codes: HashMap<String, Grant>,
    auto_approve: Option<String>,
    next_bad: Option<BadIdToken>,
    advertised_issuer: Option<String>,
    /// The token endpoint's client authentication methods, advertised
    /// and enforced.
    auth_methods: Vec<String>,
    /// The method the last token request authenticated with.
    last_auth_method: Option<String>,
    /// Leave `email_verified` out of ID tokens (as Microsoft Entra ID does).
    omit_email_verified: bool,
}

struct Grant {
    subject: String,
    client_id: String,
    redirect_uri: String,
    code_challenge: String,
    nonce: Option<String>,
    issued: Instant,
}

struct EsKey {
    kid: String,
    pair: EcdsaKeyPair,
}

struct RsaKey {
    kid: String,
    pair: RsaKeyPair,
}

impl TestIssuer {
    /// Binds `127.0.0.1:0` and serves until dropped.
    pub async fn start(users: Vec<TestOidcUser>, client: TestOidcClient) -> TestIssuer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the test issuer");
        let url = format!("http://{}", listener.local_addr().expect("local addr"));
        let rng = SystemRandom::new();
        let es = EsKey::generate(&rng);
        let shared = Arc::new(Shared {
            url: url.clone(),
            users,
            client,
            rsa: RsaKey::fixed(),
            rng,
            state: Mutex::new(Mutable {
                es,
                alg: SigningAlg::Es256,
                extra_redirect_uris: HashSet::new(),
                codes: HashMap::new(),
                auto_approve: None,
                next_bad: None,
                advertised_issuer: None,
                auth_methods: ["client_secret_basic", "client_secret_post", "none"]
                    .map(String::from)
                    .to_vec(),
                last_auth_method: None,
                omit_email_verified: false,
            }),
            discovery_requests: AtomicU64::new(0),
            jwks_requests: AtomicU64::new(0),
            token_requests: AtomicU64::new(0),
            codes_issued: AtomicU64::new(0),
        });
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks", get(jwks))
            .route("/authorize", get(authorize_get).post(authorize_post))
            .route("/token", post(token))
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        TestIssuer { url, shared, task }
    }

    /// Accept (and advertise in discovery) only these client
    /// authentication methods at the token endpoint, e.g.
    /// `["client_secret_post"]` as some issuers do.
    pub fn only_client_auth(&self, methods: &[&str]) {
        self.shared.lock().auth_methods = methods.iter().map(|m| m.to_string()).collect();
    }

    /// Leave the `email_verified` claim out of the ID tokens from now on.
    pub fn omit_email_verified(&self) {
        self.shared.lock().omit_email_verified = true;
    }

    /// How the last token request authenticated: `client_secret_basic`,
    /// `client_secret_post` or `none`.
    pub fn last_client_auth(&self) -> Option<String> {
        self.shared.lock().last_auth_method.clone()
    }

    /// `http://127.0.0.1:PORT` (no trailing slash): the `iss` of its tokens.
    pub fn issuer_url(&self) -> &str {
        &self.url
    }

    /// From now on `/authorize` skips the form and redirects straight back
    /// with a code for `subject`.
    pub fn auto_approve(&self, subject: &str) {
        self.shared.lock().auto_approve = Some(subject.to_string());
    }

    /// Back to the sign-in form.
    pub fn require_sign_in(&self) {
        self.shared.lock().auto_approve = None;
    }

    /// Also accept `uri` as a redirect URI (the client's port is often known
    /// only after the issuer started).
    pub fn allow_redirect_uri(&self, uri: &str) {
        self.shared
            .lock()
            .extra_redirect_uris
            .insert(uri.to_string());
    }

    /// Which key signs the ID tokens from now on (ES256 at first).
    pub fn sign_with(&self, alg: SigningAlg) {
        self.shared.lock().alg = alg;
    }

    /// A new ES256 key with a new `kid` replaces the current one (in the
    /// JWKS too): tokens signed from now on name a `kid` a client's cached
    /// JWKS does not know.
    pub fn rotate_keys(&self) {
        let key = EsKey::generate(&self.shared.rng);
        self.shared.lock().es = key;
    }

    /// The next ID token the token endpoint issues is spoiled as `how`.
    pub fn break_next_id_token(&self, how: BadIdToken) {
        self.shared.lock().next_bad = Some(how);
    }

    /// The discovery document names `issuer` instead of the real one.
    pub fn advertise_issuer(&self, issuer: &str) {
        self.shared.lock().advertised_issuer = Some(issuer.to_string());
    }

    pub fn discovery_requests(&self) -> u64 {
        self.shared.discovery_requests.load(Ordering::SeqCst)
    }

    pub fn jwks_requests(&self) -> u64 {
        self.shared.jwks_requests.load(Ordering::SeqCst)
    }

    /// Every POST to `/token`, good or bad.
    pub fn token_requests(&self) -> u64 {
        self.shared.token_requests.load(Ordering::SeqCst)
    }

    /// Codes handed out by `/authorize`.
    pub fn codes_issued(&self) -> u64 {
        self.shared.codes_issued.load(Ordering::SeqCst)
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Mutable> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn random(&self) -> String {
        let mut bytes = [0u8; 32];
        self.rng.fill(&mut bytes).expect("system randomness");
        URL_SAFE_NO_PAD.encode(bytes)
    }

    fn redirect_uri_allowed(&self, uri: &str) -> bool {
        self.client.redirect_uris.iter().any(|u| u == uri)
            || self.lock().extra_redirect_uris.contains(uri)
    }
}

impl EsKey {
    fn generate(rng: &SystemRandom) -> Self {
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, rng).expect("generate a P-256 key");
        let pair = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), rng).expect("read it back");
        let mut id = [0u8; 8];
        rng.fill(&mut id).expect("system randomness");
        Self {
            kid: format!("es-{}", URL_SAFE_NO_PAD.encode(id)),
            pair,
        }
    }

    fn jwk(&self) -> Value {
        // Uncompressed point: 0x04 || x || y.
        let point = self.pair.public_key().as_ref();
        json!({
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": self.kid,
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        })
    }

    fn sign(&self, rng: &SystemRandom, message: &[u8]) -> Vec<u8> {
        self.pair
            .sign(rng, message)
            .expect("ES256 signing")
            .as_ref()
            .to_vec()
    }
}

impl RsaKey {
    fn fixed() -> Self {
        let der: String = RSA_TEST_KEY_PKCS8
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        let der = STANDARD.decode(der).expect("the test RSA key is base64");
        Self {
            kid: "rsa-test-1".into(),
            pair: RsaKeyPair::from_pkcs8(&der).expect("the test RSA key is PKCS#8"),
        }
    }

    fn jwk(&self) -> Value {
        let public = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(self.pair.public());
        json!({
            "kty": "RSA", "use": "sig", "alg": "RS256", "kid": self.kid,
            "n": URL_SAFE_NO_PAD.encode(&public.n),
            "e": URL_SAFE_NO_PAD.encode(&public.e),
        })
    }

    fn sign(&self, rng: &SystemRandom, message: &[u8]) -> Vec<u8> {
        let mut sig = vec![0u8; self.pair.public().modulus_len()];
        self.pair
            .sign(&signature::RSA_PKCS1_SHA256, rng, message, &mut sig)
            .expect("RS256 signing");
        sig
    }
}

// ---------------------------------------------------------------------------
// Discovery and keys

async fn discovery(State(s): State<Arc<Shared>>) -> Json<Value> {
    s.discovery_requests.fetch_add(1, Ordering::SeqCst);
    let (issuer, auth_methods) = {
        let m = s.lock();
        (
            m.advertised_issuer.clone().unwrap_or_else(|| s.url.clone()),
            m.auth_methods.clone(),
        )
    };
    let url = &s.url;
    Json(json!({
        "issuer": issuer,
        "authorization_endpoint": format!("{url}/authorize"),
        "token_endpoint": format!("{url}/token"),
        "jwks_uri": format!("{url}/jwks"),
        "response_types_supported": ["code"],
        "grant_types_supported": ["authorization_code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256", "RS256"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": auth_methods,
        "scopes_supported": ["openid", "email", "profile"],
        "claims_supported": ["sub", "iss", "aud", "exp", "iat", "nonce", "email", "email_verified", "name"],
    }))
}

async fn jwks(State(s): State<Arc<Shared>>) -> Json<Value> {
    s.jwks_requests.fetch_add(1, Ordering::SeqCst);
    let es = s.lock().es.jwk();
    Json(json!({ "keys": [es, s.rsa.jwk()] }))
}

// ---------------------------------------------------------------------------
// /authorize

/// A checked authorization request.
struct AuthRequest {
    client_id: String,
    redirect_uri: String,
    state: Option<String>,
    nonce: Option<String>,
    code_challenge: String,
}

/// Unknown client or redirect URI: an error page (never a redirect to an
/// unchecked URI). Other problems: back to the client with `error=`.
#[allow(clippy::result_large_err)]
fn check_authorize(s: &Shared, p: &HashMap<String, String>) -> Result<AuthRequest, Response> {
    let client_id = p.get("client_id").cloned().unwrap_or_default();
    if client_id != s.client.client_id {
        return Err(error_page(StatusCode::BAD_REQUEST, "unknown client_id"));
    }
    let redirect_uri = p.get("redirect_uri").cloned().unwrap_or_default();
    if !s.redirect_uri_allowed(&redirect_uri) {
        return Err(error_page(
            StatusCode::BAD_REQUEST,
            "redirect_uri is not registered for this client",
        ));
    }
    let state = p.get("state").cloned();
    let back = |error: &str, description: &str| {
        let mut query = form_urlencoded::Serializer::new(String::new());
        query.append_pair("error", error);
        query.append_pair("error_description", description);
        if let Some(state) = &state {
            query.append_pair("state", state);
        }
        redirect_to(&redirect_uri, &query.finish())
    };
    if p.get("response_type").map(String::as_str) != Some("code") {
        return Err(back("unsupported_response_type", "only response_type=code"));
    }
    let scope = p.get("scope").map(String::as_str).unwrap_or_default();
    if !scope.split(' ').any(|s| s == "openid") {
        return Err(back("invalid_scope", "scope must include openid"));
    }
    if p.get("code_challenge_method").map(String::as_str) != Some("S256") {
        return Err(back(
            "invalid_request",
            "code_challenge_method must be S256",
        ));
    }
    let code_challenge = p.get("code_challenge").cloned().unwrap_or_default();
    if code_challenge.len() != 43 || URL_SAFE_NO_PAD.decode(&code_challenge).is_err() {
        return Err(back(
            "invalid_request",
            "code_challenge must be an S256 challenge",
        ));
    }
    Ok(AuthRequest {
        client_id,
        redirect_uri: redirect_uri.clone(),
        state: state.clone(),
        nonce: p.get("nonce").cloned(),
        code_challenge,
    })
}

async fn authorize_get(
    State(s): State<Arc<Shared>>,
    Query(p): Query<HashMap<String, String>>,
) -> Response {
    let request = match check_authorize(&s, &p) {
        Ok(r) => r,
        Err(response) => return response,
    };
    let auto = s.lock().auto_approve.clone();
    match auto {
        Some(subject) => issue_code(&s, request, subject),
        None => sign_in_form(&p, None).into_response(),
    }
}

async fn authorize_post(
    State(s): State<Arc<Shared>>,
    Form(p): Form<HashMap<String, String>>,
) -> Response {
    let request = match check_authorize(&s, &p) {
        Ok(r) => r,
        Err(response) => return response,
    };
    let username = p.get("username").map(String::as_str).unwrap_or_default();
    let password = p.get("password").map(String::as_str).unwrap_or_default();
    let user = s
        .users
        .iter()
        .find(|u| (u.email == username || u.subject == username) && u.password == password);
    match user {
        Some(user) => issue_code(&s, request, user.subject.clone()),
        None => (
            StatusCode::UNAUTHORIZED,
            sign_in_form(&p, Some("Invalid username or password.")),
        )
            .into_response(),
    }
}

fn issue_code(s: &Shared, request: AuthRequest, subject: String) -> Response {
    let code = s.random();
    let mut query = form_urlencoded::Serializer::new(String::new());
    query.append_pair("code", &code);
    if let Some(state) = &request.state {
        query.append_pair("state", state);
    }
    let location = redirect_to(&request.redirect_uri, &query.finish());
    s.lock().codes.insert(
        code,
        Grant {
            subject,
            client_id: request.client_id,
            redirect_uri: request.redirect_uri,
            code_challenge: request.code_challenge,
            nonce: request.nonce,
            issued: Instant::now(),
        },
    );
    s.codes_issued.fetch_add(1, Ordering::SeqCst);
    location
}

/// 302 (Found), as authorization servers answer.
fn redirect_to(uri: &str, query: &str) -> Response {
    let sep = if uri.contains('?') { '&' } else { '?' };
    let mut response = Redirect::to(&format!("{uri}{sep}{query}")).into_response();
    *response.status_mut() = StatusCode::FOUND;
    response
}

/// The sign-in page: the request's parameters ride along as hidden inputs.
fn sign_in_form(p: &HashMap<String, String>, problem: Option<&str>) -> Html<String> {
    let hidden: String = [
        "client_id",
        "redirect_uri",
        "response_type",
        "scope",
        "state",
        "nonce",
        "code_challenge",
        "code_challenge_method",
    ]
    .iter()
    .filter_map(|name| {
        p.get(*name).map(|v| {
            format!(
                r#"<input type="hidden" name="{name}" value="{}">"#,
                escape(v)
            )
        })
    })
    .collect::<Vec<_>>()
    .join("\n      ");
    let problem = problem
        .map(|m| format!(r#"<p role="alert" class="error">{}</p>"#, escape(m)))
        .unwrap_or_default();
    Html(format!(
        r#"<!doctype html>
<html lang="en">
  <head><meta charset="utf-8"><title>Test issuer: sign in</title></head>
  <body>
    <h1>Sign in to the test issuer</h1>
    {problem}
    <form method="post" action="/authorize">
      {hidden}
      <label>Username <input type="text" name="username" autocomplete="username"></label>
      <label>Password <input type="password" name="password" autocomplete="current-password"></label>
      <button type="submit">Sign in</button>
    </form>
  </body>
</html>
"#
    ))
}

fn error_page(status: StatusCode, message: &str) -> Response {
    (
        status,
        Html(format!(
            "<!doctype html><title>Error</title><h1>Error</h1><p>{}</p>",
            escape(message)
        )),
    )
        .into_response()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

// ---------------------------------------------------------------------------
// /token

/// An RFC 6749 §5.2 error answer.
fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    let mut response = (
        status,
        Json(json!({ "error": error, "error_description": description })),
    )
        .into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(r#"Basic realm="test-issuer""#),
        );
    }
    response
}

/// HTTP Basic client credentials, each half form-urldecoded (RFC 6749
/// §2.3.1). `None`: no Basic header; `Some(None)`: a malformed one.
fn basic_credentials(headers: &HeaderMap) -> Option<Option<(String, String)>> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))?;
    let decoded = STANDARD
        .decode(encoded.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok());
    let Some((id, secret)) = decoded.as_deref().and_then(|d| d.split_once(':')) else {
        return Some(None);
    };
    Some(Some((form_decode(id), form_decode(secret))))
}

fn form_decode(s: &str) -> String {
    form_urlencoded::parse(s.as_bytes())
        .next()
        .map(|(k, _)| k.into_owned())
        .unwrap_or_default()
}

async fn token(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Form(p): Form<HashMap<String, String>>,
) -> Response {
    s.token_requests.fetch_add(1, Ordering::SeqCst);
    if p.get("grant_type").map(String::as_str) != Some("authorization_code") {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "only authorization_code",
        );
    }
    // Client authentication: Basic, or client_id (+ client_secret) in the form.
    let (client_id, secret) = match basic_credentials(&headers) {
        Some(None) => {
            return oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "malformed Basic credentials",
            )
        }
        Some(Some((id, secret))) => {
            if p.get("client_id").is_some_and(|form_id| *form_id != id) {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "client_id in the form differs from the Basic credentials",
                );
            }
            (id, Some(secret))
        }
        None => match p.get("client_id") {
            Some(id) => (id.clone(), p.get("client_secret").cloned()),
            None => {
                return oauth_error(
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                    "no client authentication",
                )
            }
        },
    };
    let method = if basic_credentials(&headers).is_some() {
        "client_secret_basic"
    } else if p.contains_key("client_secret") {
        "client_secret_post"
    } else {
        "none"
    };
    {
        let mut m = s.lock();
        m.last_auth_method = Some(method.to_string());
        if !m.auth_methods.iter().any(|a| a == method) {
            return oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                &format!("client authentication by {method} is not accepted here"),
            );
        }
    }
    if client_id != s.client.client_id {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", "unknown client");
    }
    if let Some(expected) = &s.client.client_secret {
        if secret.as_deref() != Some(expected.as_str()) {
            return oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "wrong or missing client secret",
            );
        }
    }
    let Some(code) = p.get("code") else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "code is missing",
        );
    };
    // One use only: the code is gone whatever happens next.
    let grant = s.lock().codes.remove(code);
    let Some(grant) = grant else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "unknown, expired or already used code",
        );
    };
    if grant.issued.elapsed() > CODE_LIFETIME {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "the code expired");
    }
    if grant.client_id != client_id {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "the code was issued to another client",
        );
    }
    if p.get("redirect_uri") != Some(&grant.redirect_uri) {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "redirect_uri differs from the authorization request's",
        );
    }
    let verifier = p
        .get("code_verifier")
        .map(String::as_str)
        .unwrap_or_default();
    let well_formed = (43..=128).contains(&verifier.len())
        && verifier
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b));
    let challenge = URL_SAFE_NO_PAD.encode(ring::digest::digest(
        &ring::digest::SHA256,
        verifier.as_bytes(),
    ));
    if !well_formed || challenge != grant.code_challenge {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "PKCE verification failed: code_verifier does not match code_challenge",
        );
    }
    let Some(user) = s.users.iter().find(|u| u.subject == grant.subject) else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "the code's user does not exist",
        );
    };
    let id_token = id_token(&s, user, &grant);
    let mut response = Json(json!({
        "access_token": s.random(),
        "id_token": id_token,
        "token_type": "Bearer",
        "expires_in": 3600,
        "scope": "openid email profile",
    }))
    .into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn id_token(s: &Shared, user: &TestOidcUser, grant: &Grant) -> String {
    let (bad, alg, omit_email_verified) = {
        let mut state = s.lock();
        (state.next_bad.take(), state.alg, state.omit_email_verified)
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after the epoch")
        .as_secs() as i64;
    let lifetime = ID_TOKEN_LIFETIME.as_secs() as i64;
    let mut claims = json!({
        "iss": s.url,
        "sub": user.subject,
        "aud": grant.client_id,
        "exp": now + lifetime,
        "iat": now,
        "auth_time": now,
        "email": user.email,
        "email_verified": true,
        "name": user.name,
    });
    if let Some(nonce) = &grant.nonce {
        claims["nonce"] = json!(nonce);
    }
    if omit_email_verified {
        claims
            .as_object_mut()
            .expect("claims are an object")
            .remove("email_verified");
    }
    match bad {
        Some(BadIdToken::WrongAudience) => claims["aud"] = json!("another-client"),
        Some(BadIdToken::Expired) => {
            claims["iat"] = json!(now - 2 * lifetime);
            claims["exp"] = json!(now - lifetime);
        }
        Some(BadIdToken::IssuedInFuture) => {
            claims["iat"] = json!(now + lifetime);
            claims["exp"] = json!(now + 2 * lifetime);
        }
        Some(BadIdToken::WrongNonce) => claims["nonce"] = json!("not-the-nonce-you-sent"),
        Some(BadIdToken::WrongIssuer) => claims["iss"] = json!("https://issuer.invalid"),
        Some(BadIdToken::SeveralAudiencesWithoutAzp) => {
            claims["aud"] = json!([grant.client_id, "another-client"])
        }
        _ => {}
    }
    let payload = serde_json::to_vec(&claims).expect("claims serialize");
    let state = s.lock();
    match (bad, alg) {
        (Some(BadIdToken::UnknownKey), _) => {
            let stranger = EsKey::generate(&s.rng);
            jws("ES256", &stranger.kid, &payload, |m| {
                stranger.sign(&s.rng, m)
            })
        }
        (Some(BadIdToken::ForgedSignature), SigningAlg::Es256) => {
            let stranger = EsKey::generate(&s.rng);
            jws("ES256", &state.es.kid, &payload, |m| {
                stranger.sign(&s.rng, m)
            })
        }
        (Some(BadIdToken::ForgedSignature), SigningAlg::Rs256) => {
            // A real signature by the right key, over another message.
            let signature = s.rsa.sign(&s.rng, b"another message");
            jws("RS256", &s.rsa.kid, &payload, |_| signature)
        }
        (Some(BadIdToken::AlgNone), _) => jws("none", &state.es.kid, &payload, |_| Vec::new()),
        (Some(BadIdToken::Hs256), _) => {
            let secret = s.client.client_secret.as_deref().unwrap_or("secret");
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
            jws("HS256", &state.es.kid, &payload, |m| {
                ring::hmac::sign(&key, m).as_ref().to_vec()
            })
        }
        (_, SigningAlg::Es256) => jws("ES256", &state.es.kid, &payload, |m| {
            state.es.sign(&s.rng, m)
        }),
        (_, SigningAlg::Rs256) => jws("RS256", &s.rsa.kid, &payload, |m| s.rsa.sign(&s.rng, m)),
    }
}

/// A compact JWS: header.payload.signature, each base64url.
fn jws(alg: &str, kid: &str, payload: &[u8], sign: impl FnOnce(&[u8]) -> Vec<u8>) -> String {
    let header = serde_json::to_vec(&json!({ "alg": alg, "typ": "JWT", "kid": kid }))
        .expect("header serializes");
    let message = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(payload)
    );
    let signature = sign(message.as_bytes());
    format!("{message}.{}", URL_SAFE_NO_PAD.encode(signature))
}

/// A 2048-bit RSA key in PKCS#8 DER (base64), made with `openssl genpkey`
/// and `openssl pkcs8 -topk8 -nocrypt` for these tests only: it signs test
/// ID tokens and protects nothing.
const RSA_TEST_KEY_PKCS8: &str = "
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQC0BYFJ76gEMYUUVoD77ot54zO9
kUtwCc7ipNscgxe9TYTn8WCO8FaYjD3ChSWnjTNfVauJbYJdmjQj49xEUczThD7H2oTjunc2RBhX
5E7lk66r79NfzdqVFPk9LDzaLoH3SZLlK+jNSKFM7eBGtQi6nqg8D7btSwOu7L4w0UcCvgKo+y2Y
mST5UqZJNdp1k0C78jU7hZFXfMNMoKw3Z9qVEgQj2Zxpd37uz4GrVbrdFhfnJ1/BF+WGkxe9N7y0
osnVQFQza9vHmbSXlijVjLUqyyMFu38wQkU+tKnpLwtF4jF1hhqEfJ32KPu0OB1f01s/A50JsWNo
OgSMgx88u4tdAgMBAAECggEAH+ob7iIlHL00tRLS4hb7thuf6BsSjyXF/iswxyC8fCx6g+4oap7U
E05Fgq89KjOfqGaVNxNpebOlS7mRKrF/yP3YbXDhf0fm64Ft+WL507x3SncFd6YUerqRpxUpIpr9
InxyJNvAdWhLZEqFqLNefUs0UxWMHgxe9kt1Ok1Xs/Xzj2X+GNQXh5LqYQcvhd9bITJsIo1Z/KBr
RBOaWigF0AYrxN57INQY9HjoAuFFaR+Wql/G0uo81vzhdYvJjlCtbgggfm9XDfH04lIc/1pVhiQ5
rFNihDYtFFMY/DHee4xV1Ziq+/2GK7ddTaSdX6IxxXy6kRf/YzpgDZrLBnko5wKBgQD7Jgs/OEMH
TqH5gyAq/vJ/O7KAaBEwghDaiznzoULNY+IXBj81bMeog9XNHyepBYhoC1yG44p83rONTzpETBM8
3fZE8BIu9BxzqJaBLpERP4eaxtJbHaVX+WDfhfTn0glqlr+91ypIWh6P15mZl2hQOV2cRXFegSZp
7xAk0BMKZwKBgQC3f7rq+d0qEXIy8zKSFHsfPiKdSI29Az4w/lPiOYc+9ywputS8pdMV3649YeE7
OU55/2lMjMDDmGwx4Jf4IuJ4NJuxwt0bayt9aQtIIBh5apHbA8J2yRqZ8yuYE/PeY6q9YAlG53Uq
lUwuTJMqv+8Bd2XnyL5ZuleVSIXsqJBpmwKBgQCzvm6eOG4AdM6H/Miw/PYhCWCfdduXk/7r6mj3
bJqa1LmjMN1cJxZeDLyfqYSA+2y8yiTWhVNAO0LWB7Xz216JWXI/tHHPGPaj8CyHGATLC2TJ6THz
9Cu54sjqML0ujKwglPN1suCYF6d32x4bRrlpcSUGCs0wjc4oUuiC8EgwUQKBgBgLuObJz12P47Mh
g2L5JBk3/zk1JL28Cw5IhZ2DhGGP6k2dmfsOj9ax9Rc+GFG2dL4v5hCN8USwWJ1AnSl7CMpPuodU
zbymEpDgjwXojsx6Vpqop3cBa2b5IqFPHAnsbZdbWlvcQNJPtifrCO31MNC0YLo66BbCAHAjjMky
XZo5AoGBAI3JBvkYZaN8Amzobt/X/VRHTSRLmruhgPvwkOJwYbOIdwEIzeHFwf9G4Ko+KmIqdnIO
mxrgupgsALNYDF6B9KTKaNgg7Xkim/1L4xQ3B83DAaQklcpS2QKjNzs9M+ywUdhW3r7Z2pEM08I0
Hdua3OMgWpLn6om99WLUsboKFiEa
";
