//! Token generation: words from a small vocabulary, produced at the
//! configured latencies while the request holds a running slot.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

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

struct Generation {
    state: Arc<SimState>,
    /// Held, not read: the request runs while it exists.
    _slot: RunningGuard,
    rng: StdRng,
    produced: u32,
    max_tokens: u32,
}

impl Drop for Generation {
    fn drop(&mut self) {
        if self.produced < self.max_tokens {
            self.state.counters.aborted.fetch_add(1, Ordering::Relaxed);
        } else {
            self.state
                .counters
                .success_length
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The tokens of one request that holds `slot`, at TTFT then ITL pace.
/// Dropping the stream (client gone) frees the slot at once.
pub fn generate(
    state: Arc<SimState>,
    slot: RunningGuard,
    prompt_tokens: u32,
    max_tokens: u32,
) -> impl Stream<Item = Token> + Send + 'static {
    let rng = StdRng::seed_from_u64(state.next_request_seed());
    let generation = Generation {
        state,
        _slot: slot,
        rng,
        produced: 0,
        max_tokens,
    };
    futures::stream::unfold(generation, move |mut g| async move {
        if g.produced >= g.max_tokens {
            return None;
        }
        let delay: Duration = if g.produced == 0 {
            g.state.ttft
        } else {
            g.state.itl
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        } else {
            // Stay cooperative even with zero latencies.
            tokio::task::yield_now().await;
        }
        if g.produced == 0 {
            // Prefill is done when the first token comes out.
            g.state
                .counters
                .prompt_tokens
                .fetch_add(u64::from(prompt_tokens), Ordering::Relaxed);
        }
        let word = VOCABULARY[g.rng.random_range(0..VOCABULARY.len())];
        let text = if g.produced == 0 {
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
