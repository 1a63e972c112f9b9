//! Sign-in and accounts: `/api/v1/auth/*` (password sign-in, sign-out,
//! who am I, which sign-in methods exist), personal access tokens
//! (`/api/v1/tokens`), users (`/api/v1/users`, admin token), projects and
//! their members (`/api/v1/projects`).
//!
//! A session is two cookies: `gpufleet_session` (HttpOnly, SameSite=Lax,
//! Secure when the public URL is https) carries the secret; `gpufleet_csrf`
//! (SameSite=Strict, readable by the console) carries the CSRF token the
//! console echoes in `x-csrf-token` on every write.

use crate::audit::{self, AuditTarget};
use crate::auth::{cookie, Caller, CSRF_COOKIE, SESSION_COOKIE};
use crate::error::ApiError;
use crate::extract::{ApiJson, MemberPath};
use crate::views::ErrorBody;
use crate::SharedState;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use gpufleet_control::accounts::{NewSession, SignedInUser};
use gpufleet_domain::{AccessTokenId, Permission, ProjectId, Role, UserId};
use gpufleet_store::{AccessTokenRecord, Membership, UserRecord};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use utoipa::ToSchema;

// ---------- views ----------

/// A user (never their password hash).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UserView {
    #[schema(value_type = String, pattern = "^us-[0-9a-f]{32}$")]
    pub id: UserId,
    pub email: String,
    pub display_name: String,
    /// Whether the user can sign in with a password.
    pub has_password: bool,
    /// Whether the user has signed in with single sign-on.
    pub sso: bool,
    pub created_at: DateTime<Utc>,
}

impl From<&UserRecord> for UserView {
    fn from(u: &UserRecord) -> Self {
        Self {
            id: u.id,
            email: u.email.clone(),
            display_name: u.display_name.clone(),
            has_password: u.password_hash.is_some(),
            sso: u.oidc_subject.is_some(),
            created_at: u.created_at,
        }
    }
}

/// A role held in a project.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MembershipView {
    #[schema(value_type = String)]
    pub project_id: ProjectId,
    pub role: Role,
}

/// Who the caller is.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MeView {
    /// `admin` (the admin token) or `user`.
    pub kind: String,
    pub user: Option<UserView>,
    /// The caller's roles (the admin token: none listed; it may do everything).
    pub memberships: Vec<MembershipView>,
}

fn me_of(caller: &Caller) -> MeView {
    match caller {
        Caller::Admin => MeView {
            kind: "admin".into(),
            user: None,
            memberships: vec![],
        },
        Caller::User(u) => me_of_user(u),
    }
}

fn me_of_user(u: &SignedInUser) -> MeView {
    MeView {
        kind: "user".into(),
        user: Some(UserView::from(&u.user)),
        memberships: u
            .roles
            .iter()
            .map(|(p, r)| MembershipView {
                project_id: p.clone(),
                role: *r,
            })
            .collect(),
    }
}

/// The sign-in methods offered.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuthProviders {
    pub password: bool,
    pub oidc: Option<OidcProviderView>,
}

/// Single sign-on, when configured.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OidcProviderView {
    /// What to call it on the sign-in page.
    pub name: String,
    /// Where the browser goes to start (add `?return_to=/path`).
    pub login_url: String,
}

// ---------- sessions ----------

/// `POST /api/v1/auth/login` body.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginBody {
    #[schema(max_length = 254)]
    pub email: String,
    #[schema(max_length = 1024)]
    pub password: String,
}

/// The `Set-Cookie` values of a new session.
pub(crate) fn session_cookies(state: &SharedState, s: &NewSession) -> [HeaderValue; 2] {
    let max_age = state.accounts.session_ttl().as_secs();
    let secure = if state.secure_cookies { "; Secure" } else { "" };
    let session = format!(
        "{SESSION_COOKIE}={}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age}{secure}",
        s.token
    );
    let csrf = format!(
        "{CSRF_COOKIE}={}; Path=/; SameSite=Strict; Max-Age={max_age}{secure}",
        s.csrf
    );
    [
        HeaderValue::from_str(&session).unwrap_or(HeaderValue::from_static("")),
        HeaderValue::from_str(&csrf).unwrap_or(HeaderValue::from_static("")),
    ]
}

