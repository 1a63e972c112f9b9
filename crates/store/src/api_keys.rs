//! API keys of the OpenAI-compatible endpoint (`api_keys`, secrets stored as
//! SHA-256 digests only) and usage counters per key and per instance
//! (`usage_counters`, running totals the router adds to).

use crate::rows::{bind_opt_f64, corrupt, millis, to_i64, RowReader};
use crate::{Store, StoreError};
use chrono::{DateTime, Utc};
use gpufleet_domain::{KeyLimits, ProjectId};
use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

/// Id of an API key: `ak-` followed by a UUIDv7 in simple form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ApiKeyId(Uuid);

impl ApiKeyId {
    pub const PREFIX: &'static str = "ak-";

    /// A new, time-ordered id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
}

impl Default for ApiKeyId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for ApiKeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", Self::PREFIX, self.0.simple())
    }
}

/// A string that is not an API key id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid API key id {0:?}: expected \"ak-\" followed by 32 hex digits")]
pub struct ApiKeyIdError(pub String);

impl FromStr for ApiKeyId {
    type Err = ApiKeyIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ApiKeyIdError(s.to_string());
        let rest = s.strip_prefix(Self::PREFIX).ok_or_else(err)?;
        if rest.len() != 32 {
            return Err(err());
        }
        Uuid::parse_str(rest).map(Self).map_err(|_| err())
    }
}

impl Serialize for ApiKeyId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ApiKeyId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A key to store.
#[derive(Debug, Clone, PartialEq)]
pub struct NewApiKey {
    pub id: ApiKeyId,
    pub name: String,
    /// SHA-256 hex of the secret.
    pub key_hash: String,
    /// Models the key may use; `None`: every model.
    pub models: Option<Vec<String>>,
    pub created_at: DateTime<Utc>,
    pub project_id: ProjectId,
    pub limits: KeyLimits,
}

/// A stored key (without its secret, which is never stored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    pub id: ApiKeyId,
    pub name: String,
    pub key_hash: String,
    pub models: Option<Vec<String>>,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub project_id: ProjectId,
    pub limits: KeyLimits,
}

impl ApiKeyRecord {
    /// Whether the key may call `model`.
    pub fn allows(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|list| list.iter().any(|m| m == model))
    }
}

/// What a usage counter counts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageScope {
    /// An API key (subject: its id).
    Key,
    /// An instance (subject: its id).
    Instance,
}

impl UsageScope {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageScope::Key => "key",
            UsageScope::Instance => "instance",
        }
    }
}

impl FromStr for UsageScope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "key" => Ok(UsageScope::Key),
            "instance" => Ok(UsageScope::Instance),
            other => Err(format!("unknown usage scope {other:?}")),
        }
    }
}

/// Request, error and token counts, and (for instances) the router's
/// routing events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageCounts {
    pub requests: u64,
    pub errors: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Requests that got no first token within the instance's stall bound.
    #[serde(default)]
    pub stalls: u64,
    /// Times the instance's circuit opened (it left the router's choice).
    #[serde(default)]
    pub ejections: u64,
    /// Hedged copies of a request sent to the instance.
    #[serde(default)]
    pub hedges: u64,
    /// Streams that broke off on the instance and were continued on another.
    #[serde(default)]
    pub failovers: u64,
}

impl UsageCounts {
    pub fn is_zero(&self) -> bool {
        *self == UsageCounts::default()
    }
}

/// Counts to add to one subject's totals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageDelta {
    pub scope: UsageScope,
    pub subject: String,
    pub counts: UsageCounts,
}

/// One subject's totals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageRecord {
    pub scope: UsageScope,
    pub subject: String,
    pub counts: UsageCounts,
    pub updated_at: DateTime<Utc>,
}

