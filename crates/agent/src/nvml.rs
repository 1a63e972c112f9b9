//! Real NVIDIA GPUs through NVML (`nvml-wrapper`, which loads
//! `libnvidia-ml.so` at run time: the agent builds and starts on machines
//! without a driver, where it falls back to [`SimulatedGpus`](crate::gpu::SimulatedGpus)).
//!
//! The few NVML calls the agent makes sit behind [`NvmlBackend`] and
//! [`NvmlDevice`], so the mapping to [`GpuSample`] ([`read_gpu`]) is unit-tested
//! with a fake device; [`RealNvml`] is the thin layer over `nvml-wrapper`.
//!
//! A reading NVML refuses (not supported on this GPU, GPU lost, ...) never
//! drops the GPU from the heartbeat — a changing GPU count is rejected by the
//! control plane — it becomes 0 for the required figures and `None` for the
//! optional ones, and is logged once per GPU and figure.

use std::collections::HashSet;
use std::time::Duration;

use gpufleet_proto::{GpuSample, GpuSource};
use nvml_wrapper::enum_wrappers::device::{Clock, EccCounter, MemoryError, TemperatureSensor};
use nvml_wrapper::Nvml;

use crate::gpu::{EngineLoad, GpuSampler};

/// An NVML call that failed, as text (the library's error, or a fake's).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NvmlCallError(pub String);

impl From<nvml_wrapper::error::NvmlError> for NvmlCallError {
    fn from(e: nvml_wrapper::error::NvmlError) -> Self {
        NvmlCallError(e.to_string())
    }
}

/// Memory of one GPU, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryBytes {
    pub used: u64,
    pub total: u64,
}

/// The per-GPU NVML calls the agent uses.
pub trait NvmlDevice {
    fn name(&self) -> Result<String, NvmlCallError>;
    fn uuid(&self) -> Result<String, NvmlCallError>;
    /// `nvmlDeviceGetUtilizationRates().gpu`, percent.
    fn gpu_utilization_pct(&self) -> Result<u32, NvmlCallError>;
    fn memory(&self) -> Result<MemoryBytes, NvmlCallError>;
    /// GPU die temperature, °C.
    fn temperature_c(&self) -> Result<u32, NvmlCallError>;
    /// Board power draw, milliwatts.
    fn power_usage_mw(&self) -> Result<u32, NvmlCallError>;
    /// The power limit in force, milliwatts.
    fn power_limit_mw(&self) -> Result<u32, NvmlCallError>;
    /// Current SM clock, MHz.
    fn sm_clock_mhz(&self) -> Result<u32, NvmlCallError>;
    /// Uncorrected ECC errors, volatile counter (since the driver loaded).
    fn ecc_uncorrected_volatile(&self) -> Result<u64, NvmlCallError>;
    /// `nvmlDeviceGetCurrentClocksThrottleReasons` bit mask.
    fn throttle_reasons_mask(&self) -> Result<u64, NvmlCallError>;
}

/// The library: how many GPUs, and each by index.
pub trait NvmlBackend: Send {
    fn device_count(&self) -> Result<u32, NvmlCallError>;
    fn device(&self, index: u32) -> Result<Box<dyn NvmlDevice + '_>, NvmlCallError>;
}

/// NVML clock-event ("throttle") reason bits (`nvml.h`), with the names the
/// agent reports.
pub const THROTTLE_REASONS: [(u64, &str); 10] = [
    (0x1, "gpu_idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
    // Bits NVML may add later are reported, not dropped.
    (0, "other"),
];

/// Names of the reasons set in `mask`, in bit order; unknown bits → `other`.
pub fn throttle_reason_names(mask: u64) -> Vec<String> {
    let mut names = Vec::new();
    let mut known = 0u64;
    for (bit, name) in THROTTLE_REASONS {
        if bit == 0 {
            continue;
        }
        known |= bit;
        if mask & bit != 0 {
            names.push(name.to_string());
        }
    }
    if mask & !known != 0 {
        names.push("other".to_string());
    }
    names
}

/// Remembers which (GPU, figure) failures were logged, so each is logged once.
#[derive(Debug, Default)]
pub struct FailureLog {
    seen: HashSet<(u32, &'static str)>,
}

impl FailureLog {
    fn note<T>(
        &mut self,
        index: u32,
        figure: &'static str,
        r: Result<T, NvmlCallError>,
    ) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                if self.seen.insert((index, figure)) {
                    tracing::warn!(gpu = index, figure, error = %e, "NVML cannot read this figure; reporting it as unknown");
                }
                None
            }
        }
    }
}

