//! `gpufleet`: one binary for the control plane (`up`), the worker agent
//! (`agent`), the engine simulator (`sim`) and the client commands.

mod bench;
mod bench_deployments;
mod bench_heartbeats;
mod bench_router;
mod bench_scaleway;
mod client;
mod cloud;
mod config;
mod mock_service;
mod replica_lock;
mod signals;
mod tls;
mod token;
mod up;

use clap::{Parser, Subcommand};

/// mimalloc: the control plane allocates small, short-lived buffers per
/// request from many threads; glibc's malloc spent a tenth of the
/// heartbeat path's CPU in its free lists (perf, `bench heartbeats`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "gpufleet",
    version,
    about = "A control plane for GPU fleets serving LLMs"
)]
struct Cli {
    /// Log filter, e.g. `info` or `gpufleet_control=debug` [default: $RUST_LOG, else info for
    /// servers and warn for client commands].
    #[arg(long, global = true)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the control plane, the API and the Mock provider in this process.
    Up(up::UpArgs),
    /// Serve the Mock provider to several control planes (`up` with
    /// `[mock] url = "http://<this address>"`), so replicas share its machines.
    MockProvider(mock_service::MockProviderArgs),
    /// Run the worker agent of one instance (started by a provider).
    Agent(AgentCmd),
    /// Print one GPU sample as the agent reads it (its DCGM `/metrics`
    /// series, then the heartbeat's JSON) and exit: checks a GPU machine's
    /// NVML path by hand, without a control plane.
    GpuSample(GpuSampleCmd),
    /// Run the vLLM-compatible engine simulator (started by the agent).
    Sim(SimCmd),
    /// Create, list, inspect, terminate and archive instances.
    Instances {
        #[command(flatten)]
        client: client::ClientOpts,
        #[command(subcommand)]
        command: client::instances::InstancesCommand,
    },
    /// Declare a model's serving (placements, replicas, autoscaling); the
    /// control plane keeps it so.
    Deployments {
        #[command(flatten)]
        client: client::ClientOpts,
        #[command(subcommand)]
        command: client::deployments::DeploymentsCommand,
    },
    /// Providers and their instance types.
    Providers {
        #[command(flatten)]
        client: client::ClientOpts,
        #[command(subcommand)]
        command: client::catalog::ProvidersCommand,
    },
    /// Load generators (e.g. heartbeat ingestion).
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
    /// A live terminal dashboard of the fleet (q quits).
    Top {
        #[command(flatten)]
        client: client::ClientOpts,
        #[command(flatten)]
        args: client::top::TopArgs,
    },
    /// Models instances may serve.
    Models {
        #[command(flatten)]
        client: client::ClientOpts,
    },
    /// Keys of the OpenAI-compatible endpoint (/v1/...).
    ApiKeys {
        #[command(flatten)]
        client: client::ClientOpts,
        #[command(subcommand)]
        command: client::api_keys::ApiKeysCommand,
    },
    /// Sign in: make a personal access token and keep it for this server.
    Login {
        #[command(flatten)]
        client: client::ClientOpts,
        #[command(flatten)]
        args: client::accounts::LoginArgs,
    },
    /// Forget (and revoke) the token `login` saved for this server.
    Logout {
        #[command(flatten)]
        client: client::ClientOpts,
    },
    /// Who the client speaks as, and their roles.
    Whoami {
        #[command(flatten)]
        client: client::ClientOpts,
    },
    /// Projects and their members' roles.
    Projects {
        #[command(flatten)]
        client: client::ClientOpts,
        #[command(subcommand)]
        command: client::accounts::ProjectsCommand,
    },
    /// Users (created with the admin token, or by their first single sign-on).
    Users {
        #[command(flatten)]
        client: client::ClientOpts,
        #[command(subcommand)]
        command: client::accounts::UsersCommand,
    },
    /// Your personal access tokens.
    Tokens {
        #[command(flatten)]
        client: client::ClientOpts,
        #[command(subcommand)]
        command: client::accounts::TokensCommand,
    },
    /// Who changed what: the audit log.
    Audit {
        #[command(flatten)]
        client: client::ClientOpts,
        #[command(flatten)]
        args: client::accounts::AuditArgs,
    },
    /// What the machines cost: per project, deployment, model or provider,
    /// with tokens served and the cost per million tokens.
    Spend {
        #[command(flatten)]
        client: client::ClientOpts,
        #[command(flatten)]
        args: client::spend::SpendArgs,
    },
}

