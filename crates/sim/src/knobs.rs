//! The simulator's run-time knobs: set by flags at start, read and changed
//! through `GET/PATCH /admin/config` while it runs.

use rand::Rng;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// What the generated text is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum TextMode {
    /// Words drawn from a small vocabulary, `max_tokens` of them.
    Random,
    /// The prompt's words back, up to `max_tokens` (finish reason `stop`
    /// when the prompt is shorter).
    Echo,
}

/// An injected failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum FailureKind {
    /// 500 with an OpenAI-style error body.
    ServerError,
    /// 429, as when the engine is overloaded.
    RateLimit,
    /// No answer at all for `stall_ms`, then the normal answer.
    Stall,
    /// Half the answer, then nothing for `stall_ms`, then the rest (an
    /// engine that hangs in the middle of a stream).
    StallMidStream,
}

/// Every knob, as it is now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Knobs {
    /// Mean time to first token once a request runs, in milliseconds.
    pub ttft_ms: f64,
    /// Standard deviation of the time to first token, in milliseconds.
    pub ttft_stddev_ms: f64,
    /// Mean time between two tokens, in milliseconds.
    pub itl_ms: f64,
    /// Standard deviation of the inter-token latency, in milliseconds.
    pub itl_stddev_ms: f64,
    /// Latencies grow with load: multiplied by `1 + load_factor × running / max_num_seqs`.
    pub load_factor: f64,
    /// Requests generating at once.
    pub max_num_seqs: u32,
    /// Requests that may wait for a slot; beyond, 429.
    pub max_waiting: u32,
    /// Share of requests (0–1) that fail with one of `failure_kinds`.
    pub failure_rate: f64,
    /// Kinds of injected failures, drawn uniformly.
    pub failure_kinds: Vec<FailureKind>,
    /// How long a `stall` failure holds the request, in milliseconds.
    pub stall_ms: u64,
    /// Random words or the prompt echoed.
    pub mode: TextMode,
    /// Tokens generated when a request gives no `max_tokens`.
    pub default_max_tokens: u32,
    /// Model load time, in milliseconds. Changing it at run time "reloads"
    /// the model: not ready for that long from now.
    pub model_load_delay_ms: u64,
}

/// `PATCH /admin/config`: the knobs to change.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnobsPatch {
    pub ttft_ms: Option<f64>,
    pub ttft_stddev_ms: Option<f64>,
    pub itl_ms: Option<f64>,
    pub itl_stddev_ms: Option<f64>,
    pub load_factor: Option<f64>,
    pub max_num_seqs: Option<u32>,
    pub max_waiting: Option<u32>,
    pub failure_rate: Option<f64>,
    pub failure_kinds: Option<Vec<FailureKind>>,
    pub stall_ms: Option<u64>,
    pub mode: Option<TextMode>,
    pub default_max_tokens: Option<u32>,
    pub model_load_delay_ms: Option<u64>,
}

/// A knob value out of range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid {field}: {message}")]
pub struct KnobError {
    pub field: &'static str,
    pub message: String,
}

fn bad(field: &'static str, message: impl Into<String>) -> KnobError {
    KnobError {
        field,
        message: message.into(),
    }
}

