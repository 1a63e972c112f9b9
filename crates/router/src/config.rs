//! The router's settings (`[router]` in `gpufleet up`'s config file).

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How the router picks an instance among the ready ones serving a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Power of two choices: of two random instances, the one with fewer
    /// requests in flight.
    #[default]
    LeastOutstanding,
    /// Each instance in turn.
    RoundRobin,
    /// Consistent hashing of the `X-Session-ID` header, else of the request's
    /// `user` field (least outstanding when neither is given), so one
    /// session keeps hitting one instance (its KV cache) while the set of
    /// instances changes little.
    SessionAffinity,
}

/// The OpenAI-compatible router. Every field has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouterConfig {
    /// Instance choice: `least_outstanding`, `round_robin` or `session_affinity`.
    pub policy: Policy,
    /// Longest wait for a TCP connection to an instance's engine, in milliseconds.
    pub connect_timeout_ms: u64,
    /// Longest wait for the response headers once the request is sent, in
    /// milliseconds (for a non-streaming request: the whole generation).
    pub first_byte_timeout_ms: u64,
    /// Longest silence between two chunks of a response body, in
    /// milliseconds. Streams have no total timeout.
    pub idle_timeout_ms: u64,
    /// Further attempts on other instances after a connection failure, a
    /// timeout before the first byte, or a 5xx/429 answer, as long as nothing
    /// was sent to the client yet.
    pub retries: u32,
    /// Consecutive failures after which an instance's circuit opens (it gets
    /// no requests).
    pub breaker_failure_threshold: u32,
    /// Time an open circuit waits before one probe request may try the
    /// instance again (half-open), in milliseconds.
    pub breaker_cooldown_ms: u64,
    /// How long a verified API key is trusted before it is looked up again
    /// (so a revocation takes effect within this time), in milliseconds.
    pub api_key_cache_ttl_ms: u64,
    /// How often usage counts are added to the database, in milliseconds.
    pub usage_flush_interval_ms: u64,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            policy: Policy::LeastOutstanding,
            connect_timeout_ms: 2_000,
            first_byte_timeout_ms: 120_000,
            idle_timeout_ms: 60_000,
            retries: 2,
            breaker_failure_threshold: 5,
            breaker_cooldown_ms: 10_000,
            api_key_cache_ttl_ms: 5_000,
            usage_flush_interval_ms: 5_000,
            max_body_bytes: 4 * 1024 * 1024,
        }
    }
}

impl RouterConfig {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms.max(1))
    }
    pub fn first_byte_timeout(&self) -> Duration {
        Duration::from_millis(self.first_byte_timeout_ms.max(1))
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms.max(1))
    }
    pub fn breaker_cooldown(&self) -> Duration {
        Duration::from_millis(self.breaker_cooldown_ms)
    }
    pub fn api_key_cache_ttl(&self) -> Duration {
        Duration::from_millis(self.api_key_cache_ttl_ms)
    }
    pub fn usage_flush_interval(&self) -> Duration {
        Duration::from_millis(self.usage_flush_interval_ms.max(10))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_partial_config_with_defaults() {
        let c: RouterConfig = serde_json::from_value(serde_json::json!({
            "policy": "session_affinity",
            "retries": 0
        }))
        .unwrap();
        assert_eq!(c.policy, Policy::SessionAffinity);
        assert_eq!(c.retries, 0);
        assert_eq!(
            c.connect_timeout_ms,
            RouterConfig::default().connect_timeout_ms
        );
        assert!(serde_json::from_value::<RouterConfig>(serde_json::json!({"nope": 1})).is_err());
        assert!(
            serde_json::from_value::<RouterConfig>(serde_json::json!({"policy": "random"}))
                .is_err()
        );
    }
}