#[derive(Debug, clap::Args)]
struct AgentCmd {
    #[command(flatten)]
    args: gpufleet_agent::AgentArgs,
}

#[derive(Debug, clap::Args)]
struct GpuSampleCmd {
    /// Where GPU figures come from (`nvml` fails without a usable driver).
    #[arg(long, value_enum, default_value_t = gpufleet_agent::GpuMode::Nvml)]
    gpu: gpufleet_agent::GpuMode,
    /// How long the sample may take.
    #[arg(long, default_value_t = 10_000)]
    gpu_sample_deadline_ms: u64,
}

#[derive(Debug, clap::Args)]
struct SimCmd {
    #[command(flatten)]
    args: gpufleet_sim::SimArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Up(_) | Command::Agent(_) | Command::Sim(_) | Command::MockProvider(_) => "info",
        _ => "warn",
    };
    init_tracing(cli.log_level.as_deref(), default_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Up(args) => up::run(args).await,
        Command::MockProvider(args) => mock_service::run(args).await,
        Command::Agent(cmd) => {
            gpufleet_agent::run(cmd.args, async {
                signals::shutdown_signal().await;
            })
            .await?;
            Ok(())
        }
        Command::GpuSample(cmd) => {
            let text = gpufleet_agent::sample_once(
                cmd.gpu,
                std::time::Duration::from_millis(cmd.gpu_sample_deadline_ms.max(1)),
            )
            .await?;
            print!("{text}");
            Ok(())
        }
        Command::Sim(cmd) => {
            gpufleet_sim::run(cmd.args, async {
                signals::shutdown_signal().await;
            })
            .await?;
            Ok(())
        }
        Command::Deployments { client, command } => {
            client::deployments::run(&client::Client::new(&client)?, command).await
        }
        Command::Instances { client, command } => {
            client::instances::run(&client::Client::new(&client)?, command).await
        }
        Command::Providers { client, command } => {
            client::catalog::providers(&client::Client::new(&client)?, command).await
        }
        Command::Bench { command } => bench::run(command).await,
        Command::Top { client, args } => {
            client::top::run(&client::Client::new(&client)?, args).await
        }
        Command::Models { client } => client::catalog::models(&client::Client::new(&client)?).await,
        Command::ApiKeys { client, command } => {
            client::api_keys::run(&client::Client::new(&client)?, command).await
        }
        Command::Login { client, args } => {
            client::accounts::login(&client::Client::without_token(&client)?, args).await
        }
        Command::Logout { client } => {
            client::accounts::logout(&client::Client::without_token(&client)?).await
        }
        Command::Whoami { client } => {
            client::accounts::whoami(&client::Client::new(&client)?).await
        }
        Command::Projects { client, command } => {
            client::accounts::projects(&client::Client::new(&client)?, command).await
        }
        Command::Users { client, command } => {
            client::accounts::users(&client::Client::new(&client)?, command).await
        }
        Command::Tokens { client, command } => {
            client::accounts::tokens(&client::Client::new(&client)?, command).await
        }
        Command::Audit { client, args } => {
            client::accounts::audit(&client::Client::new(&client)?, args).await
        }
        Command::Spend { client, args } => {
            client::spend::run(&client::Client::new(&client)?, args).await
        }
    }
}

/// Logs go to stderr (stdout carries command output and `up`'s address line).
fn init_tracing(flag: Option<&str>, default_level: &str) {
    let filter = flag
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new(default_level));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn client_options_go_anywhere_after_the_group() {
        let cli = Cli::try_parse_from([
            "gpufleet",
            "instances",
            "list",
            "--json",
            "--server",
            "http://x:1",
            "--status",
            "ready",
        ])
        .unwrap();
        let Command::Instances { client, .. } = cli.command else {
            panic!("not instances")
        };
        assert!(client.json);
        assert_eq!(client.server, "http://x:1");
    }
}
