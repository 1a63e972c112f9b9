//! What a heartbeat may say: the one place its figures are checked before
//! they are stored. Pure (no I/O, no clock).

use gpufleet_proto::{CanarySample, Heartbeat};

/// A heartbeat refused: `field` is its JSON path, e.g. `gpus[0].util_pct`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid {field}: {message}")]
pub struct HeartbeatRejected {
    pub field: String,
    pub message: String,
}

/// What the control plane knows about an instance's GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GpuCountContext {
    /// GPUs of the instance's type in its provider's catalog (`None`: unknown).
    pub catalog: Option<u32>,
    /// GPUs in the instance's last stored sample (`None`: no sample yet).
    pub previous: Option<usize>,
}

/// Room for rounding when clamping a percentage (sysinfo's CPU average can
/// land a hair above 100).
const PCT_SLACK: f64 = 1.0;

fn reject(field: impl Into<String>, message: impl Into<String>) -> HeartbeatRejected {
    HeartbeatRejected {
        field: field.into(),
        message: message.into(),
    }
}

/// A finite, non-negative figure.
fn non_negative(field: &str, v: f64) -> Result<(), HeartbeatRejected> {
    if !v.is_finite() {
        return Err(reject(field, format!("must be a finite number, got {v}")));
    }
    if v < 0.0 {
        return Err(reject(field, format!("must not be negative, got {v}")));
    }
    Ok(())
}

fn non_negative_opt(field: &str, v: Option<f64>) -> Result<(), HeartbeatRejected> {
    v.map_or(Ok(()), |v| non_negative(field, v))
}

