//! Runs the Scaleway emulator as a process (for tests that drive `gpufleet`
//! as a separate process, and by hand). Prints its URL on the first line of
//! stdout; stops (killing every VM) on SIGINT or SIGTERM.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use gpufleet_scaleway_emulator::{Emulator, EmulatorConfig, RateLimit, VmConfig};

#[derive(Parser)]
#[command(about = "A local emulator of the Scaleway APIs gpufleet uses")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    #[arg(long, env = "SCW_SECRET_KEY")]
    secret_key: String,
    #[arg(long, env = "SCW_DEFAULT_PROJECT_ID")]
    project_id: String,
    #[arg(long)]
    data_dir: PathBuf,
    /// Comma-separated zones.
    #[arg(long, default_value = "fr-par-1,fr-par-2,nl-ams-1,pl-waw-2")]
    zones: String,
    #[arg(long, default_value = "127.91.0.0/16")]
    ip_pool: String,
    #[arg(long, default_value_t = 0)]
    boot_ms: u64,
    #[arg(long, default_value_t = 0)]
    stop_ms: u64,
    #[arg(long, default_value_t = 0)]
    delete_ms: u64,
    /// Requests per second per token (no limit when absent).
    #[arg(long)]
    rate: Option<f64>,
    #[arg(long, default_value_t = 10)]
    burst: u32,
    /// Run the servers' cloud-init user data as local processes.
    #[arg(long)]
    vm: bool,
    /// Stand-ins prepended to the VMs' PATH.
    #[arg(long)]
    vm_bin_dir: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = Args::parse();
    let mut cfg = EmulatorConfig::new(a.secret_key, a.project_id, a.data_dir);
    cfg.zones = a.zones.split(',').map(|z| z.trim().to_string()).collect();
    cfg.ip_pool = a.ip_pool;
    cfg.timings.boot = Duration::from_millis(a.boot_ms);
    cfg.timings.stop = Duration::from_millis(a.stop_ms);
    cfg.timings.delete = Duration::from_millis(a.delete_ms);
    cfg.rate_limit = a.rate.map(|r| RateLimit {
        requests_per_second: r,
        burst: a.burst,
    });
    if a.vm {
        cfg.vm = Some(VmConfig {
            bin_dir: a.vm_bin_dir,
            ..VmConfig::default()
        });
    }
    let listener = tokio::net::TcpListener::bind(&a.listen).await?;
    let emu = Emulator::start(cfg, listener).await?;
    println!("{}", emu.url());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    emu.shutdown().await;
    Ok(())
}
