//! What lets several control-plane replicas share one database: leases for
//! background work (with fencing tokens checked by the writes made under
//! them), and, on PostgreSQL, a listener for the changes other replicas make
//! (`LISTEN/NOTIFY`, sent by triggers at commit; see the `replicas`
//! migration).

use crate::instances::INSTANCE_COLUMNS;
use crate::{Backend, InstanceRecord, Store, StoreError};
use gpufleet_domain::InstanceId;
use sqlx::any::AnyArguments;
use sqlx::postgres::PgListener;
use sqlx::query::Query;
use sqlx::{Any, Row};
use std::time::Duration;

/// The notification channel of instance changes ("<id> <generation>").
const INSTANCES_CHANNEL: &str = "gpufleet_instances";
/// The notification channel of API key changes (the key's digest).
const API_KEYS_CHANNEL: &str = "gpufleet_api_keys";

/// A lease this replica holds, as the database granted it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub name: String,
    pub holder: String,
    /// Grows whenever the lease changes hands or lapses.
    pub token: i64,
    /// Milliseconds since the epoch on the database's clock.
    pub expires_at_ms: i64,
}

impl Lease {
    /// The fence writes made under this lease carry.
    pub fn fence(&self) -> Fence {
        Fence {
            name: self.name.clone(),
            holder: self.holder.clone(),
            token: self.token,
        }
    }
}

/// A lease as listed (for status pages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseInfo {
    pub name: String,
    pub holder: String,
    pub token: i64,
    pub expires_at_ms: i64,
    /// The database's clock when it was read.
    pub now_ms: i64,
}

/// A fencing token: a write carrying it happens only while its lease is
/// still held by the same holder with the same token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub name: String,
    pub holder: String,
    pub token: i64,
}

impl Fence {
    pub(crate) fn bind<'q>(
        &self,
        q: Query<'q, Any, AnyArguments<'q>>,
    ) -> Query<'q, Any, AnyArguments<'q>> {
        q.bind(self.name.clone())
            .bind(self.holder.clone())
            .bind(self.token)
    }
}

impl Store {
    /// The database's clock in milliseconds, as SQL.
    pub(crate) fn db_now_ms(&self) -> &'static str {
        match self.backend {
            Backend::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
            Backend::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)",
        }
    }

    /// SQL that holds while the fence bound at `$first`, `$first+1`,
    /// `$first+2` is valid. On PostgreSQL it share-locks the lease row until
    /// the transaction ends: a takeover waits for the write to commit.
    pub(crate) fn fence_condition(&self, first: usize) -> String {
        let lock = match self.backend {
            Backend::Postgres => " FOR SHARE",
            Backend::Sqlite => "",
        };
        format!(
            "EXISTS (SELECT 1 FROM leases WHERE name = ${} AND holder = ${} AND token = ${} \
             AND expires_at > {}{lock})",
            first,
            first + 1,
            first + 2,
            self.db_now_ms()
        )
    }

    /// Take the lease `name` for `holder` for `ttl`, or renew it if
    /// `holder` has it. `None` while another holder's lease runs. The token
    /// stays the same across renewals and grows when the lease changes
    /// hands or was let lapse.
    pub async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        let now = self.db_now_ms();
        let sql = format!(
            "INSERT INTO leases (name, holder, token, expires_at) VALUES ($1, $2, 1, {now} + $3) \
             ON CONFLICT (name) DO UPDATE SET \
             token = CASE WHEN leases.holder = excluded.holder AND leases.expires_at > {now} \
                     THEN leases.token ELSE leases.token + 1 END, \
             holder = excluded.holder, expires_at = excluded.expires_at \
             WHERE leases.holder = excluded.holder OR leases.expires_at <= {now} \
             RETURNING token, expires_at"
        );
        let row = sqlx::query(&sql)
            .bind(name.to_string())
            .bind(holder.to_string())
            .bind(ttl.as_millis() as i64)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(r) => Some(Lease {
                name: name.to_string(),
                holder: holder.to_string(),
                token: r.try_get::<i64, _>(0)?,
                expires_at_ms: r.try_get::<i64, _>(1)?,
            }),
            None => None,
        })
    }

    /// Let go of a lease held by `holder` (on shutdown), so another
    /// replica takes it at once rather than when it expires.
    pub async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE leases SET expires_at = 0 WHERE name = $1 AND holder = $2")
            .bind(name.to_string())
            .bind(holder.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// One trivial statement: whether the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Every lease, by name.
    pub async fn leases(&self) -> Result<Vec<LeaseInfo>, StoreError> {
        let sql = format!(
            "SELECT name, holder, token, expires_at, {} FROM leases ORDER BY name",
            self.db_now_ms()
        );
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                Ok(LeaseInfo {
                    name: r.try_get(0)?,
                    holder: r.try_get(1)?,
                    token: r.try_get(2)?,
                    expires_at_ms: r.try_get(3)?,
                    now_ms: r.try_get(4)?,
                })
            })
            .collect()
    }

    /// The instances among `ids` (in no particular order; missing ones left out).
    pub async fn get_instances(
        &self,
        ids: &[InstanceId],
    ) -> Result<Vec<InstanceRecord>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let placeholders: Vec<String> = (1..=ids.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "SELECT {INSTANCE_COLUMNS} FROM instances WHERE id IN ({})",
            placeholders.join(", ")
        );
        let mut q = sqlx::query(&sql);
        for id in ids {
            q = q.bind(id.to_string());
        }
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter().map(crate::instances::decode_instance).collect()
    }

    /// Instances whose `updated_at` is at or after `since` (the catch-up
    /// read after the change listener lost its connection).
    pub async fn instances_updated_since(
        &self,
        since: chrono::DateTime<chrono::Utc>,
    ) -> Result<Vec<InstanceRecord>, StoreError> {
        let sql = format!(
            "SELECT {INSTANCE_COLUMNS} FROM instances WHERE updated_at >= $1 ORDER BY updated_at"
        );
        let rows = sqlx::query(&sql)
            .bind(crate::rows::millis(since))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(crate::instances::decode_instance).collect()
    }

    /// Listen for the changes every replica makes (PostgreSQL only).
    pub async fn listen(&self) -> Result<ChangeListener, StoreError> {
        let url = self.pg_url.as_ref().ok_or(StoreError::NeedsPostgres {
            what: "listening for other replicas' changes",
        })?;
        let mut listener = PgListener::connect(url)
            .await
            .map_err(StoreError::Connect)?;
        listener
            .listen_all([INSTANCES_CHANNEL, API_KEYS_CHANNEL])
            .await
            .map_err(StoreError::Connect)?;
        Ok(ChangeListener {
            listener,
            lost: false,
        })
    }
}

