//! Wire types between the control plane and the worker agent.
//!
//! The agent speaks to the control plane under [`paths::AGENT_BASE`]:
//! it registers once with the one-time bootstrap secret it found in its
//! [`AgentBootstrap`], gets a per-instance token, then sends a [`Heartbeat`]
//! every `heartbeat_interval_ms` and [`AgentEvent`]s when its engine starts,
//! dies or is restarted. Every request after registration carries
//! `Authorization: Bearer <token>`.

use chrono::{DateTime, Utc};
use gpufleet_domain::{GpuSpec, InstanceId, ModelName};
use serde::{Deserialize, Serialize};

/// URL paths, shared so the two sides cannot drift.
pub mod paths {
    pub const AGENT_BASE: &str = "/internal/v1/agent";
    pub const REGISTER: &str = "/internal/v1/agent/register";
    pub const HEARTBEAT: &str = "/internal/v1/agent/heartbeat";
    pub const EVENTS: &str = "/internal/v1/agent/events";
    pub const ENGINE_ENV: &str = "/internal/v1/agent/engine-env";
    pub const ENGINE_CERT: &str = "/internal/v1/agent/engine-cert";
}

/// Proof that an answer comes from an instance's own agent.
///
/// The control plane's readiness probe sends a fresh random `challenge`; the
/// agent answers with [`readiness_proof`] keyed by its token's digest, which
/// only that agent (which holds the token) and the control plane (which
/// stores the digest) know. Another fleet's agent at the same address, or a
/// stranger reusing a cloud IP, cannot answer it.
pub mod identity {
    use gpufleet_domain::InstanceId;
    use hmac::{Hmac, Mac};
    use sha2::{Digest, Sha256};

    /// Query parameter of `GET /readyz` carrying the challenge.
    pub const CHALLENGE_PARAM: &str = "challenge";

    /// The digest of an agent token, as the control plane stores it (hex SHA-256).
    pub fn token_digest(token: &str) -> String {
        hex::encode(Sha256::digest(token.as_bytes()))
    }

    /// HMAC-SHA256 over the instance id and the challenge, keyed by the
    /// token's digest; hex.
    pub fn readiness_proof(token_digest: &str, instance_id: InstanceId, challenge: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(token_digest.as_bytes())
            .expect("HMAC takes keys of any length");
        mac.update(b"gpufleet-readyz\0");
        mac.update(instance_id.to_string().as_bytes());
        mac.update(b"\0");
        mac.update(challenge.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }
}

/// The agent's `GET /readyz` answer (200 when the engine serves the model,
/// 503 otherwise).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Readiness {
    pub ready: bool,
    pub instance_id: InstanceId,
    /// Why not ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// [`identity::readiness_proof`] of the request's challenge; absent
    /// without a challenge or before the agent has a token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proof: Option<String>,
}

/// Default TCP port of the agent's own HTTP server (`/healthz`, `/readyz`, `/info`).
pub const DEFAULT_AGENT_PORT: u16 = 7070;
/// Default TCP port of the inference engine (vLLM's default).
pub const DEFAULT_ENGINE_PORT: u16 = 8000;

/// Everything an instance needs to join the fleet; the provider delivers it
/// to the machine (the Mock provider as a file, clouds through cloud-init).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentBootstrap {
    pub instance_id: InstanceId,
    /// Base URL of the control plane, e.g. `http://127.0.0.1:8080`.
    pub control_plane_url: String,
    /// One-time secret for `register`; worthless once used.
    pub bootstrap_secret: String,
    /// Model the engine must serve.
    pub model: ModelName,
    /// Port of the agent's HTTP server.
    pub agent_port: u16,
    pub engine: EngineSpec,
    /// GPUs to simulate when no NVIDIA driver is present.
    pub gpu: GpuSpec,
    /// PEM of the control plane's TLS certificate when it is not signed by a
    /// public authority: the agent then trusts this certificate alone (it is
    /// pinned). `None`: the system's roots (or plain HTTP on loopback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_plane_ca_pem: Option<String>,
    /// Extra engine arguments (a deployment's `engine_args`), appended to
    /// the engine's command line.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub engine_args: Vec<String>,
}