impl Knobs {
    /// The knobs with `patch` applied, if every value is valid.
    pub fn patched(&self, p: &KnobsPatch) -> Result<Knobs, KnobError> {
        let mut k = self.clone();
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = p.$f.clone() { k.$f = v; } )* };
        }
        set!(
            ttft_ms,
            ttft_stddev_ms,
            itl_ms,
            itl_stddev_ms,
            load_factor,
            max_num_seqs,
            max_waiting,
            failure_rate,
            failure_kinds,
            stall_ms,
            mode,
            default_max_tokens,
            model_load_delay_ms
        );
        k.validate()?;
        Ok(k)
    }

    pub fn validate(&self) -> Result<(), KnobError> {
        for (field, v) in [
            ("ttft_ms", self.ttft_ms),
            ("ttft_stddev_ms", self.ttft_stddev_ms),
            ("itl_ms", self.itl_ms),
            ("itl_stddev_ms", self.itl_stddev_ms),
            ("load_factor", self.load_factor),
        ] {
            if !v.is_finite() || !(0.0..=3_600_000.0).contains(&v) {
                return Err(bad(field, "must be a number from 0 to 3600000"));
            }
        }
        if self.max_num_seqs == 0 {
            return Err(bad("max_num_seqs", "must be at least 1"));
        }
        if !(0.0..=1.0).contains(&self.failure_rate) {
            return Err(bad("failure_rate", "must be between 0 and 1"));
        }
        if self.failure_rate > 0.0 && self.failure_kinds.is_empty() {
            return Err(bad(
                "failure_kinds",
                "must name at least one kind when failure_rate > 0",
            ));
        }
        if self.default_max_tokens == 0 || self.default_max_tokens > crate::openai::MAX_TOKENS_LIMIT
        {
            return Err(bad(
                "default_max_tokens",
                format!("must be between 1 and {}", crate::openai::MAX_TOKENS_LIMIT),
            ));
        }
        Ok(())
    }

    /// Whether this request fails, and how.
    pub fn draw_failure(&self, rng: &mut impl Rng) -> Option<FailureKind> {
        if self.failure_rate <= 0.0 || self.failure_kinds.is_empty() {
            return None;
        }
        if rng.random::<f64>() >= self.failure_rate {
            return None;
        }
        Some(self.failure_kinds[rng.random_range(0..self.failure_kinds.len())])
    }

    /// One latency: normal around `mean_ms` with `stddev_ms` (never
    /// negative), stretched by the load.
    pub fn sample(
        &self,
        mean_ms: f64,
        stddev_ms: f64,
        running: usize,
        rng: &mut impl Rng,
    ) -> Duration {
        if mean_ms <= 0.0 && stddev_ms <= 0.0 {
            return Duration::ZERO;
        }
        let mut ms = mean_ms;
        if stddev_ms > 0.0 {
            // Box–Muller.
            let u1: f64 = rng.random_range(f64::EPSILON..1.0);
            let u2: f64 = rng.random();
            ms += stddev_ms * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        }
        let load = 1.0 + self.load_factor * running as f64 / f64::from(self.max_num_seqs);
        Duration::from_secs_f64((ms.max(0.0) * load) / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn knobs() -> Knobs {
        Knobs {
            ttft_ms: 10.0,
            ttft_stddev_ms: 0.0,
            itl_ms: 5.0,
            itl_stddev_ms: 0.0,
            load_factor: 1.0,
            max_num_seqs: 4,
            max_waiting: 8,
            failure_rate: 0.0,
            failure_kinds: vec![],
            stall_ms: 1000,
            mode: TextMode::Random,
            default_max_tokens: 16,
            model_load_delay_ms: 0,
        }
    }

    #[test]
    fn patches_validate() {
        let k = knobs();
        let p: KnobsPatch = serde_json::from_str(r#"{"itl_ms": 0, "mode": "echo"}"#).unwrap();
        let n = k.patched(&p).unwrap();
        assert_eq!((n.itl_ms, n.mode, n.ttft_ms), (0.0, TextMode::Echo, 10.0));
        let p: KnobsPatch = serde_json::from_str(r#"{"failure_rate": 0.5}"#).unwrap();
        assert_eq!(k.patched(&p).unwrap_err().field, "failure_kinds");
        let p: KnobsPatch = serde_json::from_str(r#"{"max_num_seqs": 0}"#).unwrap();
        assert_eq!(k.patched(&p).unwrap_err().field, "max_num_seqs");
        assert!(serde_json::from_str::<KnobsPatch>(r#"{"nope": 1}"#).is_err());
    }

    #[test]
    fn latency_grows_with_load_and_spreads() {
        let k = knobs();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        assert_eq!(k.sample(10.0, 0.0, 0, &mut rng), Duration::from_millis(10));
        assert_eq!(k.sample(10.0, 0.0, 4, &mut rng), Duration::from_millis(20));
        assert_eq!(k.sample(0.0, 0.0, 4, &mut rng), Duration::ZERO);
        let xs: Vec<f64> = (0..2000)
            .map(|_| k.sample(100.0, 20.0, 0, &mut rng).as_secs_f64() * 1000.0)
            .collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!((mean - 100.0).abs() < 3.0, "{mean}");
        assert!((var.sqrt() - 20.0).abs() < 3.0, "{}", var.sqrt());
    }

    #[test]
    fn failures_are_drawn_at_the_rate() {
        let mut k = knobs();
        k.failure_rate = 0.25;
        k.failure_kinds = vec![FailureKind::ServerError, FailureKind::RateLimit];
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let n = (0..10_000)
            .filter(|_| k.draw_failure(&mut rng).is_some())
            .count();
        assert!((2200..2800).contains(&n), "{n}");
    }
}
