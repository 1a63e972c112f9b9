//! Errors that stop the agent from starting. Everything that can go wrong
//! later (control plane down, engine crash) is handled and retried inside.

use std::net::SocketAddr;
use std::path::PathBuf;

use gpufleet_domain::InstanceId;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot read bootstrap file {path}")]
    ReadBootstrap {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bootstrap file {path} is not a valid AgentBootstrap")]
    ParseBootstrap {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "refusing to start: --instance-id {argument} differs from the bootstrap file's instance id {bootstrap} ({path})"
    )]
    InstanceIdMismatch {
        argument: InstanceId,
        bootstrap: InstanceId,
        path: PathBuf,
    },
    #[error("cannot use data directory {path}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot find the engine program (current executable)")]
    EngineProgram(#[source] std::io::Error),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot build the HTTP client")]
    HttpClient(#[source] reqwest::Error),
    #[error("--gpu nvml: NVML is unavailable: {0}\nhint: install the NVIDIA driver, or run with --gpu auto or --gpu simulated")]
    Nvml(String),
    #[error("--gpu nvml: NVML did not start within {deadline_ms} ms (hung driver?)")]
    NvmlStartTimeout { deadline_ms: u64 },
    #[error("cannot start the GPU sampling thread")]
    GpuThread(#[source] std::io::Error),
    #[error("agent HTTP server failed")]
    Serve(#[source] std::io::Error),
}
