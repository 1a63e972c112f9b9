//! Reading metric history: per-instance series, fleet figures now and over time.

use crate::figures::{aggregates, select_list, GPU, SYSTEM};
use crate::rollup::tier_tables;
use crate::rows::{corrupt, millis, RowReader};
use crate::staging::{tier_rows, Raw};
use crate::{Backend, Store, StoreError};
use chrono::{DateTime, Utc};
use gpufleet_domain::metrics::{Step, Tier, MAX_POINTS};
use gpufleet_domain::{InstanceId, InstanceStatus, ProjectId};
use serde::{Deserialize, Serialize};

/// One instance's history over a window, in aligned buckets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricSeries {
    pub instance_id: InstanceId,
    pub tier: Tier,
    /// The bucket width used: the step asked for, or the tier's own
    /// resolution when that is coarser (a 5 s step read from minute rollups
    /// is served in 1-minute buckets).
    pub step: Step,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// Buckets with data, ascending; empty buckets are absent.
    pub points: Vec<SystemPoint>,
    /// One series per GPU index, ascending.
    pub gpus: Vec<GpuSeries>,
}

/// Host and engine figures over one bucket. `_avg` is a mean over the
/// bucket's samples, `_max` the maximum; totals are the maximum seen.
/// An engine figure is `None` when no sample in the bucket had it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SystemPoint {
    /// Bucket start: `floor(t / step) * step`.
    pub bucket: DateTime<Utc>,
    /// Raw samples behind this point.
    pub samples: i64,
    pub cpu_pct_avg: f64,
    pub cpu_pct_max: f64,
    pub load1_avg: f64,
    pub mem_used_bytes_avg: f64,
    pub mem_total_bytes: f64,
    pub disk_used_bytes_avg: f64,
    pub disk_total_bytes: f64,
    pub net_rx_bps_avg: f64,
    pub net_tx_bps_avg: f64,
    pub requests_running_avg: f64,
    pub requests_waiting_avg: f64,
    pub kv_cache_usage_avg: Option<f64>,
    pub kv_cache_usage_max: Option<f64>,
    pub prompt_tokens_per_s_avg: Option<f64>,
    pub generation_tokens_per_s_avg: Option<f64>,
    pub ttft_mean_s_avg: Option<f64>,
    pub ttft_mean_s_max: Option<f64>,
}

/// One GPU's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuSeries {
    pub gpu_index: u32,
    pub points: Vec<GpuPoint>,
}

/// One GPU over one bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuPoint {
    pub bucket: DateTime<Utc>,
    pub samples: i64,
    /// `None` where no sample of the bucket knew the figure (e.g. a
    /// MIG-enabled GPU's utilisation).
    pub util_pct_avg: Option<f64>,
    pub util_pct_max: Option<f64>,
    pub mem_used_mib_avg: f64,
    pub mem_used_mib_max: f64,
    pub mem_total_mib: f64,
    pub temp_c_avg: Option<f64>,
    pub temp_c_max: Option<f64>,
    pub power_w_avg: Option<f64>,
    pub power_w_max: Option<f64>,
    pub power_limit_w: Option<f64>,
}

/// The fleet now: instances that are not terminal, and the GPUs of those
/// whose latest heartbeat is fresh.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetNow {
    /// Heartbeats at or after this count as fresh.
    pub fresh_after: DateTime<Utc>,
    /// Non-terminal instances.
    pub instances: i64,
    /// Of those, with a fresh heartbeat.
    pub reporting_instances: i64,
    /// GPUs in the fresh heartbeats.
    pub gpus: i64,
    /// Mean utilisation over those GPUs that report it; `None` without any.
    pub mean_gpu_util_pct: Option<f64>,
    pub vram_used_mib: f64,
    pub vram_total_mib: f64,
    pub power_w: f64,
    pub power_limit_w: f64,
    /// Every non-terminal status, in `InstanceStatus::ALL` order, zeros included.
    pub by_status: Vec<FleetStatusFigures>,
}

/// [`FleetNow`] figures of the instances in one status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetStatusFigures {
    pub status: InstanceStatus,
    pub instances: i64,
    pub reporting_instances: i64,
    pub gpus: i64,
    pub mean_gpu_util_pct: Option<f64>,
    pub vram_used_mib: f64,
    pub vram_total_mib: f64,
    pub power_w: f64,
}

/// Fleet totals over a window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetSeries {
    pub tier: Tier,
    pub step: Step,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub points: Vec<FleetPoint>,
}

