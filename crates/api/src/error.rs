//! The one error type of the HTTP edge, and how it becomes a response.
//!
//! Every failure a client sees is an [`ErrorBody`]:
//! `{"error": {"code": "...", "message": "...", "field": "..."}}`. Internal
//! failures (storage) are logged here, once, with their source chain, and the
//! client gets a generic message: database text never leaves the process.

use crate::views::{ErrorBody, ErrorDetail};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use gpufleet_control::ControlError;

/// An HTTP error: status, stable code, message and (for bad input) the field.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<String>,
    /// The project of the resource refused (for the audit log only).
    project: Option<gpufleet_domain::ProjectId>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
            project: None,
        }
    }

    /// Name the project of the resource refused, for the audit log (never
    /// shown to the client).
    pub fn in_project(mut self, project: &gpufleet_domain::ProjectId) -> Self {
        self.project = Some(project.clone());
        self
    }

    /// 400 `invalid_request` naming the offending field.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: Some(field.into()),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
        }
    }

    /// 400 `invalid_request` about the request as a whole (e.g. malformed JSON).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// 401 `unauthorized` (answered with `WWW-Authenticate: Bearer`).
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 403 `csrf`: a cookie-authenticated write without the CSRF header.
    pub fn csrf() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "csrf",
            "missing or wrong `x-csrf-token` header (send the `gpufleet_csrf` cookie's value)",
        )
    }

    /// 403 `forbidden`: valid credentials, wrong resource.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this route does not accept that method",
        )
    }

    pub fn payload_too_large(limit_bytes: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body is larger than {limit_bytes} bytes"),
        )
    }

    pub fn unsupported_media_type() -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "expected a request body with `Content-Type: application/json`",
        )
    }

    /// 503 `unavailable`: overloaded or briefly unable; retry.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// 500 with a generic message; the caller has logged the cause.
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the server log",
        )
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }
    pub fn code(&self) -> &'static str {
        self.code
    }
    pub fn field(&self) -> Option<&str> {
        self.field.as_deref()
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message.clone(),
                field: self.field.clone(),
            },
        }
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::InvalidInput { field, message } => {
                Self::invalid(field, format!("invalid {field}: {message}"))
            }
            ControlError::InvalidSpec(e) => {
                let message = e.to_string();
                Self::invalid(e.field, message)
            }
            e @ ControlError::NotFound { .. } => Self::not_found(e.to_string()),
            ControlError::Conflict { message } => {
                Self::new(StatusCode::CONFLICT, "conflict", message)
            }
            e @ ControlError::IdempotencyKeyReused { .. } => Self {
                field: Some(crate::instances::IDEMPOTENCY_KEY.to_string()),
                ..Self::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "idempotency_key_reused",
                    e.to_string(),
                )
            },
            ControlError::Unauthorized { message } => Self::unauthorized(message),
            ControlError::Forbidden { message } => Self::forbidden(message),
            ControlError::ProviderUnavailable {
                ref provider,
                ref source,
            } => {
                // Handled here: this is where it is logged.
                tracing::warn!(provider = %provider, error = %source, "provider unavailable");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "provider_unavailable",
                    e.to_string(),
                )
            }
            ControlError::InvalidHeartbeat(rejected) => {
                let message = rejected.to_string();
                Self::invalid(rejected.field, message)
            }
            ControlError::Unavailable { message } => Self::unavailable(message),
            ControlError::Store(source) => {
                tracing::error!(
                    error = &source as &dyn std::error::Error,
                    "storage failure while serving a request"
                );
                Self::internal()
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(self.body())).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(p) = self.project {
            resp.extensions_mut().insert(crate::audit::AuditTarget {
                id: None,
                project: Some(p),
                message: Some(self.message),
            });
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpufleet_store::StoreError;

    #[test]
    fn control_errors_map_to_statuses() {
        let cases = [
            (
                ControlError::invalid("model", "unknown"),
                StatusCode::BAD_REQUEST,
                "invalid_request",
            ),
            (
                ControlError::not_found("instance", "i-1"),
                StatusCode::NOT_FOUND,
                "not_found",
            ),
            (
                ControlError::Conflict {
                    message: "x".into(),
                },
                StatusCode::CONFLICT,
                "conflict",
            ),
            (
                ControlError::Unauthorized {
                    message: "x".into(),
                },
                StatusCode::UNAUTHORIZED,
                "unauthorized",
            ),
            (
                ControlError::Forbidden {
                    message: "x".into(),
                },
                StatusCode::FORBIDDEN,
                "forbidden",
            ),
        ];
        for (e, status, code) in cases {
            let api = ApiError::from(e);
            assert_eq!((api.status(), api.code()), (status, code));
        }
        let api = ApiError::from(ControlError::invalid("model", "unknown"));
        assert_eq!(api.field(), Some("model"));
        let api = ApiError::from(ControlError::Unavailable {
            message: "queue full; retry".into(),
        });
        assert_eq!(
            (api.status(), api.code()),
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        );
        let api = ApiError::from(ControlError::InvalidHeartbeat(
            gpufleet_control::validate::HeartbeatRejected {
                field: "gpus[0].util_pct".into(),
                message: "must be at most 100".into(),
            },
        ));
        assert_eq!(api.status(), StatusCode::BAD_REQUEST);
        assert_eq!(api.field(), Some("gpus[0].util_pct"));
        assert!(api.body().error.message.contains("gpus[0].util_pct"));
    }

    #[test]
    fn storage_errors_do_not_leak() {
        let e = ControlError::Store(StoreError::Corrupt {
            what: "instances row SECRET".into(),
        });
        let api = ApiError::from(e);
        assert_eq!(api.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!api.body().error.message.contains("SECRET"));
    }

    #[test]
    fn unauthorized_asks_for_a_bearer_token() {
        let resp = ApiError::unauthorized("no").into_response();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(resp.headers()[header::WWW_AUTHENTICATE], "Bearer");
    }
}
