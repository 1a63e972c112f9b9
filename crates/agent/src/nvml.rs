//! Real NVIDIA GPUs through NVML (`nvml-wrapper` 0.13, which loads
//! `libnvidia-ml.so` at run time: the agent builds and starts on machines
//! without a driver, where `--gpu auto` falls back to
//! [`SimulatedGpus`](crate::gpu::SimulatedGpus), loudly).
//!
//! The NVML calls the agent makes sit behind [`NvmlBackend`] and
//! [`NvmlDevice`], so the mapping to [`GpuSample`] ([`read_gpu`]) is unit-tested
//! with a fake device; [`RealNvml`] is the thin layer over `nvml-wrapper`.
//! Every call runs on the GPU sampling thread ([`crate::gpu::GpuThread`]),
//! never on the async runtime: a driver that hangs stalls that thread only.
//!
//! A reading NVML refuses (not supported on this GPU — utilisation on a
//! MIG-enabled GPU —, GPU lost, ...) never drops the GPU from the heartbeat
//! (a changing GPU count is rejected by the control plane) and never becomes
//! 0: it is `None`, and is logged once per GPU and figure.

use std::collections::HashSet;
use std::time::Duration;

use gpufleet_proto::{GpuSample, GpuSource, MigDeviceSample};
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{Clock, EccCounter, MemoryError, TemperatureSensor};
use nvml_wrapper::enums::device::SampleValue;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::event::EventSet;
use nvml_wrapper::struct_wrappers::event::EventData;
use nvml_wrapper::structs::device::FieldId;
use nvml_wrapper::Nvml;

use crate::gpu::{EngineLoad, GpuSampler};

/// An NVML call that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NvmlCallError {
    /// This GPU (or this mode of it, e.g. MIG) does not report the figure.
    #[error("not supported")]
    NotSupported,
    /// The GPU fell off the bus or is otherwise inaccessible.
    #[error("GPU is lost")]
    GpuLost,
    /// No such device (an empty MIG slot, an index past the count).
    #[error("not found")]
    NotFound,
    /// Anything else, as the library describes it (cannot load
    /// `libnvidia-ml`, driver/library mismatch, ...).
    #[error("{0}")]
    Other(String),
}

impl From<NvmlError> for NvmlCallError {
    fn from(e: NvmlError) -> Self {
        match e {
            NvmlError::NotSupported => NvmlCallError::NotSupported,
            NvmlError::GpuLost => NvmlCallError::GpuLost,
            NvmlError::NotFound => NvmlCallError::NotFound,
            e => NvmlCallError::Other(e.to_string()),
        }
    }
}

/// Memory of one GPU, in bytes, as `nvmlDeviceGetMemoryInfo_v2` reports it:
/// used + free + reserved = total.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryBytes {
    pub used: u64,
    pub free: u64,
    pub reserved: u64,
    pub total: u64,
}

/// The per-device NVML calls the agent uses. Those a device may lack have a
/// default answer of [`NvmlCallError::NotSupported`].
pub trait NvmlDevice {
    fn name(&self) -> Result<String, NvmlCallError>;
    fn uuid(&self) -> Result<String, NvmlCallError>;
    /// `nvmlDeviceGetUtilizationRates().gpu`, percent (NotSupported under MIG).
    fn gpu_utilization_pct(&self) -> Result<u32, NvmlCallError>;
    fn memory(&self) -> Result<MemoryBytes, NvmlCallError>;
    /// GPU die temperature, °C.
    fn temperature_c(&self) -> Result<u32, NvmlCallError>;
    /// HBM temperature, °C (field `NVML_FI_DEV_MEMORY_TEMP`).
    fn memory_temperature_c(&self) -> Result<u32, NvmlCallError> {
        Err(NvmlCallError::NotSupported)
    }
    /// Board power draw, milliwatts.
    fn power_usage_mw(&self) -> Result<u32, NvmlCallError>;
    /// `nvmlDeviceGetEnforcedPowerLimit`, milliwatts.
    fn enforced_power_limit_mw(&self) -> Result<u32, NvmlCallError>;
    /// `nvmlDeviceGetPowerManagementLimit`, milliwatts.
    fn power_management_limit_mw(&self) -> Result<u32, NvmlCallError> {
        Err(NvmlCallError::NotSupported)
    }
    /// `nvmlDeviceGetTotalEnergyConsumption`, millijoules since the driver loaded.
    fn total_energy_mj(&self) -> Result<u64, NvmlCallError> {
        Err(NvmlCallError::NotSupported)
    }
    /// Current SM clock, MHz.
    fn sm_clock_mhz(&self) -> Result<u32, NvmlCallError>;
    /// Current memory clock, MHz.
    fn mem_clock_mhz(&self) -> Result<u32, NvmlCallError> {
        Err(NvmlCallError::NotSupported)
    }
    /// Uncorrected ECC errors, volatile counter (since the driver loaded).
    fn ecc_uncorrected_volatile(&self) -> Result<u64, NvmlCallError>;
    /// `nvmlDeviceGetCurrentClocksThrottleReasons`: the raw bit mask, every
    /// bit kept (nvml-wrapper's `current_throttle_reasons()` drops the bits
    /// it does not know).
    fn clocks_event_reasons(&self) -> Result<u64, NvmlCallError>;
    /// `nvmlDeviceGetMigMode().current`.
    fn mig_enabled(&self) -> Result<bool, NvmlCallError> {
        Err(NvmlCallError::NotSupported)
    }
    /// How many MIG device slots this GPU has (`nvmlDeviceGetMaxMigDeviceCount`).
    fn mig_slots(&self) -> Result<u32, NvmlCallError> {
        Err(NvmlCallError::NotSupported)
    }
    /// The MIG device in slot `index` (NotFound: an empty slot).
    fn mig_device(&self, _index: u32) -> Result<Box<dyn NvmlDevice + '_>, NvmlCallError> {
        Err(NvmlCallError::NotSupported)
    }
}