/// Which inference engine to run and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EngineSpec {
    /// `gpufleet sim`, the vLLM-compatible simulator.
    Sim {
        port: u16,
        /// Time the simulator takes to "load" the model before it is ready.
        model_load_delay_ms: u64,
    },
    /// A real vLLM server: `command` is run with `--model <model> --host <ip> --port <port>` appended.
    Vllm { port: u16, command: Vec<String> },
    /// vLLM's OpenAI-compatible server in a container (the official image)
    /// with every GPU of the machine, run by `runtime` (`docker`).
    VllmContainer {
        port: u16,
        /// Image reference, e.g. `vllm/vllm-openai:v0.10.1`.
        image: String,
        /// Host directory for the model cache (the model volume), mounted
        /// as the container's Hugging Face cache.
        cache_dir: String,
        /// Engine arguments appended after `--model/--host/--port`.
        #[serde(default)]
        args: Vec<String>,
        /// Program that runs containers.
        #[serde(default = "default_container_runtime")]
        runtime: String,
    },
}

fn default_container_runtime() -> String {
    "docker".to_string()
}

impl EngineSpec {
    /// Whether the engine needs the secret environment (a real vLLM may
    /// download gated weights); the simulator needs none.
    pub fn needs_secrets(&self) -> bool {
        !matches!(self, Self::Sim { .. })
    }

    pub fn port(&self) -> u16 {
        match self {
            Self::Sim { port, .. } | Self::Vllm { port, .. } | Self::VllmContainer { port, .. } => {
                *port
            }
        }
    }
}

/// `POST /internal/v1/agent/register`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RegisterRequest {
    pub instance_id: InstanceId,
    pub bootstrap_secret: String,
    pub agent_version: String,
    pub hostname: String,
}

/// Answer to a successful registration. The token is shown once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RegisterResponse {
    pub token: String,
    pub heartbeat_interval_ms: u64,
    /// How often the agent checks its engine with a real one-token
    /// completion ([`CanarySample`]); 0 (or absent: an older control plane)
    /// turns the canary off.
    #[serde(default)]
    pub canary_interval_ms: u64,
    /// How long one canary request may take before it counts as failed.
    #[serde(default)]
    pub canary_timeout_ms: u64,
}

/// `POST /internal/v1/agent/engine-env` (empty body): the environment the
/// engine needs that must not travel in user data (e.g. `HF_TOKEN`), handed
/// over the authenticated channel.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EngineEnv {
    pub env: std::collections::BTreeMap<String, String>,
    /// Set for machines off the control plane's host: the engine is to
    /// serve mutual TLS, accepting the clients this grant names. Absent:
    /// plain HTTP (machines on this host, on loopback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_tls: Option<EngineTlsGrant>,
}

/// The engine's TLS grant: whom it must accept as clients.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EngineTlsGrant {
    /// PEM certificate of the router's client identity; the engine accepts
    /// clients presenting it (and the agent's own).
    pub client_ca_pem: String,
}

/// `POST /internal/v1/agent/engine-cert`: the certificate the engine serves
/// (self-signed by the agent, DNS name [`ENGINE_TLS_SERVER_NAME`]), which the
/// router trusts alone for this instance. Sent before the engine starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EngineCert {
    pub cert_pem: String,
}

/// The DNS name in an engine's TLS certificate; clients connect to the
/// engine's IP and verify this name.
pub const ENGINE_TLS_SERVER_NAME: &str = "gpufleet-engine";

/// State of the inference engine as the agent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EngineStatus {
    /// Not started yet.
    Stopped,
    /// Process running, model not served yet.
    Starting,
    /// Serves the model (its `/health` is OK and `/v1/models` lists it).
    Ready,
    /// Exited; the agent restarts it with backoff.
    Crashed,
}

/// Where GPU figures come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GpuSource {
    Nvml,
    Simulated,
}

/// Host figures at one instant.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SystemSample {
    pub cpu_pct: f64,
    pub load1: f64,
    pub load5: f64,
    pub load15: f64,
    pub mem_used_bytes: u64,
    pub mem_total_bytes: u64,
    /// Of the filesystem holding the agent's data path.
    pub disk_used_bytes: u64,
    pub disk_total_bytes: u64,
    /// Bytes per second received on non-loopback interfaces.
    pub net_rx_bps: f64,
    pub net_tx_bps: f64,
}

