//! The audit log: every change made through the API (create, terminate,
//! archive, scale, keys, roles, users, projects, tokens), refused or not,
//! with its actor, time, target and outcome; and sign-ins (written by the
//! sign-in handlers). `GET /api/v1/audit` reads it.
//!
//! [`record`] wraps the `/api/v1` routes: after the handler answers it
//! looks the route up in [`ACTIONS`] (GETs are not changes) and appends an
//! entry. Handlers name what they created or changed with an
//! [`AuditTarget`] response extension; otherwise the path's id is the target.

use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::ApiQuery;
use crate::SharedState;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use axum::Json;
use chrono::{DateTime, Utc};
use gpufleet_domain::{ActorKind, AuditOutcome, Permission, ProjectId};
use gpufleet_store::{AuditEntry, AuditFilter, NewAuditEntry};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use utoipa::{IntoParams, ToSchema};

/// What a handler tells the audit log about the thing it acted on.
#[derive(Debug, Clone, Default)]
pub struct AuditTarget {
    pub id: Option<String>,
    pub project: Option<ProjectId>,
    /// A readable line (e.g. "granted operator to ann@example.com").
    pub message: Option<String>,
}

impl AuditTarget {
    pub fn new(id: impl ToString, project: Option<&ProjectId>) -> Self {
        Self {
            id: Some(id.to_string()),
            project: project.cloned(),
            message: None,
        }
    }
    pub fn with_message(mut self, m: impl Into<String>) -> Self {
        self.message = Some(m.into());
        self
    }
}

/// Audited routes: (method, route under `/api/v1`, action, target kind).
pub const ACTIONS: &[(&str, &str, &str, &str)] = &[
    ("POST", "/instances", "instance.create", "instance"),
    (
        "DELETE",
        "/instances/{id}",
        "instance.terminate",
        "instance",
    ),
    (
        "POST",
        "/instances/{id}/archive",
        "instance.archive",
        "instance",
    ),
    ("POST", "/deployments", "deployment.create", "deployment"),
    (
        "PATCH",
        "/deployments/{id}",
        "deployment.update",
        "deployment",
    ),
    (
        "DELETE",
        "/deployments/{id}",
        "deployment.delete",
        "deployment",
    ),
    ("POST", "/api-keys", "api_key.create", "api_key"),
    ("PATCH", "/api-keys/{id}", "api_key.update", "api_key"),
    ("DELETE", "/api-keys/{id}", "api_key.revoke", "api_key"),
    ("POST", "/users", "user.create", "user"),
    ("POST", "/projects", "project.create", "project"),
    (
        "PUT",
        "/projects/{id}/members/{user_id}",
        "member.grant",
        "member",
    ),
    (
        "DELETE",
        "/projects/{id}/members/{user_id}",
        "member.revoke",
        "member",
    ),
    ("POST", "/tokens", "token.create", "access_token"),
    ("DELETE", "/tokens/{id}", "token.revoke", "access_token"),
    ("POST", "/auth/logout", "auth.sign_out", "session"),
];

fn action_of(method: &Method, route: &str) -> Option<(&'static str, &'static str)> {
    let route = route.strip_prefix("/api/v1").unwrap_or(route);
    ACTIONS
        .iter()
        .find(|(m, r, _, _)| *m == method.as_str() && *r == route)
        .map(|(_, _, a, k)| (*a, *k))
}

/// The `{name}` segment of `path` where `route` has it.
fn path_param(route: &str, path: &str, name: &str) -> Option<String> {
    let want = format!("{{{name}}}");
    route
        .split('/')
        .zip(path.split('/'))
        .find(|(r, _)| *r == want)
        .map(|(_, p)| p.to_string())
}

/// Where the request came from: the peer's address (the client as this
/// process saw it; behind a proxy, the proxy).
fn source_ip(req: &Request) -> Option<String> {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string())
}

