//! At most `max_num_seqs` requests run at once; the others wait in FIFO
//! order. Running and waiting counts are kept by RAII guards, so a request
//! that is dropped (e.g. its client disconnected) gives its slot back.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct Scheduler {
    slots: Arc<Semaphore>,
    max_num_seqs: u32,
    running: AtomicUsize,
    waiting: AtomicUsize,
}

impl Scheduler {
    pub fn new(max_num_seqs: u32) -> Self {
        let max_num_seqs = max_num_seqs.max(1);
        Self {
            slots: Arc::new(Semaphore::new(max_num_seqs as usize)),
            max_num_seqs,
            running: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
        }
    }

    pub fn max_num_seqs(&self) -> u32 {
        self.max_num_seqs
    }

    pub fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Waits for a free slot. The request counts as waiting until it gets
    /// one, then as running until the returned guard is dropped.
    pub async fn admit(self: &Arc<Self>) -> Option<RunningGuard> {
        let waiting = WaitingGuard::new(self.clone());
        // The semaphore is never closed; `None` only if that changes.
        let permit = self.slots.clone().acquire_owned().await.ok()?;
        self.running.fetch_add(1, Ordering::Relaxed);
        drop(waiting);
        Some(RunningGuard {
            scheduler: self.clone(),
            _permit: permit,
        })
    }
}

struct WaitingGuard(Arc<Scheduler>);

impl WaitingGuard {
    fn new(scheduler: Arc<Scheduler>) -> Self {
        scheduler.waiting.fetch_add(1, Ordering::Relaxed);
        Self(scheduler)
    }
}

impl Drop for WaitingGuard {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A running request's slot.
pub struct RunningGuard {
    scheduler: Arc<Scheduler>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.scheduler.running.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counts_running_and_waiting() {
        let s = Arc::new(Scheduler::new(1));
        let first = s.admit().await.expect("slot");
        assert_eq!((s.running(), s.waiting()), (1, 0));
        let s2 = s.clone();
        let second = tokio::spawn(async move { s2.admit().await.map(|_g| ()) });
        tokio::task::yield_now().await;
        while s.waiting() != 1 {
            tokio::task::yield_now().await;
        }
        assert_eq!(s.running(), 1);
        drop(first);
        second.await.expect("join").expect("slot");
        assert_eq!((s.running(), s.waiting()), (0, 0));
    }

    #[tokio::test]
    async fn a_dropped_waiter_stops_waiting() {
        let s = Arc::new(Scheduler::new(1));
        let _first = s.admit().await.expect("slot");
        let s2 = s.clone();
        let waiter = tokio::spawn(async move { s2.admit().await.map(|_g| ()) });
        while s.waiting() != 1 {
            tokio::task::yield_now().await;
        }
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(s.waiting(), 0);
    }
}
