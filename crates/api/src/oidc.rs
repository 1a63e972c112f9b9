//! OpenID Connect single sign-on: the relying party (the client side).
//!
//! The flow is the authorization code flow with PKCE (S256), a `state`
//! bound to the browser and a `nonce` bound to the ID token:
//!
//! 1. [`OidcClient::discover`] reads the issuer's discovery document
//!    (`{issuer}/.well-known/openid-configuration`), checks that it names the
//!    configured issuer exactly, and fetches its signing keys (JWKS).
//! 2. [`OidcClient::begin`] makes the URL to send the browser to and a
//!    [`PendingLogin`] (state, nonce, PKCE verifier, where to go back to) that
//!    the caller seals into a short-lived cookie.
//! 3. [`OidcClient::finish`], on the callback, checks the state (constant
//!    time), redeems the code at the token endpoint with the verifier, and
//!    validates the ID token (signature by a key of the issuer's JWKS,
//!    `iss`, `aud`, `azp`, `exp`/`iat`/`nbf` with [`CLOCK_LEEWAY`], `nonce`)
//!    into an [`OidcIdentity`].
//!
//! The JWKS is cached; a token signed with a key id the cache does not know
//! makes one refetch (at most one per [`JWKS_REFETCH_MIN_INTERVAL`]: a stream
//! of forged key ids cannot make us hammer the issuer), and the cache is
//! refreshed when older than [`JWKS_MAX_AGE`] (so removed keys stop being
//! trusted).
//!
//! Tokens with `alg: none` or an HMAC algorithm (`HS*`) are rejected before
//! any key is looked up: an HMAC "signature" keyed with a public key is the
//! classic algorithm-confusion forgery.

use axum::http::StatusCode;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use gpufleet_control::secrets::constant_time_eq;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rand::RngCore;
use reqwest::Url;
use serde::{Deserialize, Deserializer, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Mutex;

/// The scopes asked for when the configuration names none.
pub const DEFAULT_SCOPES: [&str; 3] = ["openid", "email", "profile"];
/// The sign-in button's label when the configuration names none.
pub const DEFAULT_DISPLAY_NAME: &str = "Single sign-on";
/// Clock skew tolerated between us and the issuer (`exp`, `iat`, `nbf`).
pub const CLOCK_LEEWAY: Duration = Duration::from_secs(60);
/// A token with an unknown key id refetches the JWKS at most this often.
pub const JWKS_REFETCH_MIN_INTERVAL: Duration = Duration::from_secs(30);
/// A cached JWKS older than this is fetched again before it is used.
pub const JWKS_MAX_AGE: Duration = Duration::from_secs(3600);
/// How long a [`PendingLogin`] stays good: the user's time at the issuer.
pub const PENDING_LOGIN_TTL: Duration = Duration::from_secs(10 * 60);
/// Each request to the issuer (discovery, JWKS, token) gives up after this.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// The most we read of any answer from the issuer.
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

// ---------------------------------------------------------------------------
// Configuration

/// The client secret. Its `Debug` and `Display` print `***`; only
/// [`ClientSecret::expose`] gives the value (for the token request).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct ClientSecret(String);

impl ClientSecret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    /// The value itself. Only the token request uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// Written out (a configuration dump) as `***`, never the value.
impl serde::Serialize for ClientSecret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

impl fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for ClientSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The `[oidc]` table of gpufleet's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// The issuer identifier, exactly as the issuer's discovery document
    /// spells it (`https://accounts.example.com`, no trailing slash unless
    /// the issuer has one).
    pub issuer_url: String,
    pub client_id: String,
    /// Absent for a public client (PKCE only); present for a confidential
    /// one, sent as HTTP Basic (`client_secret_basic`), or in the form when
    /// the issuer lists only `client_secret_post`.
    #[serde(default)]
    pub client_secret: Option<ClientSecret>,
    /// gpufleet's callback, registered at the issuer:
    /// `https://gpufleet.example.com/auth/oidc/callback`.
    pub redirect_url: String,
    /// Must include `openid`.
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
    /// What the sign-in button says ("Sign in with …").
    #[serde(default = "default_display_name")]
    pub display_name: String,
    /// Accept a plain-http issuer (and endpoints) on a host other than
    /// localhost: only on a network you trust (an issuer in a private
    /// network or a container beside gpufleet). Off: https, or http to a
    /// loopback address.
    #[serde(default)]
    pub allow_http: bool,
    /// Take the `email` claim as verified when the issuer does not say
    /// (some, such as Microsoft Entra ID, never send `email_verified`).
    /// Only for an issuer whose users cannot choose their email freely: a
    /// verified email links the sign-in to the gpufleet user of that email.
    #[serde(default)]
    pub trust_email: bool,
}

fn default_scopes() -> Vec<String> {
    DEFAULT_SCOPES.iter().map(|s| s.to_string()).collect()
}

fn default_display_name() -> String {
    DEFAULT_DISPLAY_NAME.to_string()
}