/// Middleware: append an audit entry for every audited route's answer.
pub async fn record(State(state): State<SharedState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string());
    let Some((action, kind)) = route.as_deref().and_then(|r| action_of(req.method(), r)) else {
        return next.run(req).await;
    };
    // Under `nest`, the route may come with the prefix and the path
    // without (or both with it): compare them without.
    let route = route.unwrap_or_default();
    let route = route.strip_prefix("/api/v1").unwrap_or(&route).to_string();
    let path = req.uri().path();
    let path = path.strip_prefix("/api/v1").unwrap_or(path).to_string();
    let ip = source_ip(&req);
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    let target = resp.extensions().get::<AuditTarget>().cloned();
    let (actor_kind, actor_id, actor_name) = resp
        .extensions()
        .get::<Caller>()
        .map(Caller::actor)
        .unwrap_or((ActorKind::Anonymous, None, "anonymous".into()));
    let target = target.unwrap_or_default();
    let target_id = target.id.or_else(|| {
        path_param(&route, &path, "user_id").or_else(|| path_param(&route, &path, "id"))
    });
    let project = target.project.or_else(|| {
        route
            .starts_with("/projects/{id}")
            .then(|| path_param(&route, &path, "id"))
            .flatten()
            .and_then(|p| p.parse().ok())
    });
    let outcome = AuditOutcome::of_status(status);
    let message = target
        .message
        .unwrap_or_else(|| format!("{action} answered {status}"));
    state
        .accounts
        .audit(NewAuditEntry {
            at: Utc::now(),
            actor_kind,
            actor_id,
            actor_name,
            action: action.to_string(),
            target_kind: kind.to_string(),
            target_id,
            project_id: project,
            outcome,
            status,
            message,
            source_ip: ip,
        })
        .await;
    resp
}

/// Record a sign-in attempt (the sign-in routes are outside [`record`]).
pub(crate) async fn sign_in(
    state: &SharedState,
    who: Result<(&gpufleet_control::accounts::SignedInUser, &str), &str>,
    status: u16,
    ip: Option<String>,
) {
    // Every refused sign-in is a denial, whatever the status said.
    let outcome = if who.is_ok() {
        AuditOutcome::Success
    } else {
        AuditOutcome::Denied
    };
    // The target is the user signing in: for a refusal, the user the
    // email names (if any), who then reads the attempt among their own
    // entries.
    let (actor_kind, actor_id, actor_name, target_id, message) = match who {
        Ok((u, how)) => (
            ActorKind::User,
            Some(u.user.id.to_string()),
            u.user.email.clone(),
            Some(u.user.id.to_string()),
            format!("signed in with {how}"),
        ),
        Err(tried) => (
            ActorKind::Anonymous,
            None,
            tried.chars().take(254).collect(),
            state
                .accounts
                .user_id_by_email(tried)
                .await
                .map(|id| id.to_string()),
            "sign-in refused".to_string(),
        ),
    };
    state
        .accounts
        .audit(NewAuditEntry {
            at: Utc::now(),
            actor_kind,
            target_id,
            actor_id,
            actor_name,
            action: "auth.sign_in".into(),
            target_kind: "session".into(),
            project_id: None,
            outcome,
            status,
            message,
            source_ip: ip,
        })
        .await;
}

/// `GET /api/v1/audit` filters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// A user id or email, or `admin token`.
    pub actor: Option<String>,
    /// An action (`instance.create`) or a prefix ending in `.` (`instance.`).
    #[param(pattern = "^[a-z_]+(\\.[a-z_]*)?$")]
    pub action: Option<String>,
    /// A target id (an instance id, a user id...).
    pub target: Option<String>,
    /// Only this project's entries.
    #[param(value_type = Option<String>, pattern = "^[a-z0-9][a-z0-9-]{0,38}$")]
    pub project: Option<String>,
    #[param(value_type = Option<String>, pattern = "^(success|denied|failure)$")]
    pub outcome: Option<String>,
    /// RFC 3339; entries at or after.
    #[param(value_type = Option<String>, format = DateTime)]
    pub from: Option<String>,
    /// RFC 3339; entries before.
    #[param(value_type = Option<String>, format = DateTime)]
    pub to: Option<String>,
    /// At most this many (1..=1000, default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
    /// Entries older than this id (the `next_before` of the previous page).
    #[param(minimum = 1)]
    pub before: Option<i64>,
}

/// Who did it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditActorView {
    pub kind: ActorKind,
    pub id: Option<String>,
    pub name: String,
}

/// What it was done to.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditTargetView {
    pub kind: String,
    pub id: Option<String>,
}

/// One audit entry.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditEntryView {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub actor: AuditActorView,
    pub action: String,
    pub target: AuditTargetView,
    #[schema(value_type = Option<String>)]
    pub project_id: Option<ProjectId>,
    pub outcome: AuditOutcome,
    /// The HTTP status answered.
    pub status: u16,
    pub message: String,
    pub source_ip: Option<String>,
}

