//! Launching the engine. [`ProcessLauncher`] runs it as a child process;
//! tests may provide their own [`EngineLauncher`].

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use gpufleet_domain::ModelName;
use gpufleet_proto::EngineSpec;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// What to launch.
#[derive(Debug, Clone)]
pub struct LaunchRequest {
    pub spec: EngineSpec,
    /// Address the engine listens on.
    pub host: IpAddr,
    pub model: ModelName,
    /// The agent's data directory (for `engine.pid`).
    pub data_dir: PathBuf,
    /// Environment of the engine beyond the agent's own (secrets such as
    /// `HF_TOKEN`; a container gets them by name, never on its command line).
    pub env: Vec<(String, String)>,
    /// Serve mutual TLS over these files (vLLM's `--ssl-*` flags); `None`:
    /// plain HTTP (machines on the control plane's host).
    pub tls: Option<super::EngineTlsFiles>,
    /// Extra engine arguments (a deployment's `engine_args`), last on the
    /// command line.
    pub extra_args: Vec<String>,
}

/// Name of the engine's container (one engine per machine).
pub const CONTAINER_NAME: &str = "gpufleet-engine";

/// Where the model cache is mounted in vLLM's container (its Hugging Face cache).
const CONTAINER_CACHE: &str = "/root/.cache/huggingface";

/// Where the engine's TLS files are mounted (read-only) in vLLM's container.
const CONTAINER_TLS: &str = "/gpufleet-tls";

/// vLLM's TLS flags over `key`, `cert` and `clients`, clients' certificates
/// required (`--ssl-cert-reqs 2` = `ssl.CERT_REQUIRED`).
fn ssl_args(key: &str, cert: &str, clients: &str) -> [String; 8] {
    [
        "--ssl-keyfile".into(),
        key.into(),
        "--ssl-certfile".into(),
        cert.into(),
        "--ssl-ca-certs".into(),
        clients.into(),
        "--ssl-cert-reqs".into(),
        "2".into(),
    ]
}

/// [`ssl_args`] over the host paths of `files`.
fn host_ssl_args(files: &super::EngineTlsFiles) -> [String; 8] {
    ssl_args(
        &files.key.to_string_lossy(),
        &files.cert.to_string_lossy(),
        &files.clients.to_string_lossy(),
    )
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("engine command is empty")]
    EmptyCommand,
    #[error("cannot spawn engine program {program}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the engine: {0}")]
    Other(String),
}

/// How an engine ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitInfo {
    pub code: Option<i32>,
    pub description: String,
}

/// A running engine.
#[async_trait]
pub trait EngineProcess: Send {
    fn pid(&self) -> Option<u32>;
    /// Resolves when the engine has exited. Cancel-safe.
    async fn wait(&mut self) -> ExitInfo;
    /// Asks the engine to stop, then forces it after `grace`.
    async fn stop(&mut self, grace: Duration);
}

#[async_trait]
pub trait EngineLauncher: Send + Sync + 'static {
    async fn launch(&self, req: &LaunchRequest) -> Result<Box<dyn EngineProcess>, LaunchError>;
}

/// Runs the engine as a child process that dies with the agent.
pub struct ProcessLauncher {
    /// Program whose `sim` subcommand runs the simulator.
    pub sim_program: PathBuf,
}