const MIB: u64 = 1024 * 1024;

/// One GPU's sample from its NVML readings.
pub fn read_gpu(index: u32, dev: &dyn NvmlDevice, log: &mut FailureLog) -> GpuSample {
    let name = log
        .note(index, "name", dev.name())
        .unwrap_or_else(|| "NVIDIA GPU".to_string());
    let uuid = log.note(index, "uuid", dev.uuid());
    let util_pct = log
        .note(index, "utilization", dev.gpu_utilization_pct())
        .map_or(0.0, |u| f64::from(u.min(100)));
    let mem = log
        .note(index, "memory", dev.memory())
        .unwrap_or(MemoryBytes { used: 0, total: 0 });
    let mem_total_mib = mem.total / MIB;
    let mem_used_mib = (mem.used / MIB).min(mem_total_mib);
    let temp_c = log
        .note(index, "temperature", dev.temperature_c())
        .map_or(0.0, f64::from);
    let power_w = log
        .note(index, "power_usage", dev.power_usage_mw())
        .map_or(0.0, |mw| f64::from(mw) / 1000.0);
    let power_limit_w = log
        .note(index, "power_limit", dev.power_limit_mw())
        .map_or(0.0, |mw| f64::from(mw) / 1000.0);
    let sm_clock_mhz = log.note(index, "sm_clock", dev.sm_clock_mhz());
    let ecc_uncorrected = log.note(index, "ecc_uncorrected", dev.ecc_uncorrected_volatile());
    let throttle_reasons = log
        .note(index, "throttle_reasons", dev.throttle_reasons_mask())
        .map(throttle_reason_names)
        .unwrap_or_default();
    GpuSample {
        index,
        name,
        uuid,
        util_pct,
        mem_used_mib,
        mem_total_mib,
        temp_c,
        power_w,
        power_limit_w,
        sm_clock_mhz,
        ecc_uncorrected,
        throttle_reasons,
    }
}

/// GPUs read through NVML.
pub struct NvmlGpus {
    backend: Box<dyn NvmlBackend>,
    /// Fixed at start: a GPU that stops answering is reported with zeros, not dropped.
    count: u32,
    log: FailureLog,
}

impl NvmlGpus {
    /// Over `backend`, which reported `count` GPUs at start.
    pub fn new(backend: Box<dyn NvmlBackend>, count: u32) -> Self {
        Self {
            backend,
            count,
            log: FailureLog::default(),
        }
    }

    pub fn count(&self) -> u32 {
        self.count
    }
}

/// Stands in for a GPU NVML no longer hands out.
struct Unreadable(NvmlCallError);

impl NvmlDevice for Unreadable {
    fn name(&self) -> Result<String, NvmlCallError> {
        Err(self.0.clone())
    }
    fn uuid(&self) -> Result<String, NvmlCallError> {
        Err(self.0.clone())
    }
    fn gpu_utilization_pct(&self) -> Result<u32, NvmlCallError> {
        Err(self.0.clone())
    }
    fn memory(&self) -> Result<MemoryBytes, NvmlCallError> {
        Err(self.0.clone())
    }
    fn temperature_c(&self) -> Result<u32, NvmlCallError> {
        Err(self.0.clone())
    }
    fn power_usage_mw(&self) -> Result<u32, NvmlCallError> {
        Err(self.0.clone())
    }
    fn power_limit_mw(&self) -> Result<u32, NvmlCallError> {
        Err(self.0.clone())
    }
    fn sm_clock_mhz(&self) -> Result<u32, NvmlCallError> {
        Err(self.0.clone())
    }
    fn ecc_uncorrected_volatile(&self) -> Result<u64, NvmlCallError> {
        Err(self.0.clone())
    }
    fn throttle_reasons_mask(&self) -> Result<u64, NvmlCallError> {
        Err(self.0.clone())
    }
}

impl GpuSampler for NvmlGpus {
    fn source(&self) -> GpuSource {
        GpuSource::Nvml
    }

    fn sample(&mut self, _load: &EngineLoad, _elapsed: Duration) -> Vec<GpuSample> {
        (0..self.count)
            .map(|index| match self.backend.device(index) {
                Ok(dev) => read_gpu(index, dev.as_ref(), &mut self.log),
                Err(e) => read_gpu(index, &Unreadable(e), &mut self.log),
            })
            .collect()
    }
}

/// `nvml-wrapper` itself.
pub struct RealNvml(Nvml);

impl RealNvml {
    /// Loads `libnvidia-ml` and initialises NVML.
    pub fn init() -> Result<Self, NvmlCallError> {
        Ok(RealNvml(Nvml::init()?))
    }
}

