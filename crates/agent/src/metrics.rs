//! The agent's `GET /metrics`, Prometheus text format 0.0.4, written by hand
//! (a few families; no registry needed):
//!
//! - **GPUs** under the DCGM exporter's names and labels (`gpu`, `UUID`,
//!   `device` = `nvidia<N>`, `modelName`, `Hostname`), so the public DCGM
//!   Grafana dashboard works unchanged: `DCGM_FI_DEV_GPU_UTIL` (%),
//!   `DCGM_FI_DEV_FB_USED` / `DCGM_FI_DEV_FB_FREE` (MiB),
//!   `DCGM_FI_DEV_GPU_TEMP` (°C), `DCGM_FI_DEV_POWER_USAGE` (W),
//!   `DCGM_FI_DEV_POWER_MGMT_LIMIT` (W), and where known
//!   `DCGM_FI_DEV_SM_CLOCK` (MHz), `DCGM_FI_DEV_ECC_DBE_VOL_TOTAL`,
//!   `DCGM_FI_DEV_CLOCK_THROTTLE_REASONS` (NVML bit mask). All are gauges, as
//!   dcgm-exporter declares them, except that the ECC count is declared a gauge
//!   too (a counter must end in `_total`, lower case, for promtool).
//!   Figures are those of the latest heartbeat sample (one per heartbeat
//!   interval), so a scrape never disturbs the simulated GPUs' state.
//! - **Host** under node-exporter names, read at scrape time:
//!   `node_load1/5/15`, `node_memory_MemTotal_bytes`,
//!   `node_memory_MemAvailable_bytes`, `node_filesystem_size_bytes` and
//!   `node_filesystem_avail_bytes` (`device`, `fstype`, `mountpoint`),
//!   `node_network_receive_bytes_total` / `..._transmit_bytes_total`
//!   (`device`), `node_cpu_seconds_total` (`cpu`, `mode`; from `/proc/stat`).
//! - **The agent**: `gpufleet_agent_heartbeats_sent_total`,
//!   `gpufleet_agent_heartbeats_failed_total`,
//!   `gpufleet_agent_engine_restarts_total`, `gpufleet_agent_engine_status`
//!   (1 for the current status, 0 for the others), `gpufleet_agent_info`,
//!   `gpufleet_agent_uptime_seconds`.
//!
//! `promtool check metrics` parses it cleanly; its linter objects only to the
//! camel case that the upstream names themselves carry ([`UPSTREAM_LINT`]).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use gpufleet_proto::{EngineStatus, GpuSample, GpuSource, MigDeviceSample};
use sysinfo::{Disks, Networks, System};

/// promtool lint findings that come with the upstream names dashboards need
/// (`modelName` is dcgm-exporter's label, `MemTotal`/`MemAvailable` are
/// node-exporter's): (metric family, message). Anything else is a real problem.
pub const UPSTREAM_LINT: [(&str, &str); 3] = [
    (
        "DCGM_FI_DEV_",
        "label names should be written in 'snake_case' not 'camelCase'",
    ),
    (
        "node_memory_MemTotal_bytes",
        "metric names should be written in 'snake_case' not 'camelCase'",
    ),
    (
        "node_memory_MemAvailable_bytes",
        "metric names should be written in 'snake_case' not 'camelCase'",
    ),
];

/// Whether a line of promtool's lint output is one of [`UPSTREAM_LINT`].
pub fn is_upstream_lint(line: &str) -> bool {
    let line = line.trim();
    line.is_empty()
        || UPSTREAM_LINT
            .iter()
            .any(|(family, msg)| line.starts_with(family) && line.ends_with(msg))
}

/// Counters the agent's tasks bump, and the latest GPU sample.
#[derive(Debug, Default)]
pub struct AgentStats {
    pub heartbeats_sent: AtomicU64,
    pub heartbeats_failed: AtomicU64,
    /// GPU faults begun (a sample past its deadline, a GPU lost).
    pub gpu_faults: AtomicU64,
    /// Whether the latest GPU sample failed.
    pub gpu_fault: AtomicBool,
    gpu_fault_reason: Mutex<Option<String>>,
    latest_gpus: Mutex<Vec<GpuSample>>,
}

