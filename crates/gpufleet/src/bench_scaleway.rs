//! `gpufleet bench scaleway`: the Scaleway provider from create to ready on
//! the local emulator of Scaleway's API, with zero emulated delays and the
//! API rate-limited. A real `gpufleet up` (this binary, as a child process)
//! offers Scaleway from `SCW_*` variables pointing at the emulator; every
//! machine runs its user data as a local "VM": download of the agent over
//! pinned TLS, the agent as a service, the `docker` stand-in starting the
//! simulator.
//!
//! Reports: create → ready of single instances (median, max), the time for
//! `--count` instances created at once to all be ready, and the API calls
//! per instance from create to terminated.

use anyhow::{bail, Context};
use gpufleet_scaleway_emulator::{Emulator, EmulatorConfig, RateLimit, VmConfig};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `docker` stand-in emulated machines run (see `standins/docker`).
const DOCKER_STANDIN: &str = include_str!("../standins/docker");

const ZONE: &str = "fr-par-2";
const SECRET: &str = "0b1c2d3e-4f5a-4b6c-8d7e-9f0a1b2c3d4e";
const PROJECT: &str = "1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d";

/// Arguments of `gpufleet bench scaleway`.
#[derive(Debug, Clone, clap::Args)]
pub struct ScalewayBenchArgs {
    /// Instances created one at a time (create → ready each).
    #[arg(long, default_value_t = 5)]
    pub singles: u32,
    /// Instances created at once.
    #[arg(long, default_value_t = 100)]
    pub count: u32,
    /// The emulator's rate limit, requests per second per token.
    #[arg(long, default_value_t = 20.0)]
    pub rate_limit_rps: f64,
    /// The emulator's rate-limit burst.
    #[arg(long, default_value_t = 40)]
    pub rate_limit_burst: u32,
    /// Instance type.
    #[arg(long, default_value = "L4-1-24G")]
    pub instance_type: String,
}

struct Up {
    child: Child,
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

impl Up {
    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await?;
        let status = resp.status();
        let body: Value = resp.json().await?;
        if !status.is_success() {
            bail!("GET {path}: {status}: {body}");
        }
        Ok(body)
    }

    async fn create(&self, instance_type: &str, count: u32) -> anyhow::Result<Vec<String>> {
        let resp = self
            .http
            .post(format!("{}/api/v1/instances", self.base))
            .bearer_auth(&self.token)
            .json(
                &json!({"provider": "scaleway", "instance_type": instance_type,
                "model": "gpufleet/sim-small", "count": count}),
            )
            .send()
            .await?;
        let status = resp.status();
        let body: Value = resp.json().await?;
        if !status.is_success() {
            bail!("create: {status}: {body}");
        }
        Ok(body["instances"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["id"].as_str().map(str::to_string))
            .collect())
    }

