//! Router failures, answered in OpenAI's error format:
//! `{"error": {"message", "type", "param", "code"}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use gpufleet_store::StoreError;
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("missing API key: send `Authorization: Bearer <key>`")]
    MissingKey,
    #[error("invalid or revoked API key")]
    InvalidKey,
    #[error("this API key may not use the model `{model}`")]
    ModelNotAllowed { model: String },
    #[error("the model `{model}` does not exist or you do not have access to it")]
    UnknownModel { model: String },
    #[error("the model `{model}` has no ready instance ({starting} starting)")]
    NoReadyInstance { model: String, starting: usize },
    #[error("every ready instance of `{model}` is failing; retry later")]
    AllCircuitsOpen { model: String },
    #[error("the model `{model}` has no ready replica yet; one is starting (retry after {retry_after_secs} s)")]
    ScalingUp {
        model: String,
        retry_after_secs: u64,
    },
    #[error("{message}")]
    BadRequest {
        param: Option<&'static str>,
        message: String,
    },
    #[error("request body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("could not reach an instance of `{model}`")]
    Unreachable { model: String },
    #[error("no instance of `{model}` answered in time")]
    Timeout { model: String },
    #[error("an instance of `{model}` broke the connection")]
    UpstreamBroken { model: String },
    /// Refused by the key's rpm, tpm or budget.
    #[error("{}", limited_message(key, refusal))]
    Limited {
        key: String,
        refusal: crate::limits::Refusal,
    },
    #[error("storage failure")]
    Store(#[from] StoreError),
    #[error("the control plane failed")]
    Control(#[from] gpufleet_control::ControlError),
}

fn limited_message(key: &str, refusal: &crate::limits::Refusal) -> String {
    match refusal {
        crate::limits::Refusal::Budget { .. } => format!("API key `{key}` {refusal}"),
        _ => format!("{} (API key `{key}`)", capitalised(&refusal.to_string())),
    }
}

fn capitalised(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

impl RouterError {
    /// Status, OpenAI error `type`, `code` and `param`.
    fn parts(
        &self,
    ) -> (
        StatusCode,
        &'static str,
        Option<&'static str>,
        Option<&'static str>,
    ) {
        use RouterError::*;
        match self {
            MissingKey | InvalidKey => (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                Some("invalid_api_key"),
                None,
            ),
            ModelNotAllowed { .. } => (
                StatusCode::FORBIDDEN,
                "permission_error",
                Some("model_not_allowed"),
                Some("model"),
            ),
            UnknownModel { .. } => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model_not_found"),
                Some("model"),
            ),
            NoReadyInstance { .. } => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("no_ready_instance"),
                Some("model"),
            ),
            AllCircuitsOpen { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("instances_unavailable"),
                None,
            ),
            ScalingUp { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("model_scaling_up"),
                Some("model"),
            ),
            BadRequest { param, .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                None,
                *param,
            ),
            TooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                Some("payload_too_large"),
                None,
            ),
            Unreachable { .. } | UpstreamBroken { .. } => (
                StatusCode::BAD_GATEWAY,
                "server_error",
                Some("upstream_unavailable"),
                None,
            ),
            Timeout { .. } => (
                StatusCode::GATEWAY_TIMEOUT,
                "server_error",
                Some("upstream_timeout"),
                None,
            ),
            Limited { refusal, .. } => match refusal {
                crate::limits::Refusal::Budget { .. } => (
                    StatusCode::TOO_MANY_REQUESTS,
                    "insufficient_quota",
                    Some("insufficient_quota"),
                    None,
                ),
                crate::limits::Refusal::Requests { .. } => (
                    StatusCode::TOO_MANY_REQUESTS,
                    "requests",
                    Some("rate_limit_exceeded"),
                    None,
                ),
                crate::limits::Refusal::Tokens { .. } | crate::limits::Refusal::TooLarge { .. } => {
                    (
                        StatusCode::TOO_MANY_REQUESTS,
                        "tokens",
                        Some("rate_limit_exceeded"),
                        None,
                    )
                }
            },
            Store(_) | Control(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                None,
                None,
            ),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.parts().0
    }

    pub(crate) fn bad(param: Option<&'static str>, message: impl Into<String>) -> Self {
        RouterError::BadRequest {
            param,
            message: message.into(),
        }
    }
}

/// An OpenAI-shaped error body.
pub(crate) fn error_body(
    message: &str,
    kind: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> serde_json::Value {
    json!({"error": {"message": message, "type": kind, "param": param, "code": code}})
}

impl IntoResponse for RouterError {
    fn into_response(self) -> Response {
        let (status, kind, code, param) = self.parts();
        let message = match &self {
            RouterError::Store(_) | RouterError::Control(_) => {
                // Handled here: logged once, details stay in the process.
                tracing::error!(
                    error = &self as &dyn std::error::Error,
                    "router failure while serving a request"
                );
                "internal error; see the server log".to_string()
            }
            other => other.to_string(),
        };
        let mut resp = (status, Json(error_body(&message, kind, param, code))).into_response();
        if let RouterError::ScalingUp {
            retry_after_secs, ..
        } = &self
        {
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_str(&retry_after_secs.to_string())
                    .unwrap_or(HeaderValue::from_static("10")),
            );
        }
        if let RouterError::Limited { refusal, .. } = &self {
            if let Some(h) = refusal.headers() {
                crate::proxy::insert_rate_headers(resp.headers_mut(), h);
            }
            if let Some(secs) = refusal.retry_after_secs() {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}