impl ProcessLauncher {
    fn command(&self, req: &LaunchRequest) -> Result<(PathBuf, Vec<String>), LaunchError> {
        let host = req.host.to_string();
        match &req.spec {
            EngineSpec::Sim {
                port,
                model_load_delay_ms,
            } => {
                let mut args: Vec<String> = vec![
                    "sim".into(),
                    "--host".into(),
                    host,
                    "--port".into(),
                    port.to_string(),
                    "--model".into(),
                    req.model.to_string(),
                    "--model-load-delay-ms".into(),
                    model_load_delay_ms.to_string(),
                ];
                if let Some(files) = &req.tls {
                    args.extend(host_ssl_args(files));
                }
                args.extend(req.extra_args.iter().cloned());
                Ok((self.sim_program.clone(), args))
            }
            EngineSpec::Vllm { port, command } => {
                let (program, args) = command.split_first().ok_or(LaunchError::EmptyCommand)?;
                let mut args = args.to_vec();
                args.extend([
                    "--model".into(),
                    req.model.to_string(),
                    "--host".into(),
                    host,
                    "--port".into(),
                    port.to_string(),
                ]);
                if let Some(files) = &req.tls {
                    args.extend(host_ssl_args(files));
                }
                args.extend(req.extra_args.iter().cloned());
                Ok((PathBuf::from(program), args))
            }
            EngineSpec::VllmContainer {
                port,
                image,
                cache_dir,
                args: extra,
                runtime,
            } => {
                let mut args: Vec<String> = [
                    "run",
                    "--rm",
                    "--name",
                    CONTAINER_NAME,
                    "--gpus",
                    "all",
                    "--ipc=host",
                    "--network",
                    "host",
                    "-v",
                ]
                .map(String::from)
                .into();
                args.push(format!("{cache_dir}:{CONTAINER_CACHE}"));
                if let Some(files) = &req.tls {
                    args.push("-v".into());
                    args.push(format!("{}:{CONTAINER_TLS}:ro", files.dir.display()));
                }
                for (name, _) in &req.env {
                    args.extend(["-e".to_string(), name.clone()]);
                }
                args.extend([
                    image.clone(),
                    "--model".into(),
                    req.model.to_string(),
                    "--host".into(),
                    host,
                    "--port".into(),
                    port.to_string(),
                ]);
                if req.tls.is_some() {
                    args.extend(ssl_args(
                        &format!("{CONTAINER_TLS}/key.pem"),
                        &format!("{CONTAINER_TLS}/cert.pem"),
                        &format!("{CONTAINER_TLS}/clients.pem"),
                    ));
                }
                args.extend(extra.iter().cloned());
                args.extend(req.extra_args.iter().cloned());
                Ok((PathBuf::from(runtime), args))
            }
        }
    }
}

/// Removes the engine's container, if any (a previous agent's, or one whose
/// `docker run` client died).
async fn remove_container(runtime: &str) {
    let out = Command::new(runtime)
        .args(["rm", "-f", CONTAINER_NAME])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
    if let Err(e) = out {
        tracing::warn!(runtime, error = %e, "cannot run the container runtime to remove the engine's container");
    }
}

#[async_trait]
impl EngineLauncher for ProcessLauncher {
    async fn launch(&self, req: &LaunchRequest) -> Result<Box<dyn EngineProcess>, LaunchError> {
        let pid_file = req.data_dir.join("engine.pid");
        kill_stale_engine(&pid_file, req.spec.port()).await;
        let container = match &req.spec {
            EngineSpec::VllmContainer { runtime, .. } => {
                remove_container(runtime).await;
                Some(runtime.clone())
            }
            _ => None,
        };
        let (program, args) = self.command(req)?;
        let mut cmd = Command::new(&program);
        cmd.args(&args)
            .envs(req.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&req.data_dir)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let agent_pid = std::process::id();
        // SAFETY: the closure only makes async-signal-safe calls (prctl,
        // getppid) and allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                // Die with the agent (the thread that spawned us, precisely:
                // tokio's worker threads live as long as the runtime).
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The agent may have died before prctl took effect.
                if libc::getppid() as u32 != agent_pid {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| LaunchError::Spawn {
            program: program.clone(),
            source,
        })?;
        let pid = child.id();
        if let Some(pid) = pid {
            if let Err(e) = std::fs::write(&pid_file, format!("{pid}\n")) {
                tracing::warn!(path = %pid_file.display(), error = %e, "cannot write engine pid file");
            }
        }
        tracing::info!(program = %program.display(), ?args, ?pid, "engine spawned");
        Ok(Box::new(ChildEngine {
            child,
            pid,
            pid_file,
            container,
        }))
    }
}