fn cleared_cookies(state: &SharedState) -> [HeaderValue; 2] {
    let secure = if state.secure_cookies { "; Secure" } else { "" };
    [
        HeaderValue::from_str(&format!(
            "{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0{secure}"
        ))
        .unwrap_or(HeaderValue::from_static("")),
        HeaderValue::from_str(&format!(
            "{CSRF_COOKIE}=; Path=/; SameSite=Strict; Max-Age=0{secure}"
        ))
        .unwrap_or(HeaderValue::from_static("")),
    ]
}

/// Sign in with email and password; sets the session cookies.
#[utoipa::path(
    post,
    path = "/api/v1/auth/login",
    tag = "auth",
    request_body = LoginBody,
    responses(
        (status = 200, description = "Signed in; session cookies set", body = MeView),
        (status = 400, description = "Malformed body (names the field)", body = ErrorBody),
        (status = 401, description = "Wrong email or password", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
    )
)]
pub async fn login(
    State(state): State<SharedState>,
    connect: Option<Extension<ConnectInfo<SocketAddr>>>,
    ApiJson(body): ApiJson<LoginBody>,
) -> Result<Response, ApiError> {
    let ip = connect.map(|c| c.0 .0.ip().to_string());
    if !state.password_sign_in {
        return Err(ApiError::forbidden(
            "password sign-in is turned off; use single sign-on",
        ));
    }
    match state
        .accounts
        .check_password(&body.email, &body.password)
        .await
    {
        Ok(user) => {
            let session = state.accounts.start_session(user).await?;
            audit::sign_in(&state, Ok((&session.user, "password")), 200, ip).await;
            let mut resp = Json(me_of_user(&session.user)).into_response();
            for c in session_cookies(&state, &session) {
                resp.headers_mut().append(header::SET_COOKIE, c);
            }
            Ok(resp)
        }
        Err(e) => {
            let e = ApiError::from(e);
            audit::sign_in(&state, Err(&body.email), e.status().as_u16(), ip).await;
            Err(e)
        }
    }
}

/// Sign out: ends the session (if any) and clears the cookies.
#[utoipa::path(
    post,
    path = "/api/v1/auth/logout",
    tag = "auth",
    responses(
        (status = 204, description = "Signed out"),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Cookie without the CSRF header", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn logout(
    State(state): State<SharedState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if let Some(token) = cookie(&headers, SESSION_COOKIE) {
        state.accounts.end_session(token).await?;
    }
    let mut resp = StatusCode::NO_CONTENT.into_response();
    for c in cleared_cookies(&state) {
        resp.headers_mut().append(header::SET_COOKIE, c);
    }
    Ok(resp)
}

/// Who am I: the admin token, or a user with their roles.
#[utoipa::path(
    get,
    path = "/api/v1/auth/me",
    tag = "auth",
    responses(
        (status = 200, description = "The caller", body = MeView),
        (status = 401, description = "Not signed in", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn me(caller: Caller) -> Json<MeView> {
    Json(me_of(&caller))
}

/// The sign-in methods offered (no authentication: the sign-in page asks).
#[utoipa::path(
    get,
    path = "/api/v1/auth/providers",
    tag = "auth",
    responses((status = 200, description = "Sign-in methods", body = AuthProviders))
)]
pub async fn providers(State(state): State<SharedState>) -> Json<AuthProviders> {
    Json(AuthProviders {
        password: state.password_sign_in,
        oidc: state.sso.as_ref().map(|sso| OidcProviderView {
            name: sso.display_name().to_string(),
            login_url: crate::oidc_routes::LOGIN_PATH.to_string(),
        }),
    })
}

// ---------- personal access tokens ----------

/// `POST /api/v1/tokens` body.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenBody {
    #[schema(min_length = 1, max_length = 100)]
    pub name: String,
    /// Days until it stops working (1..=3650); absent: never.
    #[schema(minimum = 1, maximum = 3650)]
    pub expires_in_days: Option<u32>,
}

