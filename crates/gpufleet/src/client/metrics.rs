//! `gpufleet instances metrics ID [--since 1h] [--step 1m]`: an instance's
//! figures over a window — a table, or sparklines when stdout is a terminal.
//!
//! It asks the metric-history API (`from`/`to`/`step`, the shared limits of
//! [`gpufleet_domain::metrics`], checked here first so the CLI and the API
//! agree) and reads its aligned `series`; a control plane that answers
//! without `series` (or refuses the window) is read through its recent
//! `samples` instead.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use gpufleet_api::views::{InstanceMetrics, MetricSeriesView, SampleView};
use gpufleet_domain::metrics::{validate_window, Step};
use gpufleet_domain::InstanceId;
use reqwest::{Method, StatusCode};

use super::{print_json, render, Client};

/// Arguments of `instances metrics`.
#[derive(Debug, Clone, clap::Args)]
pub struct MetricsArgs {
    pub id: InstanceId,
    /// How far back, e.g. 15m, 1h, 7d (5 minutes to 30 days).
    #[arg(long, default_value = "1h", value_parser = super::instances::parse_duration)]
    pub since: Duration,
    /// Bucket width, e.g. 5s, 1m, 1h [default: the finest the window allows].
    #[arg(long)]
    pub step: Option<Step>,
}

/// One GPU's figures over time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuHistory {
    pub index: u32,
    pub util_pct: Vec<Option<f64>>,
    pub vram_used_mib: Vec<Option<f64>>,
    pub vram_total_mib: Vec<Option<f64>>,
    pub temp_c: Vec<Option<f64>>,
    pub power_w: Vec<Option<f64>>,
    pub power_limit_w: Vec<Option<f64>>,
}

/// An instance's figures over time, from either answer shape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    /// `series`'s step, or `None` for raw samples.
    pub step: Option<String>,
    pub timestamps: Vec<DateTime<Utc>>,
    /// Heartbeats behind each point (1 for raw samples).
    pub samples: Vec<i64>,
    pub cpu_pct: Vec<Option<f64>>,
    pub mem_pct: Vec<Option<f64>>,
    pub requests_running: Vec<Option<f64>>,
    pub requests_waiting: Vec<Option<f64>>,
    pub gpus: Vec<GpuHistory>,
}

impl History {
    pub fn from_series(s: &MetricSeriesView) -> History {
        History {
            step: Some(s.step.clone()),
            timestamps: s.timestamps.clone(),
            samples: s.samples.clone(),
            cpu_pct: s.cpu_pct.clone(),
            mem_pct: s.mem_pct.clone(),
            requests_running: s.requests_running.clone(),
            requests_waiting: s.requests_waiting.clone(),
            gpus: s
                .gpus
                .iter()
                .map(|g| GpuHistory {
                    index: g.index,
                    util_pct: g.util_pct.clone(),
                    vram_used_mib: g.vram_used_mib.clone(),
                    vram_total_mib: g.vram_total_mib.clone(),
                    temp_c: g.temp_c.clone(),
                    power_w: g.power_w.clone(),
                    power_limit_w: g.power_limit_w.clone(),
                })
                .collect(),
        }
    }

