//! `gpufleet bench ...`: load generators. Each lives in its own module.

use crate::{bench_heartbeats, bench_router};

#[derive(Debug, Clone, clap::Subcommand)]
pub enum BenchCommand {
    /// Post heartbeats as N simulated agents through the real HTTP ingestion
    /// path of an in-process control plane: achieved rate and latency.
    Heartbeats(bench_heartbeats::HeartbeatsArgs),
    /// The OpenAI router vs the simulator directly vs nginx: added latency
    /// (p50, p99) and throughput.
    Router(bench_router::RouterBenchArgs),
}

pub async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Heartbeats(args) => bench_heartbeats::run(args).await,
        BenchCommand::Router(args) => bench_router::run(args).await,
    }
}
