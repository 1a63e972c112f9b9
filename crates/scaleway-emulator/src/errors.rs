//! Scaleway's error bodies.
//!
//! Recorded in the Terraform provider's cassettes: `not_found` (instance:
//! `{"type","message":"resource is not found","resource","resource_id"}`),
//! `invalid_arguments` (`details[{argument_name, reason, help_message}]`),
//! `permissions_denied`. The others follow the fields the official SDKs
//! (scaleway-sdk-go `scw/errors.go`, @scaleway/sdk-client) parse:
//! `denied_authentication {method, reason}`, `quotas_exceeded {details[{resource, quota, current}]}`,
//! `out_of_stock {resource}`, `precondition_failed {precondition, help_message}`,
//! `transient_state {resource, resource_id, current_state}`, `locked {resource, resource_id}`,
//! `too_many_requests {help_message, limit{quota, window_seconds}, reset_seconds}`,
//! and the Instance API's legacy `invalid_request_error {message}` and `conflict {message}`.

use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: Value,
    pub headers: Vec<(String, String)>,
    /// The body's exact text, where the real one is known byte for byte.
    pub raw: Option<String>,
}

/// JSON as the Instance API writes it (Python style: `{"a": 1, "b": [1, 2]}`),
/// keys in the given order.
fn instance_style(fields: &[(&str, Value)]) -> String {
    fn render(v: &Value) -> String {
        match v {
            Value::Array(a) => format!("[{}]", a.iter().map(render).collect::<Vec<_>>().join(", ")),
            Value::Object(m) => format!(
                "{{{}}}",
                m.iter()
                    .map(|(k, v)| format!("{}: {}", Value::from(k.as_str()), render(v)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            other => other.to_string(),
        }
    }
    format!(
        "{{{}}}",
        fields
            .iter()
            .map(|(k, v)| format!("{}: {}", Value::from(*k), render(v)))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

impl ApiError {
    pub fn new(status: StatusCode, body: Value) -> Self {
        ApiError {
            status,
            body,
            headers: Vec::new(),
            raw: None,
        }
    }

    /// Instance API 404, byte for byte as recorded: `resource` like
    /// `instance_server`, `instance_ip`, `instance_volume`.
    pub fn not_found(resource: &str, id: &str) -> Self {
        let fields = [
            ("type", json!("not_found")),
            ("message", json!("resource is not found")),
            ("resource", json!(resource)),
            ("resource_id", json!(id)),
        ];
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            Value::Object(
                fields
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect(),
            ),
        );
        e.raw = Some(instance_style(&fields));
        e
    }

    /// 404 of the newer APIs (block, marketplace): compact, keys sorted.
    pub fn not_found_v2(resource: &str, id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            json!({"type": "not_found", "message": "resource is not found", "resource": resource, "resource_id": id}),
        )
    }

    pub fn invalid_argument(name: &str, reason: &str, help: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            json!({"type": "invalid_arguments", "message": "invalid argument(s)",
                   "details": [{"argument_name": name, "reason": reason, "help_message": help}]}),
        )
    }

    /// The Instance API's legacy shape, e.g. "server should be stopped".
    pub fn invalid_request(message: &str) -> Self {
        let fields = [
            ("message", json!(message)),
            ("type", json!("invalid_request_error")),
        ];
        let mut e = Self::new(
            StatusCode::BAD_REQUEST,
            json!({"type": "invalid_request_error", "message": message}),
        );
        e.raw = Some(instance_style(&fields));
        e
    }

    pub fn denied_authentication(reason: &str) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            json!({"type": "denied_authentication", "message": "authentication is denied", "method": "api_key", "reason": reason}),
        )
    }

    pub fn quotas_exceeded(resource: &str, quota: u64, current: u64) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            json!({"type": "quotas_exceeded", "message": "quota(s) exceeded for this resource",
                   "details": [{"resource": resource, "quota": quota, "current": current}]}),
        )
    }

    pub fn out_of_stock(resource: &str) -> Self {
        Self::new(
            StatusCode::PRECONDITION_FAILED,
            json!({"type": "out_of_stock", "message": "resource is out of stock", "resource": resource}),
        )
    }

    pub fn precondition_failed(precondition: &str, help: &str) -> Self {
        Self::new(
            StatusCode::PRECONDITION_FAILED,
            json!({"type": "precondition_failed", "message": "precondition is not respected",
                   "precondition": precondition, "help_message": help}),
        )
    }

    pub fn locked(resource: &str, id: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            json!({"type": "locked", "message": "resource is locked", "resource": resource, "resource_id": id}),
        )
    }

    pub fn conflict(message: &str) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            json!({"type": "conflict", "message": message}),
        )
    }

    pub fn internal(status: StatusCode) -> Self {
        let message = match status.as_u16() {
            502 => "bad gateway",
            503 => "service unavailable",
            504 => "gateway timeout",
            _ => "internal error",
        };
        Self::new(
            status,
            json!({"type": "internal_error", "message": message}),
        )
    }

    pub fn too_many_requests(limit: u32, window_seconds: u64, reset_seconds: u64) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            json!({"type": "too_many_requests", "message": "too many requests",
                   "help_message": "the rate limit of this API key was reached, retry later",
                   "limit": {"quota": limit, "window_seconds": window_seconds},
                   "reset_seconds": reset_seconds}),
        );
        e.headers
            .push(("Retry-After".into(), reset_seconds.to_string()));
        e.headers
            .push(("X-Ratelimit-Limit".into(), limit.to_string()));
        e.headers.push(("X-Ratelimit-Remaining".into(), "0".into()));
        e.headers
            .push(("X-Ratelimit-Reset".into(), reset_seconds.to_string()));
        e
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = match self.raw {
            Some(raw) => (self.status, [("content-type", "application/json")], raw).into_response(),
            None => (self.status, axum::Json(self.body)).into_response(),
        };
        for (k, v) in self.headers {
            if let (Ok(k), Ok(v)) = (HeaderName::try_from(k), HeaderValue::try_from(v)) {
                resp.headers_mut().insert(k, v);
            }
        }
        resp
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