/// One GPU at one instant.
///
/// A figure NVML cannot give right now (not supported, e.g. utilisation on
/// a MIG-enabled GPU; the GPU fell off the bus; the sample timed out) is
/// `None`, never 0: an idle GPU and an unknown one must not look alike.
/// Figures added after the first version are optional and left out of the
/// JSON when unknown, so older agents' samples still parse and older control
/// planes ignore what they do not know.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GpuSample {
    pub index: u32,
    pub name: String,
    pub uuid: Option<String>,
    /// `nvmlDeviceGetUtilizationRates().gpu`, percent.
    #[serde(default)]
    pub util_pct: Option<f64>,
    pub mem_used_mib: u64,
    pub mem_total_mib: u64,
    /// Free framebuffer memory as NVML reports it (`nvmlDeviceGetMemoryInfo_v2`:
    /// used + free + reserved = total), MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_free_mib: Option<u64>,
    /// Memory the driver reserves (firmware, ...), MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_reserved_mib: Option<u64>,
    /// GPU die temperature, °C.
    #[serde(default)]
    pub temp_c: Option<f64>,
    /// Board power draw, W.
    #[serde(default)]
    pub power_w: Option<f64>,
    /// The power limit in force (NVML's *enforced* limit: the smallest of the
    /// management limit and any other limit that applies), W.
    #[serde(default)]
    pub power_limit_w: Option<f64>,
    /// The power management limit (`nvmlDeviceGetPowerManagementLimit`), W.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_mgmt_limit_w: Option<f64>,
    /// Energy used since the driver loaded (`nvmlDeviceGetTotalEnergyConsumption`), mJ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy_mj: Option<u64>,
    /// Streaming-multiprocessor clock (NVML `nvmlDeviceGetClockInfo(SM)`), MHz.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sm_clock_mhz: Option<u32>,
    /// Memory clock (`nvmlDeviceGetClockInfo(MEM)`), MHz.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_clock_mhz: Option<u32>,
    /// HBM temperature (NVML field `NVML_FI_DEV_MEMORY_TEMP`), °C.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_temp_c: Option<f64>,
    /// Uncorrected (double-bit) ECC errors since the driver loaded (NVML's
    /// volatile counter); `None` where ECC is off or unsupported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ecc_uncorrected: Option<u64>,
    /// Why the clocks are held down right now, in snake case (`gpu_idle`,
    /// `sw_power_cap`, `hw_slowdown`, `sw_thermal_slowdown`, ..., `other`
    /// for bits this version does not name); empty when nothing holds them
    /// or the reasons are unknown.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub throttle_reasons: Vec<String>,
    /// The raw clocks-event ("throttle") reason mask, every bit NVML set;
    /// `None` when unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clocks_event_reasons: Option<u64>,
    /// The last critical XID error NVML reported for this GPU since the agent
    /// started (0: none seen); `None` where XID events cannot be watched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_xid: Option<u64>,
    /// Whether MIG mode is on (`None`: not a MIG-capable GPU, or unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mig_enabled: Option<bool>,
    /// The MIG instances carved out of this GPU, each its own device.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mig_devices: Vec<MigDeviceSample>,
}

/// One MIG device (a GPU instance) of a MIG-enabled GPU: what NVML gives per
/// MIG device handle. Utilisation is not among it (NVML does not report it
/// under MIG).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MigDeviceSample {
    /// Index of the MIG device under its parent (`nvmlDeviceGetMigDeviceHandleByIndex`).
    pub mig_index: u32,
    /// Index of the parent GPU.
    pub parent_index: u32,
    pub name: String,
    pub uuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_used_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_free_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_total_mib: Option<u64>,
}

