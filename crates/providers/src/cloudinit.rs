//! The cloud-init user data that turns a bare cloud machine into a fleet
//! member: it writes the one-time [`AgentBootstrap`], downloads the agent
//! binary from the control plane (checked against its SHA-256) and runs it
//! as a systemd service.
//!
//! What it carries that is secret is the bootstrap's one-time secret alone,
//! worthless once the agent has registered. Everything else the agent needs
//! (the Hugging Face token, ...) comes over the authenticated channel after
//! registration.
//!
//! The install script prefixes every path it writes with `$GPUFLEET_ROOT`
//! (unset on a real machine), so an emulator can run the very same user data
//! inside a directory.

use gpufleet_proto::AgentBootstrap;

/// Where the machine finds the agent binary.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentInstall {
    /// URL of the agent binary, served by the control plane.
    pub binary_url: String,
    /// Lowercase hex SHA-256 of that binary.
    pub binary_sha256: String,
    /// Arguments of `gpufleet agent` beyond the bootstrap and data paths,
    /// e.g. `--gpu nvml`.
    pub agent_args: Vec<String>,
}

/// Where things go on the machine.
pub mod paths {
    pub const BOOTSTRAP: &str = "/etc/gpufleet/bootstrap.json";
    pub const CA: &str = "/etc/gpufleet/control-plane-ca.pem";
    pub const UNIT: &str = "/etc/systemd/system/gpufleet-agent.service";
    pub const INSTALL_SCRIPT: &str = "/usr/local/lib/gpufleet/install-agent.sh";
    pub const BINARY: &str = "/usr/local/bin/gpufleet";
    pub const DATA_DIR: &str = "/var/lib/gpufleet";
}

/// A block volume the machine formats (once) and mounts for the model cache.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheDisk {
    /// Its stable device path, e.g. `/dev/disk/by-id/scsi-0SCW_sbs_volume-<id>`.
    pub device: String,
    /// Where it is mounted (the engine's cache directory).
    pub mount_point: String,
}

/// Filesystem label of the model-cache volume.
const CACHE_LABEL: &str = "gpufleet-models";

/// The systemd unit's name.
pub const UNIT_NAME: &str = "gpufleet-agent.service";

/// The `#cloud-config` document for one machine; with `disk`, cloud-init
/// formats it (ext4, only if it holds no filesystem yet) and mounts it before
/// the agent is installed (`nofail`: without it the cache stays on the root
/// volume).
pub fn user_data(
    bootstrap: &AgentBootstrap,
    install: &AgentInstall,
    disk: Option<&CacheDisk>,
) -> String {
    let bootstrap_json =
        serde_json::to_string(bootstrap).expect("an AgentBootstrap always serializes");
    let mut files = vec![file(paths::BOOTSTRAP, "0600", &bootstrap_json)];
    if let Some(pem) = &bootstrap.control_plane_ca_pem {
        files.push(file(paths::CA, "0644", pem));
    }
    files.push(file(paths::UNIT, "0644", &unit(install)));
    files.push(file(
        paths::INSTALL_SCRIPT,
        "0755",
        &install_script(install, bootstrap.control_plane_ca_pem.is_some()),
    ));
    let mut out = String::from("#cloud-config\n");
    out.push_str(&format!(
        "# gpufleet instance {}: installs and starts the gpufleet agent.\n",
        bootstrap.instance_id
    ));
    out.push_str("write_files:\n");
    for f in files {
        out.push_str(&f);
    }
    if let Some(d) = disk {
        out.push_str(&format!(
            "fs_setup:\n  - label: {CACHE_LABEL}\n    filesystem: ext4\n    device: {}\n    overwrite: false\n",
            yaml_str(&d.device)
        ));
        out.push_str(&format!(
            "mounts:\n  - [\"LABEL={CACHE_LABEL}\", {}, \"ext4\", \"defaults,nofail,x-systemd.device-timeout=60s\", \"0\", \"2\"]\n",
            yaml_str(&d.mount_point)
        ));
    }
    out.push_str("runcmd:\n");
    out.push_str(&format!("  - [{}]\n", yaml_str(paths::INSTALL_SCRIPT)));
    out
}

/// One `write_files` entry; contents go base64-encoded so that no character
/// of them can break the YAML.
fn file(path: &str, permissions: &str, content: &str) -> String {
    format!(
        "  - path: {}\n    permissions: '{permissions}'\n    encoding: b64\n    content: {}\n",
        yaml_str(path),
        base64(content.as_bytes())
    )
}

fn unit(install: &AgentInstall) -> String {
    let mut exec = vec![
        paths::BINARY.to_string(),
        "agent".to_string(),
        "--bootstrap-file".to_string(),
        paths::BOOTSTRAP.to_string(),
        "--data-dir".to_string(),
        paths::DATA_DIR.to_string(),
    ];
    exec.extend(install.agent_args.iter().cloned());
    format!(
        "[Unit]\n\
         Description=gpufleet worker agent\n\
         Wants=network-online.target docker.service\n\
         After=network-online.target docker.service\n\
         \n\
         [Service]\n\
         ExecStart={}\n\
         Restart=always\n\
         RestartSec=2\n\
         KillMode=control-group\n\
         TimeoutStopSec=60\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        exec.join(" ")
    )
}

