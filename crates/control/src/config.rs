//! Control-plane settings (one section of `gpufleet up`'s config file).

use gpufleet_domain::metrics::RetentionConfig;
use gpufleet_domain::ModelName;
use serde::{Deserialize, Serialize};

/// How the control plane drives instances. Every field has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlConfig {
    /// URL agents use to reach the control plane. Empty: derived from the
    /// listen address at start-up.
    pub agent_control_url: String,
    /// URL machines of cloud providers reach the control plane at (`gpufleet
    /// up --public-url`), e.g. `https://fleet.example.com`. Empty: they use
    /// `agent_control_url` too. Mock machines always use `agent_control_url`.
    pub public_url: String,
    /// PEM of the certificate `public_url` serves when no public authority
    /// signed it: handed to agents, which pin it. Set at start-up, not in files.
    #[serde(skip)]
    pub public_ca_pem: Option<String>,
    /// PEM of the router's client certificate: engines of machines off this
    /// host accept it (mutual TLS). `None`: no grant is handed out (and such
    /// engines serve plain HTTP). Set at start-up, not in files.
    #[serde(skip)]
    pub engine_client_ca_pem: Option<String>,
    /// How often agents heartbeat.
    pub heartbeat_interval_ms: u64,
    /// A ready instance whose last heartbeat is older than this many intervals
    /// becomes unhealthy.
    pub missed_heartbeats_unhealthy: u32,
    /// An unhealthy instance that stays silent this long fails with agent_lost.
    pub agent_lost_after_secs: u64,
    /// An instance not ready this long after creation fails with startup_timeout.
    pub startup_timeout_secs: u64,
    /// A failed instance's machine is deleted after this grace period (time in
    /// which a late agent can still bring it back).
    pub failed_cleanup_grace_secs: u64,
    /// A cloud resource besides machines (a public IP, a volume) tagged with
    /// this cluster but owned by no live instance is deleted once it has been
    /// seen so this long (it may belong to a create in progress before).
    pub orphan_grace_secs: u64,
    /// Provider create attempts before the instance fails with provision_failed.
    pub provision_max_attempts: u32,
    /// First retry delay of a failed provider call; doubles per attempt.
    pub provision_backoff_base_ms: u64,
    /// Cap of the retry delay.
    pub provision_backoff_max_ms: u64,
    /// How often each reconciler runs when nothing wakes it earlier.
    pub reconcile_interval_ms: u64,
    /// How long a reconciler's lease lasts unless renewed: with several
    /// replicas, the longest the work of a dead one waits for another.
    pub lease_ttl_ms: u64,
    /// Timeout of one readiness probe of an agent's `/readyz`.
    pub probe_timeout_ms: u64,
    /// How often a ready instance whose heartbeats are fresh and report its
    /// engine ready is probed (any other instance: every pass).
    pub ready_probe_interval_ms: u64,
    /// How often each agent checks its ready engine with a real one-token
    /// completion (the engine canary); 0 turns it off. A ready instance
    /// whose latest heartbeat says the canary failed turns unhealthy (a
    /// hung engine can still answer `/health`).
    pub canary_interval_ms: u64,
    /// How long one canary request may take; below `canary_interval_ms`.
    pub canary_timeout_ms: u64,
    /// Longest a draining instance waits for in-flight requests.
    pub drain_timeout_secs: u64,
    /// Largest `count` of one create request.
    pub max_instances_per_request: u32,
    /// How long a deployment's replica may stay unhealthy before it is
    /// replaced (the replacement starts first).
    pub deployment_unhealthy_grace_secs: u64,
    /// How long a deployment's placement is skipped after an instance there
    /// failed for lack of capacity or quota (the next placement is used).
    pub deployment_placement_backoff_secs: u64,
    /// Port agents listen on.
    pub agent_port: u16,
    /// The inference engine instances run.
    pub engine: EngineConfig,
    /// Models instances may serve.
    pub models: Vec<ModelSpec>,
    /// How long metric history is kept per tier (`[control.retention]`).
    pub retention: RetentionConfig,
    /// How often the metrics rollup (and retention) runs, in milliseconds.
    pub metrics_rollup_interval_ms: u64,
    /// Batched heartbeat ingestion (`[control.ingest]`).
    pub ingest: IngestConfig,
}