/// The engine at one instant, with the vLLM gauges the agent scraped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EngineSample {
    pub status: EngineStatus,
    /// `vllm:num_requests_running`.
    pub requests_running: f64,
    /// `vllm:num_requests_waiting`.
    pub requests_waiting: f64,
    /// How often the agent restarted the engine since the agent started.
    pub restarts: u32,
    /// `vllm:kv_cache_usage_perc` (0–1; older engines: `vllm:gpu_cache_usage_perc`).
    #[serde(default)]
    pub kv_cache_usage: Option<f64>,
    /// Prompt tokens per second over the last interval (from `vllm:prompt_tokens_total`).
    #[serde(default)]
    pub prompt_tokens_per_s: Option<f64>,
    /// Generated tokens per second over the last interval (from `vllm:generation_tokens_total`).
    #[serde(default)]
    pub generation_tokens_per_s: Option<f64>,
    /// Mean time to first token over the last interval, in seconds
    /// (from the `vllm:time_to_first_token_seconds` histogram's sum and count).
    #[serde(default)]
    pub ttft_mean_s: Option<f64>,
    /// The latest engine canary: a real one-token completion the agent
    /// sends every `canary_interval_ms` while the engine is ready. Absent
    /// while the canary is off or the engine is not ready (starting,
    /// restarting), and from older agents. Kept for an instance's latest
    /// heartbeat only, not in its history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanarySample>,
}

/// The result of the engine canary: `POST /v1/completions` with
/// `max_tokens: 1`, answered within `canary_timeout_ms`. A hung engine can
/// still answer `/health`; only a real request shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CanarySample {
    /// The latest check passed: a 2xx answer with one choice in time.
    pub ok: bool,
    /// When the latest check ended.
    pub checked_at: DateTime<Utc>,
    /// Time to the engine's answer, in milliseconds; absent when none came
    /// (timeout, connection error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    /// Why the latest check failed, e.g. `no answer within 10 s`,
    /// `HTTP 500: ...`, `cannot connect to the engine: ...`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Failed checks in a row (0 when the latest passed).
    #[serde(default)]
    pub consecutive_failures: u32,
}

impl CanarySample {
    /// Longest `error` kept (a proxy's HTML page is not worth more).
    pub const MAX_ERROR_CHARS: usize = 300;
}

/// `POST /internal/v1/agent/heartbeat`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Heartbeat {
    pub instance_id: InstanceId,
    /// Strictly increasing per instance, across agent restarts (the agent
    /// starts from its boot time in milliseconds). A heartbeat whose `seq` is
    /// not above the last applied one is stale and is not applied.
    pub seq: u64,
    pub sent_at: DateTime<Utc>,
    pub agent_version: String,
    pub agent_uptime_secs: u64,
    pub system: SystemSample,
    pub gpu_source: GpuSource,
    pub gpus: Vec<GpuSample>,
    pub engine: EngineSample,
}

/// Answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HeartbeatAck {
    /// False when the heartbeat was stale (an older `seq`) and ignored.
    pub applied: bool,
    pub heartbeat_interval_ms: u64,
    /// As in [`RegisterResponse`] (an agent that kept its token learns the
    /// canary settings here); absent from older control planes: off.
    #[serde(default)]
    pub canary_interval_ms: u64,
    #[serde(default)]
    pub canary_timeout_ms: u64,
}

/// Something the agent wants on the instance timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AgentEvent {
    pub kind: AgentEventKind,
    pub message: String,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AgentEventKind {
    AgentStarted,
    EngineStarted,
    EngineReady,
    EngineExited,
    EngineRestarting,
    /// GPU figures could not be read: an NVML call did not answer within the
    /// sampling deadline (a hung driver), or a GPU fell off the bus.
    GpuFault,
    /// GPU figures are read again after a [`AgentEventKind::GpuFault`].
    GpuRecovered,
    /// The engine canary failed after passing (or on its first check).
    /// Sent only when the control plane turned the canary on, so never to
    /// a control plane that does not know the kind.
    EngineCanaryFailed,
    /// The engine canary passes again after [`AgentEventKind::EngineCanaryFailed`].
    EngineCanaryPassed,
}

