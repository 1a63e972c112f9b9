//! Token generation: words from a small vocabulary, produced at the
//! configured latencies while the request holds a running slot.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures::Stream;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::knobs::Knobs;
use crate::scheduler::RunningGuard;
use crate::state::SimState;

const VOCABULARY: &[&str] = &[
    "the",
    "fleet",
    "of",
    "GPUs",
    "serves",
    "tokens",
    "quickly",
    "and",
    "model",
    "weights",
    "load",
    "into",
    "memory",
    "while",
    "requests",
    "wait",
    "in",
    "a",
    "queue",
    "for",
    "their",
    "turn",
    "to",
    "run",
    "on",
    "simulated",
    "hardware",
    "with",
    "low",
    "latency",
];

/// Counts tokens the way the simulator does: whitespace-separated words.
pub fn count_tokens(text: &str) -> u32 {
    u32::try_from(text.split_whitespace().count()).unwrap_or(u32::MAX)
}

/// One generated token, with the leading space that joins it to the text
/// before it (none for the first).
pub struct Token {
    pub text: String,
}

/// What one request generates, and how.
pub struct Plan {
    pub prompt_tokens: u32,
    pub max_tokens: u32,
    /// Echo mode: the prompt's words to give back.
    pub echo: Option<Vec<String>>,
    /// When the request arrived (for the queue, TTFT and end-to-end times).
    pub arrived: std::time::Instant,
    pub knobs: Arc<Knobs>,
}

impl Plan {
    /// Tokens this plan produces when nothing cuts it short.
    pub fn planned_tokens(&self) -> u32 {
        match &self.echo {
            Some(words) => self
                .max_tokens
                .min(u32::try_from(words.len()).unwrap_or(u32::MAX)),
            None => self.max_tokens,
        }
    }
}

struct Generation {
    state: Arc<SimState>,
    /// Held while the request runs.
    slot: RunningGuard,
    rng: StdRng,
    plan: Plan,
    target: u32,
    produced: u32,
    last_token_at: std::time::Instant,
}

impl Drop for Generation {
    fn drop(&mut self) {
        let c = &self.state.counters;
        if self.produced < self.target {
            c.aborted.fetch_add(1, Ordering::Relaxed);
        } else if self.target < self.plan.max_tokens {
            c.success_stop.fetch_add(1, Ordering::Relaxed);
        } else {
            c.success_length.fetch_add(1, Ordering::Relaxed);
        }
        self.state.hist.e2e.observe(self.plan.arrived.elapsed());
    }
}

/// The tokens of one request that holds `slot`, at TTFT then ITL pace
/// (stretched by the load). Dropping the stream (client gone) frees the slot
/// at once.
pub fn generate(
    state: Arc<SimState>,
    slot: RunningGuard,
    plan: Plan,
) -> impl Stream<Item = Token> + Send + 'static {
    state.hist.queue.observe(plan.arrived.elapsed());
    let rng = StdRng::seed_from_u64(state.next_request_seed());
    let generation = Generation {
        state,
        slot,
        rng,
        target: plan.planned_tokens(),
        plan,
        produced: 0,
        last_token_at: std::time::Instant::now(),
    };
    futures::stream::unfold(generation, move |mut g| async move {
        if g.produced >= g.target {
            return None;
        }
        let k = &g.plan.knobs;
        let running = g.slot.running();
        let delay = if g.produced == 0 {
            k.sample(k.ttft_ms, k.ttft_stddev_ms, running, &mut g.rng)
        } else {
            k.sample(k.itl_ms, k.itl_stddev_ms, running, &mut g.rng)
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        } else if g.produced % 8 == 7 {
            // Stay cooperative even with zero latencies.
            tokio::task::yield_now().await;
        }
        let now = std::time::Instant::now();
        if g.produced == 0 {
            // Prefill is done when the first token comes out.
            g.state
                .counters
                .prompt_tokens
                .fetch_add(u64::from(g.plan.prompt_tokens), Ordering::Relaxed);
            g.state.hist.ttft.observe(now - g.plan.arrived);
        } else {
            g.state.hist.itl.observe(now - g.last_token_at);
        }
        g.last_token_at = now;
        let i = g.produced as usize;
        let word: &str = match &g.plan.echo {
            Some(words) => &words[i],
            None => VOCABULARY[g.rng.random_range(0..VOCABULARY.len())],
        };
        let text = if i == 0 {
            word.to_string()
        } else {
            format!(" {word}")
        };
        g.produced += 1;
        g.state
            .counters
            .generation_tokens
            .fetch_add(1, Ordering::Relaxed);
        Some((Token { text }, g))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_whitespace_words() {
        assert_eq!(count_tokens(""), 0);
        assert_eq!(count_tokens("  hello   world \n again"), 3);
    }

    #[test]
    fn vocabulary_words_are_single_tokens() {
        assert!(VOCABULARY.iter().all(|w| count_tokens(w) == 1));
    }
}
