//! "VMs": a running server's `cloud-init` user data, run as local processes.
//!
//! Contract (also in ARCHITECTURE.md):
//! - VM dir `<data_dir>/servers/<id>/`, root `<vm dir>/root`; output of the
//!   boot script and runcmd in `<vm dir>/console.log`, of each unit in `<vm dir>/<unit>.log`.
//! - `#cloud-config` user data: `write_files` (`path`, `content`, `encoding`
//!   b64/base64 or plain, `permissions` octal string, `append`; `owner`
//!   ignored) written at `<root><path>`, then `runcmd` in order (a list =
//!   argv run directly, a string = `sh -c`), cwd `<root>`. Every argv element
//!   that is an absolute path existing under `<root>` becomes `<root><path>`.
//!   Both run on the first boot only; later boots start the enabled units.
//!   User data starting with `#!` is run as a script on the first boot.
//! - Environment: the emulator's, with `PATH` = `VmConfig.bin_dir` :
//!   `<data_dir>/emulator-bin` (the `systemctl` stand-in) : `$PATH`, plus
//!   `GPUFLEET_ROOT`, `GPUFLEET_AGENT_BIND` (the server's first public IP),
//!   `GPUFLEET_VM_DIR`, `GPUFLEET_SERVER_ID` and `VmConfig.env`.
//! - Each VM is one session / process group (`setsid`); stopping it sends
//!   SIGTERM to the group (and to any process left in its session), then
//!   SIGKILL after `kill_grace`, and waits until none is alive.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_norway::Value as Yaml;

use crate::{EmulatorConfig, VmConfig};

const SYSTEMCTL: &str = include_str!("systemctl.sh");

pub struct Vms {
    data_dir: PathBuf,
    sys_bin: PathBuf,
    config: Option<VmConfig>,
    running: Mutex<HashMap<String, i32>>,
    shutting_down: AtomicBool,
}

fn log_line(console: &Path, line: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(console)
    {
        let _ = writeln!(f, "[gpufleet-scaleway-emulator] {line}");
    }
}

/// Single-quotes for sh.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn yaml_str(v: &Yaml) -> Option<String> {
    match v {
        Yaml::String(s) => Some(s.clone()),
        Yaml::Number(n) => Some(n.to_string()),
        Yaml::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Processes (pid, pgrp, session, state) from /proc.
fn processes() -> Vec<(i32, i32, i32, char)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        if rest.len() < 4 {
            continue;
        }
        let state = rest[0].chars().next().unwrap_or('?');
        let (Ok(pgrp), Ok(session)) = (rest[2].parse::<i32>(), rest[3].parse::<i32>()) else {
            continue;
        };
        out.push((pid, pgrp, session, state));
    }
    out
}

/// Live (not zombie) processes of a VM: in its process group or its session.
pub fn vm_processes(pgid: i32) -> Vec<i32> {
    processes()
        .into_iter()
        .filter(|(_, pgrp, sid, state)| {
            (*pgrp == pgid || *sid == pgid) && *state != 'Z' && *state != 'X'
        })
        .map(|(pid, ..)| pid)
        .collect()
}