/// A bad `[oidc]` setting, naming it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("oidc.{field}: {message}")]
pub struct OidcConfigError {
    /// The setting's name in the `[oidc]` table (`issuer_url`, ...).
    pub field: &'static str,
    pub message: String,
}

impl OidcConfigError {
    fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }
}

impl OidcConfig {
    /// A configuration with the default scopes and display name.
    pub fn new(
        issuer_url: impl Into<String>,
        client_id: impl Into<String>,
        client_secret: Option<ClientSecret>,
        redirect_url: impl Into<String>,
    ) -> Self {
        Self {
            issuer_url: issuer_url.into(),
            client_id: client_id.into(),
            client_secret,
            redirect_url: redirect_url.into(),
            scopes: default_scopes(),
            display_name: default_display_name(),
            allow_http: false,
            trust_email: false,
        }
    }

    /// Checks every setting; the error names the first bad one.
    pub fn validate(&self) -> Result<(), OidcConfigError> {
        let issuer = Url::parse(&self.issuer_url).map_err(|e| {
            OidcConfigError::new(
                "issuer_url",
                format!("{:?} is not a URL: {e}", self.issuer_url),
            )
        })?;
        check_secure_url(&issuer, self.allow_http)
            .map_err(|m| OidcConfigError::new("issuer_url", m))?;
        if issuer.query().is_some() || issuer.fragment().is_some() {
            return Err(OidcConfigError::new(
                "issuer_url",
                "an issuer URL has no query or fragment",
            ));
        }
        if self.client_id.trim().is_empty() {
            return Err(OidcConfigError::new("client_id", "must not be empty"));
        }
        if let Some(secret) = &self.client_secret {
            if secret.expose().is_empty() {
                return Err(OidcConfigError::new(
                    "client_secret",
                    "must not be empty (leave it out for a public client)",
                ));
            }
        }
        let redirect = Url::parse(&self.redirect_url).map_err(|e| {
            OidcConfigError::new(
                "redirect_url",
                format!("{:?} is not a URL: {e}", self.redirect_url),
            )
        })?;
        if !matches!(redirect.scheme(), "http" | "https") {
            return Err(OidcConfigError::new(
                "redirect_url",
                "must be an http or https URL",
            ));
        }
        if redirect.fragment().is_some() {
            return Err(OidcConfigError::new(
                "redirect_url",
                "must not have a fragment",
            ));
        }
        if !self.scopes.iter().any(|s| s == "openid") {
            return Err(OidcConfigError::new("scopes", "must include \"openid\""));
        }
        if let Some(bad) = self
            .scopes
            .iter()
            .find(|s| s.is_empty() || s.chars().any(|c| c.is_whitespace() || c == '"'))
        {
            return Err(OidcConfigError::new(
                "scopes",
                format!("{bad:?} is not a scope token"),
            ));
        }
        if self.display_name.trim().is_empty() {
            return Err(OidcConfigError::new("display_name", "must not be empty"));
        }
        Ok(())
    }
}

/// https, or http to a loopback host (a local issuer in development and tests).
fn check_secure_url(url: &Url, allow_http: bool) -> Result<(), String> {
    match url.scheme() {
        "https" => Ok(()),
        "http" if allow_http || is_loopback(url) => Ok(()),
        "http" => Err(format!(
            "{url} must use https (plain http only to localhost, or with allow_http = true on a network you trust)"
        )),
        other => Err(format!("{url}: scheme {other:?} is not https")),
    }
}

fn is_loopback(url: &Url) -> bool {
    match url.host_str() {
        Some(h) if h.eq_ignore_ascii_case("localhost") => true,
        Some(h) => h
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    }
}

// ---------------------------------------------------------------------------
// Errors

/// Why an ID token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdTokenError {
    #[error("the token endpoint's answer has no id_token")]
    Missing,
    #[error("malformed: {0}")]
    Malformed(String),
    #[error("algorithm {0:?} is not accepted (asymmetric signatures only: RS*, PS*, ES256, ES384, EdDSA)")]
    UnsupportedAlgorithm(String),
    #[error("signed with a key the issuer does not publish (kid {kid:?})")]
    UnknownKey { kid: Option<String> },
    #[error("the issuer's key {kid:?} is unusable: {reason}")]
    BadKey { kid: Option<String>, reason: String },
    #[error("the signature does not verify")]
    BadSignature,
    #[error("iss is not the configured issuer")]
    WrongIssuer,
    #[error("aud does not contain our client_id")]
    WrongAudience,
    #[error("azp {azp:?} is not our client_id")]
    WrongAuthorizedParty { azp: Option<String> },
    #[error("expired")]
    Expired,
    #[error("issued in the future (iat)")]
    IssuedInFuture,
    #[error("not valid yet (nbf)")]
    NotYetValid,
    #[error("the nonce is not the one this sign-in sent")]
    NonceMismatch,
    #[error("the {0} claim is missing")]
    MissingClaim(String),
}

