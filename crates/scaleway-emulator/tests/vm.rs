mod common;

use std::time::Duration;

use common::*;
use gpufleet_scaleway_emulator::VmConfig;
use reqwest::StatusCode;
use serde_json::json;

const USER_DATA: &str = r#"#cloud-config
write_files:
  - path: /etc/systemd/system/hello.service
    permissions: '0644'
    owner: root:root
    content: |
      [Unit]
      Description=hello
      [Service]
      Environment="GREETING=up"
      ExecStart=/bin/sh -c 'echo "$GREETING" > $GPUFLEET_ROOT/ok; echo "$GPUFLEET_AGENT_BIND" > $GPUFLEET_ROOT/bind; exec sleep 1000'
      Restart=always
      RestartSec=1
  - path: /opt/app/run.sh
    permissions: '0755'
    encoding: b64
    content: IyEvYmluL3NoCmVjaG8gInJhbiAkMSIgPiAiJEdQVUZMRUVUX1JPT1QvcmFuIgo=
runcmd:
  - [systemctl, daemon-reload]
  - [/opt/app/run.sh, arg1]
  - "echo from-string > $GPUFLEET_ROOT/string; echo $EXTRA_VAR > $GPUFLEET_ROOT/extra"
  - [systemctl, enable, --now, hello]
"#;

async fn boot_vm(env: &Env) -> (String, std::path::PathBuf, i32) {
    let ip = env
        .post(&format!("{Z}/ips"), json!({"type": "routed_ipv4"}))
        .await
        .json()["ip"]
        .clone();
    let s = env
        .create_server(
            json!({"name": "vm", "commercial_type": "L4-1-24G", "image": "ubuntu_jammy_gpu_os_12",
                               "public_ips": [ip["id"]]}),
        )
        .await;
    let id = s["id"].as_str().unwrap().to_string();
    let r = env
        .http
        .patch(env.url(&format!("{Z}/servers/{id}/user_data/cloud-init")))
        .header("X-Auth-Token", KEY)
        .header("Content-Type", "text/plain")
        .body(USER_DATA)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        env.action(&id, "poweron").await.status,
        StatusCode::ACCEPTED
    );
    env.wait_state(&id, Some("running")).await;
    let root = env.emu.vm_dir(&id).join("root");
    let ok = root.join("ok");
    poll(Duration::from_secs(10), || async {
        std::fs::read_to_string(&ok).is_ok_and(|s| s == "up\n")
    })
    .await;
    let pgid = env.emu.servers()[0].vm_pgid.expect("a VM runs");
    let addr = ip["address"].as_str().unwrap();
    assert_eq!(
        std::fs::read_to_string(root.join("bind")).unwrap().trim(),
        addr
    );
    (id, root, pgid)
}

fn alive(pgid: i32) -> bool {
    // Any non-zombie process in the VM's process group or session?
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            return false;
        };
        let Some(close) = stat.rfind(')') else {
            return false;
        };
        let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        f.len() > 3 && f[0] != "Z" && (f[2] == pgid.to_string() || f[3] == pgid.to_string())
    })
}

#[tokio::test]
async fn vm_boots_user_data_and_terminate_leaves_no_process() {
    let env = start(|c| {
        c.timings.boot = Duration::from_millis(50);
        c.vm = Some(VmConfig {
            bin_dir: None,
            env: vec![("EXTRA_VAR".into(), "extra-value".into())],
            kill_grace: Duration::from_secs(2),
        });
    })
    .await;
    let (id, root, pgid) = boot_vm(&env).await;
    let vm_dir = root.parent().unwrap().to_path_buf();
    // write_files: mode and base64; runcmd: argv with path mapping, sh -c string, env.
    let run = root.join("opt/app/run.sh");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&run).unwrap().permissions().mode() & 0o777,
        0o755
    );
    poll(Duration::from_secs(5), || async {
        root.join("extra").exists()
    })
    .await;
    assert_eq!(
        std::fs::read_to_string(root.join("ran")).unwrap(),
        "ran arg1\n"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("string")).unwrap(),
        "from-string\n"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("extra")).unwrap(),
        "extra-value\n"
    );
    let console = std::fs::read_to_string(vm_dir.join("console.log")).unwrap();
    assert!(console.contains("runcmd 4/4"), "{console}");
    assert!(alive(pgid));

    // The unit restarts when its process dies.
    std::fs::remove_file(root.join("ok")).unwrap();
    let sleeper = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .find(|pid| {
            let cmd = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            cmd.starts_with("sleep\u{0}1000")
                && stat.split_whitespace().nth(5) == Some(&pgid.to_string())
        })
        .expect("the unit's sleep");
    unsafe {
        libc::kill(sleeper, libc::SIGKILL);
    }
    poll(Duration::from_secs(10), || async {
        root.join("ok").exists()
    })
    .await;

    assert_eq!(
        env.action(&id, "terminate").await.status,
        StatusCode::ACCEPTED
    );
    env.wait_state(&id, None).await;
    poll(Duration::from_secs(10), || async { !alive(pgid) }).await;
    assert!(env.emu.servers().is_empty());
    env.emu.shutdown().await;
}

#[tokio::test]
async fn poweroff_kills_and_poweron_restarts_enabled_units() {
    let env = start(|c| {
        c.vm = Some(VmConfig {
            kill_grace: Duration::from_secs(2),
            ..VmConfig::default()
        });
    })
    .await;
    let (id, root, pgid) = boot_vm(&env).await;
    assert_eq!(
        env.action(&id, "poweroff").await.status,
        StatusCode::ACCEPTED
    );
    env.wait_state(&id, Some("stopped")).await;
    assert!(!alive(pgid), "poweroff stopped every VM process");
    std::fs::remove_file(root.join("ok")).unwrap();
    std::fs::remove_file(root.join("ran")).unwrap();
    assert_eq!(
        env.action(&id, "poweron").await.status,
        StatusCode::ACCEPTED
    );
    env.wait_state(&id, Some("running")).await;
    // The enabled unit runs again; runcmd does not (first boot only).
    poll(Duration::from_secs(10), || async {
        root.join("ok").exists()
    })
    .await;
    assert!(!root.join("ran").exists());
    let pgid2 = env.emu.servers()[0].vm_pgid.unwrap();
    env.emu.shutdown().await;
    assert!(!alive(pgid2), "shutdown killed every VM process group");
}

#[tokio::test]
async fn dropping_the_emulator_kills_its_vms() {
    let env = start(|c| c.vm = Some(VmConfig::default())).await;
    let (_, _, pgid) = boot_vm(&env).await;
    drop(env);
    poll(Duration::from_secs(10), || async { !alive(pgid) }).await;
}

#[tokio::test]
async fn without_vm_config_nothing_runs() {
    let env = start(|_| {}).await;
    let s = env
        .create_server(json!({"name": "n", "commercial_type": "DEV1-S"}))
        .await;
    let id = s["id"].as_str().unwrap();
    env.action(id, "poweron").await;
    env.wait_state(id, Some("running")).await;
    assert_eq!(env.emu.servers()[0].vm_pgid, None);
    env.emu.shutdown().await;
}