    /// Raw samples (oldest first) at or after `since`.
    pub fn from_samples(samples: &[SampleView], since: DateTime<Utc>) -> History {
        let samples: Vec<&SampleView> = samples.iter().filter(|s| s.at >= since).collect();
        let mut indexes: Vec<u32> = samples
            .iter()
            .flat_map(|s| s.gpus.iter().map(|g| g.index))
            .collect();
        indexes.sort_unstable();
        indexes.dedup();
        let gpu_figure = |index: u32, f: fn(&gpufleet_proto::GpuSample) -> Option<f64>| {
            samples
                .iter()
                .map(|s| s.gpus.iter().find(|g| g.index == index).and_then(f))
                .collect::<Vec<_>>()
        };
        History {
            step: None,
            timestamps: samples.iter().map(|s| s.at).collect(),
            samples: vec![1; samples.len()],
            cpu_pct: samples.iter().map(|s| Some(s.system.cpu_pct)).collect(),
            mem_pct: samples
                .iter()
                .map(|s| {
                    (s.system.mem_total_bytes > 0).then(|| {
                        s.system.mem_used_bytes as f64 / s.system.mem_total_bytes as f64 * 100.0
                    })
                })
                .collect(),
            requests_running: samples
                .iter()
                .map(|s| Some(s.engine.requests_running))
                .collect(),
            requests_waiting: samples
                .iter()
                .map(|s| Some(s.engine.requests_waiting))
                .collect(),
            gpus: indexes
                .into_iter()
                .map(|index| GpuHistory {
                    index,
                    util_pct: gpu_figure(index, |g| g.util_pct),
                    vram_used_mib: gpu_figure(index, |g| Some(g.mem_used_mib as f64)),
                    vram_total_mib: gpu_figure(index, |g| Some(g.mem_total_mib as f64)),
                    temp_c: gpu_figure(index, |g| g.temp_c),
                    power_w: gpu_figure(index, |g| g.power_w),
                    power_limit_w: gpu_figure(index, |g| g.power_limit_w),
                })
                .collect(),
        }
    }

    /// Points that hold figures.
    fn filled(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.timestamps.len()).filter(|&i| self.samples.get(i).copied().unwrap_or(0) > 0)
    }
}

fn fmt(v: Option<f64>, decimals: usize) -> String {
    v.map(|v| format!("{v:.decimals$}"))
        .unwrap_or_else(|| "-".to_string())
}

fn gib(mib: f64) -> String {
    format!("{:.1}", mib / 1024.0)
}

/// One row per point holding figures.
pub fn history_table(h: &History) -> comfy_table::Table {
    let mut header = vec!["TIME".to_string(), "CPU %".to_string(), "MEM %".to_string()];
    for g in &h.gpus {
        let i = g.index;
        header.extend([
            format!("GPU{i} UTIL %"),
            format!("GPU{i} VRAM GiB"),
            format!("GPU{i} TEMP °C"),
            format!("GPU{i} POWER W"),
        ]);
    }
    header.extend(["RUNNING".to_string(), "WAITING".to_string()]);
    let header_refs: Vec<&str> = header.iter().map(String::as_str).collect();
    let mut t = render::table(&header_refs);
    let at = |v: &Vec<Option<f64>>, i: usize| v.get(i).copied().flatten();
    for i in h.filled() {
        let mut row = vec![
            h.timestamps[i].format("%Y-%m-%d %H:%M:%S").to_string(),
            fmt(at(&h.cpu_pct, i), 1),
            fmt(at(&h.mem_pct, i), 1),
        ];
        for g in &h.gpus {
            let vram = match (at(&g.vram_used_mib, i), at(&g.vram_total_mib, i)) {
                (Some(u), Some(t)) => format!("{}/{}", gib(u), gib(t)),
                (Some(u), None) => gib(u),
                _ => "-".to_string(),
            };
            row.extend([
                fmt(at(&g.util_pct, i), 0),
                vram,
                fmt(at(&g.temp_c, i), 0),
                fmt(at(&g.power_w, i), 0),
            ]);
        }
        row.extend([
            fmt(at(&h.requests_running, i), 1),
            fmt(at(&h.requests_waiting, i), 1),
        ]);
        t.add_row(row);
    }
    t
}

const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// `values` squeezed into `width` columns (each the mean of its points),
/// drawn with block characters between `lo` and `hi`; a gap is a space.
pub fn sparkline(values: &[Option<f64>], width: usize, lo: f64, hi: f64) -> String {
    if values.is_empty() || width == 0 {
        return String::new();
    }
    let cols = width.min(values.len());
    let span = (hi - lo).max(f64::EPSILON);
    (0..cols)
        .map(|c| {
            let start = c * values.len() / cols;
            let end = ((c + 1) * values.len() / cols).max(start + 1);
            let some: Vec<f64> = values[start..end].iter().flatten().copied().collect();
            if some.is_empty() {
                return ' ';
            }
            let mean = some.iter().sum::<f64>() / some.len() as f64;
            let level = ((mean - lo) / span * (BARS.len() - 1) as f64).round();
            BARS[level.clamp(0.0, (BARS.len() - 1) as f64) as usize]
        })
        .collect()
}

