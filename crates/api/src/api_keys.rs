//! `/api/v1/api-keys`: keys of the OpenAI-compatible endpoint (`/v1/...`),
//! and `/api/v1/usage`: requests, errors and tokens per key and per instance.
//!
//! A key's secret (`gfk_...`) is returned once, by create; only its SHA-256
//! digest is stored. A key may have limits (`rpm`, `tpm`, `monthly_budget`),
//! which the router enforces; `PATCH` changes them, on every replica's
//! router at once (the key cache forgets the key).

use crate::audit::AuditTarget;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::{ApiJson, ApiQuery};
use crate::instances::parse_project_opt;
use crate::views::ErrorBody;
use crate::SharedState;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use gpufleet_control::{secrets, ControlError};
use gpufleet_domain::{KeyLimits, ModelName, Permission};
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
    /// The project the key belongs to: it reaches that project's
    /// instances only (default: `default` for the admin token, else the
    /// caller's only project where they may manage keys).
    #[serde(default)]
    #[schema(value_type = Option<String>, pattern = "^[a-z0-9][a-z0-9-]{0,38}$")]
    pub project: Option<String>,
    /// Requests per minute (any trailing 60 s); absent or null: no limit.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 10_000_000)]
    pub rpm: Option<u64>,
    /// Tokens (prompt and completion) per minute; absent or null: no limit.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 10_000_000_000_u64)]
    pub tpm: Option<u64>,
    /// What the key may be charged per calendar month (UTC), in the
    /// currency of the instance prices; absent or null: no budget.
    #[serde(default)]
    #[schema(minimum = 0)]
    pub monthly_budget: Option<f64>,
}

/// `PATCH /api/v1/api-keys/{id}` body: the limits to change. An absent
/// member is left as it is; null removes that limit.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchApiKeyBody {
    /// Requests per minute; null: no limit.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<u64>, minimum = 1, maximum = 10_000_000)]
    pub rpm: Option<Option<u64>>,
    /// Tokens per minute; null: no limit.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<u64>, minimum = 1, maximum = 10_000_000_000_u64)]
    pub tpm: Option<Option<u64>>,
    /// Budget per calendar month; null: no budget.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<f64>, minimum = 0)]
    pub monthly_budget: Option<Option<f64>>,
}

/// A member that is present (null or not) is `Some`.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

impl PatchApiKeyBody {
    /// `current` with this patch applied.
    fn apply(&self, current: KeyLimits) -> KeyLimits {
        KeyLimits {
            rpm: self.rpm.unwrap_or(current.rpm),
            tpm: self.tpm.unwrap_or(current.tpm),
            monthly_budget: self.monthly_budget.unwrap_or(current.monthly_budget),
        }
    }
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
    /// The project it belongs to.
    #[schema(value_type = String)]
    pub project_id: gpufleet_domain::ProjectId,
    /// Requests per minute; null: no limit.
    pub rpm: Option<u64>,
    /// Tokens per minute; null: no limit.
    pub tpm: Option<u64>,
    /// Budget per calendar month (UTC); null: no budget.
    pub monthly_budget: Option<f64>,
    /// What the key was charged this calendar month (UTC), as the routers
    /// last flushed it (every `router.usage_flush_interval_ms`).
    pub spent_this_month: f64,
}

impl From<&ApiKeyRecord> for ApiKeyView {
    fn from(r: &ApiKeyRecord) -> Self {
        Self {
            id: r.id.to_string(),
            name: r.name.clone(),
            models: r.models.clone(),
            created_at: r.created_at,
            revoked_at: r.revoked_at,
            project_id: r.project_id.clone(),
            rpm: r.limits.rpm,
            tpm: r.limits.tpm,
            monthly_budget: r.limits.monthly_budget,
            spent_this_month: 0.0,
        }
    }
}

impl ApiKeyView {
    /// With what the key was charged this month (from `charges`).
    pub fn with_charges(mut self, id: ApiKeyId, charges: &HashMap<ApiKeyId, f64>) -> Self {
        self.spent_this_month = charges.get(&id).copied().unwrap_or(0.0);
        self
    }
}

/// The start of this calendar month, UTC.
fn this_month() -> DateTime<Utc> {
    use chrono::{Datelike, TimeZone};
    let now = Utc::now();
    Utc.with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0)
        .single()
        .unwrap_or(now)
}