impl AgentStats {
    pub fn sent(&self) {
        self.heartbeats_sent.fetch_add(1, Ordering::Relaxed);
    }
    pub fn failed(&self) {
        self.heartbeats_failed.fetch_add(1, Ordering::Relaxed);
    }
    /// The latest GPU sample, and whether it came with a fault (the
    /// figures it lacks are then absent from `/metrics`, not stale).
    pub fn set_gpus(&self, gpus: &[GpuSample], fault: Option<String>) {
        if let Ok(mut g) = self.latest_gpus.lock() {
            *g = gpus.to_vec();
        }
        let faulty = fault.is_some();
        if let Ok(mut r) = self.gpu_fault_reason.lock() {
            *r = fault;
        }
        if faulty && !self.gpu_fault.swap(true, Ordering::Relaxed) {
            self.gpu_faults.fetch_add(1, Ordering::Relaxed);
        } else if !faulty {
            self.gpu_fault.store(false, Ordering::Relaxed);
        }
    }
    /// The GPU fault in force, if any.
    pub fn gpu_fault_reason(&self) -> Option<String> {
        self.gpu_fault_reason.lock().ok().and_then(|r| r.clone())
    }
    pub fn gpus(&self) -> Vec<GpuSample> {
        self.latest_gpus
            .lock()
            .map(|g| g.clone())
            .unwrap_or_default()
    }
}

/// Host figures for the node-exporter families.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostFigures {
    pub load: [f64; 3],
    pub mem_total_bytes: u64,
    pub mem_available_bytes: u64,
    pub filesystems: Vec<Filesystem>,
    /// (interface, received bytes, transmitted bytes) since boot.
    pub networks: Vec<(String, u64, u64)>,
    /// Per CPU, seconds in each mode since boot.
    pub cpus: Vec<CpuTimes>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Filesystem {
    pub device: String,
    pub fstype: String,
    pub mountpoint: String,
    pub size_bytes: u64,
    pub avail_bytes: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CpuTimes {
    pub cpu: u32,
    /// (mode, seconds), node-exporter's mode names.
    pub modes: Vec<(&'static str, f64)>,
}

/// Reads the host figures (blocking: call from `spawn_blocking`).
pub struct HostCollector {
    sys: System,
    disks: Disks,
    networks: Networks,
}

impl Default for HostCollector {
    fn default() -> Self {
        Self::new()
    }
}

impl HostCollector {
    pub fn new() -> Self {
        Self {
            sys: System::new(),
            disks: Disks::new_with_refreshed_list(),
            networks: Networks::new_with_refreshed_list(),
        }
    }

    pub fn collect(&mut self) -> HostFigures {
        self.sys.refresh_memory();
        self.disks.refresh(true);
        self.networks.refresh(true);
        let load = System::load_average();
        let mut filesystems: Vec<Filesystem> = Vec::new();
        for d in self.disks.list() {
            let mountpoint = d.mount_point().to_string_lossy().into_owned();
            if filesystems.iter().any(|f| f.mountpoint == mountpoint) {
                continue;
            }
            filesystems.push(Filesystem {
                device: d.name().to_string_lossy().into_owned(),
                fstype: d.file_system().to_string_lossy().into_owned(),
                mountpoint,
                size_bytes: d.total_space(),
                avail_bytes: d.available_space(),
            });
        }
        let mut networks: Vec<(String, u64, u64)> = self
            .networks
            .list()
            .iter()
            .map(|(name, d)| (name.clone(), d.total_received(), d.total_transmitted()))
            .collect();
        networks.sort();
        let cpus = std::fs::read_to_string("/proc/stat")
            .map(|text| parse_proc_stat(&text, clock_ticks_per_second()))
            .unwrap_or_default();
        HostFigures {
            load: [load.one, load.five, load.fifteen],
            mem_total_bytes: self.sys.total_memory(),
            mem_available_bytes: self.sys.available_memory(),
            filesystems,
            networks,
            cpus,
        }
    }
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

/// node-exporter's modes, in `/proc/stat`'s column order.
const CPU_MODES: [&str; 8] = [
    "user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal",
];

/// The `cpuN ...` lines of `/proc/stat`, in seconds.
pub fn parse_proc_stat(text: &str, ticks_per_second: f64) -> Vec<CpuTimes> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let cpu = fields.next()?.strip_prefix("cpu")?.parse::<u32>().ok()?;
            let modes = CPU_MODES
                .iter()
                .zip(fields)
                .filter_map(|(mode, v)| Some((*mode, v.parse::<f64>().ok()? / ticks_per_second)))
                .collect();
            Some(CpuTimes { cpu, modes })
        })
        .collect()
}