/// min / max / last of the known values.
fn summary(values: &[Option<f64>]) -> Option<(f64, f64, f64)> {
    let known: Vec<f64> = values.iter().flatten().copied().collect();
    let last = *known.last()?;
    let min = known.iter().copied().fold(f64::INFINITY, f64::min);
    let max = known.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some((min, max, last))
}

/// A figure to draw: label, values, fixed range (else min/max), unit.
type SparkLine<'a> = (
    String,
    &'a Vec<Option<f64>>,
    Option<(f64, f64)>,
    &'static str,
);

/// One sparkline per figure, `width` columns wide.
pub fn sparklines(h: &History, width: usize) -> String {
    let mut lines: Vec<SparkLine> = vec![
        ("CPU".into(), &h.cpu_pct, Some((0.0, 100.0)), "%"),
        ("memory".into(), &h.mem_pct, Some((0.0, 100.0)), "%"),
    ];
    for g in &h.gpus {
        let i = g.index;
        let vram_max = g
            .vram_total_mib
            .iter()
            .flatten()
            .copied()
            .fold(0.0, f64::max);
        lines.push((format!("GPU{i} util"), &g.util_pct, Some((0.0, 100.0)), "%"));
        lines.push((
            format!("GPU{i} VRAM"),
            &g.vram_used_mib,
            (vram_max > 0.0).then_some((0.0, vram_max)),
            " MiB",
        ));
        let limit_max = g
            .power_limit_w
            .iter()
            .flatten()
            .copied()
            .fold(0.0, f64::max);
        lines.push((
            format!("GPU{i} temp"),
            &g.temp_c,
            Some((20.0, 100.0)),
            " °C",
        ));
        lines.push((
            format!("GPU{i} power"),
            &g.power_w,
            (limit_max > 0.0).then_some((0.0, limit_max)),
            " W",
        ));
    }
    lines.push(("running".into(), &h.requests_running, None, ""));
    lines.push(("waiting".into(), &h.requests_waiting, None, ""));
    let mut out = String::new();
    for (label, values, range, unit) in lines {
        let Some((min, max, last)) = summary(values) else {
            out.push_str(&format!("{label:<12} (no data)\n"));
            continue;
        };
        let (lo, hi) = range.unwrap_or((min.min(0.0), max.max(1.0)));
        out.push_str(&format!(
            "{label:<12} {}  last {last:.1}{unit} (min {min:.1}, max {max:.1})\n",
            sparkline(values, width, lo, hi)
        ));
    }
    out
}