impl NvmlBackend for RealNvml {
    fn device_count(&self) -> Result<u32, NvmlCallError> {
        Ok(self.0.device_count()?)
    }

    fn device(&self, index: u32) -> Result<Box<dyn NvmlDevice + '_>, NvmlCallError> {
        Ok(Box::new(RealDevice(self.0.device_by_index(index)?)))
    }
}

struct RealDevice<'a>(nvml_wrapper::Device<'a>);

impl NvmlDevice for RealDevice<'_> {
    fn name(&self) -> Result<String, NvmlCallError> {
        Ok(self.0.name()?)
    }
    fn uuid(&self) -> Result<String, NvmlCallError> {
        Ok(self.0.uuid()?)
    }
    fn gpu_utilization_pct(&self) -> Result<u32, NvmlCallError> {
        Ok(self.0.utilization_rates()?.gpu)
    }
    fn memory(&self) -> Result<MemoryBytes, NvmlCallError> {
        let m = self.0.memory_info()?;
        Ok(MemoryBytes {
            used: m.used,
            total: m.total,
        })
    }
    fn temperature_c(&self) -> Result<u32, NvmlCallError> {
        Ok(self.0.temperature(TemperatureSensor::Gpu)?)
    }
    fn power_usage_mw(&self) -> Result<u32, NvmlCallError> {
        Ok(self.0.power_usage()?)
    }
    fn power_limit_mw(&self) -> Result<u32, NvmlCallError> {
        match self.0.enforced_power_limit() {
            Ok(mw) => Ok(mw),
            Err(_) => Ok(self.0.power_management_limit()?),
        }
    }
    fn sm_clock_mhz(&self) -> Result<u32, NvmlCallError> {
        Ok(self.0.clock_info(Clock::SM)?)
    }
    fn ecc_uncorrected_volatile(&self) -> Result<u64, NvmlCallError> {
        Ok(self
            .0
            .total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)?)
    }
    fn throttle_reasons_mask(&self) -> Result<u64, NvmlCallError> {
        Ok(self.0.current_throttle_reasons()?.bits())
    }
}

#[cfg(test)]
pub(crate) mod fake {
    use super::*;

    /// A GPU whose readings are set by the test; `None` = NVML refuses it.
    #[derive(Debug, Clone)]
    pub struct FakeDevice {
        pub name: Option<String>,
        pub uuid: Option<String>,
        pub util: Option<u32>,
        pub memory: Option<MemoryBytes>,
        pub temp: Option<u32>,
        pub power_mw: Option<u32>,
        pub limit_mw: Option<u32>,
        pub sm_clock: Option<u32>,
        pub ecc: Option<u64>,
        pub throttle: Option<u64>,
    }

    impl FakeDevice {
        pub fn h100(i: u32) -> Self {
            FakeDevice {
                name: Some("NVIDIA H100 80GB HBM3".into()),
                uuid: Some(format!("GPU-0000000{i}-aaaa-bbbb-cccc-dddddddddddd")),
                util: Some(87),
                memory: Some(MemoryBytes {
                    used: 40_000 * MIB + 123,
                    total: 81_559 * MIB,
                }),
                temp: Some(64),
                power_mw: Some(512_345),
                limit_mw: Some(700_000),
                sm_clock: Some(1_980),
                ecc: Some(0),
                throttle: Some(0x4),
            }
        }
    }

    fn get<T: Clone>(v: &Option<T>) -> Result<T, NvmlCallError> {
        v.clone()
            .ok_or_else(|| NvmlCallError("Not_Supported".into()))
    }

    impl NvmlDevice for FakeDevice {
        fn name(&self) -> Result<String, NvmlCallError> {
            get(&self.name)
        }
        fn uuid(&self) -> Result<String, NvmlCallError> {
            get(&self.uuid)
        }
        fn gpu_utilization_pct(&self) -> Result<u32, NvmlCallError> {
            get(&self.util)
        }
        fn memory(&self) -> Result<MemoryBytes, NvmlCallError> {
            get(&self.memory)
        }
        fn temperature_c(&self) -> Result<u32, NvmlCallError> {
            get(&self.temp)
        }
        fn power_usage_mw(&self) -> Result<u32, NvmlCallError> {
            get(&self.power_mw)
        }
        fn power_limit_mw(&self) -> Result<u32, NvmlCallError> {
            get(&self.limit_mw)
        }
        fn sm_clock_mhz(&self) -> Result<u32, NvmlCallError> {
            get(&self.sm_clock)
        }
        fn ecc_uncorrected_volatile(&self) -> Result<u64, NvmlCallError> {
            get(&self.ecc)
        }
        fn throttle_reasons_mask(&self) -> Result<u64, NvmlCallError> {
            get(&self.throttle)
        }
    }

