//! Agent registration and tokens (`agent_tokens`, and the bootstrap secret
//! hash on `instances`).

use crate::rows::{millis, RowReader};
use crate::{RegisterOutcome, Store, StoreError};
use chrono::{DateTime, Utc};
use gpufleet_domain::InstanceId;

impl Store {
    /// Trade the bootstrap secret (compare its hash) for an agent token,
    /// atomically. The secret works until the agent's first heartbeat: a
    /// registration retried because its answer was lost (a replica died
    /// after committing) succeeds again, and the tokens handed out before
    /// are revoked, so exactly one token of the instance works. Once the
    /// agent has sent a heartbeat the secret is refused.
    pub async fn register_agent(
        &self,
        id: InstanceId,
        secret_hash: &str,
        token_hash: &str,
        at: DateTime<Utc>,
    ) -> Result<RegisterOutcome, StoreError> {
        let mut tx = self.pool.begin().await?;
        // The write comes first, so SQLite takes the write lock at once and the
        // compare-and-mark is one statement on both engines (on PostgreSQL it
        // locks the row: concurrent registrations take turns).
        let used = sqlx::query(
            "UPDATE instances SET bootstrap_used_at = $3 \
             WHERE id = $1 AND bootstrap_secret_hash IS NOT NULL AND bootstrap_secret_hash = $2 \
             AND last_heartbeat_seq IS NULL",
        )
        .bind(id.to_string())
        .bind(secret_hash)
        .bind(millis(at))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if used == 0 {
            tx.rollback().await?;
            return Ok(RegisterOutcome::Rejected);
        }
        sqlx::query(
            "UPDATE agent_tokens SET revoked_at = $2 WHERE instance_id = $1 AND revoked_at IS NULL",
        )
        .bind(id.to_string())
        .bind(millis(at))
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO agent_tokens (token_hash, instance_id, created_at, revoked_at) \
             VALUES ($1, $2, $3, NULL)",
        )
        .bind(token_hash)
        .bind(id.to_string())
        .bind(millis(at))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(RegisterOutcome::Registered)
    }

    /// The instance an agent token belongs to (not revoked).
    pub async fn instance_for_token(
        &self,
        token_hash: &str,
    ) -> Result<Option<InstanceId>, StoreError> {
        let row = sqlx::query(
            "SELECT instance_id FROM agent_tokens WHERE token_hash = $1 AND revoked_at IS NULL",
        )
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref()
            .map(|row| RowReader::new(row, "agent_tokens row").parsed("instance_id"))
            .transpose()
    }

    /// Revoke every token of an instance (on terminate). Already revoked
    /// tokens keep their first revocation time.
    pub async fn revoke_tokens(&self, id: InstanceId, at: DateTime<Utc>) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE agent_tokens SET revoked_at = $2 WHERE instance_id = $1 AND revoked_at IS NULL",
        )
        .bind(id.to_string())
        .bind(millis(at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

impl Store {
    /// Digests of an instance's agent tokens that are not revoked.
    pub async fn agent_token_digests(&self, id: InstanceId) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT token_hash FROM agent_tokens WHERE instance_id = $1 AND revoked_at IS NULL",
        )
        .bind(id.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| RowReader::new(row, "agent_tokens row").get::<String>("token_hash"))
            .collect()
    }
}
