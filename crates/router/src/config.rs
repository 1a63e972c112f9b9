//! The router's settings (`[router]` in `gpufleet up`'s config file).

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How the router picks an instance among the ready ones serving a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Latency-aware power of two choices (the peak-EWMA idea of Finagle
    /// and Linkerd): of two random instances, the one with the lower cost,
    /// requests in flight + 1 times the larger of its moving average time to
    /// first token (which jumps up at once on a slow answer and decays
    /// slowly) and the mean age of its requests still waiting for one. A
    /// slow or stalled instance loses its share within a second.
    #[default]
    PeakEwma,
    /// Power of two choices: of two random instances, the one with fewer
    /// requests in flight.
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
    /// Longest wait for the first token once the request is sent when
    /// stall detection is off, and for the whole answer of a
    /// non-streaming request that is passed through as it is (one asking
    /// for several choices, tools or log-probabilities), in milliseconds.
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
    /// With several replicas (PostgreSQL): how often this router writes
    /// its limited keys' counts of the trailing minute and reads the other
    /// replicas', in milliseconds. Requests and tokens per minute hold
    /// across replicas to within what they admit in this interval.
    pub rate_share_interval_ms: u64,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    /// Time constant of the moving averages of time to first token and
    /// between tokens, in milliseconds.
    pub ewma_decay_ms: u64,
    /// Treat a streamed request with no first token past its instance's
    /// stall bound as stalled: try it on another instance and open the
    /// instance's circuit. The bound is `stall_factor` times the instance's
    /// moving average time to first token, plus that average again for
    /// each of its requests still waiting for a first token, kept between
    /// `stall_floor_ms` and `stall_ceiling_ms`. In the middle of a stream,
    /// the same factor applies to the time between tokens (at least
    /// `stall_gap_floor_ms`).
    pub stall_detection: bool,
    pub stall_factor: f64,
    pub stall_floor_ms: u64,
    pub stall_ceiling_ms: u64,
    /// The least silence in the middle of a stream that counts as a stall,
    /// in milliseconds (an engine may pause decoding while it fills in a
    /// long prompt).
    pub stall_gap_floor_ms: u64,
    /// Models whose streamed requests are hedged: with no first token
    /// after the model's recent p95 time to first token (at least
    /// `hedge_min_delay_ms`), a copy goes to another instance; the first
    /// to answer wins and the other is cancelled.
    pub hedge_models: Vec<String>,
    pub hedge_min_delay_ms: u64,
    /// Ask the engine for a non-streaming request's answer as a stream
    /// (and put it back together) when that is faithful and another ready
    /// instance could take over, so it gets stall detection, hedging and
    /// failover too. Off: such requests pass through whole, bounded by
    /// `first_byte_timeout_ms`.
    pub whole_as_stream: bool,
    /// Continue a stream that breaks off (engine died or stalled) on
    /// another instance, spliced into the client's stream.
    pub stream_failover: bool,
    /// Most continuations of one stream.
    pub max_stream_failovers: u32,
    /// A request for a model with a deployment but no ready replica (scaled
    /// to zero, or starting) is held while one starts, at most this long,
    /// in milliseconds; then it gets a 503 with `Retry-After`.
    pub hold_timeout_ms: u64,
    /// Most requests held at once per model; more get the 503 at once.
    pub hold_queue: usize,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            policy: Policy::PeakEwma,
            connect_timeout_ms: 2_000,
            first_byte_timeout_ms: 120_000,
            idle_timeout_ms: 60_000,
            retries: 2,
            breaker_failure_threshold: 5,
            breaker_cooldown_ms: 5_000,
            api_key_cache_ttl_ms: 5_000,
            usage_flush_interval_ms: 5_000,
            rate_share_interval_ms: 1_000,
            max_body_bytes: 4 * 1024 * 1024,
            ewma_decay_ms: 10_000,
            stall_detection: true,
            stall_factor: 4.0,
            stall_floor_ms: 1_000,
            stall_ceiling_ms: 30_000,
            stall_gap_floor_ms: 3_000,
            hedge_models: Vec::new(),
            hedge_min_delay_ms: 50,
            whole_as_stream: true,
            stream_failover: true,
            max_stream_failovers: 2,
            hold_timeout_ms: 300_000,
            hold_queue: 256,
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
    /// The first setting that makes no sense, and why.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(self.stall_factor.is_finite() && self.stall_factor >= 1.0) {
            return Err((
                "stall_factor",
                format!("must be a number of at least 1, not {}", self.stall_factor),
            ));
        }
        if self.stall_floor_ms == 0 || self.stall_floor_ms > self.stall_ceiling_ms {
            return Err((
                "stall_floor_ms",
                format!(
                    "must be above 0 and at most stall_ceiling_ms ({})",
                    self.stall_ceiling_ms
                ),
            ));
        }
        if self.stall_gap_floor_ms == 0 {
            return Err(("stall_gap_floor_ms", "must be above 0".into()));
        }
        if self.ewma_decay_ms == 0 {
            return Err(("ewma_decay_ms", "must be above 0".into()));
        }
        Ok(())
    }

    pub fn hedges(&self, model: &str) -> bool {
        self.hedge_models.iter().any(|m| m == model)
    }
    pub fn hold_timeout(&self) -> Duration {
        Duration::from_millis(self.hold_timeout_ms)
    }
    pub fn usage_flush_interval(&self) -> Duration {
        Duration::from_millis(self.usage_flush_interval_ms.max(10))
    }
    pub fn rate_share_interval(&self) -> Duration {
        Duration::from_millis(self.rate_share_interval_ms.max(10))
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
        assert_eq!(RouterConfig::default().validate(), Ok(()));
        let bad = RouterConfig {
            stall_floor_ms: 40_000,
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().0, "stall_floor_ms");
        let bad = RouterConfig {
            stall_factor: 0.5,
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().0, "stall_factor");
        assert!(
            serde_json::from_value::<RouterConfig>(serde_json::json!({"policy": "random"}))
                .is_err()
        );
    }
}
