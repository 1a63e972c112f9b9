//! Host figures via `sysinfo`: CPU % (from deltas between samples), load,
//! memory, the disk holding the data directory, network throughput.

use std::path::{Path, PathBuf};
use std::time::Instant;

use gpufleet_proto::SystemSample;
use sysinfo::{Disks, Networks, System};

pub struct SystemSampler {
    sys: System,
    disks: Disks,
    networks: Networks,
    data_dir: PathBuf,
    last_net: Instant,
}

impl SystemSampler {
    pub fn new(data_dir: &Path) -> Self {
        let mut sys = System::new();
        // First reading, so the first sample's CPU % is a real delta.
        sys.refresh_cpu_usage();
        Self {
            sys,
            disks: Disks::new_with_refreshed_list(),
            networks: Networks::new_with_refreshed_list(),
            data_dir: data_dir.to_path_buf(),
            last_net: Instant::now(),
        }
    }

    pub fn sample(&mut self) -> SystemSample {
        self.sys.refresh_cpu_usage();
        self.sys.refresh_memory();
        let load = System::load_average();
        let (disk_used_bytes, disk_total_bytes) = self.disk_usage();
        let (net_rx_bps, net_tx_bps) = self.network_rates();
        SystemSample {
            cpu_pct: f64::from(self.sys.global_cpu_usage()).clamp(0.0, 100.0),
            load1: load.one,
            load5: load.five,
            load15: load.fifteen,
            mem_used_bytes: self.sys.used_memory(),
            mem_total_bytes: self.sys.total_memory(),
            disk_used_bytes,
            disk_total_bytes,
            net_rx_bps,
            net_tx_bps,
        }
    }

    /// (used, total) of the filesystem holding the data directory: the disk
    /// with the longest mount point that prefixes it, else `statvfs`.
    fn disk_usage(&mut self) -> (u64, u64) {
        self.disks.refresh(true);
        let best = self
            .disks
            .list()
            .iter()
            .filter(|d| self.data_dir.starts_with(d.mount_point()))
            .max_by_key(|d| d.mount_point().components().count());
        match best {
            Some(d) => (
                d.total_space().saturating_sub(d.available_space()),
                d.total_space(),
            ),
            None => statvfs_usage(&self.data_dir).unwrap_or((0, 0)),
        }
    }

    /// Bytes per second since the previous sample, summed over non-loopback interfaces.
    fn network_rates(&mut self) -> (f64, f64) {
        self.networks.refresh(true);
        let now = Instant::now();
        let secs = now.duration_since(self.last_net).as_secs_f64();
        self.last_net = now;
        if secs <= 0.0 {
            return (0.0, 0.0);
        }
        let (rx, tx) = self
            .networks
            .list()
            .iter()
            .filter(|(name, _)| !is_loopback(name))
            .fold((0u64, 0u64), |(rx, tx), (_, d)| {
                (
                    rx.saturating_add(d.received()),
                    tx.saturating_add(d.transmitted()),
                )
            });
        (rx as f64 / secs, tx as f64 / secs)
    }
}

fn is_loopback(interface: &str) -> bool {
    interface == "lo" || interface.starts_with("lo:")
}

/// (used, total) bytes of the filesystem holding `path`.
fn statvfs_usage(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c_path` is a valid NUL-terminated string and `st` points to
    // writable memory of the right type; we read it only on success.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled the struct.
    let st = unsafe { st.assume_init() };
    // The field types are narrower on 32-bit targets.
    #[allow(clippy::unnecessary_cast)]
    let (frsize, blocks, bavail) = (st.f_frsize as u64, st.f_blocks as u64, st.f_bavail as u64);
    let total = blocks.saturating_mul(frsize);
    let avail = bavail.saturating_mul(frsize);
    Some((total.saturating_sub(avail), total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_sane() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = SystemSampler::new(dir.path());
        let _ = s.sample();
        let x = s.sample();
        assert!((0.0..=100.0).contains(&x.cpu_pct), "{x:?}");
        assert!(
            x.mem_total_bytes > 0 && x.mem_used_bytes <= x.mem_total_bytes,
            "{x:?}"
        );
        assert!(
            x.disk_total_bytes > 0 && x.disk_used_bytes <= x.disk_total_bytes,
            "{x:?}"
        );
        assert!(
            x.load1 >= 0.0 && x.net_rx_bps >= 0.0 && x.net_tx_bps >= 0.0,
            "{x:?}"
        );
    }

    #[test]
    fn statvfs_reads_the_root() {
        let (used, total) = statvfs_usage(Path::new("/")).expect("statvfs");
        assert!(total > 0 && used <= total);
    }

    #[test]
    fn loopback_names() {
        assert!(is_loopback("lo"));
        assert!(!is_loopback("eth0"));
        assert!(!is_loopback("lxcbr0"));
    }
}