/// What the agent knows about itself when scraped.
#[derive(Debug, Clone)]
pub struct AgentFigures {
    pub hostname: String,
    pub version: String,
    pub instance_id: String,
    pub model: String,
    pub gpu_source: GpuSource,
    pub uptime_secs: f64,
    pub heartbeats_sent: u64,
    pub heartbeats_failed: u64,
    pub engine_status: EngineStatus,
    pub engine_restarts: u32,
    /// GPU faults begun so far, and the one in force (its description).
    pub gpu_faults: u64,
    pub gpu_fault: Option<String>,
}

/// A text-format writer: one family at a time, `# HELP` and `# TYPE` first.
struct Writer {
    out: String,
}

impl Writer {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", format_value(value));
    }
}

fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_string()
    } else if v == f64::INFINITY {
        "+Inf".to_string()
    } else if v == f64::NEG_INFINITY {
        "-Inf".to_string()
    } else {
        format!("{v}")
    }
}

/// One DCGM family: a value per GPU where `value` knows it.
type GpuFigure = fn(&GpuSample) -> Option<f64>;

/// The DCGM families the agent exports: (name, help, value). An unknown
/// value leaves the series out (never 0).
pub const DCGM_FAMILIES: [(&str, &str, GpuFigure); 16] = [
    ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", |g| {
        g.util_pct
    }),
    (
        "DCGM_FI_DEV_FB_USED",
        "Framebuffer memory used (in MiB).",
        |g| (g.mem_total_mib > 0).then_some(g.mem_used_mib as f64),
    ),
    (
        "DCGM_FI_DEV_FB_FREE",
        "Framebuffer memory free (in MiB).",
        |g| g.mem_free_mib.map(|v| v as f64),
    ),
    (
        "DCGM_FI_DEV_FB_RESERVED",
        "Framebuffer memory reserved (in MiB).",
        |g| g.mem_reserved_mib.map(|v| v as f64),
    ),
    ("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", |g| {
        g.temp_c
    }),
    (
        "DCGM_FI_DEV_MEMORY_TEMP",
        "Memory temperature (in C).",
        |g| g.mem_temp_c,
    ),
    ("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", |g| {
        g.power_w
    }),
    (
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "Total energy consumption since boot (in mJ).",
        |g| g.energy_mj.map(|v| v as f64),
    ),
    (
        "DCGM_FI_DEV_POWER_MGMT_LIMIT",
        "Power management limit (in W).",
        |g| g.power_mgmt_limit_w,
    ),
    (
        "DCGM_FI_DEV_ENFORCED_POWER_LIMIT",
        "Effective power limit that the driver enforces (in W).",
        |g| g.power_limit_w,
    ),
    (
        "DCGM_FI_DEV_SM_CLOCK",
        "SM clock frequency (in MHz).",
        |g| g.sm_clock_mhz.map(f64::from),
    ),
    (
        "DCGM_FI_DEV_MEM_CLOCK",
        "Memory clock frequency (in MHz).",
        |g| g.mem_clock_mhz.map(f64::from),
    ),
    (
        "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
        "Total number of double-bit (uncorrected) volatile ECC errors.",
        |g| g.ecc_uncorrected.map(|n| n as f64),
    ),
    (
        "DCGM_FI_DEV_XID_ERRORS",
        "Value of the last XID error encountered.",
        |g| g.last_xid.map(|v| v as f64),
    ),
    (
        "DCGM_FI_DEV_CLOCKS_EVENT_REASONS",
        "Current clock event reasons (NVML bit mask; DCGM 3.3+ name of field 112).",
        |g| g.clocks_event_reasons.map(|m| m as f64),
    ),
    (
        "DCGM_FI_DEV_MIG_MODE",
        "MIG mode (1 enabled, 0 disabled).",
        |g| g.mig_enabled.map(|on| if on { 1.0 } else { 0.0 }),
    ),
];

