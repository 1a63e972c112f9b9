//! Shared state of one simulator: knobs, readiness, scheduler, counters and
//! histograms.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::time::Instant;

use crate::hist::{Histogram, E2E_BUCKETS, ITL_BUCKETS, TTFT_BUCKETS};
use crate::knobs::Knobs;
use crate::scheduler::Scheduler;
use crate::SimArgs;

pub struct SimState {
    pub model: String,
    /// When the model counts as loaded.
    ready_at: Mutex<Instant>,
    pub seed: u64,
    pub scheduler: Arc<Scheduler>,
    pub counters: Counters,
    pub hist: Histograms,
    knobs: RwLock<Arc<Knobs>>,
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
    /// Requests that ended before `max_tokens` (echo mode: the prompt ran out).
    pub success_stop: AtomicU64,
    /// Requests whose client went away before the end.
    pub aborted: AtomicU64,
    /// Requests failed on purpose (failure injection) or refused (queue full).
    pub injected_failures: AtomicU64,
    pub rejected_queue_full: AtomicU64,
}

/// Latency histograms exposed on `/metrics`.
pub struct Histograms {
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    pub queue: Histogram,
}

impl SimState {
    pub fn new(args: &SimArgs) -> Self {
        let knobs = args.knobs();
        Self {
            model: args.model.clone(),
            ready_at: Mutex::new(Instant::now() + Duration::from_millis(args.model_load_delay_ms)),
            seed: args.seed,
            scheduler: Arc::new(Scheduler::new(knobs.max_num_seqs)),
            counters: Counters::default(),
            hist: Histograms {
                ttft: Histogram::new(TTFT_BUCKETS),
                itl: Histogram::new(ITL_BUCKETS),
                e2e: Histogram::new(E2E_BUCKETS),
                queue: Histogram::new(E2E_BUCKETS),
            },
            knobs: RwLock::new(Arc::new(knobs)),
            request_seq: AtomicU64::new(0),
        }
    }

    /// The knobs in force.
    pub fn knobs(&self) -> Arc<Knobs> {
        self.knobs.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Put new knobs in force (validated by the caller). A changed model
    /// load time "reloads" the model: not ready for that long from now.
    pub fn set_knobs(&self, k: Knobs) {
        let mut cur = self.knobs.write().unwrap_or_else(|p| p.into_inner());
        if k.max_num_seqs != cur.max_num_seqs {
            self.scheduler.set_max_num_seqs(k.max_num_seqs);
        }
        if k.model_load_delay_ms != cur.model_load_delay_ms {
            *self.ready_at.lock().unwrap_or_else(|p| p.into_inner()) =
                Instant::now() + Duration::from_millis(k.model_load_delay_ms);
        }
        *cur = Arc::new(k);
    }

    pub fn ready_at(&self) -> Instant {
        *self.ready_at.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_loaded(&self) -> bool {
        Instant::now() >= self.ready_at()
    }

    /// A seed for the next request's text: reproducible for a given `--seed`
    /// and request order.
    pub fn next_request_seed(&self) -> u64 {
        let n = self.request_seq.fetch_add(1, Ordering::Relaxed);
        self.seed ^ n.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }
}