impl From<AuditEntry> for AuditEntryView {
    fn from(e: AuditEntry) -> Self {
        let x = e.entry;
        Self {
            id: e.id,
            at: x.at,
            actor: AuditActorView {
                kind: x.actor_kind,
                id: x.actor_id,
                name: x.actor_name,
            },
            action: x.action,
            target: AuditTargetView {
                kind: x.target_kind,
                id: x.target_id,
            },
            project_id: x.project_id,
            outcome: x.outcome,
            status: x.status,
            message: x.message,
            source_ip: x.source_ip,
        }
    }
}

/// A page of the audit log, newest first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditPage {
    pub entries: Vec<AuditEntryView>,
    /// Pass as `before` for the next (older) page; null at the end.
    pub next_before: Option<i64>,
}

fn time(field: &'static str, v: Option<String>) -> Result<Option<DateTime<Utc>>, ApiError> {
    v.map(|s| {
        DateTime::parse_from_rfc3339(&s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| ApiError::invalid(field, format!("expected an RFC 3339 time: {e}")))
    })
    .transpose()
}

/// The audit log. The admin token reads all of it; a signed-in user reads
/// the entries of the projects they are an admin of, and their own entries
/// that belong to no project: the ones they made (sign-ins, sign-outs,
/// access tokens) or that target them (refused sign-ins with their email).
#[utoipa::path(
    get,
    path = "/api/v1/audit",
    tag = "audit",
    params(AuditQuery),
    responses(
        (status = 200, description = "Entries, newest first", body = AuditPage),
        (status = 400, description = "A bad filter (names the field)", body = crate::views::ErrorBody),
        (status = 401, description = "Not signed in", body = crate::views::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<SharedState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> Result<Json<AuditPage>, ApiError> {
    let project: Option<ProjectId> = q
        .project
        .map(|p| p.parse())
        .transpose()
        .map_err(|e: gpufleet_domain::IdParseError| ApiError::invalid("project", e.to_string()))?;
    let outcome: Option<AuditOutcome> = q
        .outcome
        .map(|o| o.parse())
        .transpose()
        .map_err(|e: String| ApiError::invalid("outcome", e))?;
    if let Some(a) = &q.action {
        let ok = !a.is_empty()
            && a.len() <= 64
            && a.bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_' || b == b'.');
        if !ok {
            return Err(ApiError::invalid(
                "action",
                "expected an action such as instance.create, or a prefix such as instance.",
            ));
        }
    }
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit", "must be between 1 and 1000"));
    }
    if q.before.is_some_and(|b| b < 1) {
        return Err(ApiError::invalid("before", "must be at least 1"));
    }
    let from = time("from", q.from)?;
    let to = time("to", q.to)?;
    if let (Some(f), Some(t)) = (from, to) {
        if t <= f {
            return Err(ApiError::invalid("to", "must be after `from`"));
        }
    }
    // What the caller may read: the admin token everything; a user the
    // entries of the projects where they may manage members (project
    // admins), and their own entries that belong to no project (made by
    // them or aimed at them: sign-ins, refused ones too, and tokens).
    let (projects, own) = match &caller {
        Caller::Admin => (project.map(|p| vec![p]), None),
        Caller::User(u) => {
            let mine = u
                .roles
                .iter()
                .filter(|(_, r)| r.allows(Permission::ManageMembers))
                .map(|(p, _)| p.clone());
            match project {
                Some(p) => (Some(mine.filter(|m| *m == p).collect()), None),
                None => (Some(mine.collect()), Some(u.user.id.to_string())),
            }
        }
    };
    let filter = AuditFilter {
        actor: q.actor,
        action: q.action,
        target: q.target,
        projects,
        own,
        outcome,
        from,
        to,
        before: q.before,
        limit,
    };
    let entries = state.accounts.audit_log(&filter).await?;
    let next_before = (entries.len() as i64 == limit)
        .then(|| entries.last().map(|e| e.id))
        .flatten();
    Ok(Json(AuditPage {
        entries: entries.into_iter().map(AuditEntryView::from).collect(),
        next_before,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_map_to_actions_and_targets() {
        assert_eq!(
            action_of(&Method::DELETE, "/api/v1/instances/{id}"),
            Some(("instance.terminate", "instance"))
        );
        assert_eq!(action_of(&Method::GET, "/api/v1/instances/{id}"), None);
        assert_eq!(
            path_param(
                "/api/v1/projects/{id}/members/{user_id}",
                "/api/v1/projects/p/members/us-1",
                "user_id"
            )
            .as_deref(),
            Some("us-1")
        );
    }
}
