//! Idempotency keys of create requests (`idempotency_keys`): the first
//! request with a key inserts what it makes and the key in one
//! transaction; a later one with the same key, within
//! [`IDEMPOTENCY_KEY_TTL`], is told what the first made instead. Two at
//! once serialise on the key's primary key: the second waits for the
//! first to commit, then reads it.

use crate::instances::insert_rows;
use crate::rows::{corrupt, is_unique_violation, RowReader};
use crate::{InstanceRecord, NewInstance, Store, StoreError};
use gpufleet_domain::{InstanceId, ProjectId};
use std::time::Duration;

/// How long a key is remembered. After that the same key makes new things.
pub const IDEMPOTENCY_KEY_TTL: Duration = Duration::from_secs(24 * 3600);

/// A create request's idempotency key, where it applies, and the digest of
/// the request it came with.
#[derive(Debug, Clone)]
pub struct IdempotencyClaim {
    /// What the key is used for (e.g. `instances.create`): the same key on
    /// another kind of request is another key.
    pub scope: &'static str,
    /// Keys are per project: the same key in two projects is two keys.
    pub project: ProjectId,
    pub key: String,
    /// A digest of the request as read (e.g. SHA-256 hex of a canonical
    /// form): the same key with another request is not a retry.
    pub request_digest: String,
}

/// A key's earlier use, within the TTL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyUse {
    /// What the first request with the key made.
    pub ids: Vec<InstanceId>,
    /// Whether that request had the same digest as this one.
    pub same_request: bool,
}

/// What [`Store::insert_instances_once`] did.
#[derive(Debug, Clone)]
pub enum InsertOnce {
    /// The key was new: these were inserted.
    Inserted(Vec<InstanceRecord>),
    /// The key was used before: nothing was inserted.
    Used(KeyUse),
}

impl Store {
    /// [`Store::insert_instances`], at most once per `claim`'s key: the
    /// instances and the key are written in one transaction, so a retry
    /// after any failure (even one after the commit, before the client heard
    /// back) finds either both or neither. Expired keys are dropped in the
    /// same transaction. A used key is found by the key's primary key, not
    /// by a read first: callers that expect retries look the key up with
    /// [`Store::idempotency_key_use`] before they prepare the insert.
    pub async fn insert_instances_once(
        &self,
        new: &[NewInstance],
        claim: &IdempotencyClaim,
    ) -> Result<InsertOnce, StoreError> {
        let now = self.db_now_ms();
        let ttl_ms = IDEMPOTENCY_KEY_TTL.as_millis() as i64;
        let ids: Vec<String> = new.iter().map(|n| n.id.to_string()).collect();
        let ids = serde_json::to_string(&ids).map_err(|e| corrupt(format!("instance ids: {e}")))?;
        let mut tx = self.pool.begin().await?;
        sqlx::query(&format!(
            "DELETE FROM idempotency_keys WHERE created_at < {now} - $1"
        ))
        .bind(ttl_ms)
        .execute(&mut *tx)
        .await?;
        let claimed = sqlx::query(&format!(
            "INSERT INTO idempotency_keys \
             (scope, project_id, key, request_digest, resource_ids, created_at) \
             VALUES ($1, $2, $3, $4, $5, {now})"
        ))
        .bind(claim.scope)
        .bind(claim.project.as_str())
        .bind(claim.key.as_str())
        .bind(claim.request_digest.as_str())
        .bind(ids)
        .execute(&mut *tx)
        .await;
        match claimed {
            Ok(_) => {}
            // Another request with this key committed first (on PostgreSQL
            // this insert waited for it): answer with what it made.
            Err(e) if is_unique_violation(&e) => {
                drop(tx);
                let used = self.idempotency_key_use(claim).await?.ok_or_else(|| {
                    corrupt(format!(
                        "idempotency key {:?} is taken but cannot be read",
                        claim.key
                    ))
                })?;
                return Ok(InsertOnce::Used(used));
            }
            Err(e) => return Err(e.into()),
        }
        let out = insert_rows(&mut tx, new).await?;
        tx.commit().await?;
        Ok(InsertOnce::Inserted(out))
    }

    /// What the key of `claim` was used for within the TTL, if it was.
    pub async fn idempotency_key_use(
        &self,
        claim: &IdempotencyClaim,
    ) -> Result<Option<KeyUse>, StoreError> {
        let now = self.db_now_ms();
        let row = sqlx::query(&format!(
            "SELECT request_digest, resource_ids FROM idempotency_keys \
             WHERE scope = $1 AND project_id = $2 AND key = $3 AND created_at >= {now} - $4"
        ))
        .bind(claim.scope)
        .bind(claim.project.as_str())
        .bind(claim.key.as_str())
        .bind(IDEMPOTENCY_KEY_TTL.as_millis() as i64)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let r = RowReader::new(&row, "idempotency_keys row");
        let digest: String = r.get("request_digest")?;
        let raw: String = r.get("resource_ids")?;
        let ids: Vec<String> = serde_json::from_str(&raw)
            .map_err(|e| corrupt(format!("idempotency_keys.resource_ids: {e}")))?;
        let ids = ids
            .iter()
            .map(|s| s.parse::<InstanceId>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| corrupt(format!("idempotency_keys.resource_ids: {e}")))?;
        Ok(Some(KeyUse {
            ids,
            same_request: digest == claim.request_digest,
        }))
    }
}