/// Why a sign-in failed. [`OidcError::status`] maps each to HTTP.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OidcError {
    #[error(transparent)]
    Config(#[from] OidcConfigError),
    /// The callback's `state` is not the pending login's: a forged or crossed
    /// callback (login CSRF), or a second tab. 400.
    #[error("the sign-in's state does not match the one this browser started")]
    StateMismatch,
    /// The pending login is older than [`PENDING_LOGIN_TTL`]. 400.
    #[error("the sign-in took too long; start again")]
    LoginExpired,
    /// The issuer sent the browser back with `error=` instead of a code
    /// (the user declined, ...). The callback route builds it. 403 when
    /// `access_denied`, else 400.
    #[error("the identity provider refused the sign-in: {error}{}", describe(.description))]
    AuthorizationDenied {
        error: String,
        description: Option<String>,
    },
    /// Discovery, JWKS or token endpoint could not be reached, or answered
    /// 5xx. 502.
    #[error("the identity provider at {url} could not be reached: {reason}")]
    IssuerUnreachable { url: String, reason: String },
    /// The issuer answered something unusable (not JSON, missing fields). 502.
    #[error("the identity provider at {url} answered something unusable: {reason}")]
    BadIssuerResponse { url: String, reason: String },
    /// The discovery document names another issuer. 502.
    #[error("the discovery document names issuer {advertised:?}, not the configured {expected:?}")]
    IssuerMismatch {
        expected: String,
        advertised: String,
    },
    /// The token endpoint refused the code with an RFC 6749 error
    /// (`invalid_grant`: expired, replayed, bad PKCE verifier;
    /// `invalid_client`: our credentials). 400 for `invalid_grant`, else 502.
    #[error("the token endpoint refused the code (HTTP {status}): {error}{}", describe(.description))]
    TokenEndpoint {
        status: u16,
        error: String,
        description: Option<String>,
    },
    /// The ID token did not validate. 401.
    #[error("the ID token is invalid: {0}")]
    InvalidIdToken(#[from] IdTokenError),
}

fn describe(description: &Option<String>) -> String {
    description
        .as_deref()
        .map(|d| format!(" ({d})"))
        .unwrap_or_default()
}

impl OidcError {
    /// The HTTP status a sign-in route answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Config(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::StateMismatch | Self::LoginExpired => StatusCode::BAD_REQUEST,
            Self::AuthorizationDenied { error, .. } if error == "access_denied" => {
                StatusCode::FORBIDDEN
            }
            Self::AuthorizationDenied { .. } => StatusCode::BAD_REQUEST,
            Self::IssuerUnreachable { .. }
            | Self::BadIssuerResponse { .. }
            | Self::IssuerMismatch { .. } => StatusCode::BAD_GATEWAY,
            Self::TokenEndpoint { error, .. } if error == "invalid_grant" => {
                StatusCode::BAD_REQUEST
            }
            Self::TokenEndpoint { .. } => StatusCode::BAD_GATEWAY,
            Self::InvalidIdToken(_) => StatusCode::UNAUTHORIZED,
        }
    }

    /// A stable machine-readable code for the `{"error":{"code"}}` body.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Config(_) => "oidc_config",
            Self::StateMismatch => "oidc_state_mismatch",
            Self::LoginExpired => "oidc_login_expired",
            Self::AuthorizationDenied { .. } => "oidc_denied",
            Self::IssuerUnreachable { .. } => "oidc_issuer_unreachable",
            Self::BadIssuerResponse { .. } => "oidc_bad_issuer_response",
            Self::IssuerMismatch { .. } => "oidc_issuer_mismatch",
            Self::TokenEndpoint { .. } => "oidc_token_error",
            Self::InvalidIdToken(_) => "oidc_invalid_id_token",
        }
    }
}

// ---------------------------------------------------------------------------
// The flow's values

/// A sign-in between [`OidcClient::begin`] and [`OidcClient::finish`]. The
/// caller keeps it on the browser (a sealed, HttpOnly, short-lived cookie).
/// `Debug` leaves out the secrets.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingLogin {
    /// 32 random bytes, base64url: the `state` parameter.
    pub state: String,
    /// 32 random bytes, base64url: the `nonce` the ID token must carry.
    pub nonce: String,
    /// The PKCE code verifier (43 characters of base64url).
    pub code_verifier: String,
    /// Where to send the browser once signed in, as given to `begin`.
    pub return_to: String,
    /// Milliseconds since the epoch.
    pub created_at: i64,
}

impl fmt::Debug for PendingLogin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingLogin")
            .field("return_to", &self.return_to)
            .field("created_at", &self.created_at)
            .finish_non_exhaustive()
    }
}

/// Who signed in, as the issuer vouches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcIdentity {
    /// The issuer (the configured `issuer_url`, equal to the token's `iss`).
    pub issuer: String,
    /// `sub`: stable and unique within the issuer; (issuer, subject) is the
    /// user's key.
    pub subject: String,
    pub email: Option<String>,
    /// False when the claim is absent: only a verified email may be matched
    /// to an existing user.
    pub email_verified: bool,
    pub name: Option<String>,
}