impl ControlConfig {
    /// Settings that cannot work together; the error names the field.
    pub fn validate(&self) -> Result<(), crate::ControlError> {
        if self.canary_interval_ms > 0 {
            if self.canary_timeout_ms == 0 {
                return Err(crate::ControlError::invalid(
                    "canary_timeout_ms",
                    "must be above 0 while the canary is on (canary_interval_ms > 0)",
                ));
            }
            if self.canary_timeout_ms >= self.canary_interval_ms {
                return Err(crate::ControlError::invalid(
                    "canary_timeout_ms",
                    format!(
                        "must be below canary_interval_ms ({} ms), got {} ms",
                        self.canary_interval_ms, self.canary_timeout_ms
                    ),
                ));
            }
        }
        for (i, m) in self.models.iter().enumerate() {
            m.validate().map_err(|(field, message)| {
                crate::ControlError::invalid(field, format!("models[{i}]: {message}"))
            })?;
        }
        Ok(())
    }
}

/// The heartbeat writer: heartbeats queue in a bounded channel and are
/// written in batches (one transaction each).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    /// Most heartbeats written in one transaction.
    pub batch_max: usize,
    /// Longest a heartbeat waits for others to join its batch, in milliseconds.
    pub linger_ms: u64,
    /// Heartbeats queued at most; past it agents get 503 and retry.
    pub queue_capacity: usize,
    /// Staged heartbeats are moved to the indexed sample tables once this
    /// many have accumulated...
    pub compact_heartbeats: usize,
    /// ...or once the oldest has been staged this long, in milliseconds.
    pub compact_interval_ms: u64,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            batch_max: 1024,
            linger_ms: 0,
            queue_capacity: 8192,
            compact_heartbeats: 16384,
            compact_interval_ms: 5000,
        }
    }
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            agent_control_url: String::new(),
            public_url: String::new(),
            public_ca_pem: None,
            engine_client_ca_pem: None,
            heartbeat_interval_ms: 5_000,
            missed_heartbeats_unhealthy: 3,
            agent_lost_after_secs: 300,
            startup_timeout_secs: 600,
            failed_cleanup_grace_secs: 60,
            orphan_grace_secs: 120,
            provision_max_attempts: 5,
            provision_backoff_base_ms: 1_000,
            provision_backoff_max_ms: 30_000,
            reconcile_interval_ms: 1_000,
            lease_ttl_ms: 3_000,
            probe_timeout_ms: 2_000,
            ready_probe_interval_ms: 10_000,
            canary_interval_ms: 15_000,
            canary_timeout_ms: 10_000,
            drain_timeout_secs: 30,
            max_instances_per_request: 100,
            deployment_unhealthy_grace_secs: 120,
            deployment_placement_backoff_secs: 300,
            agent_port: gpufleet_proto::DEFAULT_AGENT_PORT,
            engine: EngineConfig::default(),
            models: ModelSpec::defaults(),
            retention: RetentionConfig::default(),
            metrics_rollup_interval_ms: 10_000,
            ingest: IngestConfig::default(),
        }
    }
}

/// Engine run on instances.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// `sim` (the built-in vLLM-compatible simulator) or `vllm`.
    pub kind: EngineKind,
    /// Port the engine listens on.
    pub port: u16,
    /// Simulated model load time (sim only).
    pub model_load_delay_ms: u64,
    /// Command starting vLLM (vllm only); `--model/--host/--port` are appended.
    pub vllm_command: Vec<String>,
    /// File holding the Hugging Face token real engines download gated
    /// weights with (`HF_TOKEN` in the environment of `up` wins). Handed to
    /// each agent over its authenticated channel after registration, never
    /// in user data, logs or the database.
    pub hf_token_file: String,
    /// The secret environment handed to engines (`HF_TOKEN`), read at
    /// start-up from `hf_token_file` or the environment; never in files.
    #[serde(skip)]
    pub secret_env: SecretEnv,
}

/// Environment variables whose values are secrets: `Debug` shows the names only.
#[derive(Clone, Default, PartialEq)]
pub struct SecretEnv(pub std::collections::BTreeMap<String, String>);

impl std::fmt::Debug for SecretEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            kind: EngineKind::Sim,
            port: gpufleet_proto::DEFAULT_ENGINE_PORT,
            model_load_delay_ms: 500,
            vllm_command: vec!["vllm".into(), "serve".into()],
            hf_token_file: String::new(),
            secret_env: SecretEnv::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    Sim,
    Vllm,
}

