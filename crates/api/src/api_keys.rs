//! `/api/v1/api-keys`: keys of the OpenAI-compatible endpoint (`/v1/...`),
//! and `/api/v1/usage`: requests, errors and tokens per key and per instance.
//!
//! A key's secret (`gfk_...`) is returned once, by create; only its SHA-256
//! digest is stored.

use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::views::ErrorBody;
use crate::SharedState;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use gpufleet_control::{secrets, ControlError};
use gpufleet_domain::ModelName;
use gpufleet_store::{ApiKeyId, ApiKeyRecord, NewApiKey, UsageScope};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Prefix of every API key secret.
pub const KEY_PREFIX: &str = "gfk_";
/// Longest key name.
const MAX_NAME_CHARS: usize = 100;
/// Most models on one allowlist.
const MAX_MODELS: usize = 100;

/// `POST /api/v1/api-keys` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKeyBody {
    /// A name to recognise the key by (1–100 characters, not all blank
    /// (Unicode `White_Space`); leading and trailing blanks are dropped).
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = "[^\\t\\n\\v\\f\\r \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]"
    )]
    pub name: String,
    /// Models the key may use (at most 100); absent or null: every model.
    #[serde(default)]
    #[schema(value_type = Option<Vec<ModelName>>, max_items = 100)]
    pub models: Option<Vec<String>>,
}

/// An API key (never with its secret).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApiKeyView {
    /// `ak-` followed by 32 lowercase hex digits.
    #[schema(value_type = ApiKeyIdSchema)]
    pub id: String,
    pub name: String,
    /// Models the key may use; null: every model.
    pub models: Option<Vec<String>>,
    pub created_at: DateTime<Utc>,
    /// When it was revoked; null while it works.
    pub revoked_at: Option<DateTime<Utc>>,
}

impl From<&ApiKeyRecord> for ApiKeyView {
    fn from(r: &ApiKeyRecord) -> Self {
        Self {
            id: r.id.to_string(),
            name: r.name.clone(),
            models: r.models.clone(),
            created_at: r.created_at,
            revoked_at: r.revoked_at,
        }
    }
}

/// A new key, with its secret: shown this once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreatedApiKey {
    #[serde(flatten)]
    pub api_key: ApiKeyView,
    /// The secret, `gfk_` + 64 hex digits. Send it as
    /// `Authorization: Bearer <key>` to `/v1/...`. It cannot be shown again.
    pub key: String,
}

/// `GET /api/v1/api-keys`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApiKeyList {
    pub api_keys: Vec<ApiKeyView>,
}

/// Running totals of one key or instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UsageView {
    /// The API key id or instance id.
    pub id: String,
    /// The key's name (keys only).
    pub name: Option<String>,
    pub requests: u64,
    pub errors: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Instances only (0 for keys): requests that got no first token within
    /// the instance's stall bound and were tried elsewhere.
    pub stalls: u64,
    /// Instances only: times the instance's circuit opened (it left the
    /// router's choice until a probe passed).
    pub ejections: u64,
    /// Instances only: hedged copies of requests sent to the instance.
    pub hedges: u64,
    /// Instances only: streams that broke off on the instance and were
    /// continued on another.
    pub failovers: u64,
    pub updated_at: DateTime<Utc>,
}

/// `GET /api/v1/usage`: totals since the database was created, as last
/// flushed by the router (every `router.usage_flush_interval_ms`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UsageReport {
    pub keys: Vec<UsageView>,
    pub instances: Vec<UsageView>,
}

/// The schema of an API key id: what [`ApiKeyIdPath`] accepts.
pub struct ApiKeyIdSchema;

impl ApiKeyIdSchema {
    /// `ak-` and the id's UUID in simple (lowercase hex) form, as ids are
    /// written: only that spelling is accepted.
    pub const PATTERN: &'static str = "^ak-[0-9a-f]{32}$";
}