/// `return_to` when it is a path on this origin (`/instances?x=1`), else
/// `None`: no scheme, no `//host`, no backslashes (browsers read `/\host` as
/// `//host`), no control characters.
pub fn safe_return_to(return_to: &str) -> Option<&str> {
    let ok = return_to.starts_with('/')
        && !return_to.starts_with("//")
        && !return_to.contains('\\')
        && !return_to.chars().any(|c| c.is_control());
    ok.then_some(return_to)
}

// ---------------------------------------------------------------------------
// The client

/// The relying party: one per configured issuer, cheap to clone.
#[derive(Clone)]
pub struct OidcClient {
    inner: Arc<Inner>,
}

struct Inner {
    config: OidcConfig,
    http: reqwest::Client,
    authorization_endpoint: Url,
    token_endpoint: Url,
    /// How a confidential client authenticates at the token endpoint.
    client_auth: ClientAuth,
    jwks_uri: Url,
    jwks: Mutex<JwksCache>,
}

/// Client authentication at the token endpoint (OIDC Core §9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientAuth {
    /// HTTP Basic: the default, and what every issuer must accept.
    SecretBasic,
    /// `client_id` and `client_secret` in the form, for issuers that list
    /// only `client_secret_post`.
    SecretPost,
}

impl ClientAuth {
    /// What the discovery document's `token_endpoint_auth_methods_supported`
    /// allows (absent: `client_secret_basic`, the specification's default).
    fn choose(supported: Option<&[String]>) -> ClientAuth {
        match supported {
            Some(methods)
                if !methods.iter().any(|m| m == "client_secret_basic")
                    && methods.iter().any(|m| m == "client_secret_post") =>
            {
                ClientAuth::SecretPost
            }
            _ => ClientAuth::SecretBasic,
        }
    }
}

struct JwksCache {
    keys: Vec<Jwk>,
    fetched_at: Instant,
    /// The last refetch an unknown `kid` caused.
    last_refetch: Option<Instant>,
}

impl fmt::Debug for OidcClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OidcClient")
            .field("issuer", &self.inner.config.issuer_url)
            .field("client_id", &self.inner.config.client_id)
            .field(
                "authorization_endpoint",
                &self.inner.authorization_endpoint.as_str(),
            )
            .field("token_endpoint", &self.inner.token_endpoint.as_str())
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct DiscoveryDocument {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
    #[serde(default)]
    code_challenge_methods_supported: Option<Vec<String>>,
    #[serde(default)]
    token_endpoint_auth_methods_supported: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    id_token: Option<String>,
}

#[derive(Deserialize)]
struct TokenErrorResponse {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

/// The ID token claims we read (the signature and `exp`/`nbf`/`iss`/`aud`
/// are checked by jsonwebtoken).
#[derive(Deserialize)]
struct IdClaims {
    sub: String,
    aud: Audience,
    #[serde(default)]
    azp: Option<String>,
    #[serde(default)]
    iat: Option<i64>,
    #[serde(default)]
    nonce: Option<String>,
    #[serde(default)]
    email: Option<String>,
    /// `None`: the issuer did not say.
    #[serde(default, deserialize_with = "bool_or_string")]
    email_verified: Option<bool>,
    #[serde(default)]
    name: Option<String>,
}

/// `aud`: one string or an array (jsonwebtoken checks the values; we need
/// only how many there are, for `azp`).
#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    Many(Vec<serde::de::IgnoredAny>),
    One(serde::de::IgnoredAny),
}

impl Audience {
    fn len(&self) -> usize {
        match self {
            Self::Many(v) => v.len(),
            Self::One(_) => 1,
        }
    }
}

/// `email_verified` is a boolean, but some issuers send `"true"`.
fn bool_or_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum B {
        Bool(bool),
        Str(String),
    }
    Ok(match Option::<B>::deserialize(d)? {
        Some(B::Bool(b)) => Some(b),
        Some(B::Str(s)) => Some(s.eq_ignore_ascii_case("true")),
        None => None,
    })
}

