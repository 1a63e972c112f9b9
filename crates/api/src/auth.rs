//! Who may call what.
//!
//! - `/api/` routes: `Authorization: Bearer <admin token>`, compared in
//!   constant time ([`require_admin`]).
//! - agent routes (after registration): `Authorization: Bearer <agent token>`,
//!   resolved to the one instance it belongs to ([`AgentAuth`]). An agent token
//!   is never an admin token.

use crate::error::ApiError;
use crate::SharedState;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::Response;
use gpufleet_control::secrets::{constant_time_eq, digest};
use gpufleet_domain::InstanceId;

/// The token of `Authorization: Bearer <token>`, if well-formed.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Middleware: only the admin token passes.
pub async fn require_admin(
    State(state): State<SharedState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let Some(token) = bearer(req.headers()) else {
        return Err(ApiError::unauthorized(
            "missing `Authorization: Bearer <token>` header",
        ));
    };
    // Digests first, so that not even the token's length shows in the timing.
    if !constant_time_eq(&digest(token), &digest(&state.admin_token)) {
        return Err(ApiError::unauthorized("invalid admin token"));
    }
    Ok(next.run(req).await)
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
}