/// A personal access token (never its secret, except once at creation).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenView {
    #[schema(value_type = String, pattern = "^pat-[0-9a-f]{32}$")]
    pub id: AccessTokenId,
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl From<&AccessTokenRecord> for TokenView {
    fn from(t: &AccessTokenRecord) -> Self {
        Self {
            id: t.id,
            name: t.name.clone(),
            created_at: t.created_at,
            expires_at: t.expires_at,
            last_used_at: t.last_used_at,
            revoked_at: t.revoked_at,
        }
    }
}

/// A new token: `token` is shown this once.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedToken {
    #[serde(flatten)]
    pub view: TokenView,
    /// `gfp_` and 64 hex digits; use as `Authorization: Bearer <token>`.
    pub token: String,
}

fn signed_in_user(caller: &Caller) -> Result<&SignedInUser, ApiError> {
    caller.user().ok_or_else(|| {
        ApiError::forbidden("personal access tokens belong to users; the admin token has none")
    })
}

/// Create a personal access token for the signed-in user.
#[utoipa::path(
    post,
    path = "/api/v1/tokens",
    tag = "auth",
    request_body = CreateTokenBody,
    responses(
        (status = 201, description = "Created; the secret is shown once", body = CreatedToken),
        (status = 400, description = "Bad input (names the field)", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "The admin token has no tokens", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create_token(
    State(state): State<SharedState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateTokenBody>,
) -> Result<(StatusCode, Extension<AuditTarget>, Json<CreatedToken>), ApiError> {
    let user = signed_in_user(&caller)?;
    let t = state
        .accounts
        .create_token(user.user.id, &body.name, body.expires_in_days)
        .await?;
    Ok((
        StatusCode::CREATED,
        Extension(
            AuditTarget::new(t.record.id, None)
                .with_message(format!("access token {:?} created", t.record.name)),
        ),
        Json(CreatedToken {
            view: TokenView::from(&t.record),
            token: t.token,
        }),
    ))
}

/// The signed-in user's tokens.
#[utoipa::path(
    get,
    path = "/api/v1/tokens",
    tag = "auth",
    responses(
        (status = 200, description = "Tokens, oldest first (the admin token has none)", body = [TokenView]),
        (status = 401, description = "Not signed in", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list_tokens(
    State(state): State<SharedState>,
    caller: Caller,
) -> Result<Json<Vec<TokenView>>, ApiError> {
    // The admin token has none.
    let Some(user) = caller.user() else {
        return Ok(Json(Vec::new()));
    };
    let list = state.accounts.tokens_of(user.user.id).await?;
    Ok(Json(list.iter().map(TokenView::from).collect()))
}

/// Revoke one of the signed-in user's tokens.
#[utoipa::path(
    delete,
    path = "/api/v1/tokens/{id}",
    tag = "auth",
    params(("id" = AccessTokenId, Path, description = "Access token id")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 404, description = "No such live token of yours", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn revoke_token(
    State(state): State<SharedState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id: AccessTokenId = id
        .parse()
        .map_err(|e: gpufleet_domain::IdParseError| ApiError::invalid("id", e.to_string()))?;
    // The admin token has none: whatever it names is not found.
    let Some(user) = caller.user() else {
        return Err(ApiError::not_found(format!("access token {id} not found")));
    };
    state.accounts.revoke_token(user.user.id, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---------- users ----------

/// `POST /api/v1/users` body.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUserBody {
    #[schema(max_length = 254)]
    pub email: String,
    #[schema(min_length = 1, max_length = 100)]
    pub display_name: String,
    /// At least 12 characters; absent: single sign-on only.
    #[schema(min_length = 12, max_length = 1024)]
    pub password: Option<String>,
}

/// Create a user (the admin token only).
#[utoipa::path(
    post,
    path = "/api/v1/users",
    tag = "accounts",
    request_body = CreateUserBody,
    responses(
        (status = 201, description = "Created", body = UserView),
        (status = 400, description = "Bad input (names the field)", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Not the admin token", body = ErrorBody),
        (status = 409, description = "The email is taken", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create_user(
    State(state): State<SharedState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateUserBody>,
) -> Result<(StatusCode, Extension<AuditTarget>, Json<UserView>), ApiError> {
    caller.require_admin()?;
    let u = state
        .accounts
        .create_user(&body.email, &body.display_name, body.password.as_deref())
        .await?;
    Ok((
        StatusCode::CREATED,
        Extension(AuditTarget::new(u.id, None).with_message(format!("user {} created", u.email))),
        Json(UserView::from(&u)),
    ))
}

/// Every user: for the admin token, and for project admins (who grant
/// roles by email).
#[utoipa::path(
    get,
    path = "/api/v1/users",
    tag = "accounts",
    responses(
        (status = 200, description = "Users, by email", body = [UserView]),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Neither the admin token nor a project admin", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list_users(
    State(state): State<SharedState>,
    caller: Caller,
) -> Result<Json<Vec<UserView>>, ApiError> {
    let admin_somewhere = caller.user().is_some_and(|u| {
        u.roles
            .values()
            .any(|r| r.allows(Permission::ManageMembers))
    });
    if !caller.is_admin() && !admin_somewhere {
        return Err(ApiError::forbidden(
            "listing users is for project admins and the admin token",
        ));
    }
    let users = state.accounts.list_users().await?;
    Ok(Json(users.iter().map(UserView::from).collect()))
}

// ---------- projects and members ----------

/// `POST /api/v1/projects` body.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProjectBody {
    /// Lower-case letters, digits and dashes (it is also the name).
    #[schema(value_type = String, pattern = "^[a-z0-9][a-z0-9-]{0,38}$")]
    pub id: String,
}

/// A project, with the caller's role in it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProjectView {
    #[schema(value_type = String)]
    pub id: ProjectId,
    pub created_at: DateTime<Utc>,
    /// The caller's role (the admin token: admin).
    pub role: Role,
}

/// A member of a project.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MemberView {
    pub user: UserView,
    pub role: Role,
    pub granted_at: DateTime<Utc>,
    pub granted_by: String,
}

/// `PUT /api/v1/projects/{id}/members/{user_id}` body.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantBody {
    /// `admin`, `operator` or `viewer`.
    pub role: String,
}

fn parse_project(s: &str, field: &'static str) -> Result<ProjectId, ApiError> {
    s.parse()
        .map_err(|e: gpufleet_domain::IdParseError| ApiError::invalid(field, e.to_string()))
}

fn project_not_found(p: &str) -> impl FnOnce() -> ApiError + '_ {
    move || ApiError::not_found(format!("project {p} not found"))
}

/// Create a project (the admin token only).
#[utoipa::path(
    post,
    path = "/api/v1/projects",
    tag = "accounts",
    request_body = CreateProjectBody,
    responses(
        (status = 201, description = "Created", body = ProjectView),
        (status = 400, description = "Bad input (names the field)", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Not the admin token", body = ErrorBody),
        (status = 409, description = "It exists", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create_project(
    State(state): State<SharedState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateProjectBody>,
) -> Result<(StatusCode, Extension<AuditTarget>, Json<ProjectView>), ApiError> {
    let id = parse_project(&body.id, "id")?;
    caller.require_admin()?;
    let p = state.accounts.create_project(&id).await?;
    Ok((
        StatusCode::CREATED,
        Extension(AuditTarget::new(&p.id, Some(&p.id))),
        Json(ProjectView {
            id: p.id,
            created_at: p.created_at,
            role: Role::Admin,
        }),
    ))
}

/// The projects the caller has a role in (the admin token: all).
#[utoipa::path(
    get,
    path = "/api/v1/projects",
    tag = "accounts",
    responses(
        (status = 200, description = "Projects, by id", body = [ProjectView]),
        (status = 401, description = "Not signed in", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list_projects(
    State(state): State<SharedState>,
    caller: Caller,
) -> Result<Json<Vec<ProjectView>>, ApiError> {
    let all = state.accounts.list_projects().await?;
    Ok(Json(
        all.into_iter()
            .filter_map(|p| {
                caller.role_in(&p.id).map(|role| ProjectView {
                    id: p.id,
                    created_at: p.created_at,
                    role,
                })
            })
            .collect(),
    ))
}

/// One project.
#[utoipa::path(
    get,
    path = "/api/v1/projects/{id}",
    tag = "accounts",
    params(("id" = ProjectId, Path, description = "Project id")),
    responses(
        (status = 200, description = "The project", body = ProjectView),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 404, description = "No such project (or not yours)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_project(
    State(state): State<SharedState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<ProjectView>, ApiError> {
    let pid = parse_project(&id, "id")?;
    caller.check(&pid, Permission::Read, project_not_found(&id))?;
    let p = state
        .accounts
        .get_project(&pid)
        .await?
        .ok_or_else(project_not_found(&id))?;
    Ok(Json(ProjectView {
        role: caller.role_in(&p.id).unwrap_or(Role::Viewer),
        id: p.id,
        created_at: p.created_at,
    }))
}

fn member_of(u: &UserRecord, m: &Membership) -> MemberView {
    MemberView {
        user: UserView::from(u),
        role: m.role,
        granted_at: m.granted_at,
        granted_by: m.granted_by.clone(),
    }
}

/// A project's members.
#[utoipa::path(
    get,
    path = "/api/v1/projects/{id}/members",
    tag = "accounts",
    params(("id" = ProjectId, Path, description = "Project id")),
    responses(
        (status = 200, description = "Members", body = [MemberView]),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 404, description = "No such project (or not yours)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list_members(
    State(state): State<SharedState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Vec<MemberView>>, ApiError> {
    let pid = parse_project(&id, "id")?;
    caller.check(&pid, Permission::Read, project_not_found(&id))?;
    if !state.accounts.project_exists(&pid).await? {
        return Err(project_not_found(&id)());
    }
    let users: std::collections::HashMap<UserId, UserRecord> = state
        .accounts
        .list_users()
        .await?
        .into_iter()
        .map(|u| (u.id, u))
        .collect();
    let out = state
        .accounts
        .members(&pid)
        .await?
        .iter()
        .filter_map(|m| users.get(&m.user_id).map(|u| member_of(u, m)))
        .collect();
    Ok(Json(out))
}

/// Grant a role in the project (or change it). Project admins and the
/// admin token.
#[utoipa::path(
    put,
    path = "/api/v1/projects/{id}/members/{user_id}",
    tag = "accounts",
    params(
        ("id" = ProjectId, Path, description = "Project id"),
        ("user_id" = UserId, Path, description = "User id"),
    ),
    request_body = GrantBody,
    responses(
        (status = 200, description = "Granted", body = MemberView),
        (status = 400, description = "Bad input (names the field)", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Not an admin of the project", body = ErrorBody),
        (status = 404, description = "No such project or user", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn grant(
    State(state): State<SharedState>,
    caller: Caller,
    MemberPath(pid, uid): MemberPath,
    ApiJson(body): ApiJson<GrantBody>,
) -> Result<(Extension<AuditTarget>, Json<MemberView>), ApiError> {
    let id = pid.to_string();
    let role: Role = body
        .role
        .parse()
        .map_err(|e: gpufleet_domain::RoleError| ApiError::invalid("role", e.to_string()))?;
    caller.check(&pid, Permission::ManageMembers, project_not_found(&id))?;
    if !state.accounts.project_exists(&pid).await? {
        return Err(project_not_found(&id)());
    }
    let by = caller.actor().2;
    let m = state.accounts.grant(&pid, uid, role, &by).await?;
    let view = member_of(&state.accounts.get_user(uid).await?, &m);
    Ok((
        Extension(
            AuditTarget::new(uid, Some(&pid))
                .with_message(format!("granted {role} to {}", view.user.email)),
        ),
        Json(view),
    ))
}

/// Take a member's role away.
#[utoipa::path(
    delete,
    path = "/api/v1/projects/{id}/members/{user_id}",
    tag = "accounts",
    params(
        ("id" = ProjectId, Path, description = "Project id"),
        ("user_id" = UserId, Path, description = "User id"),
    ),
    responses(
        (status = 204, description = "Revoked"),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Not an admin of the project", body = ErrorBody),
        (status = 404, description = "No such project or member", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn revoke(
    State(state): State<SharedState>,
    caller: Caller,
    MemberPath(pid, uid): MemberPath,
) -> Result<(Extension<AuditTarget>, StatusCode), ApiError> {
    let id = pid.to_string();
    caller.check(&pid, Permission::ManageMembers, project_not_found(&id))?;
    state.accounts.revoke(&pid, uid).await?;
    Ok((
        Extension(AuditTarget::new(uid, Some(&pid))),
        StatusCode::NO_CONTENT,
    ))
}