impl OidcClient {
    /// Validates `config`, reads the issuer's discovery document (its
    /// `issuer` must equal `config.issuer_url` exactly) and its JWKS.
    pub async fn discover(config: OidcConfig, http: reqwest::Client) -> Result<Self, OidcError> {
        config.validate()?;
        let url = format!(
            "{}/.well-known/openid-configuration",
            config.issuer_url.trim_end_matches('/')
        );
        let body = get(&http, &url).await?;
        let doc: DiscoveryDocument =
            serde_json::from_slice(&body).map_err(|e| OidcError::BadIssuerResponse {
                url: url.clone(),
                reason: format!("not a discovery document: {e}"),
            })?;
        if doc.issuer != config.issuer_url {
            return Err(OidcError::IssuerMismatch {
                expected: config.issuer_url.clone(),
                advertised: doc.issuer,
            });
        }
        let endpoint = |value: &str, name: &str| -> Result<Url, OidcError> {
            let parsed = Url::parse(value)
                .map_err(|e| format!("{name} {value:?} is not a URL: {e}"))
                .and_then(|u| check_secure_url(&u, config.allow_http).map(|()| u));
            parsed.map_err(|reason| OidcError::BadIssuerResponse {
                url: url.clone(),
                reason,
            })
        };
        let authorization_endpoint =
            endpoint(&doc.authorization_endpoint, "authorization_endpoint")?;
        let token_endpoint = endpoint(&doc.token_endpoint, "token_endpoint")?;
        let jwks_uri = endpoint(&doc.jwks_uri, "jwks_uri")?;
        if let Some(methods) = &doc.code_challenge_methods_supported {
            if !methods.iter().any(|m| m == "S256") {
                tracing::warn!(
                    issuer = %config.issuer_url,
                    "the issuer does not list PKCE S256 among code_challenge_methods_supported; \
                     sending it anyway"
                );
            }
        }
        let client_auth = ClientAuth::choose(doc.token_endpoint_auth_methods_supported.as_deref());
        let keys = fetch_jwks(&http, &jwks_uri).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                http,
                authorization_endpoint,
                token_endpoint,
                client_auth,
                jwks_uri,
                jwks: Mutex::new(JwksCache {
                    keys,
                    fetched_at: Instant::now(),
                    last_refetch: None,
                }),
            }),
        })
    }

    pub fn config(&self) -> &OidcConfig {
        &self.inner.config
    }

    /// The sign-in button's label.
    pub fn display_name(&self) -> &str {
        &self.inner.config.display_name
    }

    pub fn issuer(&self) -> &str {
        &self.inner.config.issuer_url
    }

    /// Starts a sign-in: the issuer URL to redirect the browser to, and what
    /// [`finish`](Self::finish) needs back. `return_to` is stored as given;
    /// check it with [`safe_return_to`] before and after.
    pub fn begin(&self, return_to: &str) -> (String, PendingLogin) {
        let config = &self.inner.config;
        let pending = PendingLogin {
            state: random_token(),
            nonce: random_token(),
            code_verifier: random_token(),
            return_to: return_to.to_string(),
            created_at: now_ms(),
        };
        let mut url = self.inner.authorization_endpoint.clone();
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", &config.client_id)
            .append_pair("redirect_uri", &config.redirect_url)
            .append_pair("scope", &config.scopes.join(" "))
            .append_pair("state", &pending.state)
            .append_pair("nonce", &pending.nonce)
            .append_pair("code_challenge", &pkce_challenge(&pending.code_verifier))
            .append_pair("code_challenge_method", "S256");
        (url.into(), pending)
    }

    /// Completes a sign-in from the callback's `code` and `state`.
    pub async fn finish(
        &self,
        pending: &PendingLogin,
        code: &str,
        state: &str,
    ) -> Result<OidcIdentity, OidcError> {
        if pending.state.is_empty() || !constant_time_eq(&pending.state, state) {
            return Err(OidcError::StateMismatch);
        }
        let age_ms = now_ms().saturating_sub(pending.created_at);
        if age_ms < -(CLOCK_LEEWAY.as_millis() as i64)
            || age_ms > PENDING_LOGIN_TTL.as_millis() as i64
        {
            return Err(OidcError::LoginExpired);
        }
        let id_token = self.redeem(code, &pending.code_verifier).await?;
        let claims = self.validate_id_token(&id_token, &pending.nonce).await?;
        Ok(OidcIdentity {
            issuer: self.inner.config.issuer_url.clone(),
            subject: claims.sub,
            email_verified: claims.email_verified.unwrap_or(false)
                || (self.inner.config.trust_email
                    && claims.email_verified.is_none()
                    && claims.email.is_some()),
            email: claims.email,
            name: claims.name,
        })
    }

    /// POSTs the code to the token endpoint; the ID token it answers.
    async fn redeem(&self, code: &str, code_verifier: &str) -> Result<String, OidcError> {
        let config = &self.inner.config;
        let url = self.inner.token_endpoint.as_str();
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", config.redirect_url.as_str()),
            ("code_verifier", code_verifier),
        ];
        let mut request = self
            .inner
            .http
            .post(url)
            .timeout(HTTP_TIMEOUT)
            .header(reqwest::header::ACCEPT, "application/json");
        match (&config.client_secret, self.inner.client_auth) {
            // RFC 6749 §2.3.1: both halves form-urlencoded before Basic.
            (Some(secret), ClientAuth::SecretBasic) => {
                request = request.basic_auth(
                    form_encode(&config.client_id),
                    Some(form_encode(secret.expose())),
                )
            }
            (Some(secret), ClientAuth::SecretPost) => {
                form.push(("client_id", config.client_id.as_str()));
                form.push(("client_secret", secret.expose()));
            }
            (None, _) => form.push(("client_id", config.client_id.as_str())),
        }
        let body = serde_urlencoded::to_string(&form).expect("strings always encode");
        let response = request
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body)
            .send()
            .await
            .map_err(|e| unreachable(url, &e))?;
        let status = response.status();
        let body = read_limited(url, response).await?;
        if !status.is_success() {
            if let Ok(e) = serde_json::from_slice::<TokenErrorResponse>(&body) {
                return Err(OidcError::TokenEndpoint {
                    status: status.as_u16(),
                    error: e.error,
                    description: e.error_description,
                });
            }
            return Err(if status.is_server_error() {
                OidcError::IssuerUnreachable {
                    url: url.to_string(),
                    reason: format!("HTTP {status}"),
                }
            } else {
                OidcError::BadIssuerResponse {
                    url: url.to_string(),
                    reason: format!("HTTP {status} without an RFC 6749 error body"),
                }
            });
        }
        let tokens: TokenResponse =
            serde_json::from_slice(&body).map_err(|e| OidcError::BadIssuerResponse {
                url: url.to_string(),
                reason: format!("not a token response: {e}"),
            })?;
        tokens
            .id_token
            .ok_or(OidcError::InvalidIdToken(IdTokenError::Missing))
    }

    async fn validate_id_token(&self, token: &str, nonce: &str) -> Result<IdClaims, OidcError> {
        let config = &self.inner.config;
        let (alg, kid) = token_algorithm(token)?;
        let key = self.key_for(kid.as_deref(), alg).await?;
        let mut validation = Validation::new(alg);
        validation.leeway = CLOCK_LEEWAY.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_issuer(&[&config.issuer_url]);
        validation.set_audience(&[&config.client_id]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let claims = jsonwebtoken::decode::<IdClaims>(token, &key, &validation)
            .map_err(|e| jwt_error(e, &kid))?
            .claims;
        let azp_ok = match &claims.azp {
            Some(azp) => *azp == config.client_id,
            None => claims.aud.len() == 1,
        };
        if !azp_ok {
            return Err(IdTokenError::WrongAuthorizedParty { azp: claims.azp }.into());
        }
        let iat = claims
            .iat
            .ok_or_else(|| IdTokenError::MissingClaim("iat".into()))?;
        if iat > now_ms() / 1000 + CLOCK_LEEWAY.as_secs() as i64 {
            return Err(IdTokenError::IssuedInFuture.into());
        }
        let nonce_ok = claims
            .nonce
            .as_deref()
            .is_some_and(|n| constant_time_eq(n, nonce));
        if !nonce_ok {
            return Err(IdTokenError::NonceMismatch.into());
        }
        Ok(claims)
    }

    /// The issuer's key for a token's `kid` and `alg`, refetching the JWKS
    /// when it is stale or (rate-limited) when the `kid` is unknown.
    async fn key_for(&self, kid: Option<&str>, alg: Algorithm) -> Result<DecodingKey, OidcError> {
        let mut cache = self.inner.jwks.lock().await;
        if cache.fetched_at.elapsed() > JWKS_MAX_AGE {
            match fetch_jwks(&self.inner.http, &self.inner.jwks_uri).await {
                Ok(keys) => {
                    cache.keys = keys;
                    cache.fetched_at = Instant::now();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not refresh the issuer's JWKS; using the cached keys")
                }
            }
        }
        if let Some(key) = find_key(&cache.keys, kid, alg)? {
            return Ok(key);
        }
        let may_refetch = cache
            .last_refetch
            .is_none_or(|t| t.elapsed() >= JWKS_REFETCH_MIN_INTERVAL);
        if may_refetch {
            cache.last_refetch = Some(Instant::now());
            cache.keys = fetch_jwks(&self.inner.http, &self.inner.jwks_uri).await?;
            cache.fetched_at = Instant::now();
            if let Some(key) = find_key(&cache.keys, kid, alg)? {
                return Ok(key);
            }
        }
        Err(IdTokenError::UnknownKey {
            kid: kid.map(str::to_string),
        }
        .into())
    }
}