fn install_script(install: &AgentInstall, pinned: bool) -> String {
    let cacert = if pinned {
        format!(" --cacert \"$ROOT{}\"", paths::CA)
    } else {
        String::new()
    };
    format!(
        "#!/bin/sh\n\
         # Installs the gpufleet agent from the control plane and starts it.\n\
         set -eu\n\
         ROOT=\"${{GPUFLEET_ROOT:-}}\"\n\
         URL={url}\n\
         SHA256={sha}\n\
         mkdir -p \"$ROOT/usr/local/bin\" \"$ROOT{data}\"\n\
         chmod 0700 \"$ROOT{data}\"\n\
         tmp=\"$ROOT/usr/local/bin/.gpufleet.download\"\n\
         n=0\n\
         until curl -fsS{cacert} -o \"$tmp\" \"$URL\"; do\n\
         \x20 n=$((n + 1))\n\
         \x20 if [ \"$n\" -ge 60 ]; then echo 'gpufleet: cannot download the agent' >&2; exit 1; fi\n\
         \x20 sleep 5\n\
         done\n\
         echo \"$SHA256  $tmp\" | sha256sum -c - >/dev/null\n\
         chmod 0755 \"$tmp\"\n\
         mv \"$tmp\" \"$ROOT{bin}\"\n\
         systemctl daemon-reload\n\
         systemctl enable --now {unit}\n",
        url = shell_str(&install.binary_url),
        sha = shell_str(&install.binary_sha256),
        data = paths::DATA_DIR,
        bin = paths::BINARY,
        unit = UNIT_NAME,
    )
}

/// A YAML double-quoted scalar.
fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string always serializes")
}

/// A POSIX shell single-quoted word.
fn shell_str(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpufleet_domain::{GpuSpec, InstanceId};
    use gpufleet_proto::EngineSpec;

    pub(crate) fn bootstrap(ca: Option<&str>) -> AgentBootstrap {
        AgentBootstrap {
            instance_id: InstanceId::new(),
            control_plane_url: "https://fleet.example.com".into(),
            bootstrap_secret: "one-time".into(),
            model: "Qwen/Qwen2.5-7B-Instruct".parse().unwrap(),
            agent_port: 7070,
            engine: EngineSpec::Sim {
                port: 8000,
                model_load_delay_ms: 0,
            },
            gpu: GpuSpec {
                model: "NVIDIA L4".into(),
                count: 1,
                vram_mib: 23034,
                power_limit_w: 72.0,
            },
            control_plane_ca_pem: ca.map(str::to_string),
            engine_args: vec![],
        }
    }

    #[test]
    fn user_data_is_cloud_config_with_the_bootstrap_unit_and_script() {
        let b = bootstrap(Some(
            "-----BEGIN CERTIFICATE-----\nX\n-----END CERTIFICATE-----\n",
        ));
        let install = AgentInstall {
            binary_url: "https://fleet.example.com/downloads/gpufleet".into(),
            binary_sha256: "ab".repeat(32),
            agent_args: vec!["--gpu".into(), "nvml".into()],
        };
        let ud = user_data(&b, &install, None);
        assert!(ud.starts_with("#cloud-config\n"), "{ud}");
        assert!(!ud.contains("mounts:"));
        assert!(ud.contains(&format!(
            "content: {}",
            base64(serde_json::to_string(&b).unwrap().as_bytes())
        )));
        assert!(ud.contains("\"/etc/gpufleet/control-plane-ca.pem\""));
        assert!(ud.contains("runcmd:\n  - [\"/usr/local/lib/gpufleet/install-agent.sh\"]\n"));
        // The secret only ever appears inside the base64 of the bootstrap.
        assert!(!ud.contains("one-time"));
        let script = install_script(&install, true);
        assert!(script.contains("--cacert \"$ROOT/etc/gpufleet/control-plane-ca.pem\""));
        assert!(script.contains(&format!("SHA256='{}'", "ab".repeat(32))));
        let unit = unit(&install);
        assert!(unit.contains(
            "ExecStart=/usr/local/bin/gpufleet agent --bootstrap-file /etc/gpufleet/bootstrap.json --data-dir /var/lib/gpufleet --gpu nvml\n"
        ));
    }

    #[test]
    fn without_a_pinned_certificate_there_is_no_ca_file() {
        let install = AgentInstall {
            binary_url: "https://x/y".into(),
            binary_sha256: "00".repeat(32),
            agent_args: vec![],
        };
        let ud = user_data(&bootstrap(None), &install, None);
        assert!(!ud.contains("control-plane-ca.pem\"\n    permissions"));
        assert!(!install_script(&install, false).contains("--cacert"));
    }

    #[test]
    fn shell_words_survive_quotes() {
        assert_eq!(shell_str("a'b"), "'a'\\''b'");
    }
}
