//! Batched heartbeat ingestion: the hot path.
//!
//! One transaction per batch: lock the batch's instance rows, decide per
//! heartbeat (seq guard, in seq order per instance), then one multi-row
//! UPDATE of the heartbeat columns and multi-row INSERTs of the samples into
//! the staging tables (see [`crate::staging`]).

use crate::figures::{chunk_lengths, list_placeholders, values_placeholders};
use crate::rows::{bind_opt_f64, millis, serde_enum_text, to_i64, unencodable};
use crate::staging::{staging_part, Raw, GPU_NCOLS, SAMPLE_NCOLS};
use crate::{Backend, HeartbeatOutcome, Store, StoreError};
use chrono::{DateTime, Utc};
use gpufleet_proto::Heartbeat;
use sqlx::AnyConnection;
use std::collections::HashMap;

/// Instance ids per `SELECT ... WHERE id IN (...)`.
const ID_CHUNK: usize = 500;

/// A heartbeat converted to column values (before any SQL runs).
struct Prepared<'a> {
    /// Position in the caller's batch.
    idx: usize,
    id: String,
    /// Staging partition of `id`.
    part: i64,
    seq: i64,
    at: i64,
    sent_at: i64,
    hb: &'a Heartbeat,
    mem_used: i64,
    mem_total: i64,
    disk_used: i64,
    disk_total: i64,
    gpu_source: String,
    engine_status: String,
    /// JSON of the engine canary (`instances.engine_canary`), if any.
    canary: Option<String>,
    gpus: Vec<(i64, i64, i64)>,
}

fn finite(v: f64) -> bool {
    v.is_finite()
}

fn finite_opt(v: Option<f64>) -> bool {
    v.is_none_or(f64::is_finite)
}

/// Convert `hb` to column values; an error names what cannot be stored.
fn prepare(
    idx: usize,
    hb: &Heartbeat,
    received_at: DateTime<Utc>,
) -> Result<Prepared<'_>, StoreError> {
    let s = &hb.system;
    let e = &hb.engine;
    let floats_ok = [
        s.cpu_pct,
        s.load1,
        s.load5,
        s.load15,
        s.net_rx_bps,
        s.net_tx_bps,
        e.requests_running,
        e.requests_waiting,
    ]
    .into_iter()
    .all(finite)
        && [
            e.kv_cache_usage,
            e.prompt_tokens_per_s,
            e.generation_tokens_per_s,
            e.ttft_mean_s,
            e.canary.as_ref().and_then(|c| c.latency_ms),
        ]
        .into_iter()
        .all(finite_opt)
        && hb.gpus.iter().all(|g| {
            [g.util_pct, g.temp_c, g.power_w, g.power_limit_w]
                .into_iter()
                .all(finite_opt)
        });
    if !floats_ok {
        return Err(unencodable("a heartbeat figure that is NaN or infinite"));
    }
    // Two GPUs of one heartbeat under one index would collide on the key.
    let mut indexes: Vec<u32> = hb.gpus.iter().map(|g| g.index).collect();
    indexes.sort_unstable();
    if indexes.windows(2).any(|w| w[0] == w[1]) {
        return Err(unencodable("two GPUs under one index"));
    }
    let id = hb.instance_id.to_string();
    Ok(Prepared {
        idx,
        part: staging_part(&id),
        id,
        seq: to_i64(hb.seq, "heartbeat seq")?,
        at: millis(received_at),
        sent_at: millis(hb.sent_at),
        hb,
        mem_used: to_i64(s.mem_used_bytes, "mem_used_bytes")?,
        mem_total: to_i64(s.mem_total_bytes, "mem_total_bytes")?,
        disk_used: to_i64(s.disk_used_bytes, "disk_used_bytes")?,
        disk_total: to_i64(s.disk_total_bytes, "disk_total_bytes")?,
        gpu_source: serde_enum_text(&hb.gpu_source)?,
        engine_status: serde_enum_text(&e.status)?,
        canary: e
            .canary
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(|_| unencodable("the engine canary"))?,
        gpus: hb
            .gpus
            .iter()
            .map(|g| {
                Ok((
                    i64::from(g.index),
                    to_i64(g.mem_used_mib, "gpu mem_used_mib")?,
                    to_i64(g.mem_total_mib, "gpu mem_total_mib")?,
                ))
            })
            .collect::<Result<Vec<_>, StoreError>>()?,
    })
}

