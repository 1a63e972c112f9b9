//! GPU figures. [`GpuSampler`] hides where they come from: NVML on real
//! machines ([`NvmlGpus`](crate::nvml::NvmlGpus)), [`SimulatedGpus`]
//! everywhere else; [`select`] picks one per `--gpu`.

use std::time::Duration;

use gpufleet_domain::GpuSpec;
use gpufleet_proto::{GpuSample, GpuSource};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use tokio::sync::oneshot;

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
/// fake); it is not called in `simulated` mode. Blocking: it runs on the GPU
/// thread ([`GpuThread::start`]).
///
/// `auto` without a usable driver falls back to simulated GPUs with a
/// warning (a cloud machine should run `--gpu nvml`, which refuses to start
/// instead); the fallback is marked `gpu_source="simulated"` in every series
/// and in the console.
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
        (GpuMode::Nvml, Err(e)) => Err(AgentError::Nvml(e.to_string())),
        (_, outcome) => {
            let why = match outcome {
                Ok(_) => "NVML reports no GPU".to_string(),
                Err(e) => e.to_string(),
            };
            tracing::warn!(reason = %why, gpus = spec.count, model = %spec.model, "GPU FIGURES ARE SIMULATED: --gpu auto found no usable NVIDIA driver; every GPU series is marked gpu_source=\"simulated\" (run with --gpu nvml on GPU machines)");
            Ok(simulated())
        }
    }
}

/// Why GPU figures are missing from a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GpuFault {
    /// The sample did not come back within the deadline: an NVML call is
    /// stuck (a hung driver). The GPU thread stays blocked; later samples
    /// are not queued behind it.
    #[error("GPU sampling did not answer within {deadline_ms} ms (NVML call stuck: hung driver?)")]
    Hung { deadline_ms: u64 },
    /// The sampler answered but a GPU is unreadable (fell off the bus).
    #[error("{0}")]
    Reported(String),
    /// The GPU thread ended (it panicked).
    #[error("the GPU sampling thread is gone")]
    ThreadGone,
}

/// One sampling through [`GpuThread`]: the samples (empty when the thread
/// did not answer: GPUs unreadable) and what went wrong, if anything.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GpuReading {
    pub gpus: Vec<GpuSample>,
    pub fault: Option<GpuFault>,
}

struct Request {
    load: EngineLoad,
    elapsed: Duration,
    reply: oneshot::Sender<(Vec<GpuSample>, Option<String>)>,
}

/// The GPU sampler on a dedicated OS thread, so that no NVML call (start-up
/// included) ever runs on the async runtime, and a call that hangs costs a
/// [`GpuFault::Hung`] in the heartbeat instead of the heartbeat itself.
pub struct GpuThread {
    requests: std::sync::mpsc::Sender<Request>,
    source: GpuSource,
    deadline: Duration,
    /// The request that missed its deadline, still unanswered.
    pending: Option<oneshot::Receiver<(Vec<GpuSample>, Option<String>)>>,
}

impl GpuThread {
    /// Starts the thread and the sampler [`select`] picks on it. NVML's
    /// start-up gets `start_deadline`: past it, `auto` falls back to
    /// simulated GPUs and `nvml` fails. Each later sample gets `deadline`.
    pub async fn start(
        mode: GpuMode,
        spec: &GpuSpec,
        seed: u64,
        load_nvml: impl FnOnce() -> Result<Box<dyn NvmlBackend>, NvmlCallError> + Send + 'static,
        start_deadline: Duration,
        deadline: Duration,
    ) -> Result<Self, AgentError> {
        match Self::spawn(
            mode,
            spec.clone(),
            seed,
            load_nvml,
            start_deadline,
            deadline,
        )
        .await
        {
            Err(AgentError::NvmlStartTimeout { .. }) if mode == GpuMode::Auto => {
                tracing::warn!(deadline_ms = start_deadline.as_millis() as u64, "GPU FIGURES ARE SIMULATED: NVML did not start in time (hung driver?); falling back (--gpu auto)");
                Self::spawn(
                    GpuMode::Simulated,
                    spec.clone(),
                    seed,
                    || Err(NvmlCallError::NotSupported),
                    start_deadline,
                    deadline,
                )
                .await
            }
            other => other,
        }
    }