struct ChildEngine {
    child: Child,
    pid: Option<u32>,
    pid_file: PathBuf,
    /// The container runtime, when the child is its client (`docker run`).
    container: Option<String>,
}

impl ChildEngine {
    fn forget_pid_file(&self) {
        let _ = std::fs::remove_file(&self.pid_file);
    }
}

fn describe(status: std::process::ExitStatus) -> ExitInfo {
    use std::os::unix::process::ExitStatusExt;
    let description = match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => "exited".to_string(),
    };
    ExitInfo {
        code: status.code(),
        description,
    }
}

#[async_trait]
impl EngineProcess for ChildEngine {
    fn pid(&self) -> Option<u32> {
        self.pid
    }

    async fn wait(&mut self) -> ExitInfo {
        let info = match self.child.wait().await {
            Ok(status) => describe(status),
            Err(e) => ExitInfo {
                code: None,
                description: format!("cannot wait for the engine: {e}"),
            },
        };
        self.forget_pid_file();
        info
    }

    async fn stop(&mut self, grace: Duration) {
        if let Some(pid) = self.child.id() {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
            if tokio::time::timeout(grace, self.child.wait())
                .await
                .is_err()
            {
                tracing::warn!(pid, "engine ignored SIGTERM; killing it");
                let _ = self.child.kill().await;
            }
        }
        if let Some(runtime) = &self.container {
            remove_container(runtime).await;
        }
        self.forget_pid_file();
    }
}

/// Kills the engine a previous agent left behind, if `pid_file` names a live
/// process that looks like it (its command line mentions `sim` or `port`).
pub async fn kill_stale_engine(pid_file: &Path, port: u16) {
    let Ok(text) = std::fs::read_to_string(pid_file) else {
        return;
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        return;
    };
    if pid <= 1 || pid as u32 == std::process::id() {
        return;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return;
    };
    let port = port.to_string();
    let looks_like_engine = cmdline
        .split(|b| *b == 0)
        .any(|arg| arg == b"sim" || arg == port.as_bytes());
    if !looks_like_engine {
        return;
    }
    tracing::warn!(pid, "killing a stale engine left by a previous agent");
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while is_alive(pid) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = std::fs::remove_file(pid_file);
}

