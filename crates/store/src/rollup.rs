//! Rollups (raw → 1 minute → 1 hour) and retention.
//!
//! A tier's watermark says up to when (exclusive, a bucket boundary) its
//! buckets are complete. Each [`Store::rollup`] call aggregates whole
//! buckets after it, upserts them (so re-running a range rewrites the same
//! rows), and moves it on, all in one transaction, a bounded span per call.
//! Buckets are keyed by the control plane's receive time (`samples.at`), so
//! the caller passes `up_to` a little behind its clock (e.g. now − 10 s) to
//! leave heartbeats still in a writer's batch time to land.

use crate::figures::{aggregates, select_list, Source, GPU, SYSTEM};
use crate::rows::millis;
use crate::staging::{raw_rows, Raw};
use crate::{Store, StoreError};
use chrono::{DateTime, Utc};
use gpufleet_domain::metrics::{RetentionConfig, Tier};
use serde::{Deserialize, Serialize};
use sqlx::AnyConnection;

/// Buckets one `rollup` call aggregates at most (10 minutes / 2 hours): a
/// call holds the write lock for a bounded time; loop while not `caught_up`.
const MAX_MINUTE_BUCKETS: i64 = 10;
const MAX_HOUR_BUCKETS: i64 = 2;
/// Rows one retention DELETE removes, and DELETEs per table per call.
const RETENTION_BATCH: i64 = 5_000;
const RETENTION_MAX_BATCHES: u32 = 20;

/// What one [`Store::rollup`] call did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollupReport {
    pub tier: Tier,
    /// The span of buckets aggregated, `[from, to)`; `None` when there was
    /// nothing complete to aggregate.
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    /// Rollup rows written (instance rows + GPU rows).
    pub rows: u64,
    /// The tier's watermark after the call.
    pub watermark: Option<DateTime<Utc>>,
    /// False when the call stopped at its bound with complete buckets left:
    /// call again.
    pub caught_up: bool,
}

/// What one [`Store::enforce_retention`] call deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionReport {
    /// Raw `samples` rows (their `gpu_samples` rows go with them).
    pub raw_samples: u64,
    pub raw_gpu_samples: u64,
    pub minute_samples: u64,
    pub minute_gpu_samples: u64,
    pub hour_samples: u64,
    pub hour_gpu_samples: u64,
    /// False when a table hit the per-call bound with old rows left: call again.
    pub complete: bool,
}

struct Tables {
    /// Destination (`samples_1m` ...) and source (`samples` ...).
    dest: &'static str,
    dest_gpu: &'static str,
    src: &'static str,
    src_gpu: &'static str,
    source: Source,
    bucket_ms: i64,
    max_buckets: i64,
}

fn tables(tier: Tier) -> Result<Tables, StoreError> {
    match tier {
        Tier::Minute => Ok(Tables {
            dest: "samples_1m",
            dest_gpu: "gpu_samples_1m",
            src: "samples",
            src_gpu: "gpu_samples",
            source: Source::Raw,
            bucket_ms: 60_000,
            max_buckets: MAX_MINUTE_BUCKETS,
        }),
        Tier::Hour => Ok(Tables {
            dest: "samples_1h",
            dest_gpu: "gpu_samples_1h",
            src: "samples_1m",
            src_gpu: "gpu_samples_1m",
            source: Source::Rollup,
            bucket_ms: 3_600_000,
            max_buckets: MAX_HOUR_BUCKETS,
        }),
        Tier::Raw => Err(StoreError::InvalidQuery {
            what: "the raw tier is not a rollup".to_string(),
        }),
    }
}

/// The table names holding `tier` (instance rows, GPU rows) and their time column.
pub(crate) fn tier_tables(tier: Tier) -> (&'static str, &'static str, Source) {
    match tier {
        Tier::Raw => ("samples", "gpu_samples", Source::Raw),
        Tier::Minute => ("samples_1m", "gpu_samples_1m", Source::Rollup),
        Tier::Hour => ("samples_1h", "gpu_samples_1h", Source::Rollup),
    }
}

fn align(ms: i64, step: i64) -> i64 {
    ms.div_euclid(step) * step
}

fn time(ms: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_millis(ms).ok_or_else(|| StoreError::Corrupt {
        what: format!("rollup time {ms} out of range"),
    })
}

