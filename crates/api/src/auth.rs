//! Who may call what.
//!
//! - `/api/` routes ([`authenticate`]): `Authorization: Bearer <admin
//!   token>` (bootstrap and break-glass: everything, every project; compared
//!   in constant time), `Authorization: Bearer gfp_…` (a user's personal
//!   access token), or the console's session cookie, whose requests other
//!   than GET/HEAD must carry `x-csrf-token` equal to the session's CSRF
//!   token (double submit; the cookie alone cannot change anything).
//!   Each handler then asks the [`Caller`] for the permission it needs in
//!   the resource's project ([`Caller::check`]): a project the caller has
//!   no role in answers 404, as if the resource did not exist.
//! - agent routes (after registration): `Authorization: Bearer <agent token>`,
//!   resolved to the one instance it belongs to ([`AgentAuth`]). An agent token
//!   is never an admin token.

use crate::error::ApiError;
use crate::SharedState;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, Method};
use axum::middleware::Next;
use axum::response::Response;
use gpufleet_control::accounts::{SignedInUser, ACCESS_TOKEN_PREFIX};
use gpufleet_control::secrets::{constant_time_eq, digest};
use gpufleet_domain::{ActorKind, InstanceId, Permission, ProjectId, Role};
use std::sync::Arc;

/// The session cookie (HttpOnly).
pub const SESSION_COOKIE: &str = "gpufleet_session";
/// The CSRF cookie (readable by the console's script, which echoes it).
pub const CSRF_COOKIE: &str = "gpufleet_csrf";
/// The header that must echo the CSRF cookie on cookie-authenticated writes.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The token of `Authorization: Bearer <token>`, if well-formed.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The value of cookie `name`, if sent.
pub(crate) fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

/// Who is calling.
#[derive(Debug, Clone)]
pub enum Caller {
    /// The admin token.
    Admin,
    /// A user, signed in by session or personal access token.
    User(Arc<SignedInUser>),
}

impl Caller {
    pub fn is_admin(&self) -> bool {
        matches!(self, Caller::Admin)
    }

    /// The role held in `project` (the admin token: admin everywhere).
    pub fn role_in(&self, project: &ProjectId) -> Option<Role> {
        match self {
            Caller::Admin => Some(Role::Admin),
            Caller::User(u) => u.roles.get(project).copied(),
        }
    }

    /// Whether the caller may read `project` at all.
    pub fn sees(&self, project: &ProjectId) -> bool {
        self.role_in(project).is_some()
    }

    /// Allowed to do `need` in `project`? A project the caller cannot read
    /// is 404 with `not_found` (the message a missing resource gets, so
    /// existence never shows); readable without the permission is 403.
    pub fn check(
        &self,
        project: &ProjectId,
        need: Permission,
        not_found: impl FnOnce() -> ApiError,
    ) -> Result<(), ApiError> {
        match self.role_in(project) {
            None => Err(not_found().in_project(project)),
            Some(r) if r.allows(need) => Ok(()),
            Some(r) => Err(ApiError::forbidden(format!(
                "your role in project {project} ({r}) does not allow this"
            ))
            .in_project(project)),
        }
    }

    /// The projects whose resources the caller may list (`None`: all).
    pub fn visible_projects(&self) -> Option<Vec<ProjectId>> {
        match self {
            Caller::Admin => None,
            Caller::User(u) => Some(u.roles.keys().cloned().collect()),
        }
    }

    /// Restrict a `?project=` filter to what the caller sees: `None` = every
    /// visible project. Asking for a project one cannot see lists nothing
    /// (no error, so existence never shows).
    pub fn project_filter(&self, asked: Option<ProjectId>) -> Option<Vec<ProjectId>> {
        match (asked, self.visible_projects()) {
            (Some(p), None) => Some(vec![p]),
            (Some(p), Some(v)) => Some(v.into_iter().filter(|x| *x == p).collect()),
            (None, v) => v,
        }
    }

    /// The project a create goes to: the one named, else `default` for the
    /// admin token or the caller's only project; with `need` checked.
    pub fn project_for_create(
        &self,
        asked: Option<ProjectId>,
        need: Permission,
    ) -> Result<ProjectId, ApiError> {
        let project = match (asked, self) {
            (Some(p), _) => p,
            (None, Caller::Admin) => ProjectId::default_project(),
            (None, Caller::User(u)) => {
                let mut allowed = u.roles.iter().filter(|(_, r)| r.allows(need));
                match (allowed.next(), allowed.next()) {
                    (Some((p, _)), None) => p.clone(),
                    (None, _) if u.roles.is_empty() => {
                        return Err(ApiError::forbidden(
                            "you have no role in any project; ask a project admin to grant you one",
                        ))
                    }
                    _ => return Err(ApiError::invalid(
                        "project",
                        "name the project (you have roles in several, or none that allows this)",
                    )),
                }
            }
        };
        self.check(&project, need, || {
            ApiError::not_found(format!("project {project} not found"))
        })?;
        Ok(project)
    }

