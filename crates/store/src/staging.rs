//! Ingestion staging: where heartbeat samples land first.
//!
//! `samples` and `gpu_samples` are indexed by instance. Written batch by
//! batch, a batch of heartbeats from N instances dirties N pages of every
//! such index (each instance's newest rows sit on their own page), and each
//! dirty page is written to the WAL again at every commit: tens of KiB per
//! heartbeat. So [`Store::record_heartbeats`] appends to `samples_staging` /
//! `gpu_samples_staging`, and [`Store::compact_staging`] moves everything
//! staged to the indexed tables in one sorted pass, where each instance's
//! page is written once for all its staged rows.
//!
//! The staging tables are split into [`STAGING_PARTS`] partitions by a hash
//! of the instance id and clustered by (partition, arrival time): a batch
//! appends to a few pages, and [`Store::compact_staging_part`] moves one
//! partition at a time, so the write lock is held for a short while (the
//! move touches the index pages of that partition's instances only), yet
//! each instance's rows still move together.
//!
//! Readers of raw samples read both tables through [`raw_rows`]; a row is
//! in exactly one of them at any time (a move is one transaction).

use crate::rollup::tier_tables;
use crate::{Backend, Store, StoreError};
use gpufleet_domain::metrics::Tier;
use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection, ConnectOptions, Connection};

/// Columns of a `samples` (and `samples_staging`) row.
pub(crate) const SAMPLE_COLUMNS: &str = "instance_id, seq, at, sent_at, cpu_pct, load1, load5, \
     load15, mem_used_bytes, mem_total_bytes, disk_used_bytes, disk_total_bytes, net_rx_bps, \
     net_tx_bps, gpu_source, engine_status, requests_running, requests_waiting, engine_restarts, \
     kv_cache_usage, prompt_tokens_per_s, generation_tokens_per_s, ttft_mean_s";
pub(crate) const SAMPLE_NCOLS: usize = 23;
/// Columns of a `gpu_samples` (and `gpu_samples_staging`) row.
pub(crate) const GPU_COLUMNS: &str = "instance_id, seq, at, gpu_index, name, uuid, util_pct, \
     mem_used_mib, mem_total_mib, temp_c, power_w, power_limit_w";
pub(crate) const GPU_NCOLS: usize = 12;

/// Partitions of the staging tables.
pub const STAGING_PARTS: i64 = 32;

/// The staging partition of an instance: FNV-1a of its id (stable across
/// processes and versions: it is stored).
pub fn staging_part(instance_id: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in instance_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % STAGING_PARTS as u64) as i64
}

/// A family of raw rows: per heartbeat, or per GPU of a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Raw {
    System,
    Gpu,
}

impl Raw {
    pub(crate) fn table(self) -> &'static str {
        match self {
            Raw::System => "samples",
            Raw::Gpu => "gpu_samples",
        }
    }
    pub(crate) fn staging(self) -> &'static str {
        match self {
            Raw::System => "samples_staging",
            Raw::Gpu => "gpu_samples_staging",
        }
    }
    pub(crate) fn columns(self) -> &'static str {
        match self {
            Raw::System => SAMPLE_COLUMNS,
            Raw::Gpu => GPU_COLUMNS,
        }
    }
}

/// `part = P AND ` for the staging rows of `instance`, or nothing.
pub(crate) fn part_filter(instance: Option<&str>) -> String {
    instance
        .map(|id| format!("part = {} AND ", staging_part(id)))
        .unwrap_or_default()
}

/// A derived table of the raw rows (both tables) that match `cond`, named
/// `alias`: `(SELECT cols FROM t WHERE cond UNION ALL SELECT cols FROM
/// t_staging WHERE [part = P AND] cond) AS alias`. The condition is applied
/// in each arm, so each uses its own indexes whatever the planner does with
/// the union. `instance`: the condition selects that one instance's rows, so
/// the staging arm reads its partition only.
pub(crate) fn raw_rows(kind: Raw, cond: &str, alias: &str, instance: Option<&str>) -> String {
    let cols = kind.columns();
    let part = part_filter(instance);
    format!(
        "(SELECT {cols} FROM {t} WHERE {cond} \
         UNION ALL SELECT {cols} FROM {s} WHERE {part}{cond}) AS {alias}",
        t = kind.table(),
        s = kind.staging(),
    )
}