/// `INSERT INTO dest ... SELECT <aggregates> FROM src WHERE time in [$1, $2)
/// GROUP BY ... ON CONFLICT DO UPDATE`.
fn upsert_sql(dest: &str, src: &str, source: Source, bucket_ms: i64, gpu: bool) -> String {
    let figures = if gpu { GPU } else { SYSTEM };
    let aggs = aggregates(figures, source);
    let t = source.time_col();
    let cond = format!("{t} >= $1 AND {t} < $2");
    let (key, key_sel, group) = if gpu {
        (
            "instance_id, bucket, gpu_index",
            format!("instance_id, ({t} / {bucket_ms}) * {bucket_ms} AS b, gpu_index"),
            "instance_id, b, gpu_index",
        )
    } else {
        (
            "instance_id, bucket",
            format!("instance_id, ({t} / {bucket_ms}) * {bucket_ms} AS b"),
            "instance_id, b",
        )
    };
    let cols = aggs
        .iter()
        .map(|(_, a)| a.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let updates = aggs
        .iter()
        .map(|(_, a)| format!("{a} = excluded.{a}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "INSERT INTO {dest} ({key}, {cols}) \
         SELECT {key_sel}, {sel} FROM {rows} WHERE {cond} \
         GROUP BY {group} \
         ON CONFLICT ({key}) DO UPDATE SET {updates}",
        sel = select_list(&aggs),
        rows = match source {
            Source::Raw => raw_rows(if gpu { Raw::Gpu } else { Raw::System }, &cond, "raw", None,),
            Source::Rollup => src.to_string(),
        },
    )
}

async fn watermark(conn: &mut AnyConnection, tier: Tier) -> Result<Option<i64>, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT up_to FROM rollup_watermarks WHERE tier = $1")
            .bind(tier.as_str())
            .fetch_optional(&mut *conn)
            .await?,
    )
}

async fn set_watermark(conn: &mut AnyConnection, tier: Tier, up_to: i64) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO rollup_watermarks (tier, up_to) VALUES ($1, $2) \
         ON CONFLICT (tier) DO UPDATE SET up_to = excluded.up_to",
    )
    .bind(tier.as_str())
    .bind(up_to)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

