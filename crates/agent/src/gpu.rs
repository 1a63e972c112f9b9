//! GPU figures. [`GpuSampler`] hides where they come from: NVML on real
//! machines (a later addition), [`SimulatedGpus`] everywhere else.

use std::time::Duration;

use gpufleet_domain::GpuSpec;
use gpufleet_proto::{GpuSample, GpuSource};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What the engine is doing, which drives simulated GPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineLoad {
    /// The model is loaded (engine ready).
    pub loaded: bool,
    pub requests_running: f64,
    pub requests_waiting: f64,
}

pub trait GpuSampler: Send {
    fn source(&self) -> GpuSource;
    /// One sample per GPU; `elapsed` is the time since the previous call.
    fn sample(&mut self, load: &EngineLoad, elapsed: Duration) -> Vec<GpuSample>;
}

const BASE_UTIL_PCT: f64 = 5.0;
const UTIL_PER_REQUEST_PCT: f64 = 8.0;
const MAX_TARGET_UTIL_PCT: f64 = 95.0;
/// Share of VRAM the model weights take once loaded.
const WEIGHTS_SHARE: f64 = 0.60;
/// Further share of VRAM (KV cache, activations) at 100 % utilisation.
const ACTIVE_SHARE: f64 = 0.35;
const AMBIENT_TEMP_C: f64 = 35.0;
const TEMP_PER_UTIL_PCT: f64 = 0.5;
const IDLE_POWER_SHARE: f64 = 0.15;
/// Time constants of the exponential easing.
const UTIL_TAU: Duration = Duration::from_secs(2);
const THERMAL_TAU: Duration = Duration::from_secs(20);
/// Amplitude of the utilisation noise, in percentage points.
const NOISE_PCT: f64 = 1.5;

#[derive(Debug, Clone)]
struct GpuState {
    util_pct: f64,
    temp_c: f64,
}

/// GPUs that follow the engine's load, per the bootstrap's [`GpuSpec`].
pub struct SimulatedGpus {
    spec: GpuSpec,
    gpus: Vec<GpuState>,
    rng: StdRng,
}