/// Alive and not a zombie.
fn is_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next())
                != Some('Z')
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Right after exec the kernel may not have filled in the command line yet.
    async fn wait_for_cmdline(pid: u32) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| c.is_empty())
            .unwrap_or(true)
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no command line for {pid}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn kills_a_stale_engine_named_in_the_pid_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A process whose command line names the engine port (600 here).
        let mut stale = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .expect("spawn");
        wait_for_cmdline(stale.id()).await;
        let pid_file = dir.path().join("engine.pid");
        std::fs::write(&pid_file, stale.id().to_string()).expect("write");
        kill_stale_engine(&pid_file, 600).await;
        let status = stale.wait().expect("wait");
        assert!(!status.success());
        assert!(!pid_file.exists());
    }

    #[tokio::test]
    async fn leaves_unrelated_processes_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut other = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn");
        let pid_file = dir.path().join("engine.pid");
        std::fs::write(&pid_file, other.id().to_string()).expect("write");
        kill_stale_engine(&pid_file, 8000).await;
        assert!(
            other.try_wait().expect("try_wait").is_none(),
            "still running"
        );
        other.kill().expect("kill");
        let _ = other.wait();
    }

    #[test]
    fn builds_vllm_and_sim_commands() {
        let l = ProcessLauncher {
            sim_program: "/usr/bin/gpufleet".into(),
        };
        let req = LaunchRequest {
            spec: EngineSpec::Vllm {
                port: 9000,
                command: vec!["vllm".into(), "serve".into()],
            },
            host: "10.0.0.2".parse().expect("ip"),
            model: "org/m".parse().expect("model"),
            data_dir: "/tmp".into(),
            env: vec![("HF_TOKEN".into(), "hf_secret".into())],
            tls: None,
            extra_args: vec![],
        };
        let (p, args) = l.command(&req).expect("cmd");
        assert_eq!(p, PathBuf::from("vllm"));
        assert_eq!(
            args,
            ["serve", "--model", "org/m", "--host", "10.0.0.2", "--port", "9000"]
        );
        let req = LaunchRequest {
            spec: EngineSpec::Sim {
                port: 8001,
                model_load_delay_ms: 5,
            },
            ..req
        };
        let (p, args) = l.command(&req).expect("cmd");
        assert_eq!(p, PathBuf::from("/usr/bin/gpufleet"));
        assert_eq!(
            args.join(" "),
            "sim --host 10.0.0.2 --port 8001 --model org/m --model-load-delay-ms 5"
        );
        // A deployment's engine arguments come last.
        let with_args = LaunchRequest {
            extra_args: vec!["--ttft-ms".into(), "40".into()],
            ..req
        };
        let (_, args) = l.command(&with_args).expect("cmd");
        assert!(
            args.join(" ")
                .ends_with("--model-load-delay-ms 5 --ttft-ms 40"),
            "{args:?}"
        );
        let req = LaunchRequest {
            extra_args: vec![],
            ..with_args
        };
        let empty = LaunchRequest {
            spec: EngineSpec::Vllm {
                port: 1,
                command: vec![],
            },
            ..req
        };
        assert!(matches!(l.command(&empty), Err(LaunchError::EmptyCommand)));
        let container = LaunchRequest {
            spec: EngineSpec::VllmContainer {
                port: 8000,
                image: "vllm/vllm-openai:v0.10.1".into(),
                cache_dir: "/var/lib/gpufleet/models".into(),
                args: vec!["--max-model-len".into(), "8192".into()],
                runtime: "docker".into(),
            },
            ..empty
        };
        let (p, args) = l.command(&container).expect("cmd");
        assert_eq!(p, PathBuf::from("docker"));
        assert_eq!(
            args.join(" "),
            "run --rm --name gpufleet-engine --gpus all --ipc=host --network host \
             -v /var/lib/gpufleet/models:/root/.cache/huggingface -e HF_TOKEN \
             vllm/vllm-openai:v0.10.1 --model org/m --host 10.0.0.2 --port 8000 --max-model-len 8192"
        );
        // The secret's value never appears on the command line.
        assert!(!args.iter().any(|a| a.contains("hf_secret")));

        // Mutual TLS: the files mounted read-only, vLLM's flags over them.
        let tls = crate::engine::EngineTlsFiles::in_dir("/var/lib/gpufleet/engine-tls".into());
        let with_tls = LaunchRequest {
            tls: Some(tls.clone()),
            ..container
        };
        let (_, args) = l.command(&with_tls).expect("cmd");
        assert_eq!(
            args.join(" "),
            "run --rm --name gpufleet-engine --gpus all --ipc=host --network host \
             -v /var/lib/gpufleet/models:/root/.cache/huggingface \
             -v /var/lib/gpufleet/engine-tls:/gpufleet-tls:ro -e HF_TOKEN \
             vllm/vllm-openai:v0.10.1 --model org/m --host 10.0.0.2 --port 8000 \
             --ssl-keyfile /gpufleet-tls/key.pem --ssl-certfile /gpufleet-tls/cert.pem \
             --ssl-ca-certs /gpufleet-tls/clients.pem --ssl-cert-reqs 2 --max-model-len 8192"
        );
        let vllm = LaunchRequest {
            spec: EngineSpec::Vllm {
                port: 9000,
                command: vec!["vllm".into(), "serve".into()],
            },
            ..with_tls
        };
        let (_, args) = l.command(&vllm).expect("cmd");
        assert_eq!(
            args[7..].join(" "),
            "--ssl-keyfile /var/lib/gpufleet/engine-tls/key.pem \
             --ssl-certfile /var/lib/gpufleet/engine-tls/cert.pem \
             --ssl-ca-certs /var/lib/gpufleet/engine-tls/clients.pem --ssl-cert-reqs 2"
        );
    }
}