    /// A library with these GPUs; `Err` from `device_count` when `broken`.
    pub struct FakeNvml {
        pub devices: Vec<Option<FakeDevice>>,
        pub broken: bool,
    }

    impl NvmlBackend for FakeNvml {
        fn device_count(&self) -> Result<u32, NvmlCallError> {
            if self.broken {
                return Err(NvmlCallError("Uninitialized".into()));
            }
            Ok(self.devices.len() as u32)
        }
        fn device(&self, index: u32) -> Result<Box<dyn NvmlDevice + '_>, NvmlCallError> {
            match self.devices.get(index as usize) {
                Some(Some(d)) => Ok(Box::new(d.clone())),
                _ => Err(NvmlCallError("GpuLost".into())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::*;
    use super::*;

    #[test]
    fn maps_every_reading() {
        let mut log = FailureLog::default();
        let s = read_gpu(3, &FakeDevice::h100(3), &mut log);
        assert_eq!(s.index, 3);
        assert_eq!(s.name, "NVIDIA H100 80GB HBM3");
        assert_eq!(
            s.uuid.as_deref(),
            Some("GPU-00000003-aaaa-bbbb-cccc-dddddddddddd")
        );
        assert_eq!(s.util_pct, 87.0);
        assert_eq!(s.mem_used_mib, 40_000, "bytes → MiB, rounded down");
        assert_eq!(s.mem_total_mib, 81_559);
        assert_eq!(s.temp_c, 64.0);
        assert!((s.power_w - 512.345).abs() < 1e-9, "mW → W: {}", s.power_w);
        assert_eq!(s.power_limit_w, 700.0);
        assert_eq!(s.sm_clock_mhz, Some(1_980));
        assert_eq!(s.ecc_uncorrected, Some(0));
        assert_eq!(s.throttle_reasons, vec!["sw_power_cap"]);
    }

    #[test]
    fn unsupported_readings_become_unknown_not_nonsense() {
        let dev = FakeDevice {
            name: None,
            uuid: None,
            util: Some(250),
            memory: Some(MemoryBytes {
                used: 30 * MIB,
                total: 20 * MIB,
            }),
            temp: None,
            power_mw: None,
            limit_mw: None,
            sm_clock: None,
            ecc: None,
            throttle: None,
        };
        let mut log = FailureLog::default();
        let s = read_gpu(0, &dev, &mut log);
        assert_eq!(s.name, "NVIDIA GPU");
        assert_eq!(s.uuid, None);
        assert_eq!(s.util_pct, 100.0, "clamped to a percentage");
        assert_eq!(s.mem_used_mib, 20, "never above the total");
        assert_eq!((s.temp_c, s.power_w, s.power_limit_w), (0.0, 0.0, 0.0));
        assert_eq!((s.sm_clock_mhz, s.ecc_uncorrected), (None, None));
        assert!(s.throttle_reasons.is_empty());
        // Each failure is remembered once per GPU and figure.
        assert!(log.seen.contains(&(0, "temperature")));
        let before = log.seen.len();
        let _ = read_gpu(0, &dev, &mut log);
        assert_eq!(log.seen.len(), before);
    }

    #[test]
    fn throttle_reason_bits_have_names() {
        assert!(throttle_reason_names(0).is_empty());
        assert_eq!(throttle_reason_names(0x1), vec!["gpu_idle"]);
        assert_eq!(
            throttle_reason_names(0x4 | 0x40 | 0x8),
            vec!["sw_power_cap", "hw_slowdown", "hw_thermal_slowdown"]
        );
        assert_eq!(throttle_reason_names(0x1000), vec!["other"]);
    }

    #[test]
    fn a_lost_gpu_keeps_its_place() {
        let backend = FakeNvml {
            devices: vec![Some(FakeDevice::h100(0)), None],
            broken: false,
        };
        let mut gpus = NvmlGpus::new(Box::new(backend), 2);
        assert_eq!(gpus.source(), GpuSource::Nvml);
        let s = gpus.sample(&EngineLoad::default(), Duration::from_secs(1));
        assert_eq!(
            s.len(),
            2,
            "the GPU count never changes under the control plane"
        );
        assert_eq!(s[0].util_pct, 87.0);
        assert_eq!(s[1].index, 1);
        assert_eq!((s[1].util_pct, s[1].mem_total_mib), (0.0, 0));
    }
}
