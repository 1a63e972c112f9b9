//! Each router's share of its limited API keys' per-minute usage
//! (`rate_shares`): what a key used through one replica in the trailing
//! 60 s, written by that replica about every second. A replica admits a
//! request while its own count plus the other replicas' shares stay under
//! the key's requests and tokens per minute.

use crate::rows::{to_i64, RowReader};
use crate::{ApiKeyId, Store, StoreError};
use std::collections::HashMap;
use std::time::Duration;

/// What one key used through one replica in the trailing minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateShare {
    /// Requests admitted.
    pub requests: u64,
    /// Tokens used, plus those reserved by requests still in flight.
    pub tokens: u64,
}

impl RateShare {
    pub fn is_zero(&self) -> bool {
        self.requests == 0 && self.tokens == 0
    }
}

/// A share older than this says nothing any more: everything it counted
/// has left the trailing minute.
pub const RATE_SHARE_MAX_AGE: Duration = Duration::from_secs(60);

impl Store {
    /// Set `replica`'s shares of the given keys (a zero share removes the
    /// key's row), and drop every replica's rows older than
    /// [`RATE_SHARE_MAX_AGE`] (a replica that went away). One transaction.
    pub async fn put_rate_shares(
        &self,
        replica: &str,
        shares: &[(ApiKeyId, RateShare)],
    ) -> Result<(), StoreError> {
        let now = self.db_now_ms();
        let mut tx = self.begin_write().await?;
        for (key, share) in shares {
            if share.is_zero() {
                sqlx::query("DELETE FROM rate_shares WHERE replica = $1 AND key_id = $2")
                    .bind(replica.to_string())
                    .bind(key.to_string())
                    .execute(&mut *tx)
                    .await?;
                continue;
            }
            sqlx::query(&format!(
                "INSERT INTO rate_shares (replica, key_id, requests, tokens, updated_at) \
                 VALUES ($1, $2, $3, $4, {now}) \
                 ON CONFLICT (replica, key_id) DO UPDATE SET requests = excluded.requests, \
                 tokens = excluded.tokens, updated_at = excluded.updated_at"
            ))
            .bind(replica.to_string())
            .bind(key.to_string())
            .bind(to_i64(share.requests, "requests")?)
            .bind(to_i64(share.tokens, "tokens")?)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(&format!(
            "DELETE FROM rate_shares WHERE updated_at < {now} - $1"
        ))
        .bind(RATE_SHARE_MAX_AGE.as_millis() as i64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The shares of every replica but `replica` written in the last
    /// [`RATE_SHARE_MAX_AGE`], added up per key.
    pub async fn other_rate_shares(
        &self,
        replica: &str,
    ) -> Result<HashMap<ApiKeyId, RateShare>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT key_id, CAST(SUM(requests) AS BIGINT) AS requests, \
             CAST(SUM(tokens) AS BIGINT) AS tokens FROM rate_shares \
             WHERE replica <> $1 AND updated_at >= {} - $2 GROUP BY key_id",
            self.db_now_ms()
        ))
        .bind(replica.to_string())
        .bind(RATE_SHARE_MAX_AGE.as_millis() as i64)
        .fetch_all(&self.pool)
        .await?;
        let mut out = HashMap::new();
        for row in &rows {
            let r = RowReader::new(row, "rate_shares sum");
            out.insert(
                r.parsed::<ApiKeyId>("key_id")?,
                RateShare {
                    requests: r.int("requests")?,
                    tokens: r.int("tokens")?,
                },
            );
        }
        Ok(out)
    }
}