    async fn terminate(&self, id: &str) -> anyhow::Result<()> {
        self.http
            .delete(format!("{}/api/v1/instances/{id}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    /// Statuses of `ids`, in one listing.
    async fn statuses(&self, ids: &[String]) -> anyhow::Result<Vec<String>> {
        let list = self.get("/api/v1/instances?limit=1000").await?;
        let all = list["instances"].as_array().cloned().unwrap_or_default();
        Ok(ids
            .iter()
            .map(|id| {
                all.iter()
                    .find(|i| i["id"] == id.as_str())
                    .and_then(|i| i["status"].as_str())
                    .unwrap_or("unknown")
                    .to_string()
            })
            .collect())
    }

    /// Waits until every one of `ids` has `status`; fails on `failed`.
    async fn wait_all(
        &self,
        ids: &[String],
        status: &str,
        limit: Duration,
    ) -> anyhow::Result<Duration> {
        let start = Instant::now();
        loop {
            let s = self.statuses(ids).await?;
            if s.iter().all(|x| x == status) {
                return Ok(start.elapsed());
            }
            if s.iter().any(|x| x == "failed") {
                bail!("an instance failed: {s:?}");
            }
            if start.elapsed() > limit {
                bail!("not all {status} after {limit:?}: {s:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

pub async fn run(args: ScalewayBenchArgs) -> anyhow::Result<()> {
    let tmp = tempfile::Builder::new()
        .prefix("gpufleet-bench-scw-")
        .tempdir()?;
    let bin_dir = tmp.path().join("standins");
    std::fs::create_dir_all(&bin_dir)?;
    let docker = bin_dir.join("docker");
    std::fs::write(&docker, DOCKER_STANDIN)?;
    std::fs::set_permissions(&docker, std::fs::Permissions::from_mode(0o755))?;

    let mut config = EmulatorConfig::new(SECRET, PROJECT, tmp.path().join("scaleway"));
    config.zones = vec![ZONE.into()];
    config.ip_pool = "127.93.0.0/16".into();
    config.rate_limit = Some(RateLimit {
        requests_per_second: args.rate_limit_rps,
        burst: args.rate_limit_burst,
    });
    config.vm = Some(VmConfig {
        bin_dir: Some(bin_dir),
        ..VmConfig::default()
    });
    let emulator = Emulator::start(config, tokio::net::TcpListener::bind("127.0.0.1:0").await?)
        .await
        .context("cannot start the Scaleway emulator")?;
    let result = measure(&args, &emulator, tmp.path()).await;
    emulator.shutdown().await;
    result
}

async fn measure(
    args: &ScalewayBenchArgs,
    emulator: &Emulator,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    let up = start_up(emulator, dir)?;
    println!(
        "Scaleway on the emulator: zero delays, rate limit {} req/s (burst {}), type {}",
        args.rate_limit_rps, args.rate_limit_burst, args.instance_type
    );

    // Single instances, one after the other.
    let mut singles = Vec::new();
    let mut last_timeline = Value::Null;
    for _ in 0..args.singles {
        let ids = up.create(&args.instance_type, 1).await?;
        singles.push(up.wait_all(&ids, "ready", Duration::from_secs(120)).await?);
        last_timeline = up
            .get(&format!("/api/v1/instances/{}/events", ids[0]))
            .await?;
        up.terminate(&ids[0]).await?;
        up.wait_all(&ids, "terminated", Duration::from_secs(120))
            .await?;
    }
    singles.sort();
    if let (Some(median), Some(max)) = (singles.get(singles.len() / 2), singles.last()) {
        println!(
            "create → ready, one at a time ({}): median {:.0} ms, max {:.0} ms",
            singles.len(),
            median.as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3
        );
    }

    print_steps(&last_timeline);

    // Many at once, counting API calls from create to terminated.
    emulator.faults().reset_log();
    let ids = up.create(&args.instance_type, args.count).await?;
    let all_ready = up.wait_all(&ids, "ready", Duration::from_secs(600)).await?;
    println!(
        "{} created at once: all ready in {:.1} s",
        args.count,
        all_ready.as_secs_f64()
    );
    for id in &ids {
        up.terminate(id).await?;
    }
    up.wait_all(&ids, "terminated", Duration::from_secs(600))
        .await?;
    let log = emulator.request_log();
    let throttled = log.iter().filter(|r| r.status == 429).count();
    let mut counts = emulator.request_counts().into_iter().collect::<Vec<_>>();
    counts.sort_by_key(|c| std::cmp::Reverse(c.1));
    println!(
        "API calls from create to terminated: {} for {} instances = {:.1} per instance ({} answered 429)",
        log.len(),
        args.count,
        log.len() as f64 / f64::from(args.count.max(1)),
        throttled
    );
    for (route, n) in counts.iter().take(12) {
        println!("  {n:>6}  {route}");
    }
    let left = (
        emulator.servers().len(),
        emulator.ips().len(),
        emulator.volumes().len(),
    );
    println!(
        "left at the provider: {} servers, {} IPs, {} volumes",
        left.0, left.1, left.2
    );
    Ok(())
}

/// Where the last single instance's time went: each timeline entry up to
/// `ready`, as milliseconds after the first.
fn print_steps(timeline: &Value) {
    let events = timeline["events"].as_array().cloned().unwrap_or_default();
    let at = |e: &Value| {
        e["at"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
    };
    let Some(start) = events.first().and_then(at) else {
        return;
    };
    println!("  the last one's timeline (ms after create):");
    for e in &events {
        let Some(t) = at(e) else { continue };
        println!(
            "    {:>6}  {} {}",
            (t - start).num_milliseconds(),
            e["action"].as_str().unwrap_or_default(),
            e["to_status"].as_str().unwrap_or_default()
        );
        if e["to_status"] == "ready" {
            break;
        }
    }
}

/// `gpufleet up` configured for the emulator through `SCW_*` only.
fn start_up(emulator: &Emulator, dir: &std::path::Path) -> anyhow::Result<Up> {
    let tls_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let config = dir.join("up.toml");
    std::fs::write(
        &config,
        format!(
            "[control]\nmax_instances_per_request = 1000\n\n[control.engine]\nmodel_load_delay_ms = 0\n\n\
             [tls]\nlisten = \"127.0.0.1:{tls_port}\"\n\n\
             [providers.scaleway]\nagent_gpu = \"simulated\"\n"
        ),
    )?;
    let data = dir.join("up");
    let mut child = Command::new(std::env::current_exe()?)
        .args(["up", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(&data)
        .env("SCW_ACCESS_KEY", "SCWBENCHACCESSKEY000")
        .env("SCW_SECRET_KEY", SECRET)
        .env("SCW_DEFAULT_PROJECT_ID", PROJECT)
        .env("SCW_DEFAULT_ZONE", ZONE)
        .env("SCW_API_URL", emulator.url())
        .env("HOME", dir)
        .env(
            "GPUFLEET_PUBLIC_URL",
            format!("https://127.0.0.1:{tls_port}"),
        )
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(dir.join("up.log"))?))
        .spawn()
        .context("cannot start gpufleet up")?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let base = loop {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(addr) = line.strip_prefix("gpufleet listening on ") {
                    break addr.trim().to_string();
                }
            }
            _ => bail!(
                "gpufleet up exited; log: {}",
                std::fs::read_to_string(dir.join("up.log")).unwrap_or_default()
            ),
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let token = std::fs::read_to_string(data.join("admin-token"))?
        .trim()
        .to_string();
    Ok(Up {
        child,
        base,
        token,
        http: reqwest::Client::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::DOCKER_STANDIN;
    use std::os::unix::fs::PermissionsExt;

    /// The stand-in maps engine arguments through `-v HOST:CONTAINER[:ro]`
    /// as docker would make those paths visible.
    #[test]
    fn the_docker_standin_maps_bind_mounted_paths() {
        let root = tempfile::tempdir().unwrap();
        let bin = root.path().join("usr/local/bin");
        std::fs::create_dir_all(&bin).unwrap();
        let fake = bin.join("gpufleet");
        std::fs::write(&fake, "#!/bin/sh\nfor a in \"$@\"; do echo \"$a\"; done\n").unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let script = root.path().join("docker");
        std::fs::write(&script, DOCKER_STANDIN).unwrap();
        let out = std::process::Command::new("sh")
            .arg(&script)
            .args([
                "run",
                "--rm",
                "--name",
                "e",
                "-v",
                "/h/models:/root/.cache",
                "-v",
                "/h/tls:/gpufleet-tls:ro",
                "-e",
                "HF_TOKEN",
                "img:1",
                "--model",
                "a b",
                "--ssl-keyfile",
                "/gpufleet-tls/key.pem",
                "--x",
                "/gpufleet-tlsx",
                "/gpufleet-tls",
            ])
            .env("GPUFLEET_ROOT", root.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let args: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
        assert_eq!(
            args,
            [
                "sim",
                "--model-load-delay-ms",
                "0",
                "--model",
                "a b",
                "--ssl-keyfile",
                "/h/tls/key.pem",
                "--x",
                "/gpufleet-tlsx",
                "/h/tls"
            ]
        );
    }
}