/// The fleet over one bucket: each GPU's mean over the bucket, then summed
/// (VRAM, power) or averaged (utilisation) across GPUs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetPoint {
    pub bucket: DateTime<Utc>,
    /// Instances with a GPU sample in the bucket.
    pub instances: i64,
    pub gpus: i64,
    /// Over the GPUs that reported utilisation; `None` without any.
    pub mean_gpu_util_pct: Option<f64>,
    pub vram_used_mib: f64,
    pub vram_total_mib: f64,
    /// Over the GPUs that reported power draw; `None` without any.
    pub power_w: Option<f64>,
}

/// `leading` then the aliases of `aggs`: the columns of a series row.
fn column_names<'a>(leading: &[&'a str], aggs: &'a [(String, String)]) -> Vec<&'a str> {
    leading
        .iter()
        .copied()
        .chain(aggs.iter().map(|(_, alias)| alias.as_str()))
        .collect()
}

/// The bucket width for `tier`: `step`, or the tier's resolution if coarser.
fn effective_step(step: Step, tier: Tier) -> Step {
    match tier.bucket_ms() {
        Some(res) if res > step.as_millis() => Step::from_millis(res).unwrap_or(step),
        _ => step,
    }
}

/// Check the window; `None` when it is empty.
fn window(
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    step: Step,
) -> Result<Option<(i64, i64)>, StoreError> {
    let (f, t) = (millis(from), millis(to));
    if t <= f {
        return Ok(None);
    }
    let points = step.points(f, t);
    if points > MAX_POINTS {
        return Err(StoreError::InvalidQuery {
            what: format!("{points} points of step {step} exceed the maximum of {MAX_POINTS}"),
        });
    }
    Ok(Some((f, t)))
}

/// Where rows of `tier` in `[from, to)` start: a rollup bucket counts when
/// it starts in the window or holds `from`.
fn lower_bound(tier: Tier, from: i64) -> i64 {
    match tier.bucket_ms() {
        Some(res) => from.div_euclid(res) * res,
        None => from,
    }
}

fn system_point(r: &Cells<'_>) -> Result<SystemPoint, StoreError> {
    Ok(SystemPoint {
        bucket: r.time("b")?,
        samples: r.int("n")?,
        cpu_pct_avg: r.get("cpu_pct_avg")?,
        cpu_pct_max: r.get("cpu_pct_max")?,
        load1_avg: r.get("load1_avg")?,
        mem_used_bytes_avg: r.get("mem_used_avg")?,
        mem_total_bytes: r.get("mem_total")?,
        disk_used_bytes_avg: r.get("disk_used_avg")?,
        disk_total_bytes: r.get("disk_total")?,
        net_rx_bps_avg: r.get("net_rx_avg")?,
        net_tx_bps_avg: r.get("net_tx_avg")?,
        requests_running_avg: r.get("running_avg")?,
        requests_waiting_avg: r.get("waiting_avg")?,
        kv_cache_usage_avg: r.opt("kv_cache_avg")?,
        kv_cache_usage_max: r.opt("kv_cache_max")?,
        prompt_tokens_per_s_avg: r.opt("prompt_tps_avg")?,
        generation_tokens_per_s_avg: r.opt("gen_tps_avg")?,
        ttft_mean_s_avg: r.opt("ttft_avg")?,
        ttft_mean_s_max: r.opt("ttft_max")?,
    })
}

fn gpu_point(r: &Cells<'_>) -> Result<GpuPoint, StoreError> {
    Ok(GpuPoint {
        bucket: r.time("b")?,
        samples: r.int("n")?,
        util_pct_avg: r.opt("util_avg")?,
        util_pct_max: r.opt("util_max")?,
        mem_used_mib_avg: r.get("mem_used_avg")?,
        mem_used_mib_max: r.get("mem_used_max")?,
        mem_total_mib: r.get("mem_total")?,
        temp_c_avg: r.opt("temp_avg")?,
        temp_c_max: r.opt("temp_max")?,
        power_w_avg: r.opt("power_avg")?,
        power_w_max: r.opt("power_max")?,
        power_limit_w: r.opt("power_limit")?,
    })
}

