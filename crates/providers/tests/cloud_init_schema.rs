//! The user data cloud machines get is valid cloud-config, as cloud-init's
//! own validator (`cloud-init schema`, Debian's `cloud-init` package, which
//! `.ci/run` installs) sees it. Fails, never skips, without it.

use gpufleet_domain::{GpuSpec, InstanceId};
use gpufleet_proto::{AgentBootstrap, EngineSpec};
use gpufleet_providers::cloudinit::{user_data, AgentInstall, CacheDisk};
use std::process::Command;

fn validate(doc: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("user-data.yaml");
    std::fs::write(&path, doc).unwrap();
    let out = Command::new("cloud-init")
        .args(["schema", "--config-file"])
        .arg(&path)
        .output()
        .expect("cloud-init is installed (apt-get install cloud-init)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_user_data_passes_cloud_inits_schema() {
    let disk = CacheDisk {
        device: "/dev/disk/by-id/scsi-0SCW_sbs_volume-3dcd8901-d213-4ca4-89c5-85ba55a60ff7".into(),
        mount_point: "/var/lib/gpufleet/models".into(),
    };
    let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    for (ca, disk) in [(None, None), (Some(pem), Some(&disk))] {
        let id = InstanceId::new();
        let bootstrap = AgentBootstrap {
            instance_id: id,
            control_plane_url: "https://fleet.example.com".into(),
            bootstrap_secret: "gfb_secret".into(),
            model: "Qwen/Qwen2.5-7B-Instruct".parse().unwrap(),
            agent_port: 7070,
            engine: EngineSpec::VllmContainer {
                port: 8000,
                image: "vllm/vllm-openai:v0.10.1".into(),
                cache_dir: "/var/lib/gpufleet/models".into(),
                args: vec![],
                runtime: "docker".into(),
            },
            gpu: GpuSpec {
                model: "NVIDIA L4".into(),
                count: 1,
                vram_mib: 23034,
                power_limit_w: 72.0,
            },
            control_plane_ca_pem: ca.map(str::to_string),
            engine_args: vec![],
        };
        let install = AgentInstall {
            binary_url: "https://fleet.example.com/downloads/gpufleet".into(),
            binary_sha256: "ab".repeat(32),
            agent_args: vec!["--gpu".into(), "nvml".into()],
        };
        let doc = user_data(&bootstrap, &install, disk);
        assert_eq!(doc.contains("mounts:"), disk.is_some());
        let (ok, text) = validate(&doc);
        assert!(ok, "cloud-init schema rejects the user data: {text}\n{doc}");
    }
}

#[test]
fn the_validator_does_reject_bad_cloud_config() {
    let (ok, text) = validate("#cloud-config\nwrite_files: 5\nruncmd: {a: 1}\n");
    assert!(!ok, "a malformed document must fail: {text}");
}
