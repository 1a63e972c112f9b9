//! `gpufleet bench ...`: load generators. Each lives in its own module.

use crate::{bench_deployments, bench_heartbeats, bench_router, bench_scaleway};

#[derive(Debug, Clone, clap::Subcommand)]
pub enum BenchCommand {
    /// Post heartbeats as N simulated agents through the real HTTP ingestion
    /// path of an in-process control plane: achieved rate and latency.
    Heartbeats(bench_heartbeats::HeartbeatsArgs),
    /// The OpenAI router vs the simulator directly vs nginx: added latency
    /// (p50, p99) and throughput.
    Router(bench_router::RouterBenchArgs),
    /// The Scaleway provider on the local emulator of its API: create →
    /// ready, many instances at once under its rate limit, API calls per
    /// instance.
    Scaleway(bench_scaleway::ScalewayBenchArgs),
    /// Deployments on the Mock provider: scale from zero (what the router
    /// and keeper add to a replica's boot), the autoscaler's reaction to a
    /// step in load, and a rolling update under paced load.
    Deployments(bench_deployments::DeploymentsBenchArgs),
}

pub async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Heartbeats(args) => bench_heartbeats::run(args).await,
        BenchCommand::Router(args) => bench_router::run(args).await,
        BenchCommand::Scaleway(args) => bench_scaleway::run(args).await,
        BenchCommand::Deployments(args) => bench_deployments::run(args).await,
    }
}