impl EngineConfig {
    pub fn spec(&self) -> gpufleet_proto::EngineSpec {
        match self.kind {
            EngineKind::Sim => gpufleet_proto::EngineSpec::Sim {
                port: self.port,
                model_load_delay_ms: self.model_load_delay_ms,
            },
            EngineKind::Vllm => gpufleet_proto::EngineSpec::Vllm {
                port: self.port,
                command: self.vllm_command.clone(),
            },
        }
    }
}

/// A model instances may serve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Name as clients send it in OpenAI requests.
    #[schema(value_type = String)]
    pub name: ModelName,
    /// One line about the model.
    #[serde(default)]
    pub description: String,
    /// VRAM the weights need, in MiB (0: unknown).
    #[serde(default)]
    pub min_vram_mib: u64,
    /// What an API key is charged per million prompt tokens, in the
    /// currency of the instance prices (none: the model's measured cost
    /// per million tokens, else 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_price_per_million: Option<f64>,
    /// Same, per million completion tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_price_per_million: Option<f64>,
}

impl ModelSpec {
    /// Prices must be finite numbers of at least 0: the field and why not.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        for (field, v) in [
            ("prompt_price_per_million", self.prompt_price_per_million),
            (
                "completion_price_per_million",
                self.completion_price_per_million,
            ),
        ] {
            if let Some(p) = v {
                if !p.is_finite() || p < 0.0 {
                    return Err((
                        field,
                        format!(
                            "{field} of {} must be a number of at least 0, got {p}",
                            self.name
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn defaults() -> Vec<ModelSpec> {
        let m = |name: &str, description: &str, min_vram_mib| ModelSpec {
            name: name.parse().expect("built-in model names are valid"),
            description: description.to_string(),
            min_vram_mib,
            prompt_price_per_million: None,
            completion_price_per_million: None,
        };
        vec![
            m(
                "gpufleet/sim-small",
                "Tiny simulated model for trying gpufleet out",
                0,
            ),
            m(
                "meta-llama/Llama-3.1-8B-Instruct",
                "Llama 3.1 8B Instruct",
                20_000,
            ),
            m("Qwen/Qwen2.5-7B-Instruct", "Qwen 2.5 7B Instruct", 20_000),
            m(
                "meta-llama/Llama-3.3-70B-Instruct",
                "Llama 3.3 70B Instruct",
                150_000,
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_prices_are_numbers_of_at_least_zero() {
        let mut c = ControlConfig::default();
        c.models[0].prompt_price_per_million = Some(0.5);
        c.models[0].completion_price_per_million = Some(0.0);
        assert!(c.validate().is_ok());
        c.models[1].completion_price_per_million = Some(-1.0);
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("completion_price_per_million"), "{e}");
        c.models[1].completion_price_per_million = Some(f64::NAN);
        assert!(c.validate().is_err());
        let m: ModelSpec = serde_json::from_value(serde_json::json!({
            "name": "org/m", "prompt_price_per_million": 0.2, "completion_price_per_million": 0.6
        }))
        .unwrap();
        assert_eq!(
            (m.prompt_price_per_million, m.completion_price_per_million),
            (Some(0.2), Some(0.6))
        );
    }

    #[test]
    fn the_canary_timeout_must_fit_in_its_interval() {
        let ok = ControlConfig::default();
        assert!(ok.validate().is_ok());
        assert_eq!(
            (ok.canary_interval_ms, ok.canary_timeout_ms),
            (15_000, 10_000)
        );
        let off = ControlConfig {
            canary_interval_ms: 0,
            canary_timeout_ms: 0,
            ..ControlConfig::default()
        };
        assert!(off.validate().is_ok(), "off: the timeout does not matter");
        for (interval, timeout) in [(1_000, 1_000), (1_000, 5_000), (1_000, 0)] {
            let bad = ControlConfig {
                canary_interval_ms: interval,
                canary_timeout_ms: timeout,
                ..ControlConfig::default()
            };
            match bad.validate() {
                Err(crate::ControlError::InvalidInput { field, .. }) => {
                    assert_eq!(field, "canary_timeout_ms")
                }
                other => panic!("{interval}/{timeout}: {other:?}"),
            }
        }
    }
}