/// The token's `alg` (asymmetric only) and `kid`, read before any key is.
fn token_algorithm(token: &str) -> Result<(Algorithm, Option<String>), IdTokenError> {
    #[derive(Deserialize)]
    struct RawHeader {
        alg: String,
        #[serde(default)]
        kid: Option<String>,
    }
    let encoded = token
        .split('.')
        .next()
        .filter(|_| token.split('.').count() == 3)
        .ok_or_else(|| IdTokenError::Malformed("not a signed JWT (three parts)".into()))?;
    let json = URL_SAFE_NO_PAD
        .decode(encoded)
        .map_err(|e| IdTokenError::Malformed(format!("header: {e}")))?;
    let header: RawHeader = serde_json::from_slice(&json)
        .map_err(|e| IdTokenError::Malformed(format!("header: {e}")))?;
    let alg = match header.alg.as_str() {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        _ => return Err(IdTokenError::UnsupportedAlgorithm(header.alg)),
    };
    Ok((alg, header.kid))
}

/// The JWKS key for `kid` usable with `alg`. Without a `kid`, the only
/// usable key (several are ambiguous).
fn find_key(
    keys: &[Jwk],
    kid: Option<&str>,
    alg: Algorithm,
) -> Result<Option<DecodingKey>, IdTokenError> {
    let usable: Vec<&Jwk> = keys
        .iter()
        .filter(|k| kid.is_none() || k.common.key_id.as_deref() == kid)
        .filter(|k| {
            k.common
                .public_key_use
                .as_ref()
                .is_none_or(|u| *u == PublicKeyUse::Signature)
        })
        .filter(|k| {
            k.common
                .key_algorithm
                .is_none_or(|a| key_algorithm_is(a, alg))
        })
        .filter(|k| key_type_fits(&k.algorithm, alg))
        .collect();
    let key = match (kid, usable.as_slice()) {
        (Some(_), [first, ..]) => *first,
        (None, [only]) => *only,
        _ => return Ok(None),
    };
    DecodingKey::from_jwk(key)
        .map(Some)
        .map_err(|e| IdTokenError::BadKey {
            kid: kid.map(str::to_string),
            reason: e.to_string(),
        })
}