/// Check (and where documented, clamp) a heartbeat's figures in place.
///
/// Every float must be finite (NaN and ±∞ are rejected, naming the field).
/// Per field:
///
/// | field | rule |
/// |---|---|
/// | `system.cpu_pct` | reject < 0; clamp to 100 when at most 101 (rounding); reject above |
/// | `system.load1/5/15`, `system.net_rx_bps`, `system.net_tx_bps` | reject < 0 |
/// | `system.mem_used_bytes` | reject above `system.mem_total_bytes` (when the total is known, > 0) |
/// | `system.disk_used_bytes` | reject above `system.disk_total_bytes` (when the total is known, > 0) |
/// | `gpus[i].index` | reject a duplicate index |
/// | `gpus[i].*` (GPU figures) | `None` (unknown: not supported, e.g. utilisation under MIG; GPU lost; sample timed out) is accepted; the rules below apply to known values |
/// | `gpus[i].util_pct` | reject < 0 or > 100 (NVML reports whole percents: above 100 is a broken reading) |
/// | `gpus[i].mem_used_mib` | reject above `gpus[i].mem_total_mib` |
/// | `gpus[i].mem_free_mib`, `mem_reserved_mib` | reject above `mem_total_mib` |
/// | `gpus[i].temp_c`, `mem_temp_c`, `power_w`, `power_limit_w`, `power_mgmt_limit_w` | reject < 0 (power above its limit is real, briefly, and kept) |
/// | `engine.requests_running/waiting`, tokens per s, `ttft_mean_s` | reject < 0 |
/// | `engine.kv_cache_usage` | reject < 0; clamp to 1 (a fraction; engines overshoot while preempting) |
/// | `engine.canary.latency_ms` | reject < 0 |
/// | `engine.canary.error` | cut to [`CanarySample::MAX_ERROR_CHARS`] characters |
/// | `gpus` (the count) | reject a non-zero count that differs both from the instance's previous sample and from its catalog type's GPU count; zero GPUs (the agent could not read them) is accepted |
///
/// A rejected heartbeat is not stored at all; a clamped one is stored clamped.
pub fn validate_heartbeat(
    hb: &mut Heartbeat,
    ctx: GpuCountContext,
) -> Result<(), HeartbeatRejected> {
    let s = &mut hb.system;
    non_negative("system.cpu_pct", s.cpu_pct)?;
    if s.cpu_pct > 100.0 + PCT_SLACK {
        return Err(reject(
            "system.cpu_pct",
            format!("must be at most 100, got {}", s.cpu_pct),
        ));
    }
    s.cpu_pct = s.cpu_pct.min(100.0);
    non_negative("system.load1", s.load1)?;
    non_negative("system.load5", s.load5)?;
    non_negative("system.load15", s.load15)?;
    non_negative("system.net_rx_bps", s.net_rx_bps)?;
    non_negative("system.net_tx_bps", s.net_tx_bps)?;
    if s.mem_total_bytes > 0 && s.mem_used_bytes > s.mem_total_bytes {
        return Err(reject(
            "system.mem_used_bytes",
            format!(
                "{} bytes used is more than the {} bytes total",
                s.mem_used_bytes, s.mem_total_bytes
            ),
        ));
    }
    if s.disk_total_bytes > 0 && s.disk_used_bytes > s.disk_total_bytes {
        return Err(reject(
            "system.disk_used_bytes",
            format!(
                "{} bytes used is more than the {} bytes total",
                s.disk_used_bytes, s.disk_total_bytes
            ),
        ));
    }

    let mut seen = std::collections::HashSet::new();
    for (i, g) in hb.gpus.iter().enumerate() {
        let f = |name: &str| format!("gpus[{i}].{name}");
        if !seen.insert(g.index) {
            return Err(reject(
                f("index"),
                format!("GPU index {} appears twice", g.index),
            ));
        }
        non_negative_opt(&f("util_pct"), g.util_pct)?;
        if let Some(u) = g.util_pct.filter(|u| *u > 100.0) {
            return Err(reject(
                f("util_pct"),
                format!("must be at most 100, got {u}"),
            ));
        }
        if g.mem_used_mib > g.mem_total_mib {
            return Err(reject(
                f("mem_used_mib"),
                format!(
                    "{} MiB used is more than the {} MiB total",
                    g.mem_used_mib, g.mem_total_mib
                ),
            ));
        }
        for (name, v) in [
            ("mem_free_mib", g.mem_free_mib),
            ("mem_reserved_mib", g.mem_reserved_mib),
        ] {
            if let Some(v) = v.filter(|v| *v > g.mem_total_mib) {
                return Err(reject(
                    f(name),
                    format!("{v} MiB is more than the {} MiB total", g.mem_total_mib),
                ));
            }
        }
        non_negative_opt(&f("temp_c"), g.temp_c)?;
        non_negative_opt(&f("mem_temp_c"), g.mem_temp_c)?;
        non_negative_opt(&f("power_w"), g.power_w)?;
        non_negative_opt(&f("power_limit_w"), g.power_limit_w)?;
        non_negative_opt(&f("power_mgmt_limit_w"), g.power_mgmt_limit_w)?;
    }
    let n = hb.gpus.len();
    let matches_catalog = ctx.catalog.is_none_or(|c| c as usize == n);
    let matches_previous = ctx.previous == Some(n);
    if n > 0 && !matches_catalog && !matches_previous {
        let mut why = format!("{n} GPUs reported");
        if let Some(c) = ctx.catalog {
            why.push_str(&format!("; the instance type has {c}"));
        }
        if let Some(p) = ctx.previous {
            why.push_str(&format!("; its previous sample had {p}"));
        }
        return Err(reject("gpus", why));
    }

    let e = &mut hb.engine;
    non_negative("engine.requests_running", e.requests_running)?;
    non_negative("engine.requests_waiting", e.requests_waiting)?;
    non_negative_opt("engine.kv_cache_usage", e.kv_cache_usage)?;
    e.kv_cache_usage = e.kv_cache_usage.map(|v| v.min(1.0));
    non_negative_opt("engine.prompt_tokens_per_s", e.prompt_tokens_per_s)?;
    non_negative_opt("engine.generation_tokens_per_s", e.generation_tokens_per_s)?;
    non_negative_opt("engine.ttft_mean_s", e.ttft_mean_s)?;
    if let Some(c) = &mut e.canary {
        non_negative_opt("engine.canary.latency_ms", c.latency_ms)?;
        if let Some(err) = &mut c.error {
            if let Some((cut, _)) = err.char_indices().nth(CanarySample::MAX_ERROR_CHARS) {
                err.truncate(cut);
                err.push('…');
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use gpufleet_domain::InstanceId;
    use gpufleet_proto::{EngineSample, EngineStatus, GpuSample, GpuSource, SystemSample};

    fn gpu(index: u32) -> GpuSample {
        GpuSample {
            index,
            name: "NVIDIA L4".into(),
            uuid: None,
            util_pct: Some(50.0),
            mem_used_mib: 1_000,
            mem_total_mib: 24_000,
            temp_c: Some(50.0),
            power_w: Some(40.0),
            power_limit_w: Some(72.0),
            ..GpuSample::default()
        }
    }

    fn hb(gpus: usize) -> Heartbeat {
        Heartbeat {
            instance_id: InstanceId::new(),
            seq: 1,
            sent_at: Utc::now(),
            agent_version: "t".into(),
            agent_uptime_secs: 1,
            system: SystemSample {
                cpu_pct: 10.0,
                mem_used_bytes: 1,
                mem_total_bytes: 2,
                disk_used_bytes: 1,
                disk_total_bytes: 2,
                ..SystemSample::default()
            },
            gpu_source: GpuSource::Simulated,
            gpus: (0..gpus as u32).map(gpu).collect(),
            engine: EngineSample {
                status: EngineStatus::Ready,
                requests_running: 1.0,
                requests_waiting: 0.0,
                restarts: 0,
                kv_cache_usage: Some(0.5),
                prompt_tokens_per_s: Some(1.0),
                generation_tokens_per_s: Some(1.0),
                ttft_mean_s: Some(0.1),
                canary: None,
            },
        }
    }

    type Mutation = fn(&mut Heartbeat);

    const ONE: GpuCountContext = GpuCountContext {
        catalog: Some(1),
        previous: None,
    };

    fn field_of(mut h: Heartbeat, ctx: GpuCountContext) -> Option<String> {
        validate_heartbeat(&mut h, ctx).err().map(|e| e.field)
    }

    #[test]
    fn good_heartbeats_pass_unchanged() {
        let mut h = hb(1);
        let before = h.clone();
        validate_heartbeat(&mut h, ONE).unwrap();
        assert_eq!(h, before);
    }

    #[test]
    fn unknown_gpu_figures_are_accepted_as_unknown() {
        // A MIG-enabled GPU (no utilisation), a GPU off the bus (nothing).
        let mut h = hb(1);
        h.gpus[0].util_pct = None;
        h.gpus[0].temp_c = None;
        h.gpus[0].power_w = None;
        h.gpus[0].power_limit_w = None;
        let before = h.clone();
        validate_heartbeat(&mut h, ONE).unwrap();
        assert_eq!(h, before, "not replaced by 0");
    }

    #[test]
    fn impossible_values_are_rejected_naming_the_field() {
        let cases: Vec<(&str, Mutation)> = vec![
            ("gpus[0].util_pct", |h| h.gpus[0].util_pct = Some(f64::NAN)),
            ("gpus[0].util_pct", |h| h.gpus[0].util_pct = Some(100.5)),
            ("gpus[0].util_pct", |h| h.gpus[0].util_pct = Some(-1.0)),
            ("gpus[0].mem_used_mib", |h| h.gpus[0].mem_used_mib = 30_000),
            ("gpus[0].temp_c", |h| h.gpus[0].temp_c = Some(f64::INFINITY)),
            ("gpus[0].power_w", |h| h.gpus[0].power_w = Some(-3.0)),
            ("gpus[0].mem_free_mib", |h| {
                h.gpus[0].mem_free_mib = Some(30_000)
            }),
            ("gpus[0].power_mgmt_limit_w", |h| {
                h.gpus[0].power_mgmt_limit_w = Some(-1.0)
            }),
            ("system.cpu_pct", |h| h.system.cpu_pct = f64::NAN),
            ("system.cpu_pct", |h| h.system.cpu_pct = 150.0),
            ("system.cpu_pct", |h| h.system.cpu_pct = -0.1),
            ("system.mem_used_bytes", |h| h.system.mem_used_bytes = 3),
            ("system.disk_used_bytes", |h| h.system.disk_used_bytes = 3),
            ("system.net_rx_bps", |h| {
                h.system.net_rx_bps = f64::NEG_INFINITY
            }),
            ("engine.requests_waiting", |h| {
                h.engine.requests_waiting = -1.0
            }),
            ("engine.ttft_mean_s", |h| {
                h.engine.ttft_mean_s = Some(f64::NAN)
            }),
            ("engine.kv_cache_usage", |h| {
                h.engine.kv_cache_usage = Some(-0.5)
            }),
            ("engine.canary.latency_ms", |h| {
                h.engine.canary = Some(canary(Some(-1.0), None))
            }),
        ];
        for (field, mutate) in cases {
            let mut h = hb(1);
            mutate(&mut h);
            assert_eq!(field_of(h, ONE).as_deref(), Some(field));
        }
        let mut h = hb(2);
        h.gpus[1].index = 0;
        assert_eq!(
            field_of(
                h,
                GpuCountContext {
                    catalog: Some(2),
                    previous: None
                }
            )
            .as_deref(),
            Some("gpus[1].index")
        );
    }

    fn canary(latency_ms: Option<f64>, error: Option<String>) -> CanarySample {
        CanarySample {
            ok: error.is_none(),
            checked_at: Utc::now(),
            latency_ms,
            error,
            consecutive_failures: 0,
        }
    }

    #[test]
    fn a_long_canary_error_is_cut() {
        let mut h = hb(1);
        h.engine.canary = Some(canary(
            Some(3.0),
            Some(format!("HTTP 502: {}", "é".repeat(1_000))),
        ));
        validate_heartbeat(&mut h, ONE).unwrap();
        let err = h.engine.canary.unwrap().error.unwrap();
        assert_eq!(err.chars().count(), CanarySample::MAX_ERROR_CHARS + 1);
        assert!(
            err.starts_with("HTTP 502: é") && err.ends_with('…'),
            "{err}"
        );
        // A short one is kept as it is.
        let mut h = hb(1);
        h.engine.canary = Some(canary(None, Some("no answer within 10 s".into())));
        let before = h.clone();
        validate_heartbeat(&mut h, ONE).unwrap();
        assert_eq!(h, before);
    }

    #[test]
    fn rounding_overshoots_are_clamped() {
        let mut h = hb(1);
        h.system.cpu_pct = 100.4;
        h.engine.kv_cache_usage = Some(1.02);
        validate_heartbeat(&mut h, ONE).unwrap();
        assert_eq!(h.system.cpu_pct, 100.0);
        assert_eq!(h.engine.kv_cache_usage, Some(1.0));
    }

    #[test]
    fn unknown_memory_totals_are_not_checked() {
        let mut h = hb(1);
        h.system.mem_total_bytes = 0;
        h.system.mem_used_bytes = 5;
        assert!(validate_heartbeat(&mut h, ONE).is_ok());
    }

    #[test]
    fn gpu_count_changes_need_a_reason() {
        let ctx = |catalog, previous| GpuCountContext { catalog, previous };
        // As the catalog says: fine, whatever came before.
        assert_eq!(field_of(hb(1), ctx(Some(1), Some(2))), None);
        // As before (the catalog may be wrong): fine.
        assert_eq!(field_of(hb(2), ctx(Some(1), Some(2))), None);
        // Neither: rejected.
        assert_eq!(
            field_of(hb(3), ctx(Some(1), Some(2))).as_deref(),
            Some("gpus")
        );
        assert_eq!(field_of(hb(2), ctx(Some(1), None)).as_deref(), Some("gpus"));
        // No GPUs read: accepted.
        assert_eq!(field_of(hb(0), ctx(Some(8), Some(8))), None);
        // Unknown catalog: anything goes.
        assert_eq!(field_of(hb(4), ctx(None, Some(2))), None);
    }
}