/// The agent's `GET /info`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub version: String,
    pub instance_id: InstanceId,
    pub uptime_secs: u64,
    pub gpu_source: GpuSource,
    pub engine_status: EngineStatus,
    pub model: ModelName,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_spec_round_trips() {
        let e = EngineSpec::Sim {
            port: 8000,
            model_load_delay_ms: 10,
        };
        let j = serde_json::to_value(&e).unwrap();
        assert_eq!(j["kind"], "sim");
        assert_eq!(serde_json::from_value::<EngineSpec>(j).unwrap(), e);
        assert_eq!(e.port(), 8000);
    }

    #[test]
    fn gpu_sample_figures_are_additive() {
        // An older agent's sample (no clock, ECC or throttle reasons) still parses.
        let old = serde_json::json!({
            "index": 0, "name": "NVIDIA L4", "uuid": null, "util_pct": 5.0,
            "mem_used_mib": 1, "mem_total_mib": 2, "temp_c": 40.0,
            "power_w": 20.0, "power_limit_w": 72.0
        });
        let s: GpuSample = serde_json::from_value(old.clone()).unwrap();
        assert_eq!((s.sm_clock_mhz, s.ecc_uncorrected), (None, None));
        assert_eq!((s.util_pct, s.power_limit_w), (Some(5.0), Some(72.0)));
        assert_eq!((s.mem_free_mib, s.mem_reserved_mib), (None, None));
        assert!(s.throttle_reasons.is_empty());
        // ...and unknown figures are left out, so the JSON is what it was.
        assert_eq!(serde_json::to_value(&s).unwrap(), old);
        let full = GpuSample {
            sm_clock_mhz: Some(1980),
            ecc_uncorrected: Some(0),
            throttle_reasons: vec!["sw_power_cap".into()],
            ..s
        };
        let j = serde_json::to_value(&full).unwrap();
        assert_eq!(j["sm_clock_mhz"], 1980);
        assert_eq!(j["throttle_reasons"][0], "sw_power_cap");
        assert_eq!(serde_json::from_value::<GpuSample>(j).unwrap(), full);
    }

    #[test]
    fn the_canary_is_additive() {
        // An older agent's engine sample (no canary) still parses...
        let old = serde_json::json!({
            "status": "ready", "requests_running": 0.0, "requests_waiting": 0.0,
            "restarts": 0, "kv_cache_usage": null, "prompt_tokens_per_s": null,
            "generation_tokens_per_s": null, "ttft_mean_s": null
        });
        let e: EngineSample = serde_json::from_value(old.clone()).unwrap();
        assert_eq!(e.canary, None);
        // ...and without a canary the JSON is what it was.
        assert_eq!(serde_json::to_value(&e).unwrap(), old);
        let failing = EngineSample {
            canary: Some(CanarySample {
                ok: false,
                checked_at: Utc::now(),
                latency_ms: None,
                error: Some("no answer within 10 s".into()),
                consecutive_failures: 2,
            }),
            ..e
        };
        let j = serde_json::to_value(&failing).unwrap();
        assert_eq!(j["canary"]["error"], "no answer within 10 s");
        assert!(j["canary"].get("latency_ms").is_none());
        assert_eq!(serde_json::from_value::<EngineSample>(j).unwrap(), failing);
    }

    #[test]
    fn an_older_control_plane_turns_the_canary_off() {
        let r: RegisterResponse = serde_json::from_value(
            serde_json::json!({"token": "t", "heartbeat_interval_ms": 5000}),
        )
        .unwrap();
        assert_eq!((r.canary_interval_ms, r.canary_timeout_ms), (0, 0));
        let a: HeartbeatAck = serde_json::from_value(
            serde_json::json!({"applied": true, "heartbeat_interval_ms": 5000}),
        )
        .unwrap();
        assert_eq!((a.canary_interval_ms, a.canary_timeout_ms), (0, 0));
    }

    #[test]
    fn unknown_gpu_figures_are_null_not_zero() {
        // A MIG-enabled GPU: no utilisation; a GPU off the bus: nothing.
        let s = GpuSample {
            index: 0,
            name: "NVIDIA H100 80GB HBM3".into(),
            mem_total_mib: 81_559,
            ..GpuSample::default()
        };
        let j = serde_json::to_value(&s).unwrap();
        for k in ["util_pct", "temp_c", "power_w", "power_limit_w"] {
            assert!(j[k].is_null(), "{k}: {j}");
        }
        assert!(j.get("mem_free_mib").is_none());
        let back: GpuSample = serde_json::from_value(j).unwrap();
        assert_eq!(back, s);
        // A sample without the keys at all parses as unknown.
        let bare = serde_json::json!({"index": 1, "name": "x", "uuid": null,
            "mem_used_mib": 0, "mem_total_mib": 0});
        let b: GpuSample = serde_json::from_value(bare).unwrap();
        assert_eq!((b.util_pct, b.temp_c, b.power_w), (None, None, None));
    }
}