/// What each key was charged this month.
async fn charges(state: &SharedState) -> Result<HashMap<ApiKeyId, f64>, ApiError> {
    state
        .fleet
        .store()
        .key_charges_since(this_month())
        .await
        .map_err(store_error)
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

/// Limits in range, or 400 naming the field.
fn validate_limits(limits: &KeyLimits) -> Result<(), ApiError> {
    limits
        .validate()
        .map_err(|e| ApiError::invalid(e.field, format!("invalid {}: {}", e.field, e.message)))
}

/// Edge validation of a create body: name length, model names, limits.
fn validate(body: CreateApiKeyBody) -> Result<(String, Option<Vec<String>>, KeyLimits), ApiError> {
    let limits = KeyLimits {
        rpm: body.rpm,
        tpm: body.tpm,
        monthly_budget: body.monthly_budget,
    };
    validate_limits(&limits)?;
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
    Ok((name, models, limits))
}

/// Create an API key; its secret is in `key`, this once.
#[utoipa::path(
    post, path = "/api/v1/api-keys", tag = "api-keys",
    request_body = CreateApiKeyBody,
    responses(
        (status = 201, description = "Key created; `key` holds the secret, shown once", body = CreatedApiKey),
        (status = 400, description = "Malformed JSON, or invalid input (`field` names it)", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Your role does not allow this", body = ErrorBody),
        (status = 413, description = "Body over 1 MiB", body = ErrorBody),
        (status = 415, description = "The body is not `Content-Type: application/json`", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create(
    State(state): State<SharedState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateApiKeyBody>,
) -> Result<(StatusCode, Extension<AuditTarget>, Json<CreatedApiKey>), ApiError> {
    let asked = parse_project_opt(body.project.as_deref(), "project")?;
    let (name, models, limits) = validate(body)?;
    let project = caller.project_for_create(asked, Permission::ManageKeys)?;
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
            project_id: project.clone(),
            limits,
        })
        .await
        .map_err(store_error)?;
    tracing::info!(api_key_id = %rec.id, name = %rec.name, "API key created");
    Ok((
        StatusCode::CREATED,
        Extension(
            AuditTarget::new(rec.id, Some(&project))
                .with_message(format!("API key {:?} created", rec.name)),
        ),
        Json(CreatedApiKey {
            api_key: ApiKeyView::from(&rec),
            key: secret,
        }),
    ))
}

/// Every API key, revoked ones too, oldest first.
#[utoipa::path(
    get, path = "/api/v1/api-keys", tag = "api-keys",
    params(ProjectParam),
    responses(
        (status = 400, description = "Bad query parameter (names it)", body = ErrorBody),
        (status = 200, description = "The keys (without secrets)", body = ApiKeyList),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Your role does not allow this", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<SharedState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<ProjectParam>,
) -> Result<Json<ApiKeyList>, ApiError> {
    let projects = caller.project_filter(parse_project_opt(q.project.as_deref(), "project")?);
    let mut keys = state
        .fleet
        .store()
        .list_api_keys()
        .await
        .map_err(store_error)?;
    if let Some(ps) = &projects {
        keys.retain(|k| ps.contains(&k.project_id));
    }
    let charges = charges(&state).await?;
    Ok(Json(ApiKeyList {
        api_keys: keys
            .iter()
            .map(|k| ApiKeyView::from(k).with_charges(k.id, &charges))
            .collect(),
    }))
}

/// Change a key's limits (`rpm`, `tpm`, `monthly_budget`; null removes
/// one). Every replica's router applies them from its next request.
#[utoipa::path(
    patch, path = "/api/v1/api-keys/{id}", tag = "api-keys",
    params(("id" = ApiKeyIdSchema, Path, description = "API key id (`ak-` and 32 lowercase hex digits)")),
    request_body = PatchApiKeyBody,
    responses(
        (status = 200, description = "The key with its new limits", body = ApiKeyView),
        (status = 400, description = "Malformed id or JSON, or a limit out of range (`field` names it)", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Your role does not allow this", body = ErrorBody),
        (status = 404, description = "No such key", body = ErrorBody),
        (status = 413, description = "Body over 1 MiB", body = ErrorBody),
        (status = 415, description = "The body is not `Content-Type: application/json`", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn patch(
    State(state): State<SharedState>,
    caller: Caller,
    ApiKeyIdPath(id): ApiKeyIdPath,
    ApiJson(body): ApiJson<PatchApiKeyBody>,
) -> Result<(Extension<AuditTarget>, Json<ApiKeyView>), ApiError> {
    let store = state.fleet.store();
    let current = reach(&state, &caller, id, Permission::ManageKeys).await?;
    let limits = body.apply(current.limits);
    validate_limits(&limits)?;
    let rec = store
        .set_api_key_limits(id, limits)
        .await
        .map_err(store_error)?
        .ok_or_else(|| ApiError::not_found(format!("API key {id} not found")))?;
    // This replica's router reads the key again now; the others hear it
    // from the database.
    state.fleet.api_key_changed(&rec.key_hash);
    tracing::info!(api_key_id = %rec.id, rpm = ?limits.rpm, tpm = ?limits.tpm, monthly_budget = ?limits.monthly_budget, "API key limits changed");
    let charges = charges(&state).await?;
    Ok((
        Extension(
            AuditTarget::new(rec.id, Some(&rec.project_id)).with_message(format!(
                "limits: rpm {:?}, tpm {:?}, monthly budget {:?}",
                limits.rpm, limits.tpm, limits.monthly_budget
            )),
        ),
        Json(ApiKeyView::from(&rec).with_charges(rec.id, &charges)),
    ))
}

/// Revoke an API key (idempotent). The router stops accepting it within
/// `router.api_key_cache_ttl_ms`.
#[utoipa::path(
    delete, path = "/api/v1/api-keys/{id}", tag = "api-keys",
    params(("id" = ApiKeyIdSchema, Path, description = "API key id (`ak-` and 32 lowercase hex digits)")),
    responses(
        (status = 200, description = "The key, revoked", body = ApiKeyView),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Your role does not allow this", body = ErrorBody),
        (status = 404, description = "No such key", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn revoke(
    State(state): State<SharedState>,
    caller: Caller,
    ApiKeyIdPath(id): ApiKeyIdPath,
) -> Result<(Extension<AuditTarget>, Json<ApiKeyView>), ApiError> {
    reach(&state, &caller, id, Permission::ManageKeys).await?;
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
    let charges = charges(&state).await?;
    Ok((
        Extension(AuditTarget::new(rec.id, Some(&rec.project_id))),
        Json(ApiKeyView::from(&rec).with_charges(rec.id, &charges)),
    ))
}

/// `?project=`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ProjectParam {
    /// Only this project's.
    #[param(value_type = Option<String>, pattern = "^[a-z0-9][a-z0-9-]{0,38}$")]
    pub project: Option<String>,
}

/// The key, if the caller may do `need` in its project; another project's
/// key answers as a missing one.
async fn reach(
    state: &SharedState,
    caller: &Caller,
    id: ApiKeyId,
    need: Permission,
) -> Result<ApiKeyRecord, ApiError> {
    let not_found = || ApiError::not_found(format!("API key {id} not found"));
    let rec = state
        .fleet
        .store()
        .get_api_key(id)
        .await
        .map_err(store_error)?
        .ok_or_else(not_found)?;
    caller.check(&rec.project_id, need, not_found)?;
    Ok(rec)
}

/// Requests, errors and tokens per API key and per instance.
#[utoipa::path(
    get, path = "/api/v1/usage", tag = "api-keys",
    params(ProjectParam),
    responses(
        (status = 400, description = "Bad query parameter (names it)", body = ErrorBody),
        (status = 200, description = "Running totals", body = UsageReport),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Your role does not allow this", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn usage(
    State(state): State<SharedState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<ProjectParam>,
) -> Result<Json<UsageReport>, ApiError> {
    let projects = caller.project_filter(parse_project_opt(q.project.as_deref(), "project")?);
    let store = state.fleet.store();
    let names: HashMap<String, String> = store
        .list_api_keys()
        .await
        .map_err(store_error)?
        .into_iter()
        .filter(|k| {
            projects
                .as_ref()
                .is_none_or(|ps| ps.contains(&k.project_id))
        })
        .map(|k| (k.id.to_string(), k.name))
        .collect();
    // The instances whose usage the caller may see (archived ones too).
    let instances: Option<std::collections::HashSet<String>> = match &projects {
        None => None,
        Some(ps) => Some(
            store
                .list_instances(&gpufleet_store::InstanceFilter {
                    include_archived: true,
                    projects: Some(ps.clone()),
                    ..Default::default()
                })
                .await
                .map_err(store_error)?
                .into_iter()
                .map(|r| r.id.to_string())
                .collect(),
        ),
    };
    let mut report = UsageReport {
        keys: vec![],
        instances: vec![],
    };
    for u in store.list_usage().await.map_err(store_error)? {
        let visible = match u.scope {
            UsageScope::Key => names.contains_key(&u.subject),
            UsageScope::Instance => instances.as_ref().is_none_or(|s| s.contains(&u.subject)),
        };
        if !visible {
            continue;
        }
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

    fn body(name: &str) -> CreateApiKeyBody {
        CreateApiKeyBody {
            name: name.into(),
            models: None,
            rpm: None,
            tpm: None,
            monthly_budget: None,
            project: None,
        }
    }

    #[test]
    fn limits_are_validated_naming_the_field() {
        for (json, field) in [
            (r#"{"name":"k","rpm":0}"#, "rpm"),
            (r#"{"name":"k","rpm":-1}"#, "rpm"),
            (r#"{"name":"k","rpm":"10"}"#, "rpm"),
            (r#"{"name":"k","tpm":0}"#, "tpm"),
            (r#"{"name":"k","monthly_budget":-0.5}"#, "monthly_budget"),
            (r#"{"name":"k","monthly_budget":"1"}"#, "monthly_budget"),
        ] {
            let e = crate::extract::decode_json::<CreateApiKeyBody>(json.as_bytes())
                .and_then(validate)
                .unwrap_err();
            assert_eq!(e.field(), Some(field), "{json}");
        }
        let (_, _, l) = validate(CreateApiKeyBody {
            rpm: Some(60),
            tpm: Some(1000),
            monthly_budget: Some(0.0),
            ..body("k")
        })
        .unwrap();
        assert_eq!(
            l,
            KeyLimits {
                rpm: Some(60),
                tpm: Some(1000),
                monthly_budget: Some(0.0)
            }
        );
    }

    #[test]
    fn a_patch_changes_what_it_names_and_null_removes() {
        let current = KeyLimits {
            rpm: Some(10),
            tpm: Some(100),
            monthly_budget: Some(5.0),
        };
        let p: PatchApiKeyBody =
            serde_json::from_str(r#"{"rpm": 20, "monthly_budget": null}"#).unwrap();
        assert_eq!(
            p.apply(current),
            KeyLimits {
                rpm: Some(20),
                tpm: Some(100),
                monthly_budget: None
            }
        );
        let p: PatchApiKeyBody = serde_json::from_str("{}").unwrap();
        assert_eq!(p.apply(current), current);
        let e = crate::extract::decode_json::<PatchApiKeyBody>(br#"{"tpm": "x"}"#).unwrap_err();
        assert_eq!(e.field(), Some("tpm"));
    }

    #[test]
    fn validates_names_and_models() {
        let ok = validate(CreateApiKeyBody {
            name: " ci ".into(),
            models: Some(vec!["a/b".into(), "a/b".into()]),
            ..body("x")
        })
        .unwrap();
        assert_eq!(
            ok,
            (
                "ci".to_string(),
                Some(vec!["a/b".to_string()]),
                KeyLimits::default()
            )
        );
        let e = validate(CreateApiKeyBody {
            name: "".into(),
            models: None,
            ..body("x")
        })
        .unwrap_err();
        assert_eq!(e.field(), Some("name"));
        // At most 100 characters as sent, blanks included (as the schema says).
        assert!(validate(CreateApiKeyBody {
            name: "x".repeat(100),
            models: None,
            ..body("x")
        })
        .is_ok());
        let e = validate(CreateApiKeyBody {
            name: format!("{} ", "x".repeat(100)),
            models: None,
            ..body("x")
        })
        .unwrap_err();
        assert_eq!(e.field(), Some("name"));
        let e = validate(CreateApiKeyBody {
            name: "x".into(),
            models: Some(vec!["ok".into(), "bad name with spaces".into()]),
            ..body("x")
        })
        .unwrap_err();
        assert_eq!(e.field(), Some("models[1]"));
    }
}