/// What to read `tier`'s `kind` rows from where `cond` holds: the tier's
/// table, or for the raw tier both raw tables ([`raw_rows`]). The caller
/// still applies `cond` itself.
pub(crate) fn tier_rows(tier: Tier, kind: Raw, cond: &str, instance: Option<&str>) -> String {
    let (system, gpu, _) = tier_tables(tier);
    match (tier, kind) {
        (Tier::Raw, _) => raw_rows(kind, cond, "raw", instance),
        (_, Raw::System) => system.to_string(),
        (_, Raw::Gpu) => gpu.to_string(),
    }
}

impl Store {
    /// Move every staged sample to `samples` / `gpu_samples`, partition by
    /// partition; returns how many heartbeats moved.
    pub async fn compact_staging(&self) -> Result<u64, StoreError> {
        let mut moved = 0;
        for part in 0..STAGING_PARTS {
            moved += self.compact_staging_part(part).await?;
        }
        Ok(moved)
    }

    /// Move the staged samples of partition `part` (`0..STAGING_PARTS`) to
    /// `samples` / `gpu_samples` atomically; returns how many heartbeats
    /// moved. Readers see each row exactly once throughout.
    ///
    /// On PostgreSQL the move is one statement (data-modifying CTEs share
    /// one snapshot): it deletes exactly the staged rows it inserts, so
    /// heartbeats staged meanwhile (by this control plane's writer or
    /// another's) neither wait for it nor slip between copy and delete;
    /// they stay for the next move. Two concurrent moves of one partition
    /// do not both move a row: the second's DELETE skips rows the first
    /// deleted. On SQLite (one writer at a time) it is one transaction.
    pub async fn compact_staging_part(&self, part: i64) -> Result<u64, StoreError> {
        let mut conn = self.pool.acquire().await?;
        self.compact_staging_part_on(&mut conn, part).await
    }

    async fn compact_staging_part_on(
        &self,
        conn: &mut AnyConnection,
        part: i64,
    ) -> Result<u64, StoreError> {
        // A row already there (cannot happen under the seq guard) is
        // skipped rather than failing every later move. No ORDER BY: the
        // pages a move dirties are those of the keys it inserts, whatever
        // their order (and a sort spilled to temporary files).
        if self.backend == Backend::Postgres {
            // The foreign-key checks of the inserted rows run a cached plan
            // per connection, made the first times it ran: planned while
            // `samples` was a page or two, it is a sequential scan per
            // checked row, and one large move (a backlog after small ones)
            // turns quadratic (17,280 rows: 16 s instead of 0.6 s).
            // Replanned now, with the tables' current sizes, it is an
            // index lookup. Costs one round trip and a replan per move.
            sqlx::query("DISCARD PLANS").execute(&mut *conn).await?;
            let (sys, gpu) = (Raw::System, Raw::Gpu);
            // The GPU rows' foreign key to their samples is checked at the
            // end of the statement, when both inserts are done.
            let done = sqlx::query(&format!(
                "WITH ms AS (DELETE FROM {ss} WHERE part = $1 RETURNING {sc}), \
                 mg AS (DELETE FROM {gs} WHERE part = $1 RETURNING {gc}), \
                 ig AS (INSERT INTO {gt} ({gc}) SELECT {gc} FROM mg ON CONFLICT DO NOTHING) \
                 INSERT INTO {st} ({sc}) SELECT {sc} FROM ms ON CONFLICT DO NOTHING",
                ss = sys.staging(),
                st = sys.table(),
                sc = sys.columns(),
                gs = gpu.staging(),
                gt = gpu.table(),
                gc = gpu.columns(),
            ))
            .bind(part)
            .execute(&mut *conn)
            .await?;
            return Ok(done.rows_affected());
        }
        let mut tx = self.begin_write_on(conn).await?;
        let mut moved = 0;
        // Samples before their GPU rows (a GPU row references its sample).
        for kind in [Raw::System, Raw::Gpu] {
            let cols = kind.columns();
            let done = sqlx::query(&format!(
                "INSERT INTO {t} ({cols}) SELECT {cols} FROM {s} WHERE part = $1 \
                 ON CONFLICT DO NOTHING",
                t = kind.table(),
                s = kind.staging(),
            ))
            .bind(part)
            .execute(&mut *tx)
            .await?;
            if kind == Raw::System {
                moved = done.rows_affected();
            }
        }
        if moved == 0 {
            tx.rollback().await?;
            return Ok(0);
        }
        for kind in [Raw::Gpu, Raw::System] {
            sqlx::query(&format!("DELETE FROM {} WHERE part = $1", kind.staging()))
                .bind(part)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(moved)
    }

    /// Heartbeats staged and not moved yet.
    pub async fn staged_heartbeats(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM samples_staging")
            .fetch_one(&self.pool)
            .await?)
    }
}

