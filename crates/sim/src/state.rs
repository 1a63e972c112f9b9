//! Shared state of one simulator: configuration, readiness, scheduler and counters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::scheduler::Scheduler;
use crate::SimArgs;

pub struct SimState {
    pub model: String,
    pub load_delay: Duration,
    /// When the model counts as loaded.
    pub ready_at: Instant,
    pub ttft: Duration,
    pub itl: Duration,
    pub seed: u64,
    pub scheduler: Arc<Scheduler>,
    pub counters: Counters,
    /// Requests received so far; numbers each request's random stream.
    request_seq: AtomicU64,
}

/// Monotonic counters exposed on `/metrics`.
#[derive(Default)]
pub struct Counters {
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    /// Requests that generated all the tokens they asked for.
    pub success_length: AtomicU64,
    /// Requests whose client went away before the end.
    pub aborted: AtomicU64,
}

impl SimState {
    pub fn new(args: &SimArgs) -> Self {
        let load_delay = Duration::from_millis(args.model_load_delay_ms);
        Self {
            model: args.model.clone(),
            load_delay,
            ready_at: Instant::now() + load_delay,
            ttft: Duration::from_millis(args.ttft_ms),
            itl: Duration::from_millis(args.itl_ms),
            seed: args.seed,
            scheduler: Arc::new(Scheduler::new(args.max_num_seqs)),
            counters: Counters::default(),
            request_seq: AtomicU64::new(0),
        }
    }

    pub fn is_loaded(&self) -> bool {
        Instant::now() >= self.ready_at
    }

    /// A seed for the next request's text: reproducible for a given `--seed`
    /// and request order.
    pub fn next_request_seed(&self) -> u64 {
        let n = self.request_seq.fetch_add(1, Ordering::Relaxed);
        self.seed ^ n.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }
}
