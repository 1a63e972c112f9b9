//! Scaleway, end to end, on the local emulator of its API: `gpufleet up`
//! configured with the `SCW_*` variables only (plus `agent_gpu = "simulated"`:
//! emulated machines have no GPU), a machine made through the provider's
//! normal calls, its cloud-init user data run as a local "VM" (the agent
//! downloaded from the control plane over pinned TLS, installed as a service,
//! vLLM's container replaced by the `docker` stand-in that runs the
//! simulator), ready, serving an OpenAI request through the router,
//! terminated leaving nothing billable — and the faults: a lost create
//! answer, `up` killed mid-create, 429s, out of stock, orphans.

use crate::common::*;
use gpufleet_domain::{InstanceId, InstanceStatus as S};
use gpufleet_scaleway_emulator::{
    Availability, Emulator, EmulatorConfig, FaultAction, FaultRule, VmConfig,
};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;

const ZONE: &str = "fr-par-2";
const L4: &str = "L4-1-24G";
const SECRET_KEY: &str = "4f1b2c3d-9e8f-4a7b-8c6d-5e4f3a2b1c0d";
const ACCESS_KEY: &str = "SCWE2ETESTACCESSKEY1";
const PROJECT: &str = "7d3c9a1e-2b4f-4e6a-9c8d-1f2e3d4c5b6a";
const HF_TOKEN: &str = "hf_e2eSECRETtokenValue0123456789";

/// The emulator, `up` configured for it, and their temporary directory.
struct Cloud {
    emulator: Option<Emulator>,
    app: TestApp,
    tmp: tempfile::TempDir,
}