fn key_algorithm_is(a: KeyAlgorithm, alg: Algorithm) -> bool {
    matches!(
        (a, alg),
        (KeyAlgorithm::RS256, Algorithm::RS256)
            | (KeyAlgorithm::RS384, Algorithm::RS384)
            | (KeyAlgorithm::RS512, Algorithm::RS512)
            | (KeyAlgorithm::PS256, Algorithm::PS256)
            | (KeyAlgorithm::PS384, Algorithm::PS384)
            | (KeyAlgorithm::PS512, Algorithm::PS512)
            | (KeyAlgorithm::ES256, Algorithm::ES256)
            | (KeyAlgorithm::ES384, Algorithm::ES384)
            | (KeyAlgorithm::EdDSA, Algorithm::EdDSA)
    )
}

/// Never a symmetric (`oct`) key: those would turn the issuer's published
/// keys into HMAC secrets.
fn key_type_fits(params: &AlgorithmParameters, alg: Algorithm) -> bool {
    match params {
        AlgorithmParameters::RSA(_) => matches!(
            alg,
            Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512
        ),
        AlgorithmParameters::EllipticCurve(_) => {
            matches!(alg, Algorithm::ES256 | Algorithm::ES384)
        }
        AlgorithmParameters::OctetKeyPair(_) => alg == Algorithm::EdDSA,
        AlgorithmParameters::OctetKey(_) => false,
    }
}

fn jwt_error(e: jsonwebtoken::errors::Error, kid: &Option<String>) -> IdTokenError {
    use jsonwebtoken::errors::ErrorKind;
    match e.into_kind() {
        ErrorKind::InvalidSignature => IdTokenError::BadSignature,
        ErrorKind::ExpiredSignature => IdTokenError::Expired,
        ErrorKind::ImmatureSignature => IdTokenError::NotYetValid,
        ErrorKind::InvalidIssuer => IdTokenError::WrongIssuer,
        ErrorKind::InvalidAudience => IdTokenError::WrongAudience,
        ErrorKind::MissingRequiredClaim(c) => IdTokenError::MissingClaim(c),
        ErrorKind::InvalidAlgorithm => {
            IdTokenError::Malformed("the key does not fit the token's algorithm".into())
        }
        kind @ (ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat) => IdTokenError::BadKey {
            kid: kid.clone(),
            reason: format!("{kind:?}"),
        },
        other => IdTokenError::Malformed(format!("{other:?}")),
    }
}

// ---------------------------------------------------------------------------
// HTTP to the issuer

async fn get(http: &reqwest::Client, url: &str) -> Result<Vec<u8>, OidcError> {
    let response = http
        .get(url)
        .timeout(HTTP_TIMEOUT)
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|e| unreachable(url, &e))?;
    let status = response.status();
    if !status.is_success() {
        return Err(OidcError::IssuerUnreachable {
            url: url.to_string(),
            reason: format!("HTTP {status}"),
        });
    }
    read_limited(url, response).await
}