/// A change some replica committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DbChange {
    /// An instance was created or changed; `generation` is the new one.
    Instance { id: InstanceId, generation: i64 },
    /// An API key (by its digest) was revoked or deleted.
    ApiKey { key_hash: String },
    /// The connection was lost and is back: notifications in between may
    /// be missing, so read back what changed meanwhile.
    Resumed,
}

/// Notifications of committed changes, on a connection of its own.
pub struct ChangeListener {
    listener: PgListener,
    lost: bool,
}

impl ChangeListener {
    /// The next change and every other one already received (up to `max`
    /// in all), so a burst is handled as one batch.
    pub async fn recv_batch(&mut self, max: usize) -> Vec<DbChange> {
        let mut out = vec![self.recv().await];
        while out.len() < max && !self.lost {
            let Some(n) = self.listener.next_buffered() else {
                break;
            };
            if let Some(change) = parse(n.channel(), n.payload()) {
                out.push(change);
            }
        }
        out
    }

    /// The next change. Reconnects by itself (waiting between tries) and
    /// then answers `Resumed` once.
    pub async fn recv(&mut self) -> DbChange {
        loop {
            if self.lost {
                // Any statement on the listener reconnects and LISTENs again.
                match sqlx::query("SELECT 1").execute(&mut self.listener).await {
                    Ok(_) => {
                        self.lost = false;
                        return DbChange::Resumed;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "change listener cannot reconnect; retrying");
                        tokio::time::sleep(Duration::from_millis(250)).await;
                        continue;
                    }
                }
            }
            match self.listener.try_recv().await {
                Ok(Some(n)) => {
                    if let Some(change) = parse(n.channel(), n.payload()) {
                        return change;
                    }
                    tracing::warn!(channel = n.channel(), "unreadable change notification");
                }
                Ok(None) => {
                    tracing::warn!("change listener lost its connection; reconnecting");
                    self.lost = true;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "change listener failed; reconnecting");
                    self.lost = true;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    }
}

fn parse(channel: &str, payload: &str) -> Option<DbChange> {
    match channel {
        INSTANCES_CHANNEL => {
            let (id, generation) = payload.split_once(' ')?;
            Some(DbChange::Instance {
                id: id.parse().ok()?,
                generation: generation.parse().ok()?,
            })
        }
        API_KEYS_CHANNEL => Some(DbChange::ApiKey {
            key_hash: payload.to_string(),
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_notifications() {
        let id = InstanceId::new();
        assert_eq!(
            parse(INSTANCES_CHANNEL, &format!("{id} 7")),
            Some(DbChange::Instance { id, generation: 7 })
        );
        assert_eq!(parse(INSTANCES_CHANNEL, "nonsense"), None);
        assert_eq!(
            parse(API_KEYS_CHANNEL, "abc"),
            Some(DbChange::ApiKey {
                key_hash: "abc".into()
            })
        );
        assert_eq!(parse("other", "x"), None);
    }
}