fn decode_key(row: &AnyRow) -> Result<ApiKeyRecord, StoreError> {
    let mut r = RowReader::new(row, "api_keys row");
    let id: ApiKeyId = r.parsed("id")?;
    r.set_ctx(format!("api_keys row {id}"));
    let models: Option<String> = r.get("models")?;
    let models = models
        .map(|m| {
            serde_json::from_str::<Vec<String>>(&m)
                .map_err(|e| corrupt(format!("api_keys row {id}: column models: {e}")))
        })
        .transpose()?;
    Ok(ApiKeyRecord {
        id,
        name: r.get("name")?,
        key_hash: r.get("key_hash")?,
        models,
        created_at: r.time("created_at")?,
        revoked_at: r.time_opt("revoked_at")?,
        project_id: r.parsed("project_id")?,
        limits: KeyLimits {
            rpm: r.get::<Option<i64>>("rpm")?.map(|v| v.max(0) as u64),
            tpm: r.get::<Option<i64>>("tpm")?.map(|v| v.max(0) as u64),
            monthly_budget: r.get("monthly_budget")?,
        },
    })
}

const KEY_COLUMNS: &str =
    "id, name, key_hash, models, created_at, revoked_at, project_id, rpm, tpm, monthly_budget";

impl Store {
    /// Store a new key.
    pub async fn insert_api_key(&self, key: &NewApiKey) -> Result<ApiKeyRecord, StoreError> {
        let models = key
            .models
            .as_ref()
            .map(|m| serde_json::Value::from(m.clone()).to_string());
        let q = sqlx::query(
            "INSERT INTO api_keys (id, name, key_hash, models, created_at, revoked_at, \
             project_id, rpm, tpm, monthly_budget) \
             VALUES ($1, $2, $3, $4, $5, NULL, $6, $7, $8, $9)",
        )
        .bind(key.id.to_string())
        .bind(key.name.as_str())
        .bind(key.key_hash.as_str())
        .bind(models)
        .bind(millis(key.created_at))
        .bind(key.project_id.as_str())
        .bind(key.limits.rpm.map(|v| to_i64(v, "rpm")).transpose()?)
        .bind(key.limits.tpm.map(|v| to_i64(v, "tpm")).transpose()?);
        bind_opt_f64(q, key.limits.monthly_budget)
            .execute(&self.pool)
            .await?;
        Ok(ApiKeyRecord {
            id: key.id,
            name: key.name.clone(),
            key_hash: key.key_hash.clone(),
            models: key.models.clone(),
            created_at: key.created_at,
            revoked_at: None,
            project_id: key.project_id.clone(),
            limits: key.limits,
        })
    }

    /// Change a key's limits. `None` when no key has this id.
    pub async fn set_api_key_limits(
        &self,
        id: ApiKeyId,
        limits: KeyLimits,
    ) -> Result<Option<ApiKeyRecord>, StoreError> {
        let q = sqlx::query(
            "UPDATE api_keys SET rpm = $2, tpm = $3, monthly_budget = $4 WHERE id = $1",
        )
        .bind(id.to_string())
        .bind(limits.rpm.map(|v| to_i64(v, "rpm")).transpose()?)
        .bind(limits.tpm.map(|v| to_i64(v, "tpm")).transpose()?);
        bind_opt_f64(q, limits.monthly_budget)
            .execute(&self.pool)
            .await?;
        self.get_api_key(id).await
    }

    /// One key, revoked or not.
    pub async fn get_api_key(&self, id: ApiKeyId) -> Result<Option<ApiKeyRecord>, StoreError> {
        let row = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(decode_key).transpose()
    }

