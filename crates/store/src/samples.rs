//! Heartbeats: the heartbeat columns of `instances`, and the columnar
//! `samples` / `gpu_samples` tables they feed.

use crate::rows::{bind_opt_f64, millis, serde_enum_text, to_i64, RowReader};
use crate::staging::{raw_rows, staging_part, Raw, SAMPLE_COLUMNS};
use crate::{HeartbeatOutcome, SampleRecord, Store, StoreError};
use chrono::{DateTime, Utc};
use gpufleet_domain::InstanceId;
use gpufleet_proto::{EngineSample, GpuSample, Heartbeat, SystemSample};
use std::collections::HashMap;

impl Store {
    /// Apply a heartbeat if `hb.seq` is above the last applied one: update the
    /// heartbeat columns (last seq, last time = `received_at`, engine status) and
    /// store the sample (system + per-GPU + engine; its `at` is `received_at`).
    /// Otherwise `Stale`, nothing written. `NotFound` if the instance does not exist.
    /// The sample goes straight to the indexed tables (the batched path,
    /// [`Store::record_heartbeats`], stages instead).
    pub async fn record_heartbeat(
        &self,
        hb: &Heartbeat,
        received_at: DateTime<Utc>,
    ) -> Result<HeartbeatOutcome, StoreError> {
        let id = hb.instance_id.to_string();
        let seq = to_i64(hb.seq, "heartbeat seq")?;
        let at = millis(received_at);
        let engine_status = serde_enum_text(&hb.engine.status)?;
        let gpu_source = serde_enum_text(&hb.gpu_source)?;
        let s = &hb.system;
        // Convert everything before opening the transaction.
        let mem_used = to_i64(s.mem_used_bytes, "mem_used_bytes")?;
        let mem_total = to_i64(s.mem_total_bytes, "mem_total_bytes")?;
        let disk_used = to_i64(s.disk_used_bytes, "disk_used_bytes")?;
        let disk_total = to_i64(s.disk_total_bytes, "disk_total_bytes")?;
        let gpus = hb
            .gpus
            .iter()
            .map(|g| {
                Ok((
                    g,
                    to_i64(g.mem_used_mib, "gpu mem_used_mib")?,
                    to_i64(g.mem_total_mib, "gpu mem_total_mib")?,
                ))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;

        let mut tx = self.pool.begin().await?;
        let applied = sqlx::query(
            "UPDATE instances SET last_heartbeat_seq = $2, last_heartbeat_at = $3, \
             engine_status = $4 \
             WHERE id = $1 AND (last_heartbeat_seq IS NULL OR last_heartbeat_seq < $2)",
        )
        .bind(&id)
        .bind(seq)
        .bind(at)
        .bind(&engine_status)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if applied == 0 {
            tx.rollback().await?;
            let exists: Option<String> =
                sqlx::query_scalar("SELECT id FROM instances WHERE id = $1")
                    .bind(&id)
                    .fetch_optional(&self.pool)
                    .await?;
            if exists.is_none() {
                return Err(StoreError::NotFound { id: hb.instance_id });
            }
            tracing::debug!(instance_id = %hb.instance_id, seq = hb.seq, "stale heartbeat ignored");
            return Ok(HeartbeatOutcome::Stale);
        }
        let q = sqlx::query(
            "INSERT INTO samples (instance_id, seq, at, sent_at, cpu_pct, load1, load5, load15, \
             mem_used_bytes, mem_total_bytes, disk_used_bytes, disk_total_bytes, net_rx_bps, \
             net_tx_bps, gpu_source, engine_status, requests_running, requests_waiting, \
             engine_restarts, kv_cache_usage, prompt_tokens_per_s, generation_tokens_per_s, \
             ttft_mean_s) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, \
             $18, $19, $20, $21, $22, $23)",
        )
        .bind(&id)
        .bind(seq)
        .bind(at)
        .bind(millis(hb.sent_at))
        .bind(s.cpu_pct)
        .bind(s.load1)
        .bind(s.load5)
        .bind(s.load15)
        .bind(mem_used)
        .bind(mem_total)
        .bind(disk_used)
        .bind(disk_total)
        .bind(s.net_rx_bps)
        .bind(s.net_tx_bps)
        .bind(&gpu_source)
        .bind(&engine_status)
        .bind(hb.engine.requests_running)
        .bind(hb.engine.requests_waiting)
        .bind(i64::from(hb.engine.restarts));
        let q = bind_opt_f64(q, hb.engine.kv_cache_usage);
        let q = bind_opt_f64(q, hb.engine.prompt_tokens_per_s);
        let q = bind_opt_f64(q, hb.engine.generation_tokens_per_s);
        let q = bind_opt_f64(q, hb.engine.ttft_mean_s);
        q.execute(&mut *tx).await?;
        for (g, mem_used, mem_total) in gpus {
            sqlx::query(
                "INSERT INTO gpu_samples (instance_id, seq, at, gpu_index, name, uuid, util_pct, \
                 mem_used_mib, mem_total_mib, temp_c, power_w, power_limit_w) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            )
            .bind(&id)
            .bind(seq)
            .bind(at)
            .bind(i64::from(g.index))
            .bind(g.name.as_str())
            .bind(g.uuid.as_deref())
            .bind(g.util_pct)
            .bind(mem_used)
            .bind(mem_total)
            .bind(g.temp_c)
            .bind(g.power_w)
            .bind(g.power_limit_w)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(HeartbeatOutcome::Applied)
    }

    /// The most recent samples of an instance, newest (highest `seq`) first.
    /// A negative `limit` is treated as 0.
    pub async fn recent_samples(
        &self,
        id: InstanceId,
        limit: i64,
    ) -> Result<Vec<SampleRecord>, StoreError> {
        // The newest `limit` of each raw table, then of both.
        let id_text = id.to_string();
        let newest = |table: &str, part: &str| {
            format!(
                "SELECT * FROM (SELECT {SAMPLE_COLUMNS} FROM {table} WHERE {part}instance_id = $1 \
                 ORDER BY seq DESC LIMIT $2) AS {table}"
            )
        };
        let rows = sqlx::query(&format!(
            "{} UNION ALL {} ORDER BY seq DESC LIMIT $2",
            newest(Raw::System.table(), ""),
            newest(
                Raw::System.staging(),
                &format!("part = {} AND ", staging_part(&id_text))
            )
        ))
        .bind(id.to_string())
        .bind(limit.max(0))
        .fetch_all(&self.pool)
        .await?;
        let mut samples = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut r = RowReader::new(row, format!("samples row of {id}"));
            let seq: i64 = r.get("seq")?;
            r.set_ctx(format!("samples row {id} seq {seq}"));
            samples.push(SampleRecord {
                instance_id: r.parsed("instance_id")?,
                seq,
                at: r.time("at")?,
                system: SystemSample {
                    cpu_pct: r.get("cpu_pct")?,
                    load1: r.get("load1")?,
                    load5: r.get("load5")?,
                    load15: r.get("load15")?,
                    mem_used_bytes: r.int("mem_used_bytes")?,
                    mem_total_bytes: r.int("mem_total_bytes")?,
                    disk_used_bytes: r.int("disk_used_bytes")?,
                    disk_total_bytes: r.int("disk_total_bytes")?,
                    net_rx_bps: r.get("net_rx_bps")?,
                    net_tx_bps: r.get("net_tx_bps")?,
                },
                gpu_source: r.serde_enum("gpu_source")?,
                gpus: Vec::new(),
                engine: EngineSample {
                    status: r.serde_enum("engine_status")?,
                    requests_running: r.get("requests_running")?,
                    requests_waiting: r.get("requests_waiting")?,
                    restarts: r.int("engine_restarts")?,
                    kv_cache_usage: r.get("kv_cache_usage")?,
                    prompt_tokens_per_s: r.get("prompt_tokens_per_s")?,
                    generation_tokens_per_s: r.get("generation_tokens_per_s")?,
                    ttft_mean_s: r.get("ttft_mean_s")?,
                },
            });
        }
        let (Some(newest), Some(oldest)) = (samples.first(), samples.last()) else {
            return Ok(samples);
        };
        let gpu_rows = sqlx::query(&format!(
            "SELECT seq, gpu_index, name, uuid, util_pct, mem_used_mib, mem_total_mib, temp_c, \
             power_w, power_limit_w FROM {cond_rows} ORDER BY seq, gpu_index",
            cond_rows = raw_rows(
                Raw::Gpu,
                "instance_id = $1 AND seq >= $2 AND seq <= $3",
                "raw",
                Some(&id_text),
            )
        ))
        .bind(id.to_string())
        .bind(oldest.seq)
        .bind(newest.seq)
        .fetch_all(&self.pool)
        .await?;
        let mut by_seq: HashMap<i64, Vec<GpuSample>> = HashMap::new();
        for row in &gpu_rows {
            let mut r = RowReader::new(row, format!("gpu_samples row of {id}"));
            let seq: i64 = r.get("seq")?;
            r.set_ctx(format!("gpu_samples row {id} seq {seq}"));
            by_seq.entry(seq).or_default().push(GpuSample {
                index: r.int("gpu_index")?,
                name: r.get("name")?,
                uuid: r.get("uuid")?,
                util_pct: r.get("util_pct")?,
                mem_used_mib: r.int("mem_used_mib")?,
                mem_total_mib: r.int("mem_total_mib")?,
                temp_c: r.get("temp_c")?,
                power_w: r.get("power_w")?,
                power_limit_w: r.get("power_limit_w")?,
                sm_clock_mhz: None,
                ecc_uncorrected: None,
                throttle_reasons: Vec::new(),
            });
        }
        for s in &mut samples {
            if let Some(gpus) = by_seq.remove(&s.seq) {
                s.gpus = gpus;
            }
        }
        Ok(samples)
    }
}