fn source_label(s: GpuSource) -> &'static str {
    match s {
        GpuSource::Nvml => "nvml",
        GpuSource::Simulated => "simulated",
    }
}

/// The figures NVML gives per MIG device: memory only.
fn mig_figure(family: &str, m: &MigDeviceSample) -> Option<f64> {
    match family {
        "DCGM_FI_DEV_FB_USED" => m.mem_used_mib.map(|v| v as f64),
        "DCGM_FI_DEV_FB_FREE" => m.mem_free_mib.map(|v| v as f64),
        _ => None,
    }
}

/// `3g.40gb` from `NVIDIA H100 80GB HBM3 MIG 3g.40gb`.
fn mig_profile(name: &str) -> &str {
    name.rsplit(' ').next().unwrap_or(name)
}

const ENGINE_STATUSES: [(EngineStatus, &str); 4] = [
    (EngineStatus::Stopped, "stopped"),
    (EngineStatus::Starting, "starting"),
    (EngineStatus::Ready, "ready"),
    (EngineStatus::Crashed, "crashed"),
];

/// The whole exposition.
pub fn render(agent: &AgentFigures, gpus: &[GpuSample], host: &HostFigures) -> String {
    let mut w = Writer { out: String::new() };

    // GPUs, DCGM exporter style; every series says where its figures come from.
    let source = source_label(agent.gpu_source);
    for (name, help, figure) in DCGM_FAMILIES {
        let values: Vec<(&GpuSample, f64)> = gpus
            .iter()
            .filter_map(|g| figure(g).map(|v| (g, v)))
            .collect();
        // MIG devices, each its own series beside its parent's (`GPU_I_ID`).
        let mig: Vec<(&GpuSample, &MigDeviceSample, f64)> = gpus
            .iter()
            .flat_map(|g| g.mig_devices.iter().map(move |m| (g, m)))
            .filter_map(|(g, m)| mig_figure(name, m).map(|v| (g, m, v)))
            .collect();
        if values.is_empty() && mig.is_empty() {
            continue;
        }
        w.family(name, "gauge", help);
        for (g, v) in values {
            let gpu = g.index.to_string();
            let device = format!("nvidia{}", g.index);
            w.sample(
                name,
                &[
                    ("gpu", &gpu),
                    ("UUID", g.uuid.as_deref().unwrap_or("")),
                    ("device", &device),
                    ("modelName", &g.name),
                    ("Hostname", &agent.hostname),
                    ("gpu_source", source),
                ],
                v,
            );
        }
        for (g, m, v) in mig {
            let gpu = g.index.to_string();
            let device = format!("nvidia{}", g.index);
            let gi = m.mig_index.to_string();
            w.sample(
                name,
                &[
                    ("gpu", &gpu),
                    ("UUID", g.uuid.as_deref().unwrap_or("")),
                    ("device", &device),
                    ("modelName", &g.name),
                    ("Hostname", &agent.hostname),
                    ("GPU_I_ID", &gi),
                    ("GPU_I_PROFILE", mig_profile(&m.name)),
                    ("mig_uuid", m.uuid.as_deref().unwrap_or("")),
                    ("gpu_source", source),
                ],
                v,
            );
        }
    }
    if agent.gpu_fault.is_some() || agent.gpu_faults > 0 {
        w.family(
            "gpufleet_agent_gpu_fault",
            "gauge",
            "1 while GPU figures cannot be read (an NVML call past its deadline, a GPU lost); the GPU series are then absent.",
        );
        w.sample(
            "gpufleet_agent_gpu_fault",
            &[("reason", agent.gpu_fault.as_deref().unwrap_or(""))],
            if agent.gpu_fault.is_some() { 1.0 } else { 0.0 },
        );
    }

    // Host, node-exporter style.
    for (i, suffix) in ["1", "5", "15"].iter().enumerate() {
        let name = format!("node_load{suffix}");
        w.family(&name, "gauge", &format!("{suffix}m load average."));
        w.sample(&name, &[], host.load[i]);
    }
    w.family(
        "node_memory_MemTotal_bytes",
        "gauge",
        "Memory information field MemTotal_bytes.",
    );
    w.sample(
        "node_memory_MemTotal_bytes",
        &[],
        host.mem_total_bytes as f64,
    );
    w.family(
        "node_memory_MemAvailable_bytes",
        "gauge",
        "Memory information field MemAvailable_bytes.",
    );
    w.sample(
        "node_memory_MemAvailable_bytes",
        &[],
        host.mem_available_bytes as f64,
    );
    if !host.filesystems.is_empty() {
        for (name, help, pick) in [
            (
                "node_filesystem_size_bytes",
                "Filesystem size in bytes.",
                (|f: &Filesystem| f.size_bytes) as fn(&Filesystem) -> u64,
            ),
            (
                "node_filesystem_avail_bytes",
                "Filesystem space available to non-root users in bytes.",
                |f: &Filesystem| f.avail_bytes,
            ),
        ] {
            w.family(name, "gauge", help);
            for f in &host.filesystems {
                w.sample(
                    name,
                    &[
                        ("device", &f.device),
                        ("fstype", &f.fstype),
                        ("mountpoint", &f.mountpoint),
                    ],
                    pick(f) as f64,
                );
            }
        }
    }
    if !host.networks.is_empty() {
        w.family(
            "node_network_receive_bytes_total",
            "counter",
            "Network device statistic receive_bytes.",
        );
        for (dev, rx, _) in &host.networks {
            w.sample(
                "node_network_receive_bytes_total",
                &[("device", dev)],
                *rx as f64,
            );
        }
        w.family(
            "node_network_transmit_bytes_total",
            "counter",
            "Network device statistic transmit_bytes.",
        );
        for (dev, _, tx) in &host.networks {
            w.sample(
                "node_network_transmit_bytes_total",
                &[("device", dev)],
                *tx as f64,
            );
        }
    }
    if !host.cpus.is_empty() {
        w.family(
            "node_cpu_seconds_total",
            "counter",
            "Seconds the CPUs spent in each mode.",
        );
        for c in &host.cpus {
            let cpu = c.cpu.to_string();
            for (mode, secs) in &c.modes {
                w.sample(
                    "node_cpu_seconds_total",
                    &[("cpu", &cpu), ("mode", mode)],
                    *secs,
                );
            }
        }
    }

    // The agent itself.
    w.family(
        "gpufleet_agent_info",
        "gauge",
        "The agent: version, instance, model and where its GPU figures come from (always 1).",
    );
    w.sample(
        "gpufleet_agent_info",
        &[
            ("version", &agent.version),
            ("instance_id", &agent.instance_id),
            ("model", &agent.model),
            ("gpu_source", source),
        ],
        1.0,
    );
    w.family(
        "gpufleet_agent_uptime_seconds",
        "gauge",
        "Seconds since the agent started.",
    );
    w.sample("gpufleet_agent_uptime_seconds", &[], agent.uptime_secs);
    w.family(
        "gpufleet_agent_heartbeats_sent_total",
        "counter",
        "Heartbeats the control plane accepted.",
    );
    w.sample(
        "gpufleet_agent_heartbeats_sent_total",
        &[],
        agent.heartbeats_sent as f64,
    );
    w.family(
        "gpufleet_agent_heartbeats_failed_total",
        "counter",
        "Heartbeats that could not be delivered or were refused.",
    );
    w.sample(
        "gpufleet_agent_heartbeats_failed_total",
        &[],
        agent.heartbeats_failed as f64,
    );
    w.family(
        "gpufleet_agent_gpu_faults_total",
        "counter",
        "GPU faults begun since the agent started.",
    );
    w.sample(
        "gpufleet_agent_gpu_faults_total",
        &[],
        agent.gpu_faults as f64,
    );
    w.family(
        "gpufleet_agent_engine_restarts_total",
        "counter",
        "Times the agent restarted the inference engine.",
    );
    w.sample(
        "gpufleet_agent_engine_restarts_total",
        &[],
        f64::from(agent.engine_restarts),
    );
    w.family(
        "gpufleet_agent_engine_status",
        "gauge",
        "The inference engine's status: 1 for the current one, 0 for the others.",
    );
    for (status, name) in ENGINE_STATUSES {
        let v = if status == agent.engine_status {
            1.0
        } else {
            0.0
        };
        w.sample("gpufleet_agent_engine_status", &[("status", name)], v);
    }
    w.out
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpufleet_test_support::promtool::{assert_metrics_pass, check_metrics};

    pub(crate) fn agent() -> AgentFigures {
        AgentFigures {
            hostname: "node-1".into(),
            version: "0.1.0".into(),
            instance_id: "0190c5b2-0000-7000-8000-000000000001".into(),
            model: "gpufleet/sim-small".into(),
            gpu_source: GpuSource::Nvml,
            uptime_secs: 12.5,
            heartbeats_sent: 7,
            heartbeats_failed: 1,
            engine_status: EngineStatus::Ready,
            engine_restarts: 2,
            gpu_faults: 0,
            gpu_fault: None,
        }
    }

    fn gpu(index: u32) -> GpuSample {
        GpuSample {
            index,
            name: "NVIDIA H100 80GB HBM3".into(),
            uuid: Some(format!("GPU-{index}")),
            util_pct: Some(87.0),
            mem_used_mib: 40_000,
            mem_total_mib: 81_559,
            mem_free_mib: Some(41_000),
            mem_reserved_mib: Some(559),
            temp_c: Some(64.0),
            power_w: Some(512.5),
            power_limit_w: Some(650.0),
            power_mgmt_limit_w: Some(700.0),
            energy_mj: Some(123_456_789),
            sm_clock_mhz: Some(1_980),
            mem_clock_mhz: Some(2_619),
            mem_temp_c: Some(71.0),
            ecc_uncorrected: Some(0),
            throttle_reasons: vec!["sw_power_cap".into(), "hw_slowdown".into()],
            clocks_event_reasons: Some(0x100c),
            last_xid: Some(0),
            mig_enabled: Some(false),
            mig_devices: Vec::new(),
        }
    }

    fn host() -> HostFigures {
        HostFigures {
            load: [0.5, 0.25, 0.125],
            mem_total_bytes: 16 << 30,
            mem_available_bytes: 8 << 30,
            filesystems: vec![Filesystem {
                device: "/dev/sda1".into(),
                fstype: "ext4".into(),
                mountpoint: "/".into(),
                size_bytes: 100 << 30,
                avail_bytes: 40 << 30,
            }],
            networks: vec![("eth0".into(), 1000, 2000), ("lo".into(), 5, 5)],
            cpus: parse_proc_stat("cpu  1 2 3 4\ncpu0 100 0 50 1000 2 0 1 0 0 0\n", 100.0),
        }
    }

    #[test]
    fn dcgm_names_and_labels() {
        let text = render(&agent(), &[gpu(0), gpu(1)], &host());
        for line in [
            r#"DCGM_FI_DEV_GPU_UTIL{gpu="1",UUID="GPU-1",device="nvidia1",modelName="NVIDIA H100 80GB HBM3",Hostname="node-1",gpu_source="nvml"} 87"#,
            r#"DCGM_FI_DEV_FB_USED{gpu="0",UUID="GPU-0",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",Hostname="node-1",gpu_source="nvml"} 40000"#,
            r#"DCGM_FI_DEV_FB_FREE{gpu="0",UUID="GPU-0",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",Hostname="node-1",gpu_source="nvml"} 41000"#,
            r#"DCGM_FI_DEV_FB_RESERVED{gpu="0",UUID="GPU-0",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",Hostname="node-1",gpu_source="nvml"} 559"#,
            r#"DCGM_FI_DEV_POWER_USAGE{gpu="0",UUID="GPU-0",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",Hostname="node-1",gpu_source="nvml"} 512.5"#,
            r#"DCGM_FI_DEV_POWER_MGMT_LIMIT{gpu="0",UUID="GPU-0",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",Hostname="node-1",gpu_source="nvml"} 700"#,
            r#"DCGM_FI_DEV_ENFORCED_POWER_LIMIT{gpu="0",UUID="GPU-0",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",Hostname="node-1",gpu_source="nvml"} 650"#,
            r#"DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{gpu="0",UUID="GPU-0",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",Hostname="node-1",gpu_source="nvml"} 123456789"#,
            r#"DCGM_FI_DEV_SM_CLOCK{gpu="0",UUID="GPU-0",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",Hostname="node-1",gpu_source="nvml"} 1980"#,
            r#"DCGM_FI_DEV_MEM_CLOCK{gpu="0",UUID="GPU-0",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",Hostname="node-1",gpu_source="nvml"} 2619"#,
            r#"DCGM_FI_DEV_MEMORY_TEMP{gpu="0",UUID="GPU-0",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",Hostname="node-1",gpu_source="nvml"} 71"#,
            r#"DCGM_FI_DEV_ECC_DBE_VOL_TOTAL{gpu="0",UUID="GPU-0",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",Hostname="node-1",gpu_source="nvml"} 0"#,
            r#"DCGM_FI_DEV_XID_ERRORS{gpu="0",UUID="GPU-0",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",Hostname="node-1",gpu_source="nvml"} 0"#,
            r#"DCGM_FI_DEV_CLOCKS_EVENT_REASONS{gpu="0",UUID="GPU-0",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",Hostname="node-1",gpu_source="nvml"} 4108"#,
            r#"DCGM_FI_DEV_MIG_MODE{gpu="0",UUID="GPU-0",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",Hostname="node-1",gpu_source="nvml"} 0"#,
            "node_load1 0.5",
            "node_memory_MemTotal_bytes 17179869184",
            r#"node_filesystem_avail_bytes{device="/dev/sda1",fstype="ext4",mountpoint="/"} 42949672960"#,
            r#"node_network_transmit_bytes_total{device="eth0"} 2000"#,
            r#"node_cpu_seconds_total{cpu="0",mode="idle"} 10"#,
            r#"node_cpu_seconds_total{cpu="0",mode="system"} 0.5"#,
            "gpufleet_agent_heartbeats_sent_total 7",
            "gpufleet_agent_heartbeats_failed_total 1",
            "gpufleet_agent_engine_restarts_total 2",
            r#"gpufleet_agent_engine_status{status="ready"} 1"#,
            r#"gpufleet_agent_engine_status{status="crashed"} 0"#,
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line}\n---\n{text}"
            );
        }
        assert_eq!(
            text.matches("# TYPE DCGM_FI_DEV_GPU_UTIL gauge").count(),
            1,
            "one TYPE per family"
        );
    }

    #[test]
    fn unknown_figures_are_left_out_never_zero() {
        // A GPU fallen off the bus: nothing known but its place.
        let lost = GpuSample {
            index: 0,
            name: "NVIDIA GPU".into(),
            ..GpuSample::default()
        };
        // A MIG-enabled GPU: everything but utilisation.
        let mig = GpuSample {
            util_pct: None,
            mig_enabled: Some(true),
            ..gpu(1)
        };
        let text = render(&agent(), &[lost, mig], &HostFigures::default());
        for (name, _, _) in DCGM_FAMILIES {
            assert!(
                !text.contains(&format!("{name}{{gpu=\"0\"")),
                "{name} of the lost GPU\n{text}"
            );
        }
        assert!(!text.contains("DCGM_FI_DEV_GPU_UTIL"), "{text}");
        assert!(text.contains(r#"DCGM_FI_DEV_GPU_TEMP{gpu="1""#), "{text}");
        assert!(text.contains(r#"DCGM_FI_DEV_MIG_MODE{gpu="1""#), "{text}");
        assert!(
            !text.contains("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS"),
            "old name: {text}"
        );
        assert!(!text.contains("node_cpu_seconds_total"), "{text}");
        assert!(
            !text.contains("gpufleet_agent_gpu_fault{"),
            "no fault yet: {text}"
        );
        assert_metrics_pass(&text, is_upstream_lint);
    }

    #[test]
    fn simulated_series_are_marked_and_faults_shown() {
        let mut a = agent();
        a.gpu_source = GpuSource::Simulated;
        a.gpu_faults = 1;
        a.gpu_fault = Some("GPU sampling did not answer within 2000 ms".into());
        let text = render(&a, &[gpu(0)], &HostFigures::default());
        let dcgm: Vec<&str> = text.lines().filter(|l| l.starts_with("DCGM_")).collect();
        assert!(!dcgm.is_empty());
        assert!(
            dcgm.iter().all(|l| l.contains(r#"gpu_source="simulated""#)),
            "{text}"
        );
        assert!(
            text.contains(
                r#"gpufleet_agent_gpu_fault{reason="GPU sampling did not answer within 2000 ms"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains("gpufleet_agent_gpu_faults_total 1"), "{text}");
        assert_metrics_pass(&text, is_upstream_lint);
    }

    #[test]
    fn mig_devices_are_series_of_their_own() {
        let g = GpuSample {
            util_pct: None,
            mig_enabled: Some(true),
            mig_devices: vec![MigDeviceSample {
                mig_index: 2,
                parent_index: 0,
                name: "NVIDIA H100 80GB HBM3 MIG 3g.40gb".into(),
                uuid: Some("MIG-abc".into()),
                mem_used_mib: Some(10_240),
                mem_free_mib: Some(30_720),
                mem_total_mib: Some(40_960),
            }],
            ..gpu(0)
        };
        let text = render(&agent(), &[g], &HostFigures::default());
        assert!(
            text.lines().any(|l| l.starts_with("DCGM_FI_DEV_FB_USED{")
                && l.contains(r#"GPU_I_ID="2",GPU_I_PROFILE="3g.40gb",mig_uuid="MIG-abc""#)
                && l.ends_with(" 10240")),
            "{text}"
        );
        assert_metrics_pass(&text, is_upstream_lint);
    }

    #[test]
    fn label_values_are_escaped() {
        let mut a = agent();
        a.hostname = "we\"ird\\host\nname".into();
        let text = render(&a, &[gpu(0)], &host());
        assert!(text.contains(r#"Hostname="we\"ird\\host\nname""#), "{text}");
        assert_metrics_pass(&text, is_upstream_lint);
    }

    #[test]
    fn passes_promtool() {
        let text = render(&agent(), &[gpu(0), gpu(1)], &host());
        assert_metrics_pass(&text, is_upstream_lint);
        let live = HostCollector::new().collect();
        assert!(live.mem_total_bytes > 0);
        let text = render(&agent(), &[], &live);
        assert_metrics_pass(&text, is_upstream_lint);
    }

    #[test]
    fn a_parse_error_is_not_excused() {
        assert!(check_metrics("not a metric line {\n", is_upstream_lint).is_err());
        assert!(
            check_metrics("# TYPE x counter\nx 1\n", is_upstream_lint).is_err(),
            "lint other than upstream's"
        );
    }

    #[test]
    fn proc_stat() {
        let c = parse_proc_stat(
            "cpu  10 0 0 0\ncpu0 200 4 100 3000 5 0 7 1 0 0\ncpu1 1 1 1 1\nintr 5\n",
            100.0,
        );
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].cpu, 0);
        assert_eq!(c[0].modes[0], ("user", 2.0));
        assert_eq!(c[0].modes[3], ("idle", 30.0));
        assert_eq!(c[0].modes.len(), 8);
        assert_eq!(c[1].modes.len(), 4);
    }
}
