//! Usage per hour and per (API key, instance) — `usage_hourly`, added to by
//! the routers' flushes — and the instances billable in a time range: what
//! spend, cost per million tokens and key budgets are computed from.

use crate::instances::{decode_instance, INSTANCE_COLUMNS};
use crate::rows::{millis, to_i64, RowReader};
use crate::{ApiKeyId, InstanceRecord, Store, StoreError};
use chrono::{DateTime, Utc};
use gpufleet_domain::{DeploymentId, InstanceId, ModelName, ProjectId};
use std::collections::HashMap;

/// Counts to add to one (hour, key, instance) row; also what is read back.
#[derive(Debug, Clone, PartialEq)]
pub struct HourlyUsage {
    /// Start of the UTC hour.
    pub hour: DateTime<Utc>,
    /// `None`: a request with no key.
    pub key_id: Option<ApiKeyId>,
    pub instance_id: InstanceId,
    /// The instance's project, model and deployment (denormalised so that
    /// roll-ups read one table).
    pub project_id: ProjectId,
    pub model: ModelName,
    pub deployment_id: Option<DeploymentId>,
    pub requests: u64,
    pub errors: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// What the key is charged for these tokens.
    pub cost: f64,
}

/// The start of the UTC hour `t` is in.
pub fn hour_of(t: DateTime<Utc>) -> DateTime<Utc> {
    let ms = t.timestamp_millis();
    let h = ms - ms.rem_euclid(3_600_000);
    DateTime::from_timestamp_millis(h).unwrap_or(t)
}

impl Store {
    /// Add each row's counts to the stored ones, in one transaction.
    pub async fn add_hourly_usage(&self, rows: &[HourlyUsage]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_write().await?;
        for u in rows {
            sqlx::query(
                "INSERT INTO usage_hourly (hour, key_id, instance_id, project_id, model, \
                 deployment_id, requests, errors, prompt_tokens, completion_tokens, cost) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
                 ON CONFLICT (hour, key_id, instance_id) DO UPDATE SET \
                 requests = usage_hourly.requests + excluded.requests, \
                 errors = usage_hourly.errors + excluded.errors, \
                 prompt_tokens = usage_hourly.prompt_tokens + excluded.prompt_tokens, \
                 completion_tokens = usage_hourly.completion_tokens + excluded.completion_tokens, \
                 cost = usage_hourly.cost + excluded.cost",
            )
            .bind(millis(hour_of(u.hour)))
            .bind(u.key_id.map(|k| k.to_string()).unwrap_or_default())
            .bind(u.instance_id.to_string())
            .bind(u.project_id.as_str())
            .bind(u.model.as_str())
            .bind(u.deployment_id.map(|d| d.to_string()).unwrap_or_default())
            .bind(to_i64(u.requests, "requests")?)
            .bind(to_i64(u.errors, "errors")?)
            .bind(to_i64(u.prompt_tokens, "prompt_tokens")?)
            .bind(to_i64(u.completion_tokens, "completion_tokens")?)
            .bind(u.cost)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Rows whose hour is in `[from, to)`, oldest first.
    pub async fn hourly_usage(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<HourlyUsage>, StoreError> {
        let rows = sqlx::query(
            "SELECT hour, key_id, instance_id, project_id, model, deployment_id, requests, \
             errors, prompt_tokens, completion_tokens, cost FROM usage_hourly \
             WHERE hour >= $1 AND hour < $2 ORDER BY hour, key_id, instance_id",
        )
        .bind(millis(hour_of(from)))
        .bind(millis(to))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let r = RowReader::new(row, "usage_hourly row");
                let key: String = r.get("key_id")?;
                let dep: String = r.get("deployment_id")?;
                Ok(HourlyUsage {
                    hour: r.time("hour")?,
                    key_id: if key.is_empty() {
                        None
                    } else {
                        Some(key.parse().map_err(|e| {
                            crate::rows::corrupt(format!("usage_hourly row: key_id: {e}"))
                        })?)
                    },
                    instance_id: r.parsed("instance_id")?,
                    project_id: r.parsed("project_id")?,
                    model: r.parsed("model")?,
                    deployment_id: if dep.is_empty() {
                        None
                    } else {
                        Some(dep.parse().map_err(|e| {
                            crate::rows::corrupt(format!("usage_hourly row: deployment_id: {e}"))
                        })?)
                    },
                    requests: r.int("requests")?,
                    errors: r.int("errors")?,
                    prompt_tokens: r.int("prompt_tokens")?,
                    completion_tokens: r.int("completion_tokens")?,
                    cost: r.get("cost")?,
                })
            })
            .collect()
    }

    /// What each key has been charged since `since` (a month's start).
    pub async fn key_charges_since(
        &self,
        since: DateTime<Utc>,
    ) -> Result<HashMap<ApiKeyId, f64>, StoreError> {
        self.key_charges_between(since, None).await
    }

    /// What each key was charged in the hours from `from`'s to `to`'s
    /// (excluded; `None`: to now).
    pub async fn key_charges_between(
        &self,
        from: DateTime<Utc>,
        to: Option<DateTime<Utc>>,
    ) -> Result<HashMap<ApiKeyId, f64>, StoreError> {
        let rows = sqlx::query(
            "SELECT key_id, SUM(cost) AS cost FROM usage_hourly \
             WHERE key_id <> '' AND hour >= $1 AND hour < $2 GROUP BY key_id",
        )
        .bind(millis(hour_of(from)))
        .bind(to.map_or(i64::MAX, |t| millis(hour_of(t))))
        .fetch_all(&self.pool)
        .await?;
        let mut out = HashMap::new();
        for row in &rows {
            let r = RowReader::new(row, "usage_hourly sum");
            let id: ApiKeyId = r.parsed("key_id")?;
            let cost: Option<f64> = r.get("cost")?;
            out.insert(id, cost.unwrap_or(0.0));
        }
        Ok(out)
    }

    /// Instances billable at some time in `[from, to)` (their billing
    /// started before `to` and had not ended by `from`).
    pub async fn billable_instances(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<InstanceRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {INSTANCE_COLUMNS} FROM instances WHERE billing_started_at IS NOT NULL \
             AND billing_started_at < $2 AND (billing_ended_at IS NULL OR billing_ended_at > $1) \
             ORDER BY created_at, id"
        ))
        .bind(millis(from))
        .bind(millis(to))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode_instance).collect()
    }
}