/// A critical XID error NVML reported for the GPU at `gpu`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XidEvent {
    pub gpu: u32,
    pub xid: u64,
}

/// The library: how many GPUs, each by index, and their XID events.
pub trait NvmlBackend: Send {
    fn device_count(&self) -> Result<u32, NvmlCallError>;
    fn device(&self, index: u32) -> Result<Box<dyn NvmlDevice + '_>, NvmlCallError>;
    /// Starts watching critical XID errors; the indices of the GPUs watched.
    fn watch_xid(&mut self) -> Vec<u32> {
        Vec::new()
    }
    /// The XID events since the last call (waits at most a millisecond).
    fn poll_xid(&mut self) -> Vec<XidEvent> {
        Vec::new()
    }
}

/// NVML clock-event ("throttle") reason bits (`nvml.h`), with the names the
/// agent reports.
pub const THROTTLE_REASONS: [(u64, &str); 9] = [
    (0x1, "gpu_idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
];

/// Names of the reasons set in `mask`, in bit order; bits this version does
/// not name → `other`.
pub fn throttle_reason_names(mask: u64) -> Vec<String> {
    let mut names = Vec::new();
    let mut known = 0u64;
    for (bit, name) in THROTTLE_REASONS {
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

/// The mask of the named reasons (samples that carry names but no mask:
/// simulated GPUs, older agents).
pub fn throttle_mask(names: &[String]) -> u64 {
    names
        .iter()
        .filter_map(|n| {
            THROTTLE_REASONS
                .iter()
                .find(|(_, name)| name == n)
                .map(|(bit, _)| *bit)
        })
        .fold(0, |a, b| a | b)
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

fn mw_to_w(mw: u32) -> f64 {
    f64::from(mw) / 1000.0
}

/// One GPU's sample from its NVML readings (`last_xid` is filled in by the caller).
pub fn read_gpu(index: u32, dev: &dyn NvmlDevice, log: &mut FailureLog) -> GpuSample {
    let name = log
        .note(index, "name", dev.name())
        .unwrap_or_else(|| "NVIDIA GPU".to_string());
    let uuid = log.note(index, "uuid", dev.uuid());
    let mig_enabled = dev.mig_enabled().ok();
    // Under MIG, NVML answers NotSupported for the whole GPU's utilisation:
    // expected, not worth a warning.
    let util_pct = match dev.gpu_utilization_pct() {
        Err(NvmlCallError::NotSupported) if mig_enabled == Some(true) => None,
        r => log.note(index, "utilization", r),
    }
    .map(|u| f64::from(u.min(100)));
    let mem = log.note(index, "memory", dev.memory());
    let mem_total_mib = mem.map_or(0, |m| m.total / MIB);
    let mem_used_mib = mem.map_or(0, |m| (m.used / MIB).min(mem_total_mib));
    let clocks_event_reasons = log.note(index, "clocks_event_reasons", dev.clocks_event_reasons());
    let mig_devices = if mig_enabled == Some(true) {
        read_mig_devices(index, dev, log)
    } else {
        Vec::new()
    };
    GpuSample {
        index,
        name,
        uuid,
        util_pct,
        mem_used_mib,
        mem_total_mib,
        mem_free_mib: mem.map(|m| (m.free / MIB).min(mem_total_mib)),
        mem_reserved_mib: mem.map(|m| (m.reserved / MIB).min(mem_total_mib)),
        temp_c: log
            .note(index, "temperature", dev.temperature_c())
            .map(f64::from),
        power_w: log
            .note(index, "power_usage", dev.power_usage_mw())
            .map(mw_to_w),
        power_limit_w: log
            .note(index, "enforced_power_limit", dev.enforced_power_limit_mw())
            .map(mw_to_w),
        power_mgmt_limit_w: log
            .note(
                index,
                "power_management_limit",
                dev.power_management_limit_mw(),
            )
            .map(mw_to_w),
        energy_mj: log.note(index, "total_energy", dev.total_energy_mj()),
        sm_clock_mhz: log.note(index, "sm_clock", dev.sm_clock_mhz()),
        mem_clock_mhz: log.note(index, "mem_clock", dev.mem_clock_mhz()),
        mem_temp_c: log
            .note(index, "memory_temperature", dev.memory_temperature_c())
            .map(f64::from),
        ecc_uncorrected: log.note(index, "ecc_uncorrected", dev.ecc_uncorrected_volatile()),
        throttle_reasons: clocks_event_reasons
            .map(throttle_reason_names)
            .unwrap_or_default(),
        clocks_event_reasons,
        last_xid: None,
        mig_enabled,
        mig_devices,
    }
}

/// The MIG devices of a MIG-enabled GPU (empty slots skipped).
fn read_mig_devices(
    parent_index: u32,
    dev: &dyn NvmlDevice,
    log: &mut FailureLog,
) -> Vec<MigDeviceSample> {
    let Some(slots) = log.note(parent_index, "mig_slots", dev.mig_slots()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for mig_index in 0..slots {
        let mig = match dev.mig_device(mig_index) {
            Ok(m) => m,
            Err(NvmlCallError::NotFound) => continue,
            Err(e) => {
                log.note::<()>(parent_index, "mig_device", Err(e));
                continue;
            }
        };
        let mem = mig.memory().ok();
        out.push(MigDeviceSample {
            mig_index,
            parent_index,
            name: mig.name().unwrap_or_else(|_| "MIG device".to_string()),
            uuid: mig.uuid().ok(),
            mem_used_mib: mem.map(|m| m.used / MIB),
            mem_free_mib: mem.map(|m| m.free / MIB),
            mem_total_mib: mem.map(|m| m.total / MIB),
        });
    }
    out
}

/// GPUs read through NVML.
pub struct NvmlGpus {
    backend: Box<dyn NvmlBackend>,
    /// Fixed at start: a GPU that stops answering is reported with unknown
    /// figures, not dropped.
    count: u32,
    log: FailureLog,
    /// Per GPU: the last critical XID seen (0: none yet); `None`: not watched.
    last_xid: Vec<Option<u64>>,
    /// GPUs NVML reported lost at the last sample.
    lost: Vec<u32>,
}

impl NvmlGpus {
    /// Over `backend`, which reported `count` GPUs at start; starts watching
    /// their XID errors.
    pub fn new(mut backend: Box<dyn NvmlBackend>, count: u32) -> Self {
        let watched = backend.watch_xid();
        let last_xid = (0..count)
            .map(|i| watched.contains(&i).then_some(0))
            .collect();
        Self {
            backend,
            count,
            log: FailureLog::default(),
            last_xid,
            lost: Vec::new(),
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
    fn enforced_power_limit_mw(&self) -> Result<u32, NvmlCallError> {
        Err(self.0.clone())
    }
    fn sm_clock_mhz(&self) -> Result<u32, NvmlCallError> {
        Err(self.0.clone())
    }
    fn ecc_uncorrected_volatile(&self) -> Result<u64, NvmlCallError> {
        Err(self.0.clone())
    }
    fn clocks_event_reasons(&self) -> Result<u64, NvmlCallError> {
        Err(self.0.clone())
    }
}

impl GpuSampler for NvmlGpus {
    fn source(&self) -> GpuSource {
        GpuSource::Nvml
    }

    fn sample(&mut self, _load: &EngineLoad, _elapsed: Duration) -> Vec<GpuSample> {
        for XidEvent { gpu, xid } in self.backend.poll_xid() {
            tracing::error!(gpu, xid, "NVML reported a critical XID error");
            if let Some(slot) = self.last_xid.get_mut(gpu as usize) {
                *slot = Some(xid);
            }
        }
        let mut lost = Vec::new();
        let samples = (0..self.count)
            .map(|index| {
                let mut s = match self.backend.device(index) {
                    Ok(dev) => {
                        // A lost GPU answers its handle but no reading.
                        if dev.memory() == Err(NvmlCallError::GpuLost) {
                            lost.push(index);
                        }
                        read_gpu(index, dev.as_ref(), &mut self.log)
                    }
                    Err(e) => {
                        if e == NvmlCallError::GpuLost {
                            lost.push(index);
                        }
                        read_gpu(index, &Unreadable(e), &mut self.log)
                    }
                };
                s.last_xid = self.last_xid.get(index as usize).copied().flatten();
                s
            })
            .collect();
        self.lost = lost;
        samples
    }

    fn fault(&self) -> Option<String> {
        (!self.lost.is_empty()).then(|| {
            let ids: Vec<String> = self.lost.iter().map(u32::to_string).collect();
            format!(
                "NVML reports GPU {} lost (fallen off the bus?)",
                ids.join(", ")
            )
        })
    }
}

/// `nvml-wrapper` itself. The library handle is leaked on purpose: it lives
/// as long as the agent, and the XID event set borrows it.
pub struct RealNvml {
    nvml: &'static Nvml,
    xid: Option<EventSet<'static>>,
}

impl RealNvml {
    /// Loads `libnvidia-ml` and initialises NVML (blocking: call it on the
    /// GPU thread).
    pub fn init() -> Result<Self, NvmlCallError> {
        let nvml: &'static Nvml = Box::leak(Box::new(Nvml::init()?));
        Ok(RealNvml { nvml, xid: None })
    }
}

impl NvmlBackend for RealNvml {
    fn device_count(&self) -> Result<u32, NvmlCallError> {
        Ok(self.nvml.device_count()?)
    }

    fn device(&self, index: u32) -> Result<Box<dyn NvmlDevice + '_>, NvmlCallError> {
        Ok(Box::new(RealDevice(self.nvml.device_by_index(index)?)))
    }

    fn watch_xid(&mut self) -> Vec<u32> {
        let Ok(count) = self.nvml.device_count() else {
            return Vec::new();
        };
        let mut watched = Vec::new();
        let mut set = match self.nvml.create_event_set() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch XID errors: no NVML event set");
                return watched;
            }
        };
        for index in 0..count {
            let Ok(dev) = self.nvml.device_by_index(index) else {
                continue;
            };
            let supported = dev
                .supported_event_types()
                .is_ok_and(|t| t.contains(EventTypes::CRITICAL_XID_ERROR));
            if !supported {
                continue;
            }
            // On failure NVML frees the set: start a fresh one (the GPUs
            // registered so far are then unwatched).
            set = match dev.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
                Ok(s) => {
                    watched.push(index);
                    s
                }
                Err(e) => {
                    tracing::warn!(gpu = index, error = %e.error, "cannot watch this GPU's XID errors");
                    watched.clear();
                    match self.nvml.create_event_set() {
                        Ok(s) => s,
                        Err(_) => return watched,
                    }
                }
            };
        }
        self.xid = Some(set);
        watched
    }

    fn poll_xid(&mut self) -> Vec<XidEvent> {
        let mut out = Vec::new();
        let Some(set) = &self.xid else {
            return out;
        };
        // Drain what is queued; a bounded number per sample.
        for _ in 0..64 {
            match set.wait(1) {
                Ok(EventData {
                    device, event_data, ..
                }) => {
                    let gpu = device.index().unwrap_or(u32::MAX);
                    let xid = match event_data {
                        Some(nvml_wrapper::enums::event::XidError::Value(v)) => v,
                        _ => 999, // "unknown XID" in NVML's catalogue
                    };
                    out.push(XidEvent { gpu, xid });
                }
                Err(_) => break, // Timeout: nothing more queued.
            }
        }
        out
    }
}

struct RealDevice(nvml_wrapper::Device<'static>);

impl NvmlDevice for RealDevice {
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
        // nvml-wrapper 0.13 calls nvmlDeviceGetMemoryInfo_v2.
        let m = self.0.memory_info()?;
        Ok(MemoryBytes {
            used: m.used,
            free: m.free,
            reserved: m.reserved,
            total: m.total,
        })
    }
    fn temperature_c(&self) -> Result<u32, NvmlCallError> {
        Ok(self.0.temperature(TemperatureSensor::Gpu)?)
    }
    fn memory_temperature_c(&self) -> Result<u32, NvmlCallError> {
        use nvml_wrapper::sys_exports::field_id::NVML_FI_DEV_MEMORY_TEMP;
        let mut values = self
            .0
            .field_values_for(&[FieldId(NVML_FI_DEV_MEMORY_TEMP)])?;
        let sample = values.pop().ok_or(NvmlCallError::NotSupported)??;
        match sample.value? {
            SampleValue::U32(v) => Ok(v),
            SampleValue::U64(v) => u32::try_from(v).map_err(|_| NvmlCallError::NotSupported),
            SampleValue::I64(v) => u32::try_from(v).map_err(|_| NvmlCallError::NotSupported),
            SampleValue::F64(v) if v.is_finite() && v >= 0.0 => Ok(v.round() as u32),
            SampleValue::F64(_) => Err(NvmlCallError::NotSupported),
        }
    }
    fn power_usage_mw(&self) -> Result<u32, NvmlCallError> {
        Ok(self.0.power_usage()?)
    }
    fn enforced_power_limit_mw(&self) -> Result<u32, NvmlCallError> {
        Ok(self.0.enforced_power_limit()?)
    }
    fn power_management_limit_mw(&self) -> Result<u32, NvmlCallError> {
        Ok(self.0.power_management_limit()?)
    }
    fn total_energy_mj(&self) -> Result<u64, NvmlCallError> {
        Ok(self.0.total_energy_consumption()?)
    }
    fn sm_clock_mhz(&self) -> Result<u32, NvmlCallError> {
        Ok(self.0.clock_info(Clock::SM)?)
    }
    fn mem_clock_mhz(&self) -> Result<u32, NvmlCallError> {
        Ok(self.0.clock_info(Clock::Memory)?)
    }
    fn ecc_uncorrected_volatile(&self) -> Result<u64, NvmlCallError> {
        Ok(self
            .0
            .total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)?)
    }
    fn clocks_event_reasons(&self) -> Result<u64, NvmlCallError> {
        // The raw call: nvml-wrapper's `current_throttle_reasons()` truncates
        // bits it has no flag for.
        let sym = self
            .0
            .nvml()
            .lib()
            .nvmlDeviceGetCurrentClocksThrottleReasons
            .as_ref()
            .map_err(|e| NvmlCallError::Other(e.to_string()))?;
        let mut mask: std::os::raw::c_ulonglong = 0;
        // SAFETY: the symbol is NVML's, called with a valid device handle
        // (borrowed from a live `Device`) and a pointer to a local u64.
        let code = unsafe { sym(self.0.handle(), &mut mask) };
        nvml_wrapper::error::nvml_try(code)?;
        Ok(mask)
    }
    fn mig_enabled(&self) -> Result<bool, NvmlCallError> {
        Ok(self.0.mig_mode()?.current == 1)
    }
    fn mig_slots(&self) -> Result<u32, NvmlCallError> {
        Ok(self.0.mig_device_count()?)
    }
    fn mig_device(&self, index: u32) -> Result<Box<dyn NvmlDevice + '_>, NvmlCallError> {
        Ok(Box::new(RealDevice(self.0.mig_device_by_index(index)?)))
    }
}

#[cfg(test)]
pub(crate) mod fake {
    use std::sync::{mpsc, Arc, Mutex};

    use super::*;

    /// A GPU whose readings are set by the test; `None` = NVML refuses it
    /// with `missing`.
    #[derive(Debug, Clone)]
    pub struct FakeDevice {
        pub name: Option<String>,
        pub uuid: Option<String>,
        pub util: Option<u32>,
        pub memory: Option<MemoryBytes>,
        pub temp: Option<u32>,
        pub mem_temp: Option<u32>,
        pub power_mw: Option<u32>,
        pub limit_mw: Option<u32>,
        pub mgmt_limit_mw: Option<u32>,
        pub energy_mj: Option<u64>,
        pub sm_clock: Option<u32>,
        pub mem_clock: Option<u32>,
        pub ecc: Option<u64>,
        pub throttle: Option<u64>,
        pub mig: Option<bool>,
        /// MIG slots; `None` = an empty slot.
        pub mig_devices: Vec<Option<FakeDevice>>,
        /// What a refused reading fails with.
        pub missing: NvmlCallError,
    }

    impl FakeDevice {
        pub fn h100(i: u32) -> Self {
            FakeDevice {
                name: Some("NVIDIA H100 80GB HBM3".into()),
                uuid: Some(format!("GPU-0000000{i}-aaaa-bbbb-cccc-dddddddddddd")),
                util: Some(87),
                memory: Some(MemoryBytes {
                    used: 40_000 * MIB + 123,
                    free: 41_000 * MIB,
                    reserved: 559 * MIB,
                    total: 81_559 * MIB,
                }),
                temp: Some(64),
                mem_temp: Some(71),
                power_mw: Some(512_345),
                limit_mw: Some(650_000),
                mgmt_limit_mw: Some(700_000),
                energy_mj: Some(123_456_789),
                sm_clock: Some(1_980),
                mem_clock: Some(2_619),
                ecc: Some(0),
                throttle: Some(0x4),
                mig: Some(false),
                mig_devices: Vec::new(),
                missing: NvmlCallError::NotSupported,
            }
        }

        /// An H100 in MIG mode with two 3g.40gb instances in slots 0 and 2:
        /// NVML gives no utilisation for the GPU.
        pub fn h100_mig(i: u32) -> Self {
            let slice = |n: u32| FakeDevice {
                name: Some("NVIDIA H100 80GB HBM3 MIG 3g.40gb".into()),
                uuid: Some(format!("MIG-{i}-{n}")),
                memory: Some(MemoryBytes {
                    used: 10 * 1024 * MIB,
                    free: 30 * 1024 * MIB,
                    reserved: 0,
                    total: 40 * 1024 * MIB,
                }),
                mig: None,
                ..FakeDevice::lost()
            };
            FakeDevice {
                util: None,
                mig: Some(true),
                mig_devices: vec![Some(slice(0)), None, Some(slice(2))],
                ..FakeDevice::h100(i)
            }
        }

        /// A GPU fallen off the bus: every reading fails with GpuLost.
        pub fn lost() -> Self {
            FakeDevice {
                name: None,
                uuid: None,
                util: None,
                memory: None,
                temp: None,
                mem_temp: None,
                power_mw: None,
                limit_mw: None,
                mgmt_limit_mw: None,
                energy_mj: None,
                sm_clock: None,
                mem_clock: None,
                ecc: None,
                throttle: None,
                mig: None,
                mig_devices: Vec::new(),
                missing: NvmlCallError::GpuLost,
            }
        }
    }

    impl FakeDevice {
        fn get<T: Clone>(&self, v: &Option<T>) -> Result<T, NvmlCallError> {
            v.clone().ok_or_else(|| self.missing.clone())
        }
    }

    impl NvmlDevice for FakeDevice {
        fn name(&self) -> Result<String, NvmlCallError> {
            self.get(&self.name)
        }
        fn uuid(&self) -> Result<String, NvmlCallError> {
            self.get(&self.uuid)
        }
        fn gpu_utilization_pct(&self) -> Result<u32, NvmlCallError> {
            self.get(&self.util)
        }
        fn memory(&self) -> Result<MemoryBytes, NvmlCallError> {
            self.get(&self.memory)
        }
        fn temperature_c(&self) -> Result<u32, NvmlCallError> {
            self.get(&self.temp)
        }
        fn memory_temperature_c(&self) -> Result<u32, NvmlCallError> {
            self.get(&self.mem_temp)
        }
        fn power_usage_mw(&self) -> Result<u32, NvmlCallError> {
            self.get(&self.power_mw)
        }
        fn enforced_power_limit_mw(&self) -> Result<u32, NvmlCallError> {
            self.get(&self.limit_mw)
        }
        fn power_management_limit_mw(&self) -> Result<u32, NvmlCallError> {
            self.get(&self.mgmt_limit_mw)
        }
        fn total_energy_mj(&self) -> Result<u64, NvmlCallError> {
            self.get(&self.energy_mj)
        }
        fn sm_clock_mhz(&self) -> Result<u32, NvmlCallError> {
            self.get(&self.sm_clock)
        }
        fn mem_clock_mhz(&self) -> Result<u32, NvmlCallError> {
            self.get(&self.mem_clock)
        }
        fn ecc_uncorrected_volatile(&self) -> Result<u64, NvmlCallError> {
            self.get(&self.ecc)
        }
        fn clocks_event_reasons(&self) -> Result<u64, NvmlCallError> {
            self.get(&self.throttle)
        }
        fn mig_enabled(&self) -> Result<bool, NvmlCallError> {
            self.get(&self.mig)
        }
        fn mig_slots(&self) -> Result<u32, NvmlCallError> {
            if self.mig == Some(true) {
                Ok(self.mig_devices.len() as u32)
            } else {
                Err(NvmlCallError::NotSupported)
            }
        }
        fn mig_device(&self, index: u32) -> Result<Box<dyn NvmlDevice + '_>, NvmlCallError> {
            match self.mig_devices.get(index as usize) {
                Some(Some(d)) => Ok(Box::new(d.clone())),
                _ => Err(NvmlCallError::NotFound),
            }
        }
    }

    /// A library with these GPUs; `Err` from `device_count` when `broken`.
    /// With `hang`, every `device()` call blocks until the test sends on (or
    /// drops) the other end: a hung driver.
    #[derive(Default)]
    pub struct FakeNvml {
        pub devices: Vec<Option<FakeDevice>>,
        pub broken: bool,
        /// GPUs whose XID errors can be watched.
        pub xid_watchable: Vec<u32>,
        /// XID events the next `poll_xid` returns.
        pub xid_queue: Arc<Mutex<Vec<XidEvent>>>,
        pub hang: Option<Arc<Mutex<mpsc::Receiver<()>>>>,
    }

    impl FakeNvml {
        pub fn with(devices: Vec<Option<FakeDevice>>) -> Self {
            FakeNvml {
                devices,
                ..FakeNvml::default()
            }
        }
    }

    impl NvmlBackend for FakeNvml {
        fn device_count(&self) -> Result<u32, NvmlCallError> {
            if self.broken {
                return Err(NvmlCallError::Other("Uninitialized".into()));
            }
            Ok(self.devices.len() as u32)
        }
        fn device(&self, index: u32) -> Result<Box<dyn NvmlDevice + '_>, NvmlCallError> {
            if let Some(gate) = &self.hang {
                if let Ok(rx) = gate.lock() {
                    let _ = rx.recv();
                }
            }
            match self.devices.get(index as usize) {
                Some(Some(d)) => Ok(Box::new(d.clone())),
                _ => Err(NvmlCallError::GpuLost),
            }
        }
        fn watch_xid(&mut self) -> Vec<u32> {
            self.xid_watchable.clone()
        }
        fn poll_xid(&mut self) -> Vec<XidEvent> {
            self.xid_queue
                .lock()
                .map(|mut q| std::mem::take(&mut *q))
                .unwrap_or_default()
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
        assert_eq!(s.util_pct, Some(87.0));
        assert_eq!(s.mem_used_mib, 40_000, "bytes → MiB, rounded down");
        assert_eq!(s.mem_total_mib, 81_559);
        assert_eq!(
            s.mem_free_mib,
            Some(41_000),
            "NVML's free, not total − used"
        );
        assert_eq!(s.mem_reserved_mib, Some(559));
        assert_eq!(s.temp_c, Some(64.0));
        assert_eq!(s.mem_temp_c, Some(71.0));
        let power = s.power_w.expect("power");
        assert!((power - 512.345).abs() < 1e-9, "mW → W: {power}");
        assert_eq!(s.power_limit_w, Some(650.0), "the enforced limit");
        assert_eq!(s.power_mgmt_limit_w, Some(700.0), "the management limit");
        assert_eq!(s.energy_mj, Some(123_456_789));
        assert_eq!(s.sm_clock_mhz, Some(1_980));
        assert_eq!(s.mem_clock_mhz, Some(2_619));
        assert_eq!(s.ecc_uncorrected, Some(0));
        assert_eq!(s.clocks_event_reasons, Some(0x4));
        assert_eq!(s.throttle_reasons, vec!["sw_power_cap"]);
        assert_eq!(s.mig_enabled, Some(false));
        assert!(s.mig_devices.is_empty());
        assert!(log.seen.is_empty(), "{:?}", log.seen);
    }

    #[test]
    fn not_supported_readings_are_unknown_never_zero() {
        let dev = FakeDevice {
            name: None,
            uuid: None,
            util: Some(250),
            memory: Some(MemoryBytes {
                used: 30 * MIB,
                free: 0,
                reserved: 0,
                total: 20 * MIB,
            }),
            ..FakeDevice::lost()
        };
        let dev = FakeDevice {
            missing: NvmlCallError::NotSupported,
            ..dev
        };
        let mut log = FailureLog::default();
        let s = read_gpu(0, &dev, &mut log);
        assert_eq!(s.name, "NVIDIA GPU");
        assert_eq!(s.uuid, None);
        assert_eq!(s.util_pct, Some(100.0), "clamped to a percentage");
        assert_eq!(s.mem_used_mib, 20, "never above the total");
        assert_eq!((s.temp_c, s.power_w, s.power_limit_w), (None, None, None));
        assert_eq!(
            (s.power_mgmt_limit_w, s.energy_mj, s.mem_temp_c),
            (None, None, None)
        );
        assert_eq!(
            (s.sm_clock_mhz, s.mem_clock_mhz, s.ecc_uncorrected),
            (None, None, None)
        );
        assert_eq!(s.clocks_event_reasons, None, "unknown, not mask 0");
        assert!(s.throttle_reasons.is_empty());
        // Each failure is remembered once per GPU and figure.
        assert!(log.seen.contains(&(0, "temperature")));
        let before = log.seen.len();
        let _ = read_gpu(0, &dev, &mut log);
        assert_eq!(log.seen.len(), before);
    }

    #[test]
    fn a_mig_gpu_has_no_utilisation_and_lists_its_instances() {
        let mut log = FailureLog::default();
        let s = read_gpu(1, &FakeDevice::h100_mig(1), &mut log);
        assert_eq!(
            s.util_pct, None,
            "NVML gives none under MIG: unknown, not 0 %"
        );
        assert_eq!(s.mig_enabled, Some(true));
        assert!(
            !log.seen.contains(&(1, "utilization")),
            "expected under MIG: not a warning"
        );
        assert_eq!(s.temp_c, Some(64.0), "the rest is still read");
        let ids: Vec<(u32, u32)> = s
            .mig_devices
            .iter()
            .map(|m| (m.parent_index, m.mig_index))
            .collect();
        assert_eq!(ids, vec![(1, 0), (1, 2)], "empty slots skipped");
        let m = &s.mig_devices[0];
        assert_eq!(m.uuid.as_deref(), Some("MIG-1-0"));
        assert_eq!(m.name, "NVIDIA H100 80GB HBM3 MIG 3g.40gb");
        assert_eq!(
            (m.mem_used_mib, m.mem_free_mib, m.mem_total_mib),
            (Some(10_240), Some(30_720), Some(40_960))
        );
    }

    #[test]
    fn throttle_reason_bits_have_names_and_unknown_bits_are_kept() {
        assert!(throttle_reason_names(0).is_empty());
        assert_eq!(throttle_reason_names(0x1), vec!["gpu_idle"]);
        assert_eq!(
            throttle_reason_names(0x4 | 0x40 | 0x8),
            vec!["sw_power_cap", "hw_slowdown", "hw_thermal_slowdown"]
        );
        assert_eq!(throttle_reason_names(0x1000), vec!["other"]);
        assert_eq!(throttle_reason_names(0x1004), vec!["sw_power_cap", "other"]);
        let mut log = FailureLog::default();
        let dev = FakeDevice {
            throttle: Some(0x1004),
            ..FakeDevice::h100(0)
        };
        let s = read_gpu(0, &dev, &mut log);
        assert_eq!(
            s.clocks_event_reasons,
            Some(0x1004),
            "raw mask, no bit dropped"
        );
        assert_eq!(throttle_mask(&s.throttle_reasons), 0x4);
    }

    #[test]
    fn a_lost_gpu_keeps_its_place_with_unknown_figures_and_is_a_fault() {
        let backend = FakeNvml::with(vec![
            Some(FakeDevice::h100(0)),
            None,
            Some(FakeDevice::lost()),
        ]);
        let mut gpus = NvmlGpus::new(Box::new(backend), 3);
        assert_eq!(gpus.source(), GpuSource::Nvml);
        assert_eq!(gpus.fault(), None);
        let s = gpus.sample(&EngineLoad::default(), Duration::from_secs(1));
        assert_eq!(
            s.len(),
            3,
            "the GPU count never changes under the control plane"
        );
        assert_eq!(s[0].util_pct, Some(87.0));
        for lost in &s[1..] {
            assert_eq!(
                (lost.util_pct, lost.temp_c, lost.power_w, lost.power_limit_w),
                (None, None, None, None),
                "0 °C and 0 W would be lies: {lost:?}"
            );
            assert_eq!((lost.mem_total_mib, lost.mem_free_mib), (0, None));
        }
        assert_eq!(s[1].index, 1);
        let fault = gpus.fault().expect("a lost GPU is a fault");
        assert!(fault.contains("GPU 1, 2 lost"), "{fault}");
    }

    #[test]
    fn xid_errors_are_kept_per_gpu() {
        let backend = FakeNvml {
            xid_watchable: vec![0],
            ..FakeNvml::with(vec![Some(FakeDevice::h100(0)), Some(FakeDevice::h100(1))])
        };
        let queue = backend.xid_queue.clone();
        let mut gpus = NvmlGpus::new(Box::new(backend), 2);
        let s = gpus.sample(&EngineLoad::default(), Duration::from_secs(1));
        assert_eq!(s[0].last_xid, Some(0), "watched, none seen");
        assert_eq!(s[1].last_xid, None, "not watched: unknown");
        queue.lock().unwrap().push(XidEvent { gpu: 0, xid: 79 });
        let s = gpus.sample(&EngineLoad::default(), Duration::from_secs(1));
        assert_eq!(s[0].last_xid, Some(79));
        let s = gpus.sample(&EngineLoad::default(), Duration::from_secs(1));
        assert_eq!(s[0].last_xid, Some(79), "the last one stays");
    }
}
