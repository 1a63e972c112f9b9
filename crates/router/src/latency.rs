//! What the router knows of an instance's speed: peak-EWMA moving averages
//! of its time to first token and of the time between tokens, and its
//! requests still waiting for a first token (how many, and since when).
//! All lock-free on the request path. Time is passed in, as microseconds
//! since a process-wide epoch ([`now_us`]), so tests drive it without
//! sleeping.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The estimate of an instance nothing has been measured on yet: close to
/// a real engine's time to first token, so a new instance neither floods
/// (zero) nor starves.
pub const PRIOR_US: f64 = 100_000.0;

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Microseconds since the process-wide epoch.
pub fn now_us() -> u64 {
    us(epoch().elapsed())
}

/// `d` in whole microseconds.
pub fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// A peak-sensitive exponentially weighted moving average: a sample above
/// the average replaces it at once; one below pulls it down with weight
/// `1 - exp(-elapsed / decay)`. So one slow answer makes an instance look
/// slow immediately, and it earns its share back over a few `decay`s.
#[derive(Debug, Default)]
pub struct PeakEwma {
    /// f64 bits, microseconds; 0: no sample yet.
    value: AtomicU64,
    /// When `value` was last updated (µs since the epoch).
    stamp: AtomicU64,
}

impl PeakEwma {
    /// The last value, as it was stored.
    pub fn get(&self) -> Option<f64> {
        let v = f64::from_bits(self.value.load(Ordering::Relaxed));
        (v > 0.0).then_some(v)
    }

    /// The value decayed towards zero for the time since it was last
    /// updated (as Finagle's peak EWMA does): an instance that got a bad
    /// figure and then no traffic is tried again in time.
    pub fn get_at(&self, now: u64, decay_us: f64) -> Option<f64> {
        let v = self.get()?;
        let dt = now.saturating_sub(self.stamp.load(Ordering::Relaxed)) as f64;
        Some((v * (-dt / decay_us.max(1.0)).exp()).max(1.0))
    }

    /// Forget the past: the value is `sample_us` from now on.
    pub fn reset(&self, sample_us: f64, now: u64) {
        self.value
            .store(sample_us.max(1.0).to_bits(), Ordering::Relaxed);
        self.stamp.store(now, Ordering::Relaxed);
    }

    pub fn observe(&self, sample_us: f64, now: u64, decay_us: f64) {
        let sample = sample_us.max(1.0);
        let prev = f64::from_bits(self.value.load(Ordering::Relaxed));
        let next = if prev <= 0.0 || sample >= prev {
            sample
        } else {
            let dt = now.saturating_sub(self.stamp.load(Ordering::Relaxed)) as f64;
            let w = (-dt / decay_us.max(1.0)).exp();
            prev * w + sample * (1.0 - w)
        };
        // Racing writers each store a sensible value; losing one sample
        // to a race is harmless.
        self.value.store(next.to_bits(), Ordering::Relaxed);
        self.stamp.store(now, Ordering::Relaxed);
    }
}

/// One instance's latency state.
#[derive(Debug)]
pub struct Latency {
    /// The averages' time constant, in microseconds.
    pub decay_us: f64,
    pub ttft: PeakEwma,
    pub itl: PeakEwma,
    /// Streamed requests sent and still without a first token.
    waiting: AtomicU64,
    /// Sum of their start times (µs since the epoch), for their mean age.
    waiting_since: AtomicU64,
}

impl Default for Latency {
    fn default() -> Self {
        Self::new(Duration::from_secs(10))
    }
}

impl Latency {
    pub fn new(decay: Duration) -> Self {
        Self {
            decay_us: us(decay).max(1) as f64,
            ttft: PeakEwma::default(),
            itl: PeakEwma::default(),
            waiting: AtomicU64::new(0),
            waiting_since: AtomicU64::new(0),
        }
    }

    /// The average time to first token (decayed to `now`), or the prior.
    pub fn ttft_at(&self, now: u64) -> f64 {
        self.ttft.get_at(now, self.decay_us).unwrap_or(PRIOR_US)
    }

    /// The average time to first token, or the prior.
    pub fn ttft_us(&self) -> f64 {
        self.ttft.get().unwrap_or(PRIOR_US)
    }

    pub fn observe_ttft(&self, d: Duration, now: u64) {
        self.ttft.observe(us(d) as f64, now, self.decay_us);
    }

    pub fn observe_itl(&self, d: Duration, now: u64) {
        self.itl.observe(us(d) as f64, now, self.decay_us);
    }