fn signal_vm(pgid: i32, sig: i32) {
    // SAFETY: kill(2) with a negative pid signals a process group; no memory is touched.
    unsafe {
        libc::kill(-pgid, sig);
    }
    for pid in vm_processes(pgid) {
        // SAFETY: as above, for single processes left in the VM's session.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

impl Vms {
    pub fn new(config: &EmulatorConfig) -> std::io::Result<Vms> {
        let data_dir = std::path::absolute(&config.data_dir)?;
        let sys_bin = data_dir.join("emulator-bin");
        if config.vm.is_some() {
            std::fs::create_dir_all(&sys_bin)?;
            let path = sys_bin.join("systemctl");
            std::fs::write(&path, SYSTEMCTL)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        }
        Ok(Vms {
            data_dir,
            sys_bin,
            config: config.vm.clone(),
            running: Mutex::new(HashMap::new()),
            shutting_down: AtomicBool::new(false),
        })
    }

    pub fn pgid(&self, id: &str) -> Option<i32> {
        self.running.lock().unwrap().get(id).copied()
    }

    pub fn vm_dir(&self, id: &str) -> PathBuf {
        self.data_dir.join("servers").join(id)
    }

    /// Boots a VM for server `id` (after it reached `running`).
    pub async fn boot(
        &self,
        id: &str,
        user_data: BTreeMap<String, Vec<u8>>,
        address: Option<String>,
    ) {
        let Some(cfg) = self.config.clone() else {
            return;
        };
        self.kill(id).await;
        let vm_dir = self.vm_dir(id);
        let root = vm_dir.join("root");
        let console = vm_dir.join("console.log");
        if let Err(e) = std::fs::create_dir_all(&root) {
            tracing::warn!(server = id, "VM dir: {e}");
            return;
        }
        // Units' pid files of an earlier boot are stale: every process of it is gone.
        if let Ok(dir) = std::fs::read_dir(vm_dir.join("units")) {
            for e in dir.flatten() {
                if e.path().extension().is_some_and(|x| x == "pid") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let done_marker = vm_dir.join(".cloud-init-done");
        let first_boot = !done_marker.exists();
        log_line(
            &console,
            &format!("boot (first: {first_boot}), address {address:?}"),
        );

        let script = if first_boot {
            let s = match user_data.get("cloud-init") {
                Some(raw) => self.first_boot_script(&vm_dir, &root, raw, &console),
                None => {
                    log_line(&console, "no cloud-init user data");
                    String::new()
                }
            };
            let _ = std::fs::write(&done_marker, b"");
            s
        } else {
            format!(
                "if [ -f {units} ]; then while IFS= read -r u; do systemctl start \"$u\"; done < {units}; fi\n",
                units = sh_quote(&vm_dir.join("units/enabled").to_string_lossy())
            )
        };
        let init = vm_dir.join("init.sh");
        if std::fs::write(
            &init,
            format!("#!/bin/sh\n# written by gpufleet-scaleway-emulator\n{script}"),
        )
        .is_err()
        {
            return;
        }

        let mut path = Vec::new();
        if let Some(b) = &cfg.bin_dir {
            path.push(std::path::absolute(b).unwrap_or_else(|_| b.clone()));
        }
        path.push(self.sys_bin.clone());
        if let Some(p) = std::env::var_os("PATH") {
            path.extend(std::env::split_paths(&p));
        }
        let Ok(path) = std::env::join_paths(path) else {
            return;
        };
        let (Ok(out), Ok(err)) = (
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&console),
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&console),
        ) else {
            return;
        };
        let mut cmd = tokio::process::Command::new("sh");
        cmd.arg(&init)
            .current_dir(&root)
            .env("PATH", path)
            .env("GPUFLEET_ROOT", &root)
            .env("GPUFLEET_VM_DIR", &vm_dir)
            .env("GPUFLEET_SERVER_ID", id)
            .env("GPUFLEET_AGENT_BIND", address.unwrap_or_default())
            .envs(cfg.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(false);
        // SAFETY: setsid(2) is async-signal-safe; it makes the child the
        // leader of a new session and process group (its pid).
        unsafe {
            cmd.as_std_mut().pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        // Hold the lock across spawn so a shutdown cannot miss this VM.
        let mut running = self.running.lock().unwrap();
        if self.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        match cmd.spawn() {
            Ok(mut child) => {
                let pgid = child.id().map(|p| p as i32).unwrap_or(0);
                running.insert(id.to_string(), pgid);
                tokio::spawn(async move {
                    let _ = child.wait().await;
                });
            }
            Err(e) => log_line(&console, &format!("could not start init: {e}")),
        }
    }

    fn first_boot_script(&self, vm_dir: &Path, root: &Path, raw: &[u8], console: &Path) -> String {
        let text = String::from_utf8_lossy(raw);
        if text.starts_with("#!") {
            let script = vm_dir.join("user-script");
            if std::fs::write(&script, raw).is_ok() {
                let _ = std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755));
                return format!(
                    "cd \"$GPUFLEET_ROOT\" && {}\n",
                    sh_quote(&script.to_string_lossy())
                );
            }
            return String::new();
        }
        if !text.starts_with("#cloud-config") {
            log_line(
                console,
                "user data is neither #cloud-config nor a #! script: ignored",
            );
            return String::new();
        }
        let doc: Yaml = match serde_norway::from_str(&text) {
            Ok(d) => d,
            Err(e) => {
                log_line(console, &format!("cloud-config is not valid YAML: {e}"));
                return String::new();
            }
        };
        if let Some(files) = doc.get("write_files").and_then(Yaml::as_sequence) {
            for f in files {
                if let Err(e) = write_file(root, f) {
                    log_line(console, &format!("write_files: {e}"));
                }
            }
        }
        let mut script = String::from(
            r#"gf_run() {
  for gf_a do
    shift
    case $gf_a in /*) if [ -e "$GPUFLEET_ROOT$gf_a" ]; then gf_a=$GPUFLEET_ROOT$gf_a; fi ;; esac
    set -- "$@" "$gf_a"
  done
  "$@"
}
"#,
        );
        let cmds = doc
            .get("runcmd")
            .and_then(Yaml::as_sequence)
            .cloned()
            .unwrap_or_default();
        let n = cmds.len();
        for (i, c) in cmds.iter().enumerate() {
            let line = match c {
                Yaml::Sequence(argv) => {
                    let words: Vec<String> = argv
                        .iter()
                        .filter_map(yaml_str)
                        .map(|w| sh_quote(&w))
                        .collect();
                    format!("gf_run {}", words.join(" "))
                }
                other => match yaml_str(other) {
                    Some(s) => format!("sh -c {}", sh_quote(&s)),
                    None => continue,
                },
            };
            let shown = line.replace('\n', " ");
            script.push_str(&format!(
                "echo {}\ncd \"$GPUFLEET_ROOT\" && {line}\necho \"[gpufleet-scaleway-emulator] runcmd {}/{n} exited with $?\"\n",
                sh_quote(&format!("[gpufleet-scaleway-emulator] runcmd {}/{n}: {shown}", i + 1)),
                i + 1
            ));
        }
        script
    }

    /// Stops a VM: TERM to its group, KILL after the grace period; returns
    /// when none of its processes is alive.
    pub async fn kill(&self, id: &str) {
        let pgid = self.running.lock().unwrap().remove(id);
        if let Some(pgid) = pgid {
            let grace = self
                .config
                .as_ref()
                .map(|c| c.kill_grace)
                .unwrap_or(Duration::from_secs(3));
            kill_group(pgid, grace).await;
        }
    }

    /// SIGKILL to every VM, without waiting (for `Drop`).
    pub fn kill_all_now(&self) {
        let all: Vec<i32> = {
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            self.shutting_down.store(true, Ordering::SeqCst);
            running.drain().map(|(_, p)| p).collect()
        };
        for pgid in all {
            if pgid > 1 {
                signal_vm(pgid, libc::SIGKILL);
            }
        }
    }

    pub async fn kill_all(&self) {
        let all: Vec<i32> = {
            let mut running = self.running.lock().unwrap();
            self.shutting_down.store(true, Ordering::SeqCst);
            running.drain().map(|(_, p)| p).collect()
        };
        let grace = self
            .config
            .as_ref()
            .map(|c| c.kill_grace)
            .unwrap_or(Duration::from_secs(3));
        futures_join(all.into_iter().map(|p| kill_group(p, grace)).collect()).await;
    }
}

async fn futures_join(tasks: Vec<impl std::future::Future<Output = ()> + Send + 'static>) {
    let handles: Vec<_> = tasks.into_iter().map(tokio::spawn).collect();
    for h in handles {
        let _ = h.await;
    }
}

pub async fn kill_group(pgid: i32, grace: Duration) {
    if pgid <= 1 {
        return;
    }
    signal_vm(pgid, libc::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if vm_processes(pgid).is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        signal_vm(pgid, libc::SIGKILL);
        if vm_processes(pgid).is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    tracing::warn!(pgid, "VM processes still alive after SIGKILL");
}

fn write_file(root: &Path, f: &Yaml) -> Result<(), String> {
    let path = f
        .get("path")
        .and_then(yaml_str)
        .ok_or("an entry has no path")?;
    let target = root.join(path.trim_start_matches('/'));
    let content = f.get("content").and_then(yaml_str).unwrap_or_default();
    let bytes = match f.get("encoding").and_then(yaml_str).as_deref() {
        None | Some("text/plain") => content.into_bytes(),
        Some("b64") | Some("base64") => base64::engine::general_purpose::STANDARD
            .decode(content.split_whitespace().collect::<String>())
            .map_err(|e| format!("{path}: bad base64: {e}"))?,
        Some(other) => return Err(format!("{path}: encoding {other} is not supported")),
    };
    if let Some(dir) = target.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{path}: {e}"))?;
    }
    let append = matches!(f.get("append"), Some(Yaml::Bool(true)));
    if append {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&target)
            .map_err(|e| format!("{path}: {e}"))?;
        file.write_all(&bytes).map_err(|e| format!("{path}: {e}"))?;
    } else {
        std::fs::write(&target, &bytes).map_err(|e| format!("{path}: {e}"))?;
    }
    let mode = match f.get("permissions").and_then(yaml_str) {
        Some(p) => u32::from_str_radix(p.trim_start_matches("0o"), 8)
            .map_err(|_| format!("{path}: bad permissions {p}"))?,
        None => 0o644,
    };
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("{path}: {e}"))?;
    Ok(())
}