impl utoipa::PartialSchema for ApiKeyIdSchema {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .pattern(Some(Self::PATTERN))
            .examples([serde_json::Value::from(
                "ak-0192f5a0c3b47d1e9a4b5c6d7e8f9a0b",
            )])
            .into()
    }
}
impl utoipa::ToSchema for ApiKeyIdSchema {
    fn name() -> std::borrow::Cow<'static, str> {
        "ApiKeyId".into()
    }
}

/// Whether `raw` is an API key id in its canonical spelling.
fn is_canonical_key_id(raw: &str) -> bool {
    raw.strip_prefix("ak-").is_some_and(|hex| {
        hex.len() == 32 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// The `{id}` path parameter as an API key id; 400 naming `id` otherwise.
pub struct ApiKeyIdPath(pub ApiKeyId);

impl<S: Send + Sync> FromRequestParts<S> for ApiKeyIdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|r| ApiError::invalid("id", format!("invalid id: {}", r.body_text())))?;
        if !is_canonical_key_id(&raw) {
            return Err(ApiError::invalid(
                "id",
                format!("invalid API key id {raw:?}: expected \"ak-\" followed by 32 lowercase hex digits"),
            ));
        }
        raw.parse()
            .map(ApiKeyIdPath)
            .map_err(|e: gpufleet_store::ApiKeyIdError| ApiError::invalid("id", e.to_string()))
    }
}

fn store_error(e: gpufleet_store::StoreError) -> ApiError {
    ApiError::from(ControlError::from(e))
}

/// Edge validation of a create body: name length, model names.
fn validate(body: CreateApiKeyBody) -> Result<(String, Option<Vec<String>>), ApiError> {
    let name = body.name.trim().to_string();
    if name.is_empty() || body.name.chars().count() > MAX_NAME_CHARS {
        return Err(ApiError::invalid(
            "name",
            format!("invalid name: must be 1 to {MAX_NAME_CHARS} characters"),
        ));
    }
    let models = match body.models {
        None => None,
        Some(list) => {
            if list.len() > MAX_MODELS {
                return Err(ApiError::invalid(
                    "models",
                    format!("invalid models: at most {MAX_MODELS}"),
                ));
            }
            let mut out = Vec::with_capacity(list.len());
            for (i, m) in list.iter().enumerate() {
                let parsed: ModelName = m
                    .parse()
                    .map_err(|e| ApiError::invalid(format!("models[{i}]"), format!("{e}")))?;
                let s = parsed.as_str().to_string();
                if !out.contains(&s) {
                    out.push(s);
                }
            }
            Some(out)
        }
    };
    Ok((name, models))
}

/// Create an API key; its secret is in `key`, this once.
#[utoipa::path(
    post, path = "/api/v1/api-keys", tag = "api-keys",
    request_body = CreateApiKeyBody,
    responses(
        (status = 201, description = "Key created; `key` holds the secret, shown once", body = CreatedApiKey),
        (status = 400, description = "Malformed JSON, or invalid input (`field` names it)", body = ErrorBody),
        (status = 401, description = "Missing or wrong admin token", body = ErrorBody),
        (status = 413, description = "Body over 1 MiB", body = ErrorBody),
        (status = 415, description = "The body is not `Content-Type: application/json`", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create(
    State(state): State<SharedState>,
    ApiJson(body): ApiJson<CreateApiKeyBody>,
) -> Result<(StatusCode, Json<CreatedApiKey>), ApiError> {
    let (name, models) = validate(body)?;
    let secret = secrets::generate(KEY_PREFIX);
    let rec = state
        .fleet
        .store()
        .insert_api_key(&NewApiKey {
            id: ApiKeyId::new(),
            name,
            key_hash: secrets::digest(&secret),
            models,
            created_at: Utc::now(),
        })
        .await
        .map_err(store_error)?;
    tracing::info!(api_key_id = %rec.id, name = %rec.name, "API key created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedApiKey {
            api_key: ApiKeyView::from(&rec),
            key: secret,
        }),
    ))
}