/// Fetches the history: the series when the server has it, else the samples.
async fn fetch(client: &Client, args: &MetricsArgs) -> anyhow::Result<(InstanceMetrics, History)> {
    let to = Utc::now();
    let since = chrono::Duration::from_std(args.since).context("--since is too long")?;
    let from = to - since;
    let (from_ms, to_ms) = (from.timestamp_millis(), to.timestamp_millis());
    let step = args
        .step
        .unwrap_or_else(|| Step::for_window(to_ms - from_ms));
    validate_window(from_ms, to_ms, step).context("--since/--step")?;
    let id = args.id;
    let path = format!(
        "/api/v1/instances/{id}/metrics?from={}&to={}&step={step}",
        urlencode(&from.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        urlencode(&to.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
    );
    let resp = client
        .request(Method::GET, &path)
        .send()
        .await
        .map_err(|e| client.transport_error(e))?;
    if resp.status() == StatusCode::BAD_REQUEST {
        // A control plane that does not know the window: its recent samples.
        tracing::warn!("the server refused the history window; showing its recent samples");
    } else {
        let resp = client.check(resp).await?;
        let m: InstanceMetrics = resp.json().await.map_err(|e| client.transport_error(e))?;
        if let Some(series) = &m.series {
            let h = History::from_series(series);
            return Ok((m, h));
        }
        let h = History::from_samples(&m.samples, from);
        return Ok((m, h));
    }
    let m: InstanceMetrics = client
        .get(&format!("/api/v1/instances/{id}/metrics"))
        .await?;
    let h = History::from_samples(&m.samples, from);
    Ok((m, h))
}

/// `+` and `:` in RFC 3339 times, made safe for a query string.
fn urlencode(s: &str) -> String {
    s.replace('+', "%2B").replace(':', "%3A")
}

pub async fn run(client: &Client, args: MetricsArgs) -> anyhow::Result<()> {
    let (raw, history) = fetch(client, &args).await?;
    if client.json {
        return print_json(&raw);
    }
    if history.filled().next().is_none() {
        println!("no figures for {} in the last {:?}", args.id, args.since);
        return Ok(());
    }
    let stdout = std::io::stdout();
    if stdout.is_terminal() {
        let width = terminal_width().saturating_sub(60).clamp(10, 200);
        print!("{}", sparklines(&history, width));
    } else {
        println!("{}", history_table(&history));
    }
    Ok(())
}

fn terminal_width() -> usize {
    ratatui::crossterm::terminal::size()
        .map(|(w, _)| usize::from(w))
        .unwrap_or(100)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpufleet_proto::{EngineSample, EngineStatus, GpuSample, GpuSource, SystemSample};

    fn sample(at: DateTime<Utc>, util: f64) -> SampleView {
        SampleView {
            at,
            seq: 1,
            system: SystemSample {
                cpu_pct: 12.5,
                mem_used_bytes: 1 << 30,
                mem_total_bytes: 4 << 30,
                ..SystemSample::default()
            },
            gpu_source: GpuSource::Simulated,
            gpus: vec![GpuSample {
                index: 0,
                name: "NVIDIA L4".into(),
                uuid: None,
                util_pct: Some(util),
                mem_used_mib: 12_288,
                mem_total_mib: 24_576,
                temp_c: Some(55.0),
                power_w: Some(40.0),
                power_limit_w: Some(72.0),
                ..GpuSample::default()
            }],
            engine: EngineSample {
                status: EngineStatus::Ready,
                requests_running: 3.0,
                requests_waiting: 1.0,
                restarts: 0,
                kv_cache_usage: None,
                prompt_tokens_per_s: None,
                generation_tokens_per_s: None,
                ttft_mean_s: None,
                canary: None,
            },
        }
    }

    #[test]
    fn samples_become_history_and_a_table() {
        let now = Utc::now();
        let samples = vec![
            sample(now - chrono::Duration::hours(2), 10.0),
            sample(now - chrono::Duration::seconds(10), 50.0),
            sample(now, 90.0),
        ];
        let h = History::from_samples(&samples, now - chrono::Duration::hours(1));
        assert_eq!(h.timestamps.len(), 2, "older than --since is left out");
        assert_eq!(h.gpus.len(), 1);
        assert_eq!(h.gpus[0].util_pct, vec![Some(50.0), Some(90.0)]);
        assert_eq!(h.mem_pct[0], Some(25.0));
        let text = history_table(&h).to_string();
        assert!(text.contains("GPU0 UTIL %"), "{text}");
        assert!(text.contains("12.0/24.0"), "{text}");
        assert!(text.contains("90"), "{text}");
        let lines = sparklines(&h, 20);
        assert!(lines.contains("GPU0 util"), "{lines}");
        assert!(lines.contains("last 90.0%"), "{lines}");
    }

    #[test]
    fn sparklines_scale_and_squeeze() {
        assert_eq!(sparkline(&[Some(0.0), Some(100.0)], 10, 0.0, 100.0), "▁█");
        assert_eq!(
            sparkline(&[Some(0.0), None, Some(50.0)], 3, 0.0, 100.0),
            "▁ ▅"
        );
        let many: Vec<Option<f64>> = (0..100).map(|i| Some(f64::from(i))).collect();
        let s = sparkline(&many, 10, 0.0, 99.0);
        assert_eq!(s.chars().count(), 10);
        assert!(s.starts_with('▁') && s.ends_with('█'), "{s}");
        assert_eq!(sparkline(&[], 10, 0.0, 1.0), "");
    }
}