/// The heartbeat writer's own connection: one writer at a time anyway (on
/// SQLite), and a connection that stays with it keeps the pages it writes
/// (each instance's newest index pages) in its page cache, where the pool
/// would hand it a different connection, with a cold cache, each time.
///
/// On SQLite it is taken from the pool, and given back after each call
/// when the pool has a single connection (an in-memory database). On
/// PostgreSQL it is a connection of its own, opened where the session is
/// first used: its socket belongs to the runtime of the task that uses it
/// (the writer runs its own), not to whichever runtime opened a pooled one,
/// and its session settings never reach the pool. Opened on first use;
/// closed after any error, and by [`IngestSession::close`].
pub struct IngestSession {
    store: Store,
    conn: Option<SessionConn>,
}

enum SessionConn {
    Pooled(PoolConnection<Any>),
    Own(AnyConnection),
}

impl SessionConn {
    fn get(&mut self) -> &mut AnyConnection {
        match self {
            SessionConn::Pooled(c) => c,
            SessionConn::Own(c) => c,
        }
    }
}

impl IngestSession {
    pub fn new(store: Store) -> IngestSession {
        IngestSession { store, conn: None }
    }

    async fn conn(&mut self) -> Result<&mut AnyConnection, StoreError> {
        if self.conn.is_none() {
            let conn = match self.store.backend {
                Backend::Sqlite => SessionConn::Pooled(self.store.pool.acquire().await?),
                Backend::Postgres => {
                    let mut conn = self
                        .store
                        .pool
                        .connect_options()
                        .connect()
                        .await
                        .map_err(StoreError::Connect)?;
                    // Telemetry: a commit need not wait for its WAL flush (a
                    // crash of the server may lose the last fraction of a
                    // second of heartbeats, never consistency).
                    sqlx::query("SET synchronous_commit = off")
                        .execute(&mut conn)
                        .await?;
                    SessionConn::Own(conn)
                }
            };
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("just set").get())
    }

    /// [`Store::record_heartbeats`] on the session's connection.
    pub async fn record_heartbeats(
        &mut self,
        batch: &[(gpufleet_proto::Heartbeat, chrono::DateTime<chrono::Utc>)],
    ) -> Result<Vec<crate::HeartbeatOutcome>, StoreError> {
        let store = self.store.clone();
        let result = store.record_heartbeats_on(self.conn().await?, batch).await;
        self.after(result.is_err());
        result
    }

    /// [`Store::compact_staging_part`] on the session's connection.
    pub async fn compact_staging_part(&mut self, part: i64) -> Result<u64, StoreError> {
        let store = self.store.clone();
        let result = store
            .compact_staging_part_on(self.conn().await?, part)
            .await;
        self.after(result.is_err());
        result
    }

    fn after(&mut self, failed: bool) {
        if failed {
            self.reset();
        } else if self.store.pool.options().get_max_connections() <= 1 {
            // The pool's only connection: others need it between calls.
            self.conn = None;
        }
    }

    /// After an error: drop the connection (it may be mid-transaction or
    /// broken); the next call opens one.
    fn reset(&mut self) {
        match self.conn.take() {
            Some(SessionConn::Pooled(c)) => drop(c.detach()),
            Some(SessionConn::Own(c)) => drop(c),
            None => {}
        }
    }

    /// Close the session's connection cleanly (a pooled one goes back).
    pub async fn close(&mut self) {
        match self.conn.take() {
            Some(SessionConn::Own(c)) => {
                if let Err(e) = c.close().await {
                    tracing::debug!(error = %e, "closing the ingest connection failed");
                }
            }
            Some(SessionConn::Pooled(c)) => drop(c),
            None => {}
        }
    }

    /// The session's store.
    pub fn store(&self) -> &Store {
        &self.store
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_stable_and_spread() {
        // Stored: must never change.
        assert_eq!(staging_part(""), (0xcbf2_9ce4_8422_2325u64 % 32) as i64);
        let mut seen = [0usize; STAGING_PARTS as usize];
        for i in 0..1600 {
            let p = staging_part(&format!("i-{i:032x}"));
            assert!((0..STAGING_PARTS).contains(&p));
            seen[p as usize] += 1;
        }
        assert!(seen.iter().all(|n| *n > 25), "{seen:?}");
    }
}