    pub fn waiting(&self) -> u64 {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Mean age of the requests waiting for a first token (0: none).
    pub fn waiting_age_us(&self, now: u64) -> f64 {
        let n = self.waiting.load(Ordering::Relaxed);
        if n == 0 {
            return 0.0;
        }
        let sum = self.waiting_since.load(Ordering::Relaxed);
        // Read apart from `n`: clamp what a race could make negative.
        (n.saturating_mul(now).saturating_sub(sum) as f64 / n as f64).max(0.0)
    }

    /// A request starts waiting for its first token (see `pool::Waiting`).
    pub fn begin_wait(&self, now: u64) {
        self.waiting_since.fetch_add(now, Ordering::Relaxed);
        self.waiting.fetch_add(1, Ordering::Relaxed);
    }

    /// The request that began waiting at `since` stops waiting.
    pub fn end_wait(&self, since: u64) {
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        self.waiting_since.fetch_sub(since, Ordering::Relaxed);
    }

    /// The cost of sending one more request here: lower is better.
    pub fn cost(&self, in_flight: u64, now: u64) -> f64 {
        let latency = self.ttft_at(now).max(self.waiting_age_us(now));
        latency * (in_flight as f64 + 1.0)
    }

    /// How long a new request may wait for its first token here before it
    /// counts as stalled.
    pub fn stall_bound(&self, factor: f64, floor: Duration, ceiling: Duration) -> Duration {
        let ttft = self.ttft_us();
        let ahead = self.waiting() as f64;
        let bound_us = ttft * factor + ttft * ahead;
        let bound = Duration::from_micros(bound_us.min(u64::MAX as f64) as u64);
        bound.clamp(floor, ceiling.max(floor))
    }

    /// How long a stream may go silent between two tokens here.
    pub fn gap_bound(&self, factor: f64, floor: Duration, ceiling: Duration) -> Duration {
        let itl = self.itl.get().unwrap_or(PRIOR_US);
        Duration::from_micros((itl * factor).min(u64::MAX as f64) as u64)
            .clamp(floor, ceiling.max(floor))
    }
}

/// The recent times to first token of one model's instances, for the
/// hedging delay (its p95).
#[derive(Debug, Default)]
pub struct RecentTtft {
    samples: Mutex<VecDeque<u32>>,
}

/// Samples kept for the percentile.
const WINDOW: usize = 256;

impl RecentTtft {
    pub fn record(&self, d: Duration) {
        let v = u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
        let mut s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        if s.len() == WINDOW {
            s.pop_front();
        }
        s.push_back(v);
    }

    /// The `q` quantile (0–1) of the recent samples; `None` with fewer
    /// than 8.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let mut v: Vec<u32> = self
            .samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect();
        if v.len() < 8 {
            return None;
        }
        v.sort_unstable();
        let i = ((v.len() as f64 - 1.0) * q.clamp(0.0, 1.0)).round() as usize;
        Some(Duration::from_micros(u64::from(v[i])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DECAY: f64 = 10_000_000.0;

    #[test]
    fn peaks_at_once_and_decays_slowly() {
        let e = PeakEwma::default();
        assert_eq!(e.get(), None);
        e.observe(20_000.0, 0, DECAY);
        assert_eq!(e.get(), Some(20_000.0));
        e.observe(1_000_000.0, 1_000, DECAY);
        assert_eq!(e.get(), Some(1_000_000.0), "a slow answer counts at once");
        // Fast answers pull it back over the decay time.
        e.observe(20_000.0, 1_000 + 1_000_000, DECAY);
        let after_1s = e.get().unwrap();
        assert!(after_1s < 1_000_000.0 && after_1s > 800_000.0, "{after_1s}");
        e.observe(20_000.0, 1_000 + 40_000_000, DECAY);
        assert!(e.get().unwrap() < 50_000.0);
    }

    #[test]
    fn an_unused_bad_figure_fades() {
        let l = Latency::new(Duration::from_secs(10));
        l.ttft.observe(1_000_000.0, 0, DECAY);
        assert_eq!(l.ttft_at(0), 1_000_000.0);
        let later = l.ttft_at(10_000_000);
        assert!(
            (later - 1_000_000.0 / std::f64::consts::E).abs() < 1.0,
            "{later}"
        );
        l.ttft.reset(30_000.0, 10_000_000);
        assert_eq!(l.ttft_at(10_000_000), 30_000.0);
    }

    #[test]
    fn waiting_requests_age_and_raise_the_cost() {
        let l = Latency::default();
        l.ttft.observe(20_000.0, 0, DECAY);
        let idle = l.cost(0, 0);
        assert_eq!(idle, 20_000.0);
        l.begin_wait(0);
        assert_eq!(l.waiting(), 1);
        // Half a second without a first token: the instance looks as slow
        // as that, whatever its average says.
        assert_eq!(l.waiting_age_us(500_000), 500_000.0);
        assert_eq!(l.cost(1, 500_000), 1_000_000.0);
        l.end_wait(0);
        assert_eq!(l.waiting(), 0);
        assert_eq!(l.waiting_age_us(900_000), 0.0);
    }

    #[test]
    fn stall_bound_follows_ttft_and_queue_within_limits() {
        let floor = Duration::from_millis(1_000);
        let ceiling = Duration::from_secs(30);
        let l = Latency::default();
        l.ttft.observe(50_000.0, 0, DECAY);
        assert_eq!(l.stall_bound(4.0, floor, ceiling), floor);
        l.ttft.observe(2_000_000.0, 0, DECAY);
        assert_eq!(
            l.stall_bound(4.0, floor, ceiling),
            Duration::from_secs(8),
            "4 × 2 s"
        );
        l.begin_wait(0);
        l.begin_wait(0);
        assert_eq!(
            l.stall_bound(4.0, floor, ceiling),
            Duration::from_secs(12),
            "two ahead add 2 × 2 s"
        );
        l.ttft.observe(60_000_000.0, 0, DECAY);
        assert_eq!(l.stall_bound(4.0, floor, ceiling), ceiling);
    }

    #[test]
    fn p95_of_recent_samples() {
        let r = RecentTtft::default();
        assert_eq!(r.quantile(0.95), None);
        for ms in 1..=100u64 {
            r.record(Duration::from_millis(ms));
        }
        assert_eq!(r.quantile(0.95), Some(Duration::from_millis(95)));
        for _ in 0..WINDOW {
            r.record(Duration::from_millis(7));
        }
        assert_eq!(r.quantile(0.95), Some(Duration::from_millis(7)));
    }
}