async fn read_limited(url: &str, mut response: reqwest::Response) -> Result<Vec<u8>, OidcError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| unreachable(url, &e))? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(OidcError::BadIssuerResponse {
                url: url.to_string(),
                reason: format!("the answer is larger than {MAX_RESPONSE_BYTES} bytes"),
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn unreachable(url: &str, e: &reqwest::Error) -> OidcError {
    // The chain names the cause (connection refused, timed out, TLS).
    let mut reason = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        reason.push_str(": ");
        reason.push_str(&s.to_string());
        source = s.source();
    }
    OidcError::IssuerUnreachable {
        url: url.to_string(),
        reason,
    }
}

/// The JWKS's keys; keys this crate cannot read (unknown `kty` or `alg`) are
/// skipped rather than failing the set.
async fn fetch_jwks(http: &reqwest::Client, url: &Url) -> Result<Vec<Jwk>, OidcError> {
    #[derive(Deserialize)]
    struct RawSet {
        keys: Vec<serde_json::Value>,
    }
    let body = get(http, url.as_str()).await?;
    let set: RawSet = serde_json::from_slice(&body).map_err(|e| OidcError::BadIssuerResponse {
        url: url.to_string(),
        reason: format!("not a JWK set: {e}"),
    })?;
    Ok(set
        .keys
        .into_iter()
        .filter_map(|k| serde_json::from_value::<Jwk>(k).ok())
        .collect())
}

// ---------------------------------------------------------------------------
// Small helpers

/// 32 random bytes, base64url without padding (43 characters).
fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// RFC 7636 S256: base64url(SHA-256(verifier)).
fn pkce_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

fn form_encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> OidcConfig {
        OidcConfig::new(
            "https://id.example.com",
            "gpufleet",
            Some(ClientSecret::new("s3cret")),
            "https://gpufleet.example.com/auth/oidc/callback",
        )
    }

    #[test]
    fn pkce_challenge_matches_rfc_7636_appendix_b() {
        assert_eq!(
            pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn random_tokens_are_43_unreserved_characters_and_differ() {
        let a = random_token();
        assert_eq!(a.len(), 43);
        assert!(a
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        assert_ne!(a, random_token());
    }

    #[test]
    fn the_secret_never_prints() {
        let c = config();
        let debug = format!("{c:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(debug.contains("***"));
        assert_eq!(ClientSecret::new("x").to_string(), "***");
    }

    #[test]
    fn a_good_config_validates() {
        config().validate().unwrap();
        let mut local = config();
        local.issuer_url = "http://127.0.0.1:8080/realms/x".into();
        local.validate().unwrap();
        local.issuer_url = "http://localhost:8080".into();
        local.validate().unwrap();
        local.issuer_url = "http://[::1]:8080".into();
        local.validate().unwrap();
        // Plain http elsewhere only when allowed (a trusted network).
        local.issuer_url = "http://keycloak:8080/realms/x".into();
        let err = local.validate().unwrap_err();
        assert!(err.to_string().contains("allow_http = true"), "{err}");
        local.allow_http = true;
        local.validate().unwrap();
        let parsed: OidcConfig = serde_json::from_value(serde_json::json!({
            "issuer_url": "http://dex:5556/dex", "client_id": "g",
            "redirect_url": "http://gpufleet:8080/auth/oidc/callback", "allow_http": true
        }))
        .unwrap();
        parsed.validate().unwrap();
    }

    #[test]
    fn bad_settings_are_named() {
        type Mutation = fn(&mut OidcConfig);
        let cases: Vec<(&str, Mutation)> = vec![
            ("issuer_url", |c| c.issuer_url = "id.example.com".into()),
            ("issuer_url", |c| {
                c.issuer_url = "http://id.example.com".into()
            }),
            ("issuer_url", |c| {
                c.issuer_url = "https://id.example.com/?a=b".into()
            }),
            ("client_id", |c| c.client_id = " ".into()),
            ("client_secret", |c| {
                c.client_secret = Some(ClientSecret::new(""))
            }),
            ("redirect_url", |c| c.redirect_url = "/callback".into()),
            ("redirect_url", |c| c.redirect_url = "ftp://x/cb".into()),
            ("scopes", |c| c.scopes = vec!["email".into()]),
            ("scopes", |c| c.scopes = vec!["openid".into(), "a b".into()]),
            ("display_name", |c| c.display_name = "".into()),
        ];
        for (field, mutate) in cases {
            let mut c = config();
            mutate(&mut c);
            let err = c.validate().unwrap_err();
            assert_eq!(err.field, field, "{err}");
            assert!(err.to_string().starts_with(&format!("oidc.{field}: ")));
        }
    }

    #[test]
    fn pending_login_debug_leaves_out_the_secrets() {
        let p = PendingLogin {
            state: "STATE".into(),
            nonce: "NONCE".into(),
            code_verifier: "VERIFIER".into(),
            return_to: "/instances".into(),
            created_at: 1,
        };
        let debug = format!("{p:?}");
        assert!(debug.contains("/instances"));
        for secret in ["STATE", "NONCE", "VERIFIER"] {
            assert!(!debug.contains(secret), "{debug}");
        }
    }

    #[test]
    fn return_to_must_stay_on_this_origin() {
        for good in ["/", "/instances", "/deployments/dp-1?tab=events#x"] {
            assert_eq!(safe_return_to(good), Some(good));
        }
        for bad in [
            "",
            "instances",
            "https://evil.example/",
            "//evil.example/",
            "/\\evil.example",
            "/a\nb",
            "javascript:alert(1)",
        ] {
            assert_eq!(safe_return_to(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn algorithms_none_and_hmac_are_refused_before_any_key() {
        let header = |alg: &str| {
            format!(
                "{}.e30.sig",
                URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"{alg}","kid":"k"}}"#))
            )
        };
        for alg in ["none", "HS256", "HS512", "nOnE"] {
            assert_eq!(
                token_algorithm(&header(alg)).unwrap_err(),
                IdTokenError::UnsupportedAlgorithm(alg.into())
            );
        }
        assert_eq!(
            token_algorithm(&header("ES256")).unwrap(),
            (Algorithm::ES256, Some("k".into()))
        );
        assert!(matches!(
            token_algorithm("a.b"),
            Err(IdTokenError::Malformed(_))
        ));
    }
}
