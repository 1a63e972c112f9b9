//! The inference engine: how it is launched ([`EngineLauncher`]), probed
//! ([`probe`]), checked with real requests ([`canary`]) and kept running
//! ([`supervisor`]).

pub mod canary;
mod launch;
pub mod probe;
pub mod supervisor;
pub mod tls;

pub use launch::{
    EngineLauncher, EngineProcess, ExitInfo, LaunchError, LaunchRequest, ProcessLauncher,
};
pub use tls::EngineTlsFiles;

use gpufleet_proto::EngineStatus;

/// The engine as the agent currently sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineState {
    pub status: EngineStatus,
    /// Restarts since the agent started.
    pub restarts: u32,
    pub pid: Option<u32>,
}

impl Default for EngineState {
    fn default() -> Self {
        Self {
            status: EngineStatus::Stopped,
            restarts: 0,
            pid: None,
        }
    }
}
