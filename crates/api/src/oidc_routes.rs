//! Single sign-on routes (OpenID Connect, authorization code + PKCE):
//! `GET /auth/oidc/login?return_to=/path` sends the browser to the issuer,
//! with the pending login (state, nonce, PKCE verifier, where to return)
//! sealed in a short-lived HttpOnly cookie (HMAC with a key every replica
//! shares, so the callback may reach any of them);
//! `GET /auth/oidc/callback?code=&state=` checks it all, finds or creates
//! the user ([`gpufleet_control::Accounts::sso_user`]), starts a session
//! and returns the browser to where it was going.
//!
//! The issuer is discovered on first use (and again after a failure), so
//! `gpufleet up` starts while the issuer is down.

use crate::accounts::session_cookies;
use crate::audit;
use crate::auth::cookie;
use crate::error::ApiError;
use crate::oidc::{safe_return_to, OidcClient, OidcConfig, OidcError, PendingLogin};
use crate::SharedState;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use gpufleet_control::accounts::SsoIdentity;
use serde::Deserialize;
use std::sync::Arc;

/// Where the browser starts a single sign-on.
pub const LOGIN_PATH: &str = "/auth/oidc/login";
/// Where the issuer sends the browser back (the redirect URI to register).
pub const CALLBACK_PATH: &str = "/auth/oidc/callback";
/// The pending login's cookie.
const PENDING_COOKIE: &str = "gpufleet_oidc";
/// How long a sign-in at the issuer may take.
const PENDING_MAX_AGE_SECS: u64 = 600;

/// The configured issuer, discovered when first needed.
pub struct Sso {
    config: OidcConfig,
    http: reqwest::Client,
    client: tokio::sync::Mutex<Option<OidcClient>>,
}

impl Sso {
    pub fn new(config: OidcConfig, http: reqwest::Client) -> Arc<Self> {
        Arc::new(Self {
            config,
            http,
            client: tokio::sync::Mutex::new(None),
        })
    }

    pub fn display_name(&self) -> &str {
        &self.config.display_name
    }

    async fn client(&self) -> Result<OidcClient, OidcError> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = OidcClient::discover(self.config.clone(), self.http.clone()).await?;
        *slot = Some(c.clone());
        Ok(c)
    }
}

fn oidc_error(e: &OidcError) -> ApiError {
    match e.status().as_u16() {
        400 => ApiError::bad_request(e.to_string()),
        401 => ApiError::unauthorized(e.to_string()),
        403 => ApiError::forbidden(e.to_string()),
        _ => {
            tracing::warn!(error = %e, "single sign-on failed");
            ApiError::unavailable(format!("single sign-on is unavailable: {e}"))
        }
    }
}

fn no_sso() -> ApiError {
    ApiError::not_found("single sign-on is not configured")
}

fn pending_cookie(value: &str, max_age: u64, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{PENDING_COOKIE}={value}; Path={CALLBACK_PATH}; HttpOnly; SameSite=Lax; Max-Age={max_age}{secure}"
    ))
    .unwrap_or(HeaderValue::from_static(""))
}

#[derive(Debug, Deserialize)]
pub struct LoginQuery {
    return_to: Option<String>,
}

/// Start a single sign-on: 302 to the issuer.
pub async fn login(
    State(state): State<SharedState>,
    Query(q): Query<LoginQuery>,
) -> Result<Response, ApiError> {
    let sso = state.sso.as_ref().ok_or_else(no_sso)?;
    let return_to = match q.return_to.as_deref() {
        None => "/",
        Some(r) => safe_return_to(r).ok_or_else(|| {
            ApiError::invalid(
                "return_to",
                "must be a path on this site, such as /instances",
            )
        })?,
    };
    let client = sso.client().await.map_err(|e| oidc_error(&e))?;
    let (url, pending) = client.begin(return_to);
    let sealed = state
        .accounts
        .seal(&serde_json::to_vec(&pending).map_err(|_| ApiError::internal())?);
    let mut resp = (StatusCode::FOUND, [(header::LOCATION, url)]).into_response();
    resp.headers_mut().append(
        header::SET_COOKIE,
        pending_cookie(&sealed, PENDING_MAX_AGE_SECS, state.secure_cookies),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

#[derive(Debug, Deserialize)]
pub struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

/// The issuer's answer: sign the user in, 302 to where they were going.
pub async fn callback(
    State(state): State<SharedState>,
    connect: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    headers: HeaderMap,
    Query(q): Query<CallbackQuery>,
) -> Result<Response, ApiError> {
    let sso = state.sso.as_ref().ok_or_else(no_sso)?;
    let ip = connect.map(|c| c.0 .0.ip().to_string());
    let refused = |e: ApiError, tried: &str| {
        let state = state.clone();
        let tried = tried.to_string();
        let ip = ip.clone();
        async move {
            audit::sign_in(&state, Err(&tried), e.status().as_u16(), ip).await;
            Err::<Response, ApiError>(e)
        }
    };
    if let Some(error) = q.error {
        let e = OidcError::AuthorizationDenied {
            error,
            description: q.error_description,
        };
        return refused(oidc_error(&e), "single sign-on").await;
    }
    let (Some(code), Some(st)) = (q.code, q.state) else {
        return Err(ApiError::invalid(
            "code",
            "the issuer's answer has no code and state",
        ));
    };
    let pending: Option<PendingLogin> = cookie(&headers, PENDING_COOKIE)
        .and_then(|c| state.accounts.unseal(c))
        .and_then(|b| serde_json::from_slice(&b).ok());
    let Some(pending) = pending else {
        return refused(
            ApiError::bad_request(
                "no sign-in is pending in this browser (or it expired); start again",
            ),
            "single sign-on",
        )
        .await;
    };
    let client = sso.client().await.map_err(|e| oidc_error(&e))?;
    let identity = match client.finish(&pending, &code, &st).await {
        Ok(i) => i,
        Err(e) => return refused(oidc_error(&e), "single sign-on").await,
    };
    let who = identity
        .email
        .clone()
        .unwrap_or_else(|| identity.subject.clone());
    let user = match state
        .accounts
        .sso_user(&SsoIdentity {
            issuer: identity.issuer,
            subject: identity.subject,
            email: identity.email,
            email_verified: identity.email_verified,
            name: identity.name,
        })
        .await
    {
        Ok(u) => u,
        Err(e) => return refused(ApiError::from(e), &who).await,
    };
    let session = state.accounts.start_session(user).await?;
    audit::sign_in(&state, Ok((&session.user, "single sign-on")), 302, ip).await;
    let to = safe_return_to(&pending.return_to)
        .unwrap_or("/")
        .to_string();
    let mut resp = (StatusCode::FOUND, [(header::LOCATION, to)]).into_response();
    for c in session_cookies(&state, &session) {
        resp.headers_mut().append(header::SET_COOKIE, c);
    }
    resp.headers_mut().append(
        header::SET_COOKIE,
        pending_cookie("", 0, state.secure_cookies),
    );
    Ok(resp)
}