impl Store {
    /// The tier's watermark: every bucket starting before it is rolled up.
    pub async fn rollup_watermark(&self, tier: Tier) -> Result<Option<DateTime<Utc>>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        watermark(&mut conn, tier).await?.map(time).transpose()
    }

    /// Aggregate the complete buckets of `tier` (`Minute` from raw samples,
    /// `Hour` from minute rollups) after its watermark and before `up_to`
    /// (and, for `Hour`, before the minute watermark), at most a bounded
    /// span per call; upsert them and advance the watermark, in one
    /// transaction. Idempotent: a bucket aggregated twice gets the same row.
    /// `Raw` is `InvalidQuery`.
    pub async fn rollup(
        &self,
        tier: Tier,
        up_to: DateTime<Utc>,
    ) -> Result<RollupReport, StoreError> {
        let tb = tables(tier)?;
        let mut tx = self.begin_write().await?;
        let mut limit = align(millis(up_to), tb.bucket_ms);
        if tier == Tier::Hour {
            // Only hours whose minutes are all rolled up.
            let minutes = watermark(&mut tx, Tier::Minute).await?;
            limit = limit.min(align(minutes.unwrap_or(i64::MIN / 2), tb.bucket_ms));
        }
        let wm = watermark(&mut tx, tier).await?;
        let t = tb.source.time_col();
        // Skip empty stretches: start at the first source row at or after the watermark.
        let cond = format!("{t} >= $1");
        let rows_from = match tb.source {
            Source::Raw => raw_rows(Raw::System, &cond, "raw", None),
            Source::Rollup => tb.src.to_string(),
        };
        let first: Option<i64> =
            sqlx::query_scalar(&format!("SELECT MIN({t}) FROM {rows_from} WHERE {cond}"))
                .bind(wm.unwrap_or(i64::MIN))
                .fetch_one(&mut *tx)
                .await?;
        let start = match first {
            Some(f) => align(f, tb.bucket_ms).max(wm.unwrap_or(i64::MIN)),
            None => limit,
        };
        if start >= limit {
            // Nothing complete to aggregate: the empty buckets up to `limit`
            // are done too (so the next tier may use them).
            let moved = wm.is_some_and(|w| w < limit);
            if moved {
                set_watermark(&mut tx, tier, limit).await?;
                tx.commit().await?;
            } else {
                tx.rollback().await?;
            }
            return Ok(RollupReport {
                tier,
                from: None,
                to: None,
                rows: 0,
                watermark: if moved { Some(limit) } else { wm }.map(time).transpose()?,
                caught_up: true,
            });
        }
        let end = limit.min(start.saturating_add(tb.max_buckets * tb.bucket_ms));
        let mut rows = 0;
        for (dest, src, gpu) in [(tb.dest, tb.src, false), (tb.dest_gpu, tb.src_gpu, true)] {
            rows += sqlx::query(&upsert_sql(dest, src, tb.source, tb.bucket_ms, gpu))
                .bind(start)
                .bind(end)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        set_watermark(&mut tx, tier, end).await?;
        tx.commit().await?;
        tracing::debug!(%tier, start, end, rows, "rollup");
        Ok(RollupReport {
            tier,
            from: Some(time(start)?),
            to: Some(time(end)?),
            rows,
            watermark: Some(time(end)?),
            caught_up: end >= limit,
        })
    }

    /// Delete rows past their tier's retention at `now`, in bounded batches.
    /// Rows not yet rolled up into the next tier are kept (raw rows until the
    /// minute watermark passes them, minute rows until the hour watermark
    /// does), so history is never lost to a lagging rollup.
    pub async fn enforce_retention(
        &self,
        retention: &RetentionConfig,
        now: DateTime<Utc>,
    ) -> Result<RetentionReport, StoreError> {
        let now = millis(now);
        let (minute_wm, hour_wm) = {
            let mut conn = self.pool.acquire().await?;
            (
                watermark(&mut conn, Tier::Minute).await?,
                watermark(&mut conn, Tier::Hour).await?,
            )
        };
        let raw_cut = retention
            .cutoff_ms(Tier::Raw, now)
            .min(minute_wm.unwrap_or(i64::MIN));
        let minute_cut = retention
            .cutoff_ms(Tier::Minute, now)
            .min(hour_wm.unwrap_or(i64::MIN));
        let hour_cut = retention.cutoff_ms(Tier::Hour, now);
        let mut report = RetentionReport {
            complete: true,
            ..RetentionReport::default()
        };
        // Raw rows not moved out of staging yet count as raw rows.
        let (mut staged_gpu, mut staged) = (0, 0);
        let jobs: [(&str, &str, &str, i64, &mut u64); 8] = [
            (
                "gpu_samples_staging",
                "part, at, instance_id, seq, gpu_index",
                "at",
                raw_cut,
                &mut staged_gpu,
            ),
            (
                "samples_staging",
                "part, at, instance_id, seq",
                "at",
                raw_cut,
                &mut staged,
            ),
            // GPU rows first: their samples rows would cascade to them anyway.
            (
                "gpu_samples",
                "instance_id, seq, gpu_index",
                "at",
                raw_cut,
                &mut report.raw_gpu_samples,
            ),
            (
                "samples",
                "instance_id, seq",
                "at",
                raw_cut,
                &mut report.raw_samples,
            ),
            (
                "gpu_samples_1m",
                "instance_id, bucket, gpu_index",
                "bucket",
                minute_cut,
                &mut report.minute_gpu_samples,
            ),
            (
                "samples_1m",
                "instance_id, bucket",
                "bucket",
                minute_cut,
                &mut report.minute_samples,
            ),
            (
                "gpu_samples_1h",
                "instance_id, bucket, gpu_index",
                "bucket",
                hour_cut,
                &mut report.hour_gpu_samples,
            ),
            (
                "samples_1h",
                "instance_id, bucket",
                "bucket",
                hour_cut,
                &mut report.hour_samples,
            ),
        ];
        let mut complete = true;
        for (table, key, t, cutoff, counter) in jobs {
            if cutoff == i64::MIN {
                continue;
            }
            let sql = format!(
                "DELETE FROM {table} WHERE ({key}) IN \
                 (SELECT {key} FROM {table} WHERE {t} < $1 LIMIT $2)"
            );
            let mut batches = 0;
            loop {
                let n = sqlx::query(&sql)
                    .bind(cutoff)
                    .bind(RETENTION_BATCH)
                    .execute(&self.pool)
                    .await?
                    .rows_affected();
                *counter += n;
                batches += 1;
                if n < RETENTION_BATCH as u64 {
                    break;
                }
                if batches >= RETENTION_MAX_BATCHES {
                    complete = false;
                    break;
                }
            }
        }
        report.complete = complete;
        report.raw_gpu_samples += staged_gpu;
        report.raw_samples += staged;
        if report
            != (RetentionReport {
                complete: true,
                ..RetentionReport::default()
            })
        {
            tracing::debug!(?report, "retention enforced");
        }
        Ok(report)
    }
}