    /// Every key, revoked ones too, oldest first.
    pub async fn list_api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at, id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode_key).collect()
    }

    /// The key whose secret has this digest, revoked or not.
    pub async fn api_key_by_hash(
        &self,
        key_hash: &str,
    ) -> Result<Option<ApiKeyRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = $1"
        ))
        .bind(key_hash)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(decode_key).transpose()
    }

    /// Revoke a key; a key already revoked keeps its first revocation time.
    /// `None` when no key has this id.
    pub async fn revoke_api_key(
        &self,
        id: ApiKeyId,
        at: DateTime<Utc>,
    ) -> Result<Option<ApiKeyRecord>, StoreError> {
        sqlx::query("UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL")
            .bind(id.to_string())
            .bind(millis(at))
            .execute(&self.pool)
            .await?;
        self.get_api_key(id).await
    }

    /// Add counts to each subject's totals, in one transaction.
    pub async fn add_usage(
        &self,
        deltas: &[UsageDelta],
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        if deltas.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_write().await?;
        for d in deltas {
            let c = &d.counts;
            sqlx::query(
                "INSERT INTO usage_counters (scope, subject, requests, errors, prompt_tokens, \
                 completion_tokens, stalls, ejections, hedges, failovers, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
                 ON CONFLICT (scope, subject) DO UPDATE SET \
                 requests = usage_counters.requests + excluded.requests, \
                 errors = usage_counters.errors + excluded.errors, \
                 prompt_tokens = usage_counters.prompt_tokens + excluded.prompt_tokens, \
                 completion_tokens = usage_counters.completion_tokens + excluded.completion_tokens, \
                 stalls = usage_counters.stalls + excluded.stalls, \
                 ejections = usage_counters.ejections + excluded.ejections, \
                 hedges = usage_counters.hedges + excluded.hedges, \
                 failovers = usage_counters.failovers + excluded.failovers, \
                 updated_at = excluded.updated_at",
            )
            .bind(d.scope.as_str())
            .bind(d.subject.as_str())
            .bind(to_i64(c.requests, "requests")?)
            .bind(to_i64(c.errors, "errors")?)
            .bind(to_i64(c.prompt_tokens, "prompt_tokens")?)
            .bind(to_i64(c.completion_tokens, "completion_tokens")?)
            .bind(to_i64(c.stalls, "stalls")?)
            .bind(to_i64(c.ejections, "ejections")?)
            .bind(to_i64(c.hedges, "hedges")?)
            .bind(to_i64(c.failovers, "failovers")?)
            .bind(millis(at))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Every subject's totals, by scope then subject.
    pub async fn list_usage(&self) -> Result<Vec<UsageRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT scope, subject, requests, errors, prompt_tokens, completion_tokens, \
             stalls, ejections, hedges, failovers, updated_at FROM usage_counters ORDER BY scope, subject",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let r = RowReader::new(row, "usage_counters row");
                Ok(UsageRecord {
                    scope: r.parsed("scope")?,
                    subject: r.get("subject")?,
                    counts: UsageCounts {
                        requests: r.int("requests")?,
                        errors: r.int("errors")?,
                        prompt_tokens: r.int("prompt_tokens")?,
                        completion_tokens: r.int("completion_tokens")?,
                        stalls: r.int("stalls")?,
                        ejections: r.int("ejections")?,
                        hedges: r.int("hedges")?,
                        failovers: r.int("failovers")?,
                    },
                    updated_at: r.time("updated_at")?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_key_ids_round_trip() {
        let id = ApiKeyId::new();
        let s = id.to_string();
        assert!(s.starts_with("ak-") && s.len() == 35);
        assert_eq!(s.parse::<ApiKeyId>().unwrap(), id);
        assert!("ak-zz".parse::<ApiKeyId>().is_err());
        assert!("i-0192f5a0c3b47d1e9a4b5c6d7e8f9a0b"
            .parse::<ApiKeyId>()
            .is_err());
    }

    #[test]
    fn allowlists() {
        let mut k = ApiKeyRecord {
            id: ApiKeyId::new(),
            name: "n".into(),
            key_hash: "h".into(),
            models: None,
            created_at: Utc::now(),
            revoked_at: None,
            project_id: ProjectId::default_project(),
            limits: KeyLimits::default(),
        };
        assert!(k.allows("anything"));
        k.models = Some(vec!["a".into()]);
        assert!(k.allows("a"));
        assert!(!k.allows("b"));
    }
}