/// The rows of a series query as one JSON array of arrays, built by the
/// database: one result row instead of one per bucket. A month of minutes
/// is tens of thousands of rows, and the driver's per-row cost (a hand-off
/// between the SQLite worker thread and the task, a copy of every value)
/// was most of a long query's time. Figures keep 15 significant digits on
/// SQLite (its JSON output) and are exact on PostgreSQL.
fn json_rows(backend: Backend, inner: &str, cols: &[&str], order: &str) -> String {
    let list = cols.join(", ");
    match backend {
        Backend::Sqlite => format!(
            "SELECT json_group_array(json_array({list}) ORDER BY {order}) AS j FROM ({inner}) AS q"
        ),
        Backend::Postgres => format!(
            "SELECT COALESCE(CAST(json_agg(json_build_array({list}) ORDER BY {order}) AS TEXT), \
             '[]') AS j FROM ({inner}) AS q"
        ),
    }
}

/// One JSON cell: a number, null, or (PostgreSQL's JSON of a non-finite
/// float) the string `Infinity`, `-Infinity` or `NaN`.
#[derive(Debug, Clone, Copy)]
struct Cell(Option<f64>);

impl<'de> Deserialize<'de> for Cell {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Cell, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Cell;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number or null")
            }
            fn visit_f64<E>(self, v: f64) -> Result<Cell, E> {
                Ok(Cell(Some(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Cell, E> {
                Ok(Cell(Some(v as f64)))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Cell, E> {
                Ok(Cell(Some(v as f64)))
            }
            fn visit_unit<E>(self) -> Result<Cell, E> {
                Ok(Cell(None))
            }
            fn visit_none<E>(self) -> Result<Cell, E> {
                Ok(Cell(None))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Cell, E> {
                match v {
                    "Infinity" => Ok(Cell(Some(f64::INFINITY))),
                    "-Infinity" => Ok(Cell(Some(f64::NEG_INFINITY))),
                    "NaN" => Ok(Cell(Some(f64::NAN))),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// Parse the JSON of [`json_rows`]. SQLite writes an infinite float as
/// `9.0e+999`, beyond what a JSON parser takes: read as infinity.
fn parse_rows(text: &str, what: &str) -> Result<Vec<Vec<Cell>>, StoreError> {
    let text = if text.contains("e+999") {
        std::borrow::Cow::Owned(
            text.replace("-9.0e+999", "\"-Infinity\"")
                .replace("9.0e+999", "\"Infinity\""),
        )
    } else {
        std::borrow::Cow::Borrowed(text)
    };
    serde_json::from_str(&text).map_err(|e| corrupt(format!("{what}: {e}")))
}

/// One row of [`parse_rows`], read by column name.
struct Cells<'a> {
    names: &'a [&'a str],
    values: &'a [Cell],
    what: &'a str,
}

impl Cells<'_> {
    fn opt(&self, col: &str) -> Result<Option<f64>, StoreError> {
        let i = self
            .names
            .iter()
            .position(|n| *n == col)
            .ok_or_else(|| corrupt(format!("{}: no column {col}", self.what)))?;
        self.values
            .get(i)
            .map(|c| c.0)
            .ok_or_else(|| corrupt(format!("{}: a row without column {col}", self.what)))
    }
    fn get(&self, col: &str) -> Result<f64, StoreError> {
        self.opt(col)?
            .ok_or_else(|| corrupt(format!("{}: column {col} is null", self.what)))
    }
    fn int(&self, col: &str) -> Result<i64, StoreError> {
        let v = self.get(col)?;
        if v.fract() != 0.0 || v.abs() > 9.007_199_254_740_992e15 {
            return Err(corrupt(format!(
                "{}: column {col}: {v} is not an integer",
                self.what
            )));
        }
        Ok(v as i64)
    }
    fn time(&self, col: &str) -> Result<DateTime<Utc>, StoreError> {
        time(self.int(col)?)
    }
}

fn time(ms: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_millis(ms)
        .ok_or_else(|| corrupt(format!("series time {ms} out of range")))
}

impl Store {
    /// One instance's history over `[from, to)` from `tier`, in buckets of
    /// `step` (`floor(t / step) * step`, computed in SQL), or of the tier's
    /// resolution when coarser. From raw samples each bucket is the mean and
    /// max of its samples; from rollups, the count-weighted mean of their
    /// means and the max of their maxes. `InvalidQuery` past
    /// [`MAX_POINTS`] buckets; an empty window gives an empty series.
    pub async fn metric_series(
        &self,
        id: InstanceId,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        step: Step,
        tier: Tier,
    ) -> Result<MetricSeries, StoreError> {
        let step = effective_step(step, tier);
        let mut series = MetricSeries {
            instance_id: id,
            tier,
            step,
            from,
            to,
            points: Vec::new(),
            gpus: Vec::new(),
        };
        let Some((f, t)) = window(from, to, step)? else {
            return Ok(series);
        };
        let (_, _, source) = tier_tables(tier);
        let tc = source.time_col();
        let cond = format!("instance_id = $1 AND {tc} >= $2 AND {tc} < $3");
        let id_text = id.to_string();
        let system_aggs = aggregates(SYSTEM, source);
        let system_names = column_names(&["b"], &system_aggs);
        let system_sql = json_rows(
            self.backend,
            &format!(
                "SELECT ({tc} / $4) * $4 AS b, {} FROM {} WHERE {cond} GROUP BY b",
                select_list(&system_aggs),
                tier_rows(tier, Raw::System, &cond, Some(&id_text)),
            ),
            &system_names,
            "b",
        );
        let gpu_aggs = aggregates(GPU, source);
        let gpu_names = column_names(&["gpu_index", "b"], &gpu_aggs);
        let gpu_sql = json_rows(
            self.backend,
            &format!(
                "SELECT gpu_index, ({tc} / $4) * $4 AS b, {} FROM {} \
                 WHERE {cond} GROUP BY gpu_index, b",
                select_list(&gpu_aggs),
                tier_rows(tier, Raw::Gpu, &cond, Some(&id_text)),
            ),
            &gpu_names,
            "gpu_index, b",
        );
        let binds = (id_text.as_str(), lower_bound(tier, f), t, step.as_millis());
        // Side by side, on two connections.
        let (system_json, gpu_json) = tokio::try_join!(
            self.series_json(&system_sql, binds),
            self.series_json(&gpu_sql, binds)
        )?;

        let what = format!("series of {id}");
        for values in parse_rows(&system_json, &what)? {
            series.points.push(system_point(&Cells {
                names: &system_names,
                values: &values,
                what: &what,
            })?);
        }
        let what = format!("GPU series of {id}");
        for values in parse_rows(&gpu_json, &what)? {
            let r = Cells {
                names: &gpu_names,
                values: &values,
                what: &what,
            };
            let index = u32::try_from(r.int("gpu_index")?)
                .map_err(|_| corrupt(format!("{what}: GPU index out of range")))?;
            let point = gpu_point(&r)?;
            match series.gpus.last_mut() {
                Some(g) if g.gpu_index == index => g.points.push(point),
                _ => series.gpus.push(GpuSeries {
                    gpu_index: index,
                    points: vec![point],
                }),
            }
        }
        Ok(series)
    }

    /// The JSON of a [`json_rows`] query bound to (instance, from, to, step).
    async fn series_json(
        &self,
        sql: &str,
        (id, from, to, step): (&str, i64, i64, i64),
    ) -> Result<String, sqlx::Error> {
        sqlx::query_scalar(sql)
            .bind(id.to_string())
            .bind(from)
            .bind(to)
            .bind(step)
            .fetch_one(&self.pool)
            .await
    }

    /// The fleet now: non-terminal instances by status, and over those whose
    /// last heartbeat arrived at or after `fresh_after`, the GPUs of that
    /// heartbeat (count, mean utilisation, VRAM used/total, power and limit).
    /// Only the instances of `projects`, when given.
    pub async fn fleet_now(
        &self,
        fresh_after: DateTime<Utc>,
        projects: Option<&[ProjectId]>,
    ) -> Result<FleetNow, StoreError> {
        let in_projects = project_condition("project_id", projects);
        let i_in_projects = project_condition("i.project_id", projects);
        let terminal = InstanceStatus::TERMINAL
            .iter()
            .map(|s| format!("'{}'", s.as_str()))
            .collect::<Vec<_>>()
            .join(", ");
        let fresh = millis(fresh_after);
        let counts = sqlx::query(&format!(
            "SELECT status, COUNT(*) AS instances, \
             SUM(CASE WHEN last_heartbeat_at >= $1 THEN 1 ELSE 0 END) AS reporting \
             FROM instances WHERE status NOT IN ({terminal}){in_projects} GROUP BY status"
        ))
        .bind(fresh)
        .fetch_all(&self.pool)
        .await?;
        // Each instance's latest GPU rows are in exactly one of the two raw
        // tables: one query per table (a join on their union would defeat
        // the indexes), summed below.
        let mut gpus = Vec::new();
        for table in [Raw::Gpu.table(), Raw::Gpu.staging()] {
            gpus.extend(
                sqlx::query(&format!(
                    "SELECT i.status AS status, COUNT(*) AS gpus, \
                     SUM(g.util_pct) AS util_sum, COUNT(g.util_pct) AS util_n, \
                     SUM(CAST(g.mem_used_mib AS DOUBLE PRECISION)) AS vram_used, \
                     SUM(CAST(g.mem_total_mib AS DOUBLE PRECISION)) AS vram_total, \
                     SUM(g.power_w) AS power, SUM(g.power_limit_w) AS power_limit \
                     FROM instances i JOIN {table} g \
                     ON g.instance_id = i.id AND g.seq = i.last_heartbeat_seq \
                     WHERE i.status NOT IN ({terminal}) AND i.last_heartbeat_at >= $1{i_in_projects} \
                     GROUP BY i.status"
                ))
                .bind(fresh)
                .fetch_all(&self.pool)
                .await?,
            );
        }

        let mut by_status: Vec<FleetStatusFigures> = InstanceStatus::ALL
            .into_iter()
            .filter(|s| !s.is_terminal())
            .map(|status| FleetStatusFigures {
                status,
                instances: 0,
                reporting_instances: 0,
                gpus: 0,
                mean_gpu_util_pct: None,
                vram_used_mib: 0.0,
                vram_total_mib: 0.0,
                power_w: 0.0,
            })
            .collect();
        let mut now = FleetNow {
            fresh_after,
            instances: 0,
            reporting_instances: 0,
            gpus: 0,
            mean_gpu_util_pct: None,
            vram_used_mib: 0.0,
            vram_total_mib: 0.0,
            power_w: 0.0,
            power_limit_w: 0.0,
            by_status: Vec::new(),
        };
        let slot = |by_status: &mut Vec<FleetStatusFigures>, r: &RowReader<'_>| {
            let status: InstanceStatus = r.parsed("status")?;
            by_status
                .iter_mut()
                .position(|f| f.status == status)
                .ok_or_else(|| corrupt(format!("fleet figures: unexpected status {status}")))
        };
        for row in &counts {
            let r = RowReader::new(row, "fleet status counts");
            let i = slot(&mut by_status, &r)?;
            let f = &mut by_status[i];
            f.instances = r.get("instances")?;
            f.reporting_instances = r.get::<Option<i64>>("reporting")?.unwrap_or(0);
            now.instances += f.instances;
            now.reporting_instances += f.reporting_instances;
        }
        let mut util_sum = 0.0;
        let mut util_n = 0i64;
        let mut util_by_status = vec![(0.0, 0i64); by_status.len()];
        for row in &gpus {
            let r = RowReader::new(row, "fleet GPU figures");
            let i = slot(&mut by_status, &r)?;
            let f = &mut by_status[i];
            let n: i64 = r.get("gpus")?;
            let util: f64 = r.get::<Option<f64>>("util_sum")?.unwrap_or(0.0);
            let known: i64 = r.get::<Option<i64>>("util_n")?.unwrap_or(0);
            let vram_used = r.get::<Option<f64>>("vram_used")?.unwrap_or(0.0);
            let vram_total = r.get::<Option<f64>>("vram_total")?.unwrap_or(0.0);
            let power = r.get::<Option<f64>>("power")?.unwrap_or(0.0);
            f.gpus += n;
            util_by_status[i].0 += util;
            util_by_status[i].1 += known;
            f.vram_used_mib += vram_used;
            f.vram_total_mib += vram_total;
            f.power_w += power;
            now.gpus += n;
            util_sum += util;
            util_n += known;
            now.vram_used_mib += vram_used;
            now.vram_total_mib += vram_total;
            now.power_w += power;
            now.power_limit_w += r.get::<Option<f64>>("power_limit")?.unwrap_or(0.0);
        }
        // Means over the GPUs that know their utilisation (a MIG-enabled
        // GPU does not): an unknown is not an idle GPU.
        for (f, (util, known)) in by_status.iter_mut().zip(util_by_status) {
            f.mean_gpu_util_pct = (known > 0).then(|| util / known as f64);
        }
        now.mean_gpu_util_pct = (util_n > 0).then(|| util_sum / util_n as f64);
        now.by_status = by_status;
        Ok(now)
    }

    /// Fleet GPU totals per bucket over `[from, to)` from `tier`: each GPU's
    /// mean over the bucket, then the mean utilisation across GPUs and the
    /// total VRAM used/total and power. Every instance with samples counts,
    /// whatever its status now. Buckets as in [`Store::metric_series`].
    pub async fn fleet_series(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        step: Step,
        tier: Tier,
        projects: Option<&[ProjectId]>,
    ) -> Result<FleetSeries, StoreError> {
        let step = effective_step(step, tier);
        let mut series = FleetSeries {
            tier,
            step,
            from,
            to,
            points: Vec::new(),
        };
        let Some((f, t)) = window(from, to, step)? else {
            return Ok(series);
        };
        let (_, _, source) = tier_tables(tier);
        let tc = source.time_col();
        let cond = format!(
            "{tc} >= $1 AND {tc} < $2{}",
            match projects {
                None => String::new(),
                Some(_) => format!(
                    " AND instance_id IN (SELECT id FROM instances WHERE 1 = 1{})",
                    project_condition("project_id", projects)
                ),
            }
        );
        let sql = format!(
            "SELECT b, COUNT(DISTINCT instance_id) AS instances, COUNT(*) AS gpus, \
             AVG(util_avg) AS util, SUM(mem_used_avg) AS vram_used, \
             SUM(mem_total) AS vram_total, SUM(power_avg) AS power \
             FROM (SELECT instance_id, gpu_index, ({tc} / $3) * $3 AS b, {} FROM {} \
                   WHERE {cond} GROUP BY instance_id, gpu_index, b) per_gpu \
             GROUP BY b ORDER BY b",
            select_list(&aggregates(GPU, source)),
            tier_rows(tier, Raw::Gpu, &cond, None),
        );
        let rows = sqlx::query(&sql)
            .bind(lower_bound(tier, f))
            .bind(t)
            .bind(step.as_millis())
            .fetch_all(&self.pool)
            .await?;
        for row in &rows {
            let r = RowReader::new(row, "fleet series");
            series.points.push(FleetPoint {
                bucket: time(r.get("b")?)?,
                instances: r.get("instances")?,
                gpus: r.get("gpus")?,
                mean_gpu_util_pct: r.get("util")?,
                vram_used_mib: r.get("vram_used")?,
                vram_total_mib: r.get("vram_total")?,
                power_w: r.get("power")?,
            });
        }
        Ok(series)
    }
}

/// ` AND {column} IN ('a', 'b')` for `Some(projects)` (nothing matches an
/// empty list), nothing for `None`. Project ids are slugs
/// (`[a-z0-9][a-z0-9-]*`, checked when parsed), so they are written inline.
fn project_condition(column: &str, projects: Option<&[ProjectId]>) -> String {
    match projects {
        None => String::new(),
        Some([]) => " AND 1 = 0".to_string(),
        Some(list) => {
            let ids: Vec<String> = list
                .iter()
                .map(|p| {
                    debug_assert!(p
                        .as_str()
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
                    format!("'{}'", p.as_str())
                })
                .collect();
            format!(" AND {column} IN ({})", ids.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_rows_parse_numbers_nulls_and_infinities() {
        // SQLite's JSON of ±infinity, PostgreSQL's, integers and nulls.
        let rows = parse_rows(
            r#"[[60000,2,1.5,null,9.0e+999],[120000,1,-9.0e+999,"Infinity","-Infinity"]]"#,
            "t",
        )
        .unwrap();
        let names = ["b", "n", "x", "y", "z"];
        let a = Cells {
            names: &names,
            values: &rows[0],
            what: "t",
        };
        assert_eq!(a.time("b").unwrap().timestamp_millis(), 60_000);
        assert_eq!(a.int("n").unwrap(), 2);
        assert_eq!(a.get("x").unwrap(), 1.5);
        assert_eq!(a.opt("y").unwrap(), None);
        assert!(a.get("y").is_err(), "null where a value is required");
        assert_eq!(a.get("z").unwrap(), f64::INFINITY);
        assert!(a.int("x").is_err(), "1.5 is no integer");
        assert!(a.get("nope").is_err());
        let b = Cells {
            names: &names,
            values: &rows[1],
            what: "t",
        };
        assert_eq!(b.get("x").unwrap(), f64::NEG_INFINITY);
        assert_eq!(b.get("y").unwrap(), f64::INFINITY);
        assert_eq!(b.get("z").unwrap(), f64::NEG_INFINITY);
        assert!(parse_rows(r#"[["text"]]"#, "t").is_err());
        assert!(parse_rows("[]", "t").unwrap().is_empty());
    }
}