impl Store {
    /// Apply one heartbeat if `hb.seq` is above the last applied one (the
    /// batched path with a batch of one). `Stale` otherwise, nothing
    /// written; `NotFound` if the instance does not exist; a value that
    /// cannot be stored is an error naming it.
    pub async fn record_heartbeat(
        &self,
        hb: &Heartbeat,
        received_at: DateTime<Utc>,
    ) -> Result<HeartbeatOutcome, StoreError> {
        prepare(0, hb, received_at)?;
        let outcome = self.record_heartbeats(&[(hb.clone(), received_at)]).await?;
        match outcome.first() {
            Some(HeartbeatOutcome::UnknownInstance) => {
                Err(StoreError::NotFound { id: hb.instance_id })
            }
            Some(o @ (HeartbeatOutcome::Applied | HeartbeatOutcome::Stale)) => Ok(*o),
            Some(HeartbeatOutcome::Invalid) | None => {
                Err(unencodable("a heartbeat the store refused"))
            }
        }
    }

    /// Apply a batch of heartbeats (each with the time the control plane
    /// received it) in one transaction, with the same per-instance seq guard
    /// as [`Store::record_heartbeat`]: heartbeats of one instance are taken
    /// in seq order, and each is applied only if its seq is above the last
    /// applied one (stored or earlier in the batch). Returns one outcome per
    /// heartbeat, in batch order: `Applied`, `Stale`, `UnknownInstance` (no
    /// such instance) or `Invalid` (a value that cannot be stored). Only a
    /// database failure fails the whole batch (and then nothing is written).
    pub async fn record_heartbeats(
        &self,
        batch: &[(Heartbeat, DateTime<Utc>)],
    ) -> Result<Vec<HeartbeatOutcome>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        self.record_heartbeats_on(&mut conn, batch).await
    }

    /// [`Store::record_heartbeats`] on `conn`.
    pub(crate) async fn record_heartbeats_on(
        &self,
        conn: &mut AnyConnection,
        batch: &[(Heartbeat, DateTime<Utc>)],
    ) -> Result<Vec<HeartbeatOutcome>, StoreError> {
        let mut outcomes = vec![HeartbeatOutcome::Invalid; batch.len()];
        let mut prepared: Vec<Prepared<'_>> = batch
            .iter()
            .enumerate()
            .filter_map(|(i, (hb, at))| prepare(i, hb, *at).ok())
            .collect();
        if prepared.is_empty() {
            return Ok(outcomes);
        }
        // Per instance, in seq order (then batch order for equal seqs).
        prepared.sort_by(|a, b| (&a.id, a.seq, a.idx).cmp(&(&b.id, b.seq, b.idx)));
        let mut ids: Vec<&str> = prepared.iter().map(|p| p.id.as_str()).collect();
        ids.dedup();

        let mut tx = self.begin_write_on(conn).await?;
        // The stored last seq of each instance, rows locked (SQLite: the
        // IMMEDIATE transaction already holds the write lock). NO KEY
        // UPDATE: it still serializes writers of one instance, but not the
        // foreign-key checks of a staging move (KEY SHARE on the same rows,
        // taken in no particular order): FOR UPDATE deadlocked with them.
        let lock = match self.backend {
            Backend::Postgres => " ORDER BY id FOR NO KEY UPDATE",
            Backend::Sqlite => "",
        };
        let mut last: HashMap<String, Option<i64>> = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(ID_CHUNK) {
            let sql = format!(
                "SELECT id, last_heartbeat_seq FROM instances WHERE id IN ({}){lock}",
                list_placeholders(self.backend, chunk.len())
            );
            let mut q = sqlx::query_as::<_, (String, Option<i64>)>(&sql);
            for id in chunk {
                q = q.bind(*id);
            }
            for (id, seq) in q.fetch_all(&mut *tx).await? {
                last.insert(id, seq);
            }
        }

        // Decide. `applied` keeps sort order; `latest` is the last applied
        // heartbeat of each instance (it sets the heartbeat columns).
        let mut applied: Vec<&Prepared<'_>> = Vec::with_capacity(prepared.len());
        let mut latest: Vec<&Prepared<'_>> = Vec::with_capacity(ids.len());
        let mut i = 0;
        while i < prepared.len() {
            let id = &prepared[i].id;
            let mut j = i;
            while j < prepared.len() && prepared[j].id == *id {
                j += 1;
            }
            match last.get(id) {
                None => {
                    for p in &prepared[i..j] {
                        outcomes[p.idx] = HeartbeatOutcome::UnknownInstance;
                    }
                }
                Some(stored) => {
                    let mut cur = *stored;
                    let mut newest = None;
                    for p in &prepared[i..j] {
                        if cur.is_none_or(|c| p.seq > c) {
                            cur = Some(p.seq);
                            outcomes[p.idx] = HeartbeatOutcome::Applied;
                            applied.push(p);
                            newest = Some(p);
                        } else {
                            outcomes[p.idx] = HeartbeatOutcome::Stale;
                        }
                    }
                    latest.extend(newest);
                }
            }
            i = j;
        }
        if applied.is_empty() {
            tx.rollback().await?;
            return Ok(outcomes);
        }

        // Heartbeat columns, guarded again in SQL for good measure.
        let mut rest = latest.as_slice();
        for n in chunk_lengths(latest.len()) {
            let (chunk, tail) = rest.split_at(n);
            rest = tail;
            let sql = format!(
                "UPDATE instances SET last_heartbeat_seq = v.column2, \
                 last_heartbeat_at = v.column3, engine_status = v.column4, \
                 engine_canary = v.column5 \
                 FROM (VALUES {}) AS v \
                 WHERE instances.id = v.column1 AND (instances.last_heartbeat_seq IS NULL \
                 OR instances.last_heartbeat_seq < v.column2)",
                values_placeholders(self.backend, n, 5, 1)
            );
            let mut q = sqlx::query(&sql);
            for p in chunk {
                q = q
                    .bind(p.id.as_str())
                    .bind(p.seq)
                    .bind(p.at)
                    .bind(p.engine_status.as_str())
                    .bind(p.canary.as_deref());
            }
            q.execute(&mut *tx).await?;
        }

        let mut rest = applied.as_slice();
        for n in chunk_lengths(applied.len()) {
            let (chunk, tail) = rest.split_at(n);
            rest = tail;
            let sql = format!(
                "INSERT INTO {} (part, {}) VALUES {}",
                Raw::System.staging(),
                Raw::System.columns(),
                values_placeholders(self.backend, n, SAMPLE_NCOLS + 1, 1)
            );
            let mut q = sqlx::query(&sql);
            for p in chunk {
                let s = &p.hb.system;
                let e = &p.hb.engine;
                q = q
                    .bind(p.part)
                    .bind(p.id.as_str())
                    .bind(p.seq)
                    .bind(p.at)
                    .bind(p.sent_at)
                    .bind(s.cpu_pct)
                    .bind(s.load1)
                    .bind(s.load5)
                    .bind(s.load15)
                    .bind(p.mem_used)
                    .bind(p.mem_total)
                    .bind(p.disk_used)
                    .bind(p.disk_total)
                    .bind(s.net_rx_bps)
                    .bind(s.net_tx_bps)
                    .bind(p.gpu_source.as_str())
                    .bind(p.engine_status.as_str())
                    .bind(e.requests_running)
                    .bind(e.requests_waiting)
                    .bind(i64::from(e.restarts));
                q = bind_opt_f64(q, e.kv_cache_usage);
                q = bind_opt_f64(q, e.prompt_tokens_per_s);
                q = bind_opt_f64(q, e.generation_tokens_per_s);
                q = bind_opt_f64(q, e.ttft_mean_s);
            }
            q.execute(&mut *tx).await?;
        }

        let gpu_rows: Vec<(&Prepared<'_>, usize)> = applied
            .iter()
            .flat_map(|p| (0..p.gpus.len()).map(move |g| (*p, g)))
            .collect();
        let mut rest = gpu_rows.as_slice();
        for n in chunk_lengths(gpu_rows.len()) {
            let (chunk, tail) = rest.split_at(n);
            rest = tail;
            let sql = format!(
                "INSERT INTO {} (part, {}) VALUES {}",
                Raw::Gpu.staging(),
                Raw::Gpu.columns(),
                values_placeholders(self.backend, n, GPU_NCOLS + 1, 1)
            );
            let mut q = sqlx::query(&sql);
            for (p, g) in chunk {
                let gs = &p.hb.gpus[*g];
                let (index, used, total) = p.gpus[*g];
                q = q
                    .bind(p.part)
                    .bind(p.id.as_str())
                    .bind(p.seq)
                    .bind(p.at)
                    .bind(index)
                    .bind(gs.name.as_str())
                    .bind(gs.uuid.as_deref());
                q = bind_opt_f64(q, gs.util_pct).bind(used).bind(total);
                q = bind_opt_f64(q, gs.temp_c);
                q = bind_opt_f64(q, gs.power_w);
                q = bind_opt_f64(q, gs.power_limit_w);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(outcomes)
    }
}
