//! Extractors whose rejections are [`ApiError`]s naming the offending field,
//! so a client never sees axum's plain-text rejections.

use crate::error::ApiError;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use bytes::Bytes;
use gpufleet_domain::{DeploymentId, InstanceId};
use serde::de::DeserializeOwned;

/// Largest accepted request body.
pub const BODY_LIMIT_BYTES: usize = 1024 * 1024;
/// Largest accepted body on the agent routes (`/internal/`): a heartbeat of
/// eight GPUs is about 3 KiB.
pub const AGENT_BODY_LIMIT_BYTES: usize = 256 * 1024;

/// A JSON body. Needs `Content-Type: application/json` (or `+json`).
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(req.headers()) {
            return Err(ApiError::unsupported_media_type());
        }
        let limit = if req.uri().path().starts_with("/internal/") {
            AGENT_BODY_LIMIT_BYTES
        } else {
            BODY_LIMIT_BYTES
        };
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|r| bytes_rejection(r, limit))?;
        // Every body this API takes is an object: serde would also read a
        // struct from an array (`[null, null]`), which no client means.
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object",
            ));
        }
        decode_json(&bytes).map(ApiJson)
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

fn bytes_rejection(r: BytesRejection, limit: usize) -> ApiError {
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::payload_too_large(limit)
    } else {
        ApiError::bad_request(format!(
            "could not read the request body: {}",
            r.body_text()
        ))
    }
}

/// Decode a JSON document, naming the field at fault. Well-formed bodies
/// (nearly all) decode in one plain pass; only a failure is decoded again
/// with path tracking, which costs on every field, to name the field.
pub(crate) fn decode_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if let Ok(value) = serde_json::from_slice(bytes) {
        return Ok(value);
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_data() {
            data_error(&path, &inner.to_string())
        } else {
            ApiError::bad_request(format!("malformed JSON body: {inner}"))
        }
    })?;
    de.end()
        .map_err(|e| ApiError::bad_request(format!("malformed JSON body: {e}")))?;
    Ok(value)
}

/// A well-formed document or query with a bad value. `path` is where serde
/// was (`.` at the top level); a missing field is named only in the message.
fn data_error(path: &str, message: &str) -> ApiError {
    let field = if path == "." || path.is_empty() {
        missing_field(message).map(str::to_string)
    } else {
        Some(path.to_string())
    };
    match field {
        Some(field) => ApiError::invalid(field.clone(), format!("invalid {field}: {message}")),
        None => ApiError::bad_request(format!("invalid request: {message}")),
    }
}

/// `missing field `model`` → `model`.
fn missing_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("missing field `")?;
    rest.split('`').next()
}

/// A query string decoded into `T`; a bad value names its parameter.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or("");
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(de)
            .map(ApiQuery)
            .map_err(|e| {
                let path = e.path().to_string();
                data_error(&path, &e.into_inner().to_string())
            })
    }
}

/// The `{id}` path parameter, parsed as an [`InstanceId`]; 400 naming `id` otherwise.
#[derive(Debug, Clone, Copy)]
pub struct InstanceIdPath(pub InstanceId);

impl<S: Send + Sync> FromRequestParts<S> for InstanceIdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|r| ApiError::invalid("id", format!("invalid id: {}", r.body_text())))?;
        raw.parse()
            .map(InstanceIdPath)
            .map_err(|e| ApiError::invalid("id", e.to_string()))
    }
}

/// A `{id}` path parameter holding a [`DeploymentId`]; a malformed one is
/// 400 naming `id`.
#[derive(Debug, Clone, Copy)]
pub struct DeploymentIdPath(pub DeploymentId);

impl<S: Send + Sync> FromRequestParts<S> for DeploymentIdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|r| ApiError::invalid("id", format!("invalid id: {}", r.body_text())))?;
        raw.parse()
            .map(DeploymentIdPath)
            .map_err(|e| ApiError::invalid("id", e.to_string()))
    }
}

/// The `{id}` and `{user_id}` path parameters of a project member; a
/// malformed one is 400 naming it.
#[derive(Debug, Clone)]
pub struct MemberPath(pub gpufleet_domain::ProjectId, pub gpufleet_domain::UserId);

impl<S: Send + Sync> FromRequestParts<S> for MemberPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path((id, user_id)) = Path::<(String, String)>::from_request_parts(parts, state)
            .await
            .map_err(|r| ApiError::invalid("id", format!("invalid path: {}", r.body_text())))?;
        let project = id
            .parse()
            .map_err(|e: gpufleet_domain::IdParseError| ApiError::invalid("id", e.to_string()))?;
        let user = user_id
            .parse()
            .map_err(|e: gpufleet_domain::IdParseError| {
                ApiError::invalid("user_id", e.to_string())
            })?;
        Ok(MemberPath(project, user))
    }
}

/// Parse an optional query value that names an instance.
pub(crate) fn parse_instance_id(field: &str, raw: &str) -> Result<InstanceId, ApiError> {
    raw.parse()
        .map_err(|e: gpufleet_domain::IdParseError| ApiError::invalid(field, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Body {
        name: String,
        count: Option<u32>,
    }

    #[test]
    fn json_errors_name_the_field() {
        let e = decode_json::<Body>(br#"{"count": 1}"#).unwrap_err();
        assert_eq!(e.field(), Some("name"));
        let e = decode_json::<Body>(br#"{"name": "x", "count": "many"}"#).unwrap_err();
        assert_eq!(e.field(), Some("count"));
        let e = decode_json::<Body>(br#"{"name": "#).unwrap_err();
        assert_eq!((e.status(), e.field()), (StatusCode::BAD_REQUEST, None));
        let e = decode_json::<Body>(br#"{"name": "x"} trailing"#).unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert!(decode_json::<Body>(br#"{"name": "x"}"#).is_ok());
    }

    #[test]
    fn content_types() {
        let mut h = HeaderMap::new();
        assert!(!is_json(&h));
        h.insert(
            header::CONTENT_TYPE,
            "application/json; charset=utf-8".parse().unwrap(),
        );
        assert!(is_json(&h));
        h.insert(
            header::CONTENT_TYPE,
            "application/merge-patch+json".parse().unwrap(),
        );
        assert!(is_json(&h));
        h.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        assert!(!is_json(&h));
    }
}
