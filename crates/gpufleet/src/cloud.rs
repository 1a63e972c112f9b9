//! Cloud providers offered by `up`, from their own credential conventions.
//!
//! Scaleway is offered when its `SCW_*` variables (or an `scw` CLI profile)
//! hold credentials. Its machines reach the control plane at the public URL
//! and install the agent from `GET /downloads/gpufleet`, this very binary,
//! checked against its SHA-256.

use crate::config::UpConfig;
use anyhow::Context;
use gpufleet_api::downloads::{AgentBinary, AGENT_BINARY_PATH};
use gpufleet_providers::cloudinit::AgentInstall;
use gpufleet_providers::scaleway::{ScalewayConfig, ScalewayProvider};
use gpufleet_providers::ProviderRegistry;

/// Registers every cloud provider with credentials; returns the agent binary
/// to serve when one was.
pub async fn register(
    config: &UpConfig,
    providers: &mut ProviderRegistry,
) -> anyhow::Result<Option<AgentBinary>> {
    let Some(scw) = ScalewayConfig::from_process_env().context("Scaleway credentials")? else {
        return Ok(None);
    };
    if config.public_url.is_empty() {
        anyhow::bail!(
            "SCW_* credentials are set, but cloud machines need an address to reach this control plane: \
             start with --public-url https://<host> (or GPUFLEET_PUBLIC_URL)"
        );
    }
    let settings = config.providers.scaleway.clone();
    if settings.agent_port != config.control.agent_port {
        anyhow::bail!(
            "[providers.scaleway] agent_port = {} differs from [control] agent_port = {}: the firewall would not open the port probes use",
            settings.agent_port,
            config.control.agent_port
        );
    }
    if !["nvml", "simulated", "auto"].contains(&settings.agent_gpu.as_str()) {
        anyhow::bail!(
            "[providers.scaleway] agent_gpu = {:?}: use \"nvml\" (real GPUs), \"simulated\" or \"auto\"",
            settings.agent_gpu
        );
    }
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let binary = AgentBinary::hash(exe.clone())
        .await
        .with_context(|| format!("cannot read {}", exe.display()))?;
    let install = AgentInstall {
        binary_url: format!("{}{AGENT_BINARY_PATH}", config.public_url),
        binary_sha256: binary.sha256.clone(),
        agent_args: vec!["--gpu".into(), settings.agent_gpu.clone()],
    };
    let project = scw.project_id.clone();
    let provider = ScalewayProvider::new(scw, settings, install)
        .context("invalid Scaleway configuration ([providers.scaleway] or SCW_*)")?;
    tracing::info!(zones = ?provider.zones(), %project, "Scaleway provider offered");
    providers.register(provider);
    Ok(Some(binary))
}