/// Every API key, revoked ones too, oldest first.
#[utoipa::path(
    get, path = "/api/v1/api-keys", tag = "api-keys",
    responses(
        (status = 200, description = "The keys (without secrets)", body = ApiKeyList),
        (status = 401, description = "Missing or wrong admin token", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list(State(state): State<SharedState>) -> Result<Json<ApiKeyList>, ApiError> {
    let keys = state
        .fleet
        .store()
        .list_api_keys()
        .await
        .map_err(store_error)?;
    Ok(Json(ApiKeyList {
        api_keys: keys.iter().map(ApiKeyView::from).collect(),
    }))
}

/// Revoke an API key (idempotent). The router stops accepting it within
/// `router.api_key_cache_ttl_ms`.
#[utoipa::path(
    delete, path = "/api/v1/api-keys/{id}", tag = "api-keys",
    params(("id" = ApiKeyIdSchema, Path, description = "API key id (`ak-` and 32 lowercase hex digits)")),
    responses(
        (status = 200, description = "The key, revoked", body = ApiKeyView),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 401, description = "Missing or wrong admin token", body = ErrorBody),
        (status = 404, description = "No such key", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn revoke(
    State(state): State<SharedState>,
    ApiKeyIdPath(id): ApiKeyIdPath,
) -> Result<Json<ApiKeyView>, ApiError> {
    let rec = state
        .fleet
        .store()
        .revoke_api_key(id, Utc::now())
        .await
        .map_err(store_error)?
        .ok_or_else(|| ApiError::not_found(format!("API key {id} not found")))?;
    // This replica's router forgets the key now; the others hear it from
    // the database.
    state.fleet.api_key_changed(&rec.key_hash);
    tracing::info!(api_key_id = %rec.id, "API key revoked");
    Ok(Json(ApiKeyView::from(&rec)))
}

/// Requests, errors and tokens per API key and per instance.
#[utoipa::path(
    get, path = "/api/v1/usage", tag = "api-keys",
    responses(
        (status = 200, description = "Running totals", body = UsageReport),
        (status = 401, description = "Missing or wrong admin token", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn usage(State(state): State<SharedState>) -> Result<Json<UsageReport>, ApiError> {
    let store = state.fleet.store();
    let names: HashMap<String, String> = store
        .list_api_keys()
        .await
        .map_err(store_error)?
        .into_iter()
        .map(|k| (k.id.to_string(), k.name))
        .collect();
    let mut report = UsageReport {
        keys: vec![],
        instances: vec![],
    };
    for u in store.list_usage().await.map_err(store_error)? {
        let view = UsageView {
            name: match u.scope {
                UsageScope::Key => names.get(&u.subject).cloned(),
                UsageScope::Instance => None,
            },
            id: u.subject,
            requests: u.counts.requests,
            errors: u.counts.errors,
            prompt_tokens: u.counts.prompt_tokens,
            completion_tokens: u.counts.completion_tokens,
            stalls: u.counts.stalls,
            ejections: u.counts.ejections,
            hedges: u.counts.hedges,
            failovers: u.counts.failovers,
            updated_at: u.updated_at,
        };
        match u.scope {
            UsageScope::Key => report.keys.push(view),
            UsageScope::Instance => report.instances.push(view),
        }
    }
    Ok(Json(report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_names_and_models() {
        let ok = validate(CreateApiKeyBody {
            name: " ci ".into(),
            models: Some(vec!["a/b".into(), "a/b".into()]),
        })
        .unwrap();
        assert_eq!(ok, ("ci".to_string(), Some(vec!["a/b".to_string()])));
        let e = validate(CreateApiKeyBody {
            name: "".into(),
            models: None,
        })
        .unwrap_err();
        assert_eq!(e.field(), Some("name"));
        // At most 100 characters as sent, blanks included (as the schema says).
        assert!(validate(CreateApiKeyBody {
            name: "x".repeat(100),
            models: None,
        })
        .is_ok());
        let e = validate(CreateApiKeyBody {
            name: format!("{} ", "x".repeat(100)),
            models: None,
        })
        .unwrap_err();
        assert_eq!(e.field(), Some("name"));
        let e = validate(CreateApiKeyBody {
            name: "x".into(),
            models: Some(vec!["ok".into(), "bad name with spaces".into()]),
        })
        .unwrap_err();
        assert_eq!(e.field(), Some("models[1]"));
    }
}
