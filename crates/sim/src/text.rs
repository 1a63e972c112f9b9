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

/// The word at `position` of the context for `seed`: the same on every
/// simulator, so a continuation from any point goes on with the same text.
pub fn seeded_word(seed: u64, position: u32) -> &'static str {
    let mut h = seed ^ u64::from(position).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    VOCABULARY[(h % VOCABULARY.len() as u64) as usize]
}

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
    /// The request's seed: word `i` is then a function of the seed and of
    /// its position `context_tokens + i` alone (see [`seeded_word`]).
    pub seed: Option<u64>,
    pub context_tokens: u32,
    /// The first token gets a leading space (it continues text).
    pub leading_space: bool,
    /// An injected mid-stream stall: after this many tokens, nothing for
    /// `knobs.stall_ms`.
    pub stall_after: Option<u32>,
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
        if g.plan.stall_after == Some(g.produced) {
            tokio::time::sleep(std::time::Duration::from_millis(k.stall_ms)).await;
        }
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
        let word: &str = match (&g.plan.echo, g.plan.seed) {
            (Some(words), _) => &words[i],
            (None, Some(seed)) => {
                seeded_word(seed, g.plan.context_tokens.saturating_add(g.produced))
            }
            (None, None) => VOCABULARY[g.rng.random_range(0..VOCABULARY.len())],
        };
        let text = if i == 0 && !g.plan.leading_space {
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
    fn seeded_words_depend_on_seed_and_position_only() {
        let a: Vec<&str> = (0..64).map(|p| seeded_word(7, p)).collect();
        let b: Vec<&str> = (0..64).map(|p| seeded_word(7, p)).collect();
        assert_eq!(a, b);
        let c: Vec<&str> = (0..64).map(|p| seeded_word(8, p)).collect();
        assert_ne!(a, c, "another seed, another text");
        let distinct: std::collections::HashSet<&str> = a.iter().copied().collect();
        assert!(distinct.len() > 10, "{distinct:?}");
    }

    #[test]
    fn vocabulary_words_are_single_tokens() {
        assert!(VOCABULARY.iter().all(|w| count_tokens(w) == 1));
    }
}
