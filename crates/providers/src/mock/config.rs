//! Configuration of the Mock provider and its default catalog.

use gpufleet_domain::{GpuSpec, InstanceType, Zone};
use serde::Deserialize;
use std::path::PathBuf;

/// Configuration of the Mock provider.
///
/// Every field but `data_dir` has a default, so a config file may name only
/// the data directory.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MockConfig {
    /// Where machines live: `<data_dir>/machines/<machine-id>/` holds a
    /// machine's `machine.json`, `bootstrap.json` and `agent.log`. Made
    /// absolute when the provider opens it.
    pub data_dir: PathBuf,
    /// Loopback addresses handed to machines, as an IPv4 CIDR inside
    /// `127.0.0.0/8` (Linux routes all of it to `lo`). The network and
    /// broadcast addresses are never handed out.
    #[serde(default = "default_ip_pool")]
    pub ip_pool: String,
    /// The program that is a machine's agent. A bare name is looked up in
    /// `PATH`; a relative path is resolved against the working directory at
    /// open time. The product points this at its own `gpufleet` binary.
    #[serde(default = "default_agent_program")]
    pub agent_program: PathBuf,
    /// Arguments given to `agent_program` before the per-machine ones
    /// (`--instance-id`, `--bootstrap-file`, `--bind`, `--data-dir`).
    #[serde(default = "default_agent_args")]
    pub agent_args: Vec<String>,
    /// Time from `create` until the machine's IP becomes visible, in milliseconds.
    #[serde(default)]
    pub ip_delay_ms: u64,
    /// Time from `create` until the agent process is spawned, in milliseconds.
    #[serde(default)]
    pub boot_delay_ms: u64,
    /// Time between SIGTERM and SIGKILL to a terminated machine's processes, in milliseconds.
    #[serde(default = "default_terminate_grace_ms")]
    pub terminate_grace_ms: u64,
    /// Time between noticing a dead agent and starting it again, in milliseconds.
    #[serde(default = "default_agent_restart_delay_ms")]
    pub agent_restart_delay_ms: u64,
    /// Zones machines can be created in.
    #[serde(default = "default_zones")]
    pub zones: Vec<Zone>,
    /// Instance types on sale; each names the zones it is offered in.
    #[serde(default = "default_instance_types")]
    pub instance_types: Vec<InstanceType>,
    /// Most live machines per zone (absent: only the address pool limits);
    /// past it a create is `OutOfCapacity`, as a cloud's sold-out zone is.
    #[serde(default)]
    pub zone_capacity: std::collections::BTreeMap<String, u32>,
}

impl MockConfig {
    /// A configuration with every default, for machines under `data_dir`
    /// whose agent is `agent_program` (with the default `agent_args`, `["agent"]`).
    pub fn new(data_dir: impl Into<PathBuf>, agent_program: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            ip_pool: default_ip_pool(),
            agent_program: agent_program.into(),
            agent_args: default_agent_args(),
            ip_delay_ms: 0,
            boot_delay_ms: 0,
            terminate_grace_ms: default_terminate_grace_ms(),
            agent_restart_delay_ms: default_agent_restart_delay_ms(),
            zones: default_zones(),
            instance_types: default_instance_types(),
            zone_capacity: Default::default(),
        }
    }
}

fn default_ip_pool() -> String {
    "127.77.0.0/16".to_string()
}

fn default_agent_program() -> PathBuf {
    PathBuf::from("gpufleet")
}

fn default_agent_args() -> Vec<String> {
    vec!["agent".to_string()]
}

fn default_terminate_grace_ms() -> u64 {
    5000
}

fn default_agent_restart_delay_ms() -> u64 {
    2000
}

/// `local-1` ("This host") and `local-2`.
pub fn default_zones() -> Vec<Zone> {
    vec![
        Zone {
            name: "local-1".to_string(),
            description: "This host".to_string(),
        },
        Zone {
            name: "local-2".to_string(),
            description: "This host, second zone".to_string(),
        },
    ]
}

/// `mock-l4-1`, `mock-a100-1` and `mock-h100-8`, each in every default zone.
pub fn default_instance_types() -> Vec<InstanceType> {
    let zones: Vec<String> = default_zones().into_iter().map(|z| z.name).collect();
    let ty = |name: &str,
              model: &str,
              count: u32,
              vram_mib: u64,
              power_limit_w: f64,
              vcpus: u32,
              ram_gib: u64,
              price_per_hour: f64| InstanceType {
        name: name.to_string(),
        gpu: GpuSpec {
            model: model.to_string(),
            count,
            vram_mib,
            power_limit_w,
        },
        vcpus,
        ram_mib: ram_gib * 1024,
        price_per_hour,
        currency: "EUR".to_string(),
        zones: zones.clone(),
    };
    vec![
        ty("mock-l4-1", "NVIDIA L4", 1, 23034, 72.0, 8, 48, 0.75),
        ty(
            "mock-a100-1",
            "NVIDIA A100-SXM4-80GB",
            1,
            81920,
            400.0,
            12,
            120,
            2.60,
        ),
        ty(
            "mock-h100-8",
            "NVIDIA H100 80GB HBM3",
            8,
            81559,
            700.0,
            112,
            960,
            23.00,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_naming_only_the_data_dir_gets_every_default() {
        let parsed: MockConfig = serde_json::from_str(r#"{"data_dir": "/var/lib/gpufleet/mock"}"#)
            .expect("minimal config parses");
        let mut want = MockConfig::new("/var/lib/gpufleet/mock", "gpufleet");
        assert_eq!(parsed, want);
        want.ip_delay_ms = 5;
        assert_ne!(parsed, want);
        assert_eq!(parsed.ip_pool, "127.77.0.0/16");
        assert_eq!(parsed.agent_args, vec!["agent"]);
        assert_eq!(parsed.terminate_grace_ms, 5000);
        assert_eq!(parsed.agent_restart_delay_ms, 2000);
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = serde_json::from_str::<MockConfig>(r#"{"data_dir": "/x", "ip_delay": 5}"#)
            .expect_err("typo must not be ignored");
        assert!(err.to_string().contains("ip_delay"), "{err}");
    }

    #[test]
    fn default_catalog_matches_the_spec() {
        let types = default_instance_types();
        let names: Vec<&str> = types.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["mock-l4-1", "mock-a100-1", "mock-h100-8"]);
        let h100 = &types[2];
        assert_eq!(h100.gpu.count, 8);
        assert_eq!(h100.gpu.vram_mib, 81559);
        assert_eq!(h100.ram_mib, 960 * 1024);
        assert_eq!(h100.zones, ["local-1", "local-2"]);
        assert_eq!(default_zones()[0].description, "This host");
    }
}