impl SimulatedGpus {
    pub fn new(spec: GpuSpec, seed: u64) -> Self {
        let gpus = (0..spec.count)
            .map(|_| GpuState {
                util_pct: 0.0,
                temp_c: AMBIENT_TEMP_C,
            })
            .collect();
        Self {
            spec,
            gpus,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// The utilisation the GPUs tend to under `load`.
    pub fn target_util_pct(load: &EngineLoad) -> f64 {
        let requests = (load.requests_running.max(0.0) + load.requests_waiting.max(0.0)).min(1e6);
        (BASE_UTIL_PCT + UTIL_PER_REQUEST_PCT * requests).min(MAX_TARGET_UTIL_PCT)
    }
}

/// Fraction of the way to the target covered in `elapsed`.
fn ease(elapsed: Duration, tau: Duration) -> f64 {
    1.0 - (-elapsed.as_secs_f64() / tau.as_secs_f64()).exp()
}

impl GpuSampler for SimulatedGpus {
    fn source(&self) -> GpuSource {
        GpuSource::Simulated
    }

    fn sample(&mut self, load: &EngineLoad, elapsed: Duration) -> Vec<GpuSample> {
        let target = Self::target_util_pct(load);
        let a_util = ease(elapsed, UTIL_TAU);
        let a_temp = ease(elapsed, THERMAL_TAU);
        let total_mib = self.spec.vram_mib;
        let limit_w = self.spec.power_limit_w.max(0.0);
        let idle_w = IDLE_POWER_SHARE * limit_w;
        let mut out = Vec::with_capacity(self.gpus.len());
        for (index, gpu) in self.gpus.iter_mut().enumerate() {
            let noise = self.rng.random_range(-NOISE_PCT..=NOISE_PCT);
            gpu.util_pct =
                (gpu.util_pct + (target - gpu.util_pct) * a_util + noise).clamp(0.0, 100.0);
            let temp_target = AMBIENT_TEMP_C + TEMP_PER_UTIL_PCT * gpu.util_pct;
            gpu.temp_c += (temp_target - gpu.temp_c) * a_temp;
            let u = gpu.util_pct / 100.0;
            let mem_used_mib = if load.loaded {
                let share = (WEIGHTS_SHARE + ACTIVE_SHARE * u).min(1.0);
                ((total_mib as f64) * share).round() as u64
            } else {
                0
            }
            .min(total_mib);
            out.push(GpuSample {
                index: index as u32,
                name: self.spec.model.clone(),
                uuid: None,
                util_pct: gpu.util_pct,
                mem_used_mib,
                mem_total_mib: total_mib,
                temp_c: gpu.temp_c,
                power_w: (idle_w + (limit_w - idle_w) * u).clamp(idle_w, limit_w),
                power_limit_w: limit_w,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> GpuSpec {
        GpuSpec {
            model: "NVIDIA L4".into(),
            count: 2,
            vram_mib: 24_576,
            power_limit_w: 72.0,
        }
    }

    fn load(running: f64, waiting: f64) -> EngineLoad {
        EngineLoad {
            loaded: true,
            requests_running: running,
            requests_waiting: waiting,
        }
    }

    #[test]
    fn target_follows_queue_depth_and_is_capped() {
        assert_eq!(SimulatedGpus::target_util_pct(&load(0.0, 0.0)), 5.0);
        assert_eq!(SimulatedGpus::target_util_pct(&load(2.0, 1.0)), 29.0);
        assert_eq!(SimulatedGpus::target_util_pct(&load(100.0, 50.0)), 95.0);
    }

    #[test]
    fn deterministic_under_a_seed() {
        let run = |seed| {
            let mut g = SimulatedGpus::new(spec(), seed);
            (0..20)
                .flat_map(|i| g.sample(&load(f64::from(i % 7), 1.0), Duration::from_secs(1)))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn bounds_always_hold() {
        let mut g = SimulatedGpus::new(spec(), 1);
        let mut rng = StdRng::seed_from_u64(99);
        for step in 0..2_000 {
            let l = EngineLoad {
                loaded: step > 10,
                requests_running: rng.random_range(0.0..40.0),
                requests_waiting: rng.random_range(0.0..40.0),
            };
            let dt = Duration::from_millis(rng.random_range(0..30_000));
            let samples = g.sample(&l, dt);
            assert_eq!(samples.len(), 2);
            for s in samples {
                assert!((0.0..=100.0).contains(&s.util_pct), "{s:?}");
                assert!(s.mem_used_mib <= s.mem_total_mib, "{s:?}");
                assert!(
                    (AMBIENT_TEMP_C..=AMBIENT_TEMP_C + 50.0).contains(&s.temp_c),
                    "{s:?}"
                );
                assert!(
                    s.power_w >= 0.15 * 72.0 - 1e-9 && s.power_w <= 72.0,
                    "{s:?}"
                );
                assert_eq!(s.name, "NVIDIA L4");
            }
        }
    }

    #[test]
    fn eases_towards_load_with_thermal_lag() {
        let mut g = SimulatedGpus::new(GpuSpec { count: 1, ..spec() }, 3);
        let busy = load(20.0, 0.0);
        let first = g.sample(&busy, Duration::from_millis(500)).remove(0);
        assert!(
            first.util_pct < 50.0,
            "moves smoothly, not at once: {first:?}"
        );
        let mut last = first.clone();
        for _ in 0..30 {
            last = g.sample(&busy, Duration::from_secs(1)).remove(0);
        }
        assert!(last.util_pct > 90.0, "{last:?}");
        assert!(last.temp_c > first.temp_c + 10.0, "{last:?}");
        assert!(
            last.temp_c < AMBIENT_TEMP_C + 0.5 * last.util_pct,
            "thermal lag: {last:?}"
        );
        assert!(last.mem_used_mib > (24_576.0 * 0.9) as u64, "{last:?}");
        assert!(last.power_w > 0.9 * 72.0, "{last:?}");
        let idle = g
            .sample(&EngineLoad::default(), Duration::from_secs(60))
            .remove(0);
        assert_eq!(idle.mem_used_mib, 0, "nothing loaded, no weights in memory");
        assert!(idle.util_pct < 10.0, "{idle:?}");
    }
}
