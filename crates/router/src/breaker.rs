//! A per-instance circuit breaker: closed (requests flow) → open after
//! `threshold` consecutive failures (no requests) → half-open after the
//! cool-down (one probe request) → closed on its success, open again on its
//! failure. Time is passed in, so tests drive it without sleeping.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Closed,
    /// No requests until `until`.
    Open {
        until: Instant,
    },
    /// One probe is in flight since `probe_started`. A probe that never
    /// reports (its request was cancelled) is replaced after the cool-down.
    HalfOpen {
        probe_started: Instant,
    },
}

#[derive(Debug)]
struct State {
    phase: Phase,
    consecutive_failures: u32,
}

#[derive(Debug)]
pub struct Breaker {
    state: Mutex<State>,
    /// 0: never opens.
    threshold: u32,
    cooldown: Duration,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            state: Mutex::new(State {
                phase: Phase::Closed,
                consecutive_failures: 0,
            }),
            threshold,
            cooldown,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn phase(&self) -> Phase {
        self.lock().phase
    }

    /// Whether a request could be sent now (no side effect).
    pub fn available(&self, now: Instant) -> bool {
        match self.lock().phase {
            Phase::Closed => true,
            Phase::Open { until } => now >= until,
            Phase::HalfOpen { probe_started } => now >= probe_started + self.cooldown,
        }
    }

    /// Whether the circuit is open and its cool-down has passed: the
    /// instance is owed a probe, whatever its figures say.
    pub fn probe_due(&self, now: Instant) -> bool {
        match self.lock().phase {
            Phase::Closed => false,
            Phase::Open { until } => now >= until,
            Phase::HalfOpen { probe_started } => now >= probe_started + self.cooldown,
        }
    }

    /// Take the right to send a request now: always when closed; the one
    /// probe when the cool-down has passed.
    pub fn acquire(&self, now: Instant) -> bool {
        let mut s = self.lock();
        match s.phase {
            Phase::Closed => true,
            Phase::Open { until } if now >= until => {
                s.phase = Phase::HalfOpen { probe_started: now };
                true
            }
            Phase::HalfOpen { probe_started } if now >= probe_started + self.cooldown => {
                s.phase = Phase::HalfOpen { probe_started: now };
                true
            }
            _ => false,
        }
    }

    /// The instance answered properly. Returns true when this closed a
    /// circuit that was not closed (the instance is back).
    pub fn success(&self) -> bool {
        let mut s = self.lock();
        s.consecutive_failures = 0;
        let was = std::mem::replace(&mut s.phase, Phase::Closed);
        was != Phase::Closed
    }

    /// The instance stalled: open the circuit now, whatever the count
    /// (unless the breaker is off). Returns true when this opened it.
    pub fn trip(&self, now: Instant) -> bool {
        let mut s = self.lock();
        s.consecutive_failures = s.consecutive_failures.saturating_add(1);
        if self.threshold == 0 || matches!(s.phase, Phase::Open { .. }) {
            return false;
        }
        s.phase = Phase::Open {
            until: now + self.cooldown,
        };
        true
    }

    /// The instance failed (connection, timeout, 5xx). Returns true when this
    /// failure opened the circuit.
    pub fn failure(&self, now: Instant) -> bool {
        let mut s = self.lock();
        s.consecutive_failures = s.consecutive_failures.saturating_add(1);
        let open = match s.phase {
            Phase::HalfOpen { .. } => true,
            Phase::Closed => self.threshold > 0 && s.consecutive_failures >= self.threshold,
            Phase::Open { .. } => false,
        };
        if open {
            s.phase = Phase::Open {
                until: now + self.cooldown,
            };
        }
        open
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_and_probes_after_cooldown() {
        let cd = Duration::from_secs(10);
        let b = Breaker::new(3, cd);
        let t0 = Instant::now();
        assert!(b.acquire(t0));
        assert!(!b.failure(t0));
        b.success(); // resets the streak
        assert!(!b.failure(t0));
        assert!(!b.failure(t0));
        assert!(b.failure(t0), "third consecutive failure opens");
        assert!(!b.available(t0));
        assert!(!b.acquire(t0 + Duration::from_secs(9)));
        // Half-open: exactly one probe.
        let t1 = t0 + cd;
        assert!(b.available(t1));
        assert!(b.acquire(t1));
        assert!(matches!(b.phase(), Phase::HalfOpen { .. }));
        assert!(!b.acquire(t1), "only one probe at a time");
        // Probe fails: open again for a full cool-down.
        assert!(b.failure(t1));
        assert!(!b.acquire(t1 + Duration::from_secs(5)));
        let t2 = t1 + cd;
        assert!(b.acquire(t2));
        b.success();
        assert_eq!(b.phase(), Phase::Closed);
        assert!(b.acquire(t2));
    }

    #[test]
    fn a_lost_probe_is_replaced_after_the_cooldown() {
        let cd = Duration::from_secs(1);
        let b = Breaker::new(1, cd);
        let t0 = Instant::now();
        assert!(b.failure(t0));
        assert!(b.acquire(t0 + cd));
        assert!(!b.acquire(t0 + cd + Duration::from_millis(500)));
        assert!(b.acquire(t0 + cd * 2), "the lost probe's slot is reclaimed");
    }

    #[test]
    fn a_stall_opens_at_once_and_a_probe_closes_again() {
        let cd = Duration::from_secs(2);
        let b = Breaker::new(5, cd);
        let t0 = Instant::now();
        assert!(b.trip(t0), "one stall is enough");
        assert!(!b.trip(t0), "already open");
        assert!(!b.available(t0));
        assert!(b.acquire(t0 + cd));
        assert!(b.success(), "the probe brought it back");
        assert!(!b.success(), "already closed");
    }

    #[test]
    fn threshold_zero_never_opens() {
        let b = Breaker::new(0, Duration::from_secs(1));
        let t0 = Instant::now();
        for _ in 0..100 {
            assert!(!b.failure(t0));
        }
        assert!(b.acquire(t0));
    }
}