    async fn spawn(
        mode: GpuMode,
        spec: GpuSpec,
        seed: u64,
        load_nvml: impl FnOnce() -> Result<Box<dyn NvmlBackend>, NvmlCallError> + Send + 'static,
        start_deadline: Duration,
        deadline: Duration,
    ) -> Result<Self, AgentError> {
        let (ready_tx, ready_rx) = oneshot::channel();
        let (requests, rx) = std::sync::mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("gpu-sampler".into())
            .spawn(move || {
                let mut sampler = match select(mode, &spec, seed, load_nvml) {
                    Ok(s) => {
                        let _ = ready_tx.send(Ok(s.source()));
                        s
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Ok(req) = rx.recv() {
                    let gpus = sampler.sample(&req.load, req.elapsed);
                    let fault = sampler.fault();
                    let _ = req.reply.send((gpus, fault));
                }
            })
            .map_err(AgentError::GpuThread)?;
        let source = match tokio::time::timeout(start_deadline, ready_rx).await {
            Ok(Ok(ready)) => ready?,
            Ok(Err(_)) => {
                return Err(AgentError::Nvml(
                    "the GPU thread ended during start-up".into(),
                ))
            }
            Err(_) => {
                return Err(AgentError::NvmlStartTimeout {
                    deadline_ms: start_deadline.as_millis() as u64,
                })
            }
        };
        Ok(Self {
            requests,
            source,
            deadline,
            pending: None,
        })
    }

    pub fn source(&self) -> GpuSource {
        self.source
    }

    /// One sample of every GPU, or a fault within the deadline. While an
    /// earlier sample is still stuck, no new one is asked for.
    pub async fn sample(&mut self, load: &EngineLoad, elapsed: Duration) -> GpuReading {
        let hung = GpuFault::Hung {
            deadline_ms: self.deadline.as_millis() as u64,
        };
        if let Some(pending) = &mut self.pending {
            match pending.try_recv() {
                Ok(_) => self.pending = None, // Late: discarded, the thread is free.
                Err(oneshot::error::TryRecvError::Empty) => {
                    return GpuReading {
                        gpus: Vec::new(),
                        fault: Some(hung),
                    }
                }
                Err(oneshot::error::TryRecvError::Closed) => {
                    return GpuReading {
                        gpus: Vec::new(),
                        fault: Some(GpuFault::ThreadGone),
                    }
                }
            }
        }
        let (reply, mut rx) = oneshot::channel();
        let sent = self.requests.send(Request {
            load: *load,
            elapsed,
            reply,
        });
        if sent.is_err() {
            return GpuReading {
                gpus: Vec::new(),
                fault: Some(GpuFault::ThreadGone),
            };
        }
        match tokio::time::timeout(self.deadline, &mut rx).await {
            Ok(Ok((gpus, fault))) => GpuReading {
                gpus,
                fault: fault.map(GpuFault::Reported),
            },
            Ok(Err(_)) => GpuReading {
                gpus: Vec::new(),
                fault: Some(GpuFault::ThreadGone),
            },
            Err(_) => {
                self.pending = Some(rx);
                GpuReading {
                    gpus: Vec::new(),
                    fault: Some(hung),
                }
            }
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
    /// A fault seen at the last sample (a GPU fallen off the bus), if any.
    fn fault(&self) -> Option<String> {
        None
    }
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
            let clocks_event_reasons = crate::nvml::throttle_mask(&throttle_reasons);
            out.push(GpuSample {
                index: index as u32,
                name: self.spec.model.clone(),
                uuid: None,
                util_pct: Some(util_pct),
                mem_used_mib,
                mem_total_mib: total_mib,
                mem_free_mib: Some(total_mib - mem_used_mib),
                mem_reserved_mib: Some(0),
                temp_c: Some(gpu.temp_c),
                power_w: Some(power_w),
                power_limit_w: Some(limit_w),
                power_mgmt_limit_w: Some(limit_w),
                sm_clock_mhz: Some(clock.round() as u32),
                ecc_uncorrected: Some(0),
                throttle_reasons,
                clocks_event_reasons: Some(clocks_event_reasons),
                ..GpuSample::default()
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
                assert!((0.0..=100.0).contains(&s.util_pct.unwrap()), "{s:?}");
                assert!(s.mem_used_mib <= s.mem_total_mib, "{s:?}");
                assert!(
                    (AMBIENT_TEMP_C..=AMBIENT_TEMP_C + 50.0).contains(&s.temp_c.unwrap()),
                    "{s:?}"
                );
                assert!(
                    s.power_w.unwrap() >= 0.15 * 72.0 - 1e-9 && s.power_w.unwrap() <= 72.0,
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
            first.util_pct.unwrap() < 50.0,
            "moves smoothly, not at once: {first:?}"
        );
        let mut last = first.clone();
        for _ in 0..30 {
            last = g.sample(&busy, Duration::from_secs(1)).remove(0);
        }
        assert!(last.util_pct.unwrap() > 90.0, "{last:?}");
        assert!(
            last.temp_c.unwrap() > first.temp_c.unwrap() + 10.0,
            "{last:?}"
        );
        assert!(
            last.temp_c.unwrap() < AMBIENT_TEMP_C + 0.5 * last.util_pct.unwrap(),
            "thermal lag: {last:?}"
        );
        assert!(last.mem_used_mib > (24_576.0 * 0.9) as u64, "{last:?}");
        assert!(last.power_w.unwrap() > 0.9 * 72.0, "{last:?}");
        let idle = g
            .sample(&EngineLoad::default(), Duration::from_secs(60))
            .remove(0);
        assert_eq!(idle.mem_used_mib, 0, "nothing loaded, no weights in memory");
        assert!(idle.util_pct.unwrap() < 10.0, "{idle:?}");
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
            assert!(
                (s.util_pct.unwrap() - 45.0).abs() <= NOISE_PCT + 1e-6,
                "{s:?}"
            );
            if let Some(p) = prev {
                assert!(
                    (s.util_pct.unwrap() - p).abs() <= 2.0 * NOISE_PCT + 1e-6,
                    "smooth: {p} → {s:?}"
                );
            }
            prev = Some(s.util_pct.unwrap());
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
        assert!(s.util_pct.unwrap() > 85.0, "{s:?}");
        // ...temperature, 20 s after the step, has covered about 1 - 1/e of the way.
        let full = TEMP_PER_UTIL_PCT * MAX_TARGET_UTIL_PCT;
        let covered = (s.temp_c.unwrap() - AMBIENT_TEMP_C) / full;
        assert!((0.5..0.7).contains(&covered), "covered {covered}: {s:?}");
    }

    #[test]
    fn power_clock_and_reasons_follow_load() {
        let mut g = SimulatedGpus::new(GpuSpec { count: 1, ..spec() }, 9);
        let idle = g.sample(&load(0.0, 0.0), Duration::from_secs(60)).remove(0);
        assert!(
            idle.power_w.unwrap() <= IDLE_POWER_SHARE * 72.0 + 0.1 * 72.0,
            "{idle:?}"
        );
        assert!(
            idle.power_w.unwrap() >= IDLE_POWER_SHARE * 72.0,
            "idle floor: {idle:?}"
        );
        let busy = g
            .sample(&load(40.0, 10.0), Duration::from_secs(60))
            .remove(0);
        assert!(
            busy.power_w.unwrap() > 0.9 * 72.0 && busy.power_w.unwrap() <= 72.0,
            "{busy:?}"
        );
        assert!(busy.sm_clock_mhz > idle.sm_clock_mhz, "{idle:?} {busy:?}");
        assert!(!busy.throttle_reasons.contains(&"gpu_idle".to_string()));
        assert_eq!(busy.ecc_uncorrected, Some(0));
        let quiet = g
            .sample(&EngineLoad::default(), Duration::from_secs(600))
            .remove(0);
        assert!(
            quiet.util_pct.unwrap() <= BASE_UTIL_PCT + NOISE_PCT + 1e-9,
            "{quiet:?}"
        );
    }

    mod selection {
        use std::sync::{mpsc, Arc, Mutex};

        use super::*;
        use crate::nvml::fake::{FakeDevice, FakeNvml};

        fn fake(n: u32) -> Result<Box<dyn NvmlBackend>, NvmlCallError> {
            Ok(Box::new(FakeNvml::with(
                (0..n).map(|i| Some(FakeDevice::h100(i))).collect(),
            )))
        }
        fn missing() -> Result<Box<dyn NvmlBackend>, NvmlCallError> {
            Err(NvmlCallError::Other(
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
                    broken: true,
                    ..FakeNvml::default()
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

        const START: Duration = Duration::from_secs(10);

        #[tokio::test]
        async fn the_thread_samples_nvml_off_the_runtime() {
            let mut t = GpuThread::start(GpuMode::Nvml, &spec(), 1, || fake(2), START, START)
                .await
                .unwrap();
            assert_eq!(t.source(), GpuSource::Nvml);
            let r = t
                .sample(&EngineLoad::default(), Duration::from_secs(1))
                .await;
            assert_eq!(r.fault, None);
            assert_eq!(r.gpus.len(), 2);
            let e = GpuThread::start(GpuMode::Nvml, &spec(), 1, missing, START, START)
                .await
                .err()
                .expect("nvml mode without NVML");
            assert!(matches!(e, AgentError::Nvml(_)), "{e}");
        }

        #[tokio::test]
        async fn a_hung_call_is_a_fault_within_the_deadline_and_recovers() {
            let (release, gate) = mpsc::channel::<()>();
            let gate = Arc::new(Mutex::new(gate));
            let backend = move || -> Result<Box<dyn NvmlBackend>, NvmlCallError> {
                Ok(Box::new(FakeNvml {
                    hang: Some(gate),
                    ..FakeNvml::with(vec![Some(FakeDevice::h100(0))])
                }))
            };
            let deadline = Duration::from_millis(200);
            let mut t = GpuThread::start(GpuMode::Nvml, &spec(), 1, backend, START, deadline)
                .await
                .unwrap();
            let started = std::time::Instant::now();
            let r = t
                .sample(&EngineLoad::default(), Duration::from_secs(1))
                .await;
            assert_eq!(r.fault, Some(GpuFault::Hung { deadline_ms: 200 }));
            assert!(r.gpus.is_empty(), "no stale or invented figures");
            // Still stuck: answered at once, nothing queued behind the stuck call.
            let r = t
                .sample(&EngineLoad::default(), Duration::from_secs(1))
                .await;
            assert_eq!(r.fault, Some(GpuFault::Hung { deadline_ms: 200 }));
            assert!(started.elapsed() < Duration::from_secs(5));
            // The driver comes back: the stuck call (and the next) return.
            release.send(()).unwrap();
            release.send(()).unwrap();
            let until = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                let r = t
                    .sample(&EngineLoad::default(), Duration::from_secs(1))
                    .await;
                if r.fault.is_none() {
                    assert_eq!(r.gpus.len(), 1);
                    assert_eq!(r.gpus[0].util_pct, Some(87.0));
                    break;
                }
                assert!(std::time::Instant::now() < until, "never recovered: {r:?}");
            }
            drop(release);
        }

        #[tokio::test]
        async fn a_hung_start_falls_back_in_auto_and_fails_in_nvml_mode() {
            let hung = |gate: Arc<Mutex<mpsc::Receiver<()>>>| {
                move || -> Result<Box<dyn NvmlBackend>, NvmlCallError> {
                    let _ = gate.lock().map(|g| g.recv());
                    fake(1)
                }
            };
            let short = Duration::from_millis(100);
            let (_hold, gate) = mpsc::channel::<()>();
            let gate = Arc::new(Mutex::new(gate));
            let t = GpuThread::start(GpuMode::Auto, &spec(), 1, hung(gate.clone()), short, short)
                .await
                .unwrap();
            assert_eq!(t.source(), GpuSource::Simulated);
            let (_hold2, gate2) = mpsc::channel::<()>();
            let e = GpuThread::start(
                GpuMode::Nvml,
                &spec(),
                1,
                hung(Arc::new(Mutex::new(gate2))),
                short,
                short,
            )
            .await
            .err()
            .expect("nvml mode");
            assert!(matches!(e, AgentError::NvmlStartTimeout { .. }), "{e}");
        }
    }
}
