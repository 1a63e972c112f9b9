//! Command-line arguments and the configuration resolved from them and the
//! bootstrap file.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gpufleet_domain::InstanceId;
use gpufleet_proto::AgentBootstrap;

use crate::error::AgentError;
use crate::gpu::GpuMode;

/// Arguments of `gpufleet agent`.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// This instance's id; must match the bootstrap file's when given
    /// (default: the bootstrap file's).
    #[arg(long)]
    pub instance_id: Option<InstanceId>,
    /// JSON file with the `AgentBootstrap` (control plane URL, secret, model, engine, GPUs).
    #[arg(long)]
    pub bootstrap_file: PathBuf,
    /// IP address the agent's server and the engine listen on.
    #[arg(long, env = "GPUFLEET_AGENT_BIND", default_value = "0.0.0.0")]
    pub bind: IpAddr,
    /// Directory for the agent's state (token, engine pid file).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Program whose `sim` subcommand runs the simulated engine
    /// (default: this executable).
    #[arg(long)]
    pub engine_program: Option<PathBuf>,
    /// Heartbeat period, overriding what the control plane asks for.
    #[arg(long)]
    pub heartbeat_interval_ms: Option<u64>,
    /// Where GPU figures come from: `auto` (NVML when the NVIDIA driver loads
    /// and reports a GPU, else simulated per the bootstrap), `nvml` (fail
    /// without it) or `simulated`.
    #[arg(long, value_enum, default_value_t = GpuMode::Auto)]
    pub gpu: GpuMode,
    /// How long one GPU sample may take (NVML calls run on their own
    /// thread); past it the heartbeat goes out without GPU figures and a
    /// `gpu_fault` event goes on the instance's timeline.
    #[arg(long, default_value_t = DEFAULT_GPU_SAMPLE_DEADLINE_MS)]
    pub gpu_sample_deadline_ms: u64,
}

/// Default of `--gpu-sample-deadline-ms`: NVML answers in milliseconds; a
/// call stuck for seconds is a hung driver.
pub const DEFAULT_GPU_SAMPLE_DEADLINE_MS: u64 = 2_000;

/// Heartbeat period used until the control plane says otherwise.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(5000);
/// Bounds applied to any heartbeat period, wherever it comes from.
pub const MIN_HEARTBEAT_INTERVAL_MS: u64 = 10;
pub const MAX_HEARTBEAT_INTERVAL_MS: u64 = 3_600_000;

pub fn clamp_interval_ms(ms: u64) -> u64 {
    ms.clamp(MIN_HEARTBEAT_INTERVAL_MS, MAX_HEARTBEAT_INTERVAL_MS)
}

/// Reads and checks the bootstrap file.
pub fn load_bootstrap(args: &AgentArgs) -> Result<AgentBootstrap, AgentError> {
    let path = &args.bootstrap_file;
    let text = std::fs::read_to_string(path).map_err(|source| AgentError::ReadBootstrap {
        path: path.clone(),
        source,
    })?;
    let bootstrap: AgentBootstrap =
        serde_json::from_str(&text).map_err(|source| AgentError::ParseBootstrap {
            path: path.clone(),
            source,
        })?;
    if let Some(argument) = args.instance_id.filter(|id| *id != bootstrap.instance_id) {
        return Err(AgentError::InstanceIdMismatch {
            argument,
            bootstrap: bootstrap.instance_id,
            path: path.clone(),
        });
    }
    Ok(bootstrap)
}

/// Where the agent keeps its files.
#[derive(Debug, Clone)]
pub struct DataDir(PathBuf);

impl DataDir {
    pub fn create(path: &Path) -> Result<Self, AgentError> {
        std::fs::create_dir_all(path).map_err(|source| AgentError::DataDir {
            path: path.to_path_buf(),
            source,
        })?;
        let path = std::fs::canonicalize(path).map_err(|source| AgentError::DataDir {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn token_file(&self) -> PathBuf {
        self.0.join("agent-token")
    }
}