impl Cloud {
    /// `control_toml`: more keys of `up`'s `[control]` section.
    async fn start(control_toml: &str) -> Cloud {
        let tmp = tempfile::Builder::new()
            .prefix("gpufleet-scw-")
            .tempdir()
            .expect("temp dir");
        let standins = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("standins");
        let mut config = EmulatorConfig::new(SECRET_KEY, PROJECT, tmp.path().join("scaleway"));
        config.zones = vec![ZONE.to_string()];
        config.ip_pool = format!(
            "127.{}.{}.0/24",
            rand::random_range(60..=90u8),
            rand::random::<u8>()
        );
        config.vm = Some(VmConfig {
            bin_dir: Some(standins),
            env: vec![],
            kill_grace: Duration::from_secs(2),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let emulator = Emulator::start(config, listener)
            .await
            .expect("emulator starts");
        let tls_port = free_port();
        let home = tmp.path().join("home");
        std::fs::create_dir_all(&home).unwrap();
        let env = [
            ("SCW_ACCESS_KEY", ACCESS_KEY.to_string()),
            ("SCW_SECRET_KEY", SECRET_KEY.to_string()),
            ("SCW_DEFAULT_PROJECT_ID", PROJECT.to_string()),
            ("SCW_DEFAULT_ZONE", ZONE.to_string()),
            ("SCW_API_URL", emulator.url()),
            ("HOME", home.display().to_string()),
            ("HF_TOKEN", HF_TOKEN.to_string()),
            (
                "GPUFLEET_PUBLIC_URL",
                format!("https://127.0.0.1:{tls_port}"),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let app = TestApp::spawn_with(
            BIN,
            Options {
                extra_toml: format!(
                    "[tls]\nlisten = \"127.0.0.1:{tls_port}\"\n\n\
                 [providers.scaleway]\nagent_gpu = \"simulated\"\ncatalog_ttl_secs = 1\n"
                ),
                control_toml: control_toml.to_string(),
                env,
                ..Default::default()
            },
        )
        .await;
        Cloud {
            emulator: Some(emulator),
            app,
            tmp,
        }
    }

    fn emu(&self) -> &Emulator {
        self.emulator.as_ref().expect("emulator running")
    }

    /// Waits until the emulator holds no server, IP or volume.
    async fn wait_nothing_billable(&self) {
        let emu = self.emu();
        eventually(
            Duration::from_secs(60),
            "no server, IP or volume left",
            || emu.servers().is_empty() && emu.ips().is_empty() && emu.volumes().is_empty(),
        )
        .await;
    }

    /// Terminates `id`, waits until nothing billable is left at the
    /// provider, and stops `up` and the emulator.
    async fn terminate_and_shut_down(self, id: InstanceId) {
        self.app.terminate(id).await;
        self.app
            .wait_status(&[id], S::Terminated, Duration::from_secs(60))
            .await;
        self.wait_nothing_billable().await;
        self.shutdown().await;
    }

    async fn shutdown(mut self) {
        let _ = self.app.stop(Duration::from_secs(20));
        if let Some(e) = self.emulator.take() {
            e.shutdown().await;
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Every file under `dir`, recursively, as bytes.
fn all_bytes(dir: &std::path::Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.is_dir() {
            out.extend(all_bytes(&p));
        } else if meta.is_file() && meta.len() < 64 << 20 {
            if let Ok(b) = std::fs::read(&p) {
                out.push((p, b));
            }
        }
    }
    out
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

async fn api_key(app: &TestApp) -> String {
    let resp = app
        .req(Method::POST, "/api/v1/api-keys")
        .json(&json!({"name": "scw"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    resp.json::<Value>().await.unwrap()["key"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn create_to_ready_serves_and_terminate_leaves_nothing() {
    let cloud = Cloud::start("").await;
    let app = &cloud.app;

    // The catalog comes from the emulated API: GPU types with their prices.
    let types: Value = app
        .get_json("/api/v1/providers/scaleway/instance-types")
        .await;
    let l4 = types["instance_types"]
        .as_array()
        .expect("types")
        .iter()
        .find(|t| t["name"] == L4)
        .unwrap_or_else(|| panic!("{L4} is offered: {types}"));
    assert!(l4["price_per_hour"].as_f64().unwrap() > 0.0, "{l4}");

    let id = app.create_on("scaleway", L4, 1).await[0].id;
    let ready = app
        .wait_status(&[id], S::Ready, Duration::from_secs(120))
        .await;
    let ip = ready[0].ip.expect("the machine's public IP");

    // Exactly one server, tagged, with its IP; user data set before poweron.
    let servers = cloud.emu().servers();
    assert_eq!(servers.len(), 1, "{servers:?}");
    let server = &servers[0];
    assert!(
        server.tags.contains(&format!("gpufleet-instance={id}")),
        "{server:?}"
    );
    assert_eq!(server.public_ips, vec![ip.to_string()]);
    assert!(server.user_data_keys.contains(&"cloud-init".to_string()));

    // The engine is vLLM's container, run by the stand-in with the GPUs and
    // the Hugging Face token by name only.
    let vm = cloud.emu().vm_dir(&server.id);
    let docker_log = std::fs::read_to_string(vm.join("root/var/log/docker-standin.log"))
        .expect("the docker stand-in ran");
    assert!(docker_log.contains("--gpus all"), "{docker_log}");
    assert!(docker_log.contains("-e HF_TOKEN"), "{docker_log}");
    assert!(
        docker_log.contains("image vllm/vllm-openai:"),
        "{docker_log}"
    );
    assert!(
        docker_log.contains(&format!("HF_TOKEN set ({} characters)", HF_TOKEN.len())),
        "{docker_log}"
    );

    // An OpenAI request through the router reaches it.
    let key = api_key(app).await;
    let resp = app
        .http
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&json!({"model": MODEL, "max_tokens": 5,
            "messages": [{"role": "user", "content": "hello"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()["x-gpufleet-instance"],
        id.to_string().as_str()
    );

    // The engine speaks mutual TLS only (vLLM's --ssl-* flags over the
    // agent's files, mounted read-only): plain HTTP gets no answer, and an
    // https client without the router's (or agent's) certificate is refused.
    assert!(
        docker_log.contains(":/gpufleet-tls:ro") && docker_log.contains("--ssl-cert-reqs 2"),
        "{docker_log}"
    );
    let engine = std::net::SocketAddr::new(ip, gpufleet_proto::DEFAULT_ENGINE_PORT);
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let answer = plain.get(format!("http://{engine}/v1/models")).send().await;
    assert!(
        answer.as_ref().map_or(true, |r| !r.status().is_success()),
        "plain HTTP to the engine answered: {answer:?}"
    );
    let no_cert = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap();
    let answer = no_cert
        .get(format!("https://{engine}/v1/models"))
        .send()
        .await;
    assert!(
        answer.is_err(),
        "an https client without a client certificate was answered: {answer:?}"
    );
    // The router, with its identity, still gets through (again).
    let resp = app
        .http
        .post(app.url("/v1/completions"))
        .bearer_auth(&key)
        .json(&json!({"model": MODEL, "max_tokens": 3, "prompt": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    // The timeline tells the story.
    let tl = app.timeline(id).await.unwrap();
    let actions: Vec<&str> = tl.events.iter().map(|e| e.action.as_str()).collect();
    for a in [
        "provider.create",
        "agent.registered",
        "agent.engine_cert",
        "agent.engine_started",
        "agent.engine_ready",
    ] {
        assert!(actions.contains(&a), "{a} missing from {actions:?}");
    }

    app.terminate(id).await;
    app.wait_status(&[id], S::Terminated, Duration::from_secs(60))
        .await;
    cloud.wait_nothing_billable().await;
    eventually(
        Duration::from_secs(20),
        "the VM's processes are gone",
        || pids_with_env("GPUFLEET_ROOT", &vm.join("root").display().to_string()).is_empty(),
    )
    .await;

    // Neither secret is anywhere: logs, database, answers, user data.
    let instance_json = app.get(id).await.unwrap();
    let answers = format!(
        "{}{}",
        serde_json::to_string(&instance_json).unwrap(),
        serde_json::to_string(&tl).unwrap()
    );
    for (secret, what) in [
        (SECRET_KEY, "the Scaleway secret key"),
        (HF_TOKEN, "the Hugging Face token"),
    ] {
        assert!(!answers.contains(secret), "{what} in an API answer");
        for (path, bytes) in all_bytes(&app.data_dir) {
            assert!(!contains(&bytes, secret), "{what} in {}", path.display());
        }
        for (path, bytes) in all_bytes(cloud.tmp.path().join("scaleway").as_path()) {
            // The VM's files: user data, console, agent logs.
            assert!(!contains(&bytes, secret), "{what} in {}", path.display());
        }
    }
    cloud.shutdown().await;
}

/// Instances' servers at the emulator, by instance tag.
fn servers_of(emu: &Emulator, id: InstanceId) -> usize {
    let tag = format!("gpufleet-instance={id}");
    emu.servers()
        .iter()
        .filter(|s| s.tags.contains(&tag))
        .count()
}

#[tokio::test]
async fn a_lost_create_answer_and_429s_still_make_exactly_one_server() {
    let cloud = Cloud::start("").await;
    let emu = cloud.emu();
    emu.faults().add(
        FaultRule::new(
            "POST",
            "/instance/v1/zones/*/servers",
            FaultAction::LoseAnswer,
        )
        .times(1),
    );
    emu.faults().add(
        FaultRule::new(
            "*",
            "/instance/v1/zones/*/servers/**",
            FaultAction::TooManyRequests {
                retry_after_secs: 1,
            },
        )
        .times(2),
    );
    let id = cloud.app.create_on("scaleway", L4, 1).await[0].id;
    cloud
        .app
        .wait_status(&[id], S::Ready, Duration::from_secs(120))
        .await;
    assert_eq!(servers_of(emu, id), 1, "one server despite the lost answer");
    let tl = cloud.app.timeline(id).await.unwrap();
    assert!(
        tl.events
            .iter()
            .any(|e| e.action == "provider.create" && e.outcome == "failed"),
        "the failed attempt is on the timeline"
    );
    cloud.terminate_and_shut_down(id).await;
}

#[tokio::test]
async fn up_killed_mid_create_never_makes_a_second_server() {
    let mut cloud = Cloud::start("").await;
    // The server create takes a while: up dies while it is in flight.
    cloud.emu().faults().add(
        FaultRule::new(
            "POST",
            "/instance/v1/zones/*/servers",
            FaultAction::Latency { ms: 3000 },
        )
        .times(1),
    );
    let id = cloud.app.create_on("scaleway", L4, 1).await[0].id;
    // The steps before the server create are done (its image and security
    // group): the create is (about to be) in flight, for 3 s.
    eventually(
        Duration::from_secs(30),
        "the security group is set up",
        || {
            cloud
                .emu()
                .request_log()
                .iter()
                .any(|r| r.path.contains("/security_groups"))
        },
    )
    .await;
    cloud.app.kill9();
    cloud.app.restart().await;
    cloud
        .app
        .wait_status(&[id], S::Ready, Duration::from_secs(120))
        .await;
    assert_eq!(
        servers_of(cloud.emu(), id),
        1,
        "the restarted up found the server it made"
    );
    cloud.terminate_and_shut_down(id).await;
}

#[tokio::test]
async fn out_of_stock_fails_with_the_reason_and_orphans_are_reaped() {
    let cloud = Cloud::start("orphan_grace_secs = 1").await;
    let emu = cloud.emu();
    emu.faults().set_availability(L4, Availability::Shortage);
    let id = cloud.app.create_on("scaleway", L4, 1).await[0].id;
    let failed = cloud
        .app
        .wait_status(&[id], S::Failed, Duration::from_secs(60))
        .await;
    let reason = format!(
        "{:?} {:?}",
        failed[0].status_reason, failed[0].status_message
    );
    assert!(reason.contains("capacity"), "{reason}");
    assert!(emu.servers().is_empty());

    // An IP and a volume tagged with this cluster for an instance that does
    // not exist (a crash left them): reaped after the grace period.
    emu.faults().set_availability(L4, Availability::Available);
    let cluster = cluster_tag(&cloud.app).await;
    let http = reqwest::Client::new();
    let ghost = InstanceId::new();
    let tags = json!(["gpufleet", cluster, format!("gpufleet-instance={ghost}")]);
    let ip = http
        .post(format!("{}/instance/v1/zones/{ZONE}/ips", emu.url()))
        .header("X-Auth-Token", SECRET_KEY)
        .json(&json!({"type": "routed_ipv4", "project": PROJECT, "tags": tags}))
        .send()
        .await
        .unwrap();
    assert!(ip.status().is_success(), "{}", ip.text().await.unwrap());
    let vol = http
        .post(format!("{}/block/v1/zones/{ZONE}/volumes", emu.url()))
        .header("X-Auth-Token", SECRET_KEY)
        .json(
            &json!({"name": "leaked", "project_id": PROJECT, "tags": tags,
            "from_empty": {"size": 10_000_000_000u64}}),
        )
        .send()
        .await
        .unwrap();
    assert!(vol.status().is_success(), "{}", vol.text().await.unwrap());
    cloud.wait_nothing_billable().await;
    cloud.shutdown().await;
}

/// The `gpufleet-cluster=<id>` tag of this control plane, read from the
/// tags of a Mock machine it made.
async fn cluster_tag(app: &TestApp) -> String {
    let id = app.create(1).await[0].id;
    let dir = app
        .wait_until(&[id], Duration::from_secs(30), "a machine", |v| {
            v[0].provider_instance_id.is_some()
        })
        .await;
    let machine = app.machine_dir_of(dir[0].id).expect("machine dir");
    let record: Value =
        serde_json::from_str(&std::fs::read_to_string(machine.join("machine.json")).unwrap())
            .unwrap();
    let cluster = record["tags"]["gpufleet-cluster"]
        .as_str()
        .expect("cluster tag")
        .to_string();
    app.terminate(id).await;
    format!("gpufleet-cluster={cluster}")
}