    /// Only the admin token (users and projects are made with it).
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::forbidden(
                "only the admin token may do this (it creates users and projects)",
            ))
        }
    }

    /// The signed-in user (`None` for the admin token).
    pub fn user(&self) -> Option<&SignedInUser> {
        match self {
            Caller::Admin => None,
            Caller::User(u) => Some(u),
        }
    }

    /// For the audit log: kind, id, name.
    pub fn actor(&self) -> (ActorKind, Option<String>, String) {
        match self {
            Caller::Admin => (ActorKind::Admin, None, "admin token".into()),
            Caller::User(u) => (
                ActorKind::User,
                Some(u.user.id.to_string()),
                u.user.email.clone(),
            ),
        }
    }
}

impl FromRequestParts<SharedState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &SharedState,
    ) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| ApiError::unauthorized("not signed in"))
    }
}

fn safe_method(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Resolve the caller of a request, or `Err` (401, or 403 `csrf`).
pub(crate) async fn resolve(
    state: &SharedState,
    headers: &HeaderMap,
    method: &Method,
) -> Result<Caller, ApiError> {
    if let Some(token) = bearer(headers) {
        if state.is_admin_token(token) {
            return Ok(Caller::Admin);
        }
        if token.starts_with(ACCESS_TOKEN_PREFIX) {
            if let Some(u) = state.accounts.token_user(token).await? {
                return Ok(Caller::User(Arc::new(u)));
            }
            return Err(ApiError::unauthorized(
                "invalid, expired or revoked access token",
            ));
        }
        return Err(ApiError::unauthorized("invalid token"));
    }
    if let Some(token) = cookie(headers, SESSION_COOKIE) {
        let Some(session) = state.accounts.session(token).await? else {
            return Err(ApiError::unauthorized(
                "your session has expired; sign in again",
            ));
        };
        if !safe_method(method) {
            let sent = headers
                .get(CSRF_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if sent.is_empty() || !constant_time_eq(&digest(sent), &session.csrf_hash) {
                return Err(ApiError::csrf());
            }
        }
        return Ok(Caller::User(Arc::new(session.user)));
    }
    Err(ApiError::unauthorized(
        "missing `Authorization: Bearer <token>` header (or sign in)",
    ))
}

/// Middleware: resolve the caller (401 without one) and hand it to the
/// handler (request extension) and to the audit layer (response extension).
pub async fn authenticate(
    State(state): State<SharedState>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let caller = resolve(&state, req.headers(), req.method()).await?;
    req.extensions_mut().insert(caller.clone());
    let mut resp = next.run(req).await;
    resp.extensions_mut().insert(caller);
    Ok(resp)
}

/// The instance whose agent sent the request.
#[derive(Debug, Clone, Copy)]
pub struct AgentAuth(pub InstanceId);

impl FromRequestParts<SharedState> for AgentAuth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &SharedState,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer(&parts.headers).ok_or_else(|| {
            ApiError::unauthorized("missing `Authorization: Bearer <agent token>` header")
        })?;
        let id = state.agents.authenticate_agent(token).await?;
        Ok(AgentAuth(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_tokens() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "bearer  abc ".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer ".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }

    #[test]
    fn parses_cookies() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, "a=1; gpufleet_session=xyz".parse().unwrap());
        h.append(header::COOKIE, "gpufleet_csrf=c".parse().unwrap());
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("xyz"));
        assert_eq!(cookie(&h, CSRF_COOKIE), Some("c"));
        assert_eq!(cookie(&h, "b"), None);
    }

    fn user(roles: &[(&str, Role)]) -> Caller {
        Caller::User(Arc::new(SignedInUser {
            user: gpufleet_store::UserRecord {
                id: gpufleet_domain::UserId::new(),
                email: "a@b.c".into(),
                display_name: "A".into(),
                password_hash: None,
                oidc_issuer: None,
                oidc_subject: None,
                created_at: chrono::Utc::now(),
                disabled_at: None,
            },
            roles: roles
                .iter()
                .map(|(p, r)| (p.parse().unwrap(), *r))
                .collect(),
        }))
    }

    #[test]
    fn checks_answer_404_outside_and_403_inside() {
        let c = user(&[("p", Role::Viewer)]);
        let p: ProjectId = "p".parse().unwrap();
        let q: ProjectId = "q".parse().unwrap();
        let nf = || ApiError::not_found("x not found");
        assert!(c.check(&p, Permission::Read, nf).is_ok());
        assert_eq!(
            c.check(&p, Permission::Operate, nf).unwrap_err().status(),
            403
        );
        assert_eq!(c.check(&q, Permission::Read, nf).unwrap_err().status(), 404);
        assert!(Caller::Admin
            .check(&q, Permission::ManageMembers, nf)
            .is_ok());
        assert_eq!(c.project_filter(Some(q.clone())), Some(vec![]));
        assert_eq!(c.project_filter(None), Some(vec![p.clone()]));
        // One project that allows it: the default for creates.
        let op = user(&[("p", Role::Operator), ("q", Role::Viewer)]);
        assert_eq!(op.project_for_create(None, Permission::Operate).unwrap(), p);
        assert_eq!(
            op.project_for_create(Some(q), Permission::Operate)
                .unwrap_err()
                .status(),
            403
        );
    }
}
