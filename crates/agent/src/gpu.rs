//! GPU figures. [`GpuSampler`] hides where they come from: NVML on real
//! machines ([`NvmlGpus`](crate::nvml::NvmlGpus)), [`SimulatedGpus`]
//! everywhere else; [`select`] picks one per `--gpu`.

use std::time::Duration;

use gpufleet_domain::GpuSpec;
use gpufleet_proto::{GpuSample, GpuSource};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::AgentError;
use crate::nvml::{NvmlBackend, NvmlCallError, NvmlGpus};

/// `--gpu`: where GPU figures come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum GpuMode {
    /// NVML when the NVIDIA driver loads and reports at least one GPU, else simulated.
    #[default]
    Auto,
    /// NVML only: the agent refuses to start without it.
    Nvml,
    /// Simulated GPUs per the bootstrap's GPU spec, even on a GPU machine.
    Simulated,
}

/// The sampler `mode` asks for. `load_nvml` loads the library (tests pass a
/// fake); it is not called in `simulated` mode.
pub fn select(
    mode: GpuMode,
    spec: &GpuSpec,
    seed: u64,
    load_nvml: impl FnOnce() -> Result<Box<dyn NvmlBackend>, NvmlCallError>,
) -> Result<Box<dyn GpuSampler>, AgentError> {
    let simulated = || -> Box<dyn GpuSampler> { Box::new(SimulatedGpus::new(spec.clone(), seed)) };
    if mode == GpuMode::Simulated {
        tracing::info!(gpus = spec.count, model = %spec.model, "GPU figures: simulated (--gpu simulated)");
        return Ok(simulated());
    }
    let probed = load_nvml().and_then(|backend| {
        let count = backend.device_count()?;
        Ok((backend, count))
    });
    match (mode, probed) {
        (_, Ok((backend, count))) if count > 0 => {
            tracing::info!(gpus = count, "GPU figures: NVML");
            Ok(Box::new(NvmlGpus::new(backend, count)))
        }
        (GpuMode::Nvml, Ok(_)) => Err(AgentError::Nvml("NVML reports no GPU".to_string())),
        (GpuMode::Nvml, Err(e)) => Err(AgentError::Nvml(e.0)),
        (_, outcome) => {
            let why = match outcome {
                Ok(_) => "NVML reports no GPU".to_string(),
                Err(e) => e.0,
            };
            tracing::info!(reason = %why, gpus = spec.count, model = %spec.model, "GPU figures: simulated (no usable NVIDIA driver)");
            Ok(simulated())
        }
    }
}

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
/// Power floor of an idle GPU, as a share of its limit.
const IDLE_POWER_SHARE: f64 = 0.15;
/// Time constants of the exponential easing.
const UTIL_TAU: Duration = Duration::from_secs(2);
const THERMAL_TAU: Duration = Duration::from_secs(20);
/// Amplitude of the utilisation noise around the smooth trend, in percentage points.
const NOISE_PCT: f64 = 1.5;
/// Amplitude of the power noise, as a share of the limit.
const POWER_NOISE_SHARE: f64 = 0.01;
/// SM clock at idle and at full boost, MHz.
const IDLE_SM_CLOCK_MHZ: f64 = 345.0;
const BOOST_SM_CLOCK_MHZ: f64 = 1_980.0;
/// Below this utilisation the clocks are reported as held for `gpu_idle`.
const IDLE_UTIL_PCT: f64 = 5.0;
/// At or above this share of the limit, `sw_power_cap` holds the clocks.
const POWER_CAP_SHARE: f64 = 0.97;

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

    /// The trend (`util_pct`, `temp_c`) moves smoothly towards the load's
    /// target; what is reported is the trend plus small noise that does not
    /// accumulate. Temperature follows the trend with a longer time constant
    /// (thermal lag); power lies between the idle floor and the limit.
    fn sample(&mut self, load: &EngineLoad, elapsed: Duration) -> Vec<GpuSample> {
        let target = Self::target_util_pct(load);
        let a_util = ease(elapsed, UTIL_TAU);
        let a_temp = ease(elapsed, THERMAL_TAU);
        let total_mib = self.spec.vram_mib;
        let limit_w = self.spec.power_limit_w.max(0.0);
        let idle_w = IDLE_POWER_SHARE * limit_w;
        let mut out = Vec::with_capacity(self.gpus.len());
        for (index, gpu) in self.gpus.iter_mut().enumerate() {
            gpu.util_pct += (target - gpu.util_pct) * a_util;
            let util_pct =
                (gpu.util_pct + self.rng.random_range(-NOISE_PCT..=NOISE_PCT)).clamp(0.0, 100.0);
            let temp_target = AMBIENT_TEMP_C + TEMP_PER_UTIL_PCT * gpu.util_pct;
            gpu.temp_c += (temp_target - gpu.temp_c) * a_temp;
            let u = util_pct / 100.0;
            let mem_used_mib = if load.loaded {
                let share = (WEIGHTS_SHARE + ACTIVE_SHARE * u).min(1.0);
                ((total_mib as f64) * share).round() as u64
            } else {
                0
            }
            .min(total_mib);
            let power_noise = self.rng.random_range(-1.0..=1.0) * POWER_NOISE_SHARE * limit_w;
            let power_w = (idle_w + (limit_w - idle_w) * u + power_noise).clamp(idle_w, limit_w);
            let mut throttle_reasons = Vec::new();
            let mut clock = IDLE_SM_CLOCK_MHZ + (BOOST_SM_CLOCK_MHZ - IDLE_SM_CLOCK_MHZ) * u.sqrt();
            if util_pct < IDLE_UTIL_PCT {
                throttle_reasons.push("gpu_idle".to_string());
            }
            if limit_w > 0.0 && power_w >= POWER_CAP_SHARE * limit_w {
                throttle_reasons.push("sw_power_cap".to_string());
                clock *= 0.95;
            }
            out.push(GpuSample {
                index: index as u32,
                name: self.spec.model.clone(),
                uuid: None,
                util_pct,
                mem_used_mib,
                mem_total_mib: total_mib,
                temp_c: gpu.temp_c,
                power_w,
                power_limit_w: limit_w,
                sm_clock_mhz: Some(clock.round() as u32),
                ecc_uncorrected: Some(0),
                throttle_reasons,
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

    #[test]
    fn noise_is_small_and_does_not_accumulate() {
        let mut g = SimulatedGpus::new(GpuSpec { count: 1, ..spec() }, 11);
        let steady = load(3.0, 2.0); // target 45 %
        for _ in 0..30 {
            g.sample(&steady, Duration::from_secs(1));
        }
        let mut prev: Option<f64> = None;
        for _ in 0..2_000 {
            let s = g.sample(&steady, Duration::from_secs(1)).remove(0);
            assert!((s.util_pct - 45.0).abs() <= NOISE_PCT + 1e-6, "{s:?}");
            if let Some(p) = prev {
                assert!(
                    (s.util_pct - p).abs() <= 2.0 * NOISE_PCT + 1e-6,
                    "smooth: {p} → {s:?}"
                );
            }
            prev = Some(s.util_pct);
        }
    }

    #[test]
    fn temperature_lags_with_its_time_constant() {
        let mut g = SimulatedGpus::new(GpuSpec { count: 1, ..spec() }, 5);
        let busy = load(50.0, 0.0);
        // Utilisation settles within seconds...
        let mut s = g.sample(&busy, Duration::from_millis(100)).remove(0);
        for _ in 0..199 {
            s = g.sample(&busy, Duration::from_millis(100)).remove(0);
        }
        assert!(s.util_pct > 85.0, "{s:?}");
        // ...temperature, 20 s after the step, has covered about 1 - 1/e of the way.
        let full = TEMP_PER_UTIL_PCT * MAX_TARGET_UTIL_PCT;
        let covered = (s.temp_c - AMBIENT_TEMP_C) / full;
        assert!((0.5..0.7).contains(&covered), "covered {covered}: {s:?}");
    }

    #[test]
    fn power_clock_and_reasons_follow_load() {
        let mut g = SimulatedGpus::new(GpuSpec { count: 1, ..spec() }, 9);
        let idle = g.sample(&load(0.0, 0.0), Duration::from_secs(60)).remove(0);
        assert!(
            idle.power_w <= IDLE_POWER_SHARE * 72.0 + 0.1 * 72.0,
            "{idle:?}"
        );
        assert!(
            idle.power_w >= IDLE_POWER_SHARE * 72.0,
            "idle floor: {idle:?}"
        );
        let busy = g
            .sample(&load(40.0, 10.0), Duration::from_secs(60))
            .remove(0);
        assert!(
            busy.power_w > 0.9 * 72.0 && busy.power_w <= 72.0,
            "{busy:?}"
        );
        assert!(busy.sm_clock_mhz > idle.sm_clock_mhz, "{idle:?} {busy:?}");
        assert!(!busy.throttle_reasons.contains(&"gpu_idle".to_string()));
        assert_eq!(busy.ecc_uncorrected, Some(0));
        let quiet = g
            .sample(&EngineLoad::default(), Duration::from_secs(600))
            .remove(0);
        assert!(
            quiet.util_pct <= BASE_UTIL_PCT + NOISE_PCT + 1e-9,
            "{quiet:?}"
        );
    }

    mod selection {
        use super::*;
        use crate::nvml::fake::{FakeDevice, FakeNvml};

        fn fake(n: u32) -> Result<Box<dyn NvmlBackend>, NvmlCallError> {
            Ok(Box::new(FakeNvml {
                devices: (0..n).map(|i| Some(FakeDevice::h100(i))).collect(),
                broken: false,
            }))
        }
        fn missing() -> Result<Box<dyn NvmlBackend>, NvmlCallError> {
            Err(NvmlCallError(
                "libnvidia-ml.so: cannot open shared object file".into(),
            ))
        }

        #[test]
        fn auto_uses_nvml_when_it_reports_gpus() {
            let mut s = select(GpuMode::Auto, &spec(), 1, || fake(8)).unwrap();
            assert_eq!(s.source(), GpuSource::Nvml);
            let samples = s.sample(&EngineLoad::default(), Duration::from_secs(1));
            assert_eq!(samples.len(), 8, "NVML's count, not the bootstrap's");
            assert_eq!(samples[0].name, "NVIDIA H100 80GB HBM3");
        }

        #[test]
        fn auto_falls_back_to_simulation() {
            for loader in [missing as fn() -> _, || fake(0)] {
                let mut s = select(GpuMode::Auto, &spec(), 1, loader).unwrap();
                assert_eq!(s.source(), GpuSource::Simulated);
                assert_eq!(s.sample(&load(1.0, 0.0), Duration::from_secs(1)).len(), 2);
            }
            let broken = || -> Result<Box<dyn NvmlBackend>, NvmlCallError> {
                Ok(Box::new(FakeNvml {
                    devices: vec![],
                    broken: true,
                }))
            };
            let s = select(GpuMode::Auto, &spec(), 1, broken).unwrap();
            assert_eq!(s.source(), GpuSource::Simulated);
        }

        #[test]
        fn nvml_mode_refuses_to_simulate() {
            let e = select(GpuMode::Nvml, &spec(), 1, missing)
                .err()
                .expect("error");
            assert!(
                matches!(e, AgentError::Nvml(ref m) if m.contains("libnvidia-ml")),
                "{e}"
            );
            let e = select(GpuMode::Nvml, &spec(), 1, || fake(0))
                .err()
                .expect("error");
            assert!(e.to_string().contains("no GPU"), "{e}");
            let s = select(GpuMode::Nvml, &spec(), 1, || fake(1)).unwrap();
            assert_eq!(s.source(), GpuSource::Nvml);
        }

        /// The real library: simulated on a machine without a driver, NVML
        /// with real readings on one with; `auto` never fails either way.
        #[test]
        fn auto_with_the_real_library_never_fails() {
            let mut s = select(GpuMode::Auto, &spec(), 1, || {
                crate::nvml::RealNvml::init().map(|n| Box::new(n) as Box<dyn NvmlBackend>)
            })
            .expect("auto never fails");
            let samples = s.sample(&EngineLoad::default(), Duration::from_secs(1));
            match s.source() {
                GpuSource::Simulated => assert_eq!(samples.len(), 2),
                GpuSource::Nvml => {
                    assert!(!samples.is_empty());
                    for g in &samples {
                        assert!(g.mem_total_mib > 0 && g.uuid.is_some(), "{g:?}");
                    }
                }
            }
        }

        #[test]
        fn simulated_mode_never_loads_nvml() {
            let s = select(
                GpuMode::Simulated,
                &spec(),
                1,
                || -> Result<Box<dyn NvmlBackend>, NvmlCallError> {
                    panic!("NVML must not be loaded")
                },
            )
            .unwrap();
            assert_eq!(s.source(), GpuSource::Simulated);
        }
    }
}
