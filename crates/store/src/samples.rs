//! Heartbeats: the heartbeat columns of `instances`, and the columnar
//! `samples` / `gpu_samples` tables they feed.

use crate::rows::RowReader;
use crate::staging::{part_filter, raw_rows, Raw, GPU_COLUMNS, SAMPLE_COLUMNS};
use crate::{SampleRecord, Store, StoreError};
use gpufleet_domain::{InstanceId, InstanceStatus};
use gpufleet_proto::{CanarySample, EngineSample, GpuSample, SystemSample};
use std::collections::HashMap;

impl Store {
    /// The most recent samples of an instance, newest (highest `seq`) first.
    /// A negative `limit` is treated as 0.
    pub async fn recent_samples(
        &self,
        id: InstanceId,
        limit: i64,
    ) -> Result<Vec<SampleRecord>, StoreError> {
        // The newest `limit` of each raw table, then of both.
        let id_text = id.to_string();
        let newest = |table: &str, part: String| {
            format!(
                "SELECT * FROM (SELECT {SAMPLE_COLUMNS} FROM {table} WHERE {part}instance_id = $1 \
                 ORDER BY seq DESC LIMIT $2) AS {table}"
            )
        };
        let rows = sqlx::query(&format!(
            "{} UNION ALL {} ORDER BY seq DESC LIMIT $2",
            newest(Raw::System.table(), String::new()),
            newest(Raw::System.staging(), part_filter(Some(&id_text)))
        ))
        .bind(id.to_string())
        .bind(limit.max(0))
        .fetch_all(&self.pool)
        .await?;
        let mut samples = rows
            .iter()
            .map(|row| sample_row(row, &id_text))
            .collect::<Result<Vec<_>, _>>()?;
        let (Some(newest), Some(oldest)) = (samples.first(), samples.last()) else {
            return Ok(samples);
        };
        let gpu_rows = sqlx::query(&format!(
            "SELECT {GPU_COLUMNS} FROM {cond_rows} ORDER BY seq, gpu_index",
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
            let (_, seq, gpu) = gpu_row(row, &id_text)?;
            by_seq.entry(seq).or_default().push(gpu);
        }
        for s in &mut samples {
            if let Some(gpus) = by_seq.remove(&s.seq) {
                s.gpus = gpus;
            }
        }
        // The engine canary is kept for the latest heartbeat only.
        let canary: Option<(Option<i64>, Option<String>)> =
            sqlx::query_as("SELECT last_heartbeat_seq, engine_canary FROM instances WHERE id = $1")
                .bind(id.to_string())
                .fetch_optional(&self.pool)
                .await?;
        if let (Some((Some(seq), text)), Some(newest)) = (canary, samples.first_mut()) {
            if seq == newest.seq {
                newest.engine.canary = canary_of(text, &id_text);
            }
        }
        Ok(samples)
    }

    /// The engine canary of the latest heartbeat of every instance in one
    /// of `statuses` whose latest heartbeat carried one.
    pub async fn engine_canaries(
        &self,
        statuses: &[InstanceStatus],
    ) -> Result<HashMap<InstanceId, CanarySample>, StoreError> {
        if statuses.is_empty() {
            return Ok(HashMap::new());
        }
        let sql = format!(
            "SELECT id, engine_canary FROM instances \
             WHERE engine_canary IS NOT NULL AND status IN ({})",
            statuses
                .iter()
                .map(|s| format!("'{}'", s.as_str()))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let rows: Vec<(String, Option<String>)> =
            sqlx::query_as(&sql).fetch_all(&self.pool).await?;
        let mut out = HashMap::with_capacity(rows.len());
        for (id, text) in rows {
            let Ok(parsed) = id.parse::<InstanceId>() else {
                return Err(crate::rows::corrupt(format!(
                    "instances row {id}: column id"
                )));
            };
            if let Some(c) = canary_of(text, &id) {
                out.insert(parsed, c);
            }
        }
        Ok(out)
    }

    /// The latest stored sample (with its GPUs) of every instance in one of
    /// `statuses` that has heartbeats: the sample of its
    /// `last_heartbeat_seq`. Four queries whatever the number of instances
    /// (each raw table and its staging table, joined on `instances`).
    pub async fn latest_samples(
        &self,
        statuses: &[InstanceStatus],
    ) -> Result<Vec<SampleRecord>, StoreError> {
        if statuses.is_empty() {
            return Ok(Vec::new());
        }
        let wanted = statuses
            .iter()
            .map(|s| format!("'{}'", s.as_str()))
            .collect::<Vec<_>>()
            .join(", ");
        let prefixed = |cols: &str| {
            cols.split(", ")
                .map(|c| format!("r.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let joined = |table: &str, cols: &str, extra: &str, order: &str| {
            format!(
                "SELECT {}{extra} FROM instances i JOIN {table} r \
                 ON r.instance_id = i.id AND r.seq = i.last_heartbeat_seq \
                 WHERE i.status IN ({wanted}){order}",
                prefixed(cols)
            )
        };
        let mut samples = Vec::new();
        for table in [Raw::System.table(), Raw::System.staging()] {
            for row in sqlx::query(&joined(
                table,
                SAMPLE_COLUMNS,
                ", i.engine_canary AS engine_canary",
                "",
            ))
            .fetch_all(&self.pool)
            .await?
            {
                let mut sample = sample_row(&row, "latest samples")?;
                let text: Option<String> =
                    RowReader::new(&row, "latest samples").get("engine_canary")?;
                sample.engine.canary = canary_of(text, &sample.instance_id.to_string());
                samples.push(sample);
            }
        }
        let mut gpus: HashMap<(String, i64), Vec<GpuSample>> = HashMap::new();
        for table in [Raw::Gpu.table(), Raw::Gpu.staging()] {
            for row in sqlx::query(&joined(table, GPU_COLUMNS, "", " ORDER BY r.gpu_index"))
                .fetch_all(&self.pool)
                .await?
            {
                let (id, seq, gpu) = gpu_row(&row, "latest samples")?;
                gpus.entry((id, seq)).or_default().push(gpu);
            }
        }
        for s in &mut samples {
            if let Some(g) = gpus.remove(&(s.instance_id.to_string(), s.seq)) {
                s.gpus = g;
            }
        }
        Ok(samples)
    }
}

/// The stored engine canary (JSON); one this version cannot read is
/// logged and left out rather than failing the read.
fn canary_of(text: Option<String>, whose: &str) -> Option<CanarySample> {
    let text = text?;
    match serde_json::from_str(&text) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(instance_id = whose, error = %e, "unreadable engine canary in instances.engine_canary; ignored");
            None
        }
    }
}

/// A `samples` row ([`SAMPLE_COLUMNS`]); `whose` names it in errors.
fn sample_row(row: &sqlx::any::AnyRow, whose: &str) -> Result<SampleRecord, StoreError> {
    let mut r = RowReader::new(row, format!("samples row of {whose}"));
    let seq: i64 = r.get("seq")?;
    r.set_ctx(format!("samples row of {whose}, seq {seq}"));
    Ok(SampleRecord {
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
            // Not in history; see `instances.engine_canary`.
            canary: None,
        },
    })
}

/// A `gpu_samples` row ([`GPU_COLUMNS`]): its instance id, seq and GPU.
fn gpu_row(row: &sqlx::any::AnyRow, whose: &str) -> Result<(String, i64, GpuSample), StoreError> {
    let mut r = RowReader::new(row, format!("gpu_samples row of {whose}"));
    let seq: i64 = r.get("seq")?;
    let id: String = r.get("instance_id")?;
    r.set_ctx(format!("gpu_samples row {id} seq {seq}"));
    let gpu = GpuSample {
        index: r.int("gpu_index")?,
        name: r.get("name")?,
        uuid: r.get("uuid")?,
        util_pct: r.get("util_pct")?,
        mem_used_mib: r.int("mem_used_mib")?,
        mem_total_mib: r.int("mem_total_mib")?,
        temp_c: r.get("temp_c")?,
        power_w: r.get("power_w")?,
        power_limit_w: r.get("power_limit_w")?,
        // Not kept in history: live in the heartbeat and the agent's /metrics.
        ..GpuSample::default()
    };
    Ok((id, seq, gpu))
}
