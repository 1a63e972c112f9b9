//! At most `max_num_seqs` requests run at once; the others wait in FIFO
//! order, at most `max_waiting` of them (beyond: rejected, 429). Running and
//! waiting counts are kept by RAII guards, so a request that is dropped
//! (e.g. its client disconnected) gives its slot back. `max_num_seqs` can
//! change while requests run.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct Scheduler {
    slots: Arc<Semaphore>,
    max_num_seqs: AtomicU32,
    running: AtomicUsize,
    waiting: AtomicUsize,
}

/// The waiting queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull;

/// A request let in: running at once, or waiting for a slot.
pub enum Ticket {
    Running(RunningGuard),
    Waiting(WaitingGuard),
}

impl Ticket {
    /// Waits (if it must) for a slot.
    pub async fn run(self) -> Option<RunningGuard> {
        match self {
            Ticket::Running(g) => Some(g),
            Ticket::Waiting(w) => {
                let scheduler = w.0.clone();
                // The semaphore is never closed; `None` only if that changes.
                let permit = scheduler.slots.clone().acquire_owned().await.ok()?;
                scheduler.running.fetch_add(1, Ordering::Relaxed);
                drop(w);
                Some(RunningGuard {
                    scheduler,
                    _permit: permit,
                })
            }
        }
    }
}

impl Scheduler {
    pub fn new(max_num_seqs: u32) -> Self {
        let max_num_seqs = max_num_seqs.max(1);
        Self {
            slots: Arc::new(Semaphore::new(max_num_seqs as usize)),
            max_num_seqs: AtomicU32::new(max_num_seqs),
            running: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
        }
    }

    pub fn max_num_seqs(&self) -> u32 {
        self.max_num_seqs.load(Ordering::Relaxed)
    }

    pub fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Let a request in: it runs at once if a slot is free, else waits if
    /// fewer than `max_waiting` already do.
    pub fn enter(self: &Arc<Self>, max_waiting: u32) -> Result<Ticket, QueueFull> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            self.running.fetch_add(1, Ordering::Relaxed);
            return Ok(Ticket::Running(RunningGuard {
                scheduler: self.clone(),
                _permit: permit,
            }));
        }
        let before = self.waiting.fetch_add(1, Ordering::Relaxed);
        let guard = WaitingGuard(self.clone());
        if before >= max_waiting as usize {
            return Err(QueueFull);
        }
        Ok(Ticket::Waiting(guard))
    }

    /// Waits for a free slot, however long the queue.
    #[cfg(test)]
    pub async fn admit(self: &Arc<Self>) -> Option<RunningGuard> {
        self.enter(u32::MAX).ok()?.run().await
    }

    /// Change the number of slots. Fewer slots take effect as running
    /// requests finish.
    pub fn set_max_num_seqs(self: &Arc<Self>, n: u32) {
        let n = n.max(1);
        let old = self.max_num_seqs.swap(n, Ordering::Relaxed);
        if n > old {
            self.slots.add_permits((n - old) as usize);
        } else if n < old {
            let slots = self.slots.clone();
            tokio::spawn(async move {
                if let Ok(p) = slots.acquire_many_owned(old - n).await {
                    p.forget();
                }
            });
        }
    }
}

/// A request counted as waiting while this lives.
pub struct WaitingGuard(Arc<Scheduler>);

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

impl RunningGuard {
    /// Requests running now (this one included).
    pub fn running(&self) -> usize {
        self.scheduler.running()
    }
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

    #[tokio::test]
    async fn a_full_queue_rejects_and_slots_resize() {
        let s = Arc::new(Scheduler::new(1));
        let a = s.enter(1).unwrap();
        assert!(matches!(a, Ticket::Running(_)));
        let b = s.enter(1).unwrap();
        assert!(matches!(b, Ticket::Waiting(_)));
        assert_eq!(s.enter(1).err(), Some(QueueFull));
        assert_eq!(s.waiting(), 1, "the rejected request is not counted");
        // One more slot: the waiter runs.
        s.set_max_num_seqs(2);
        let b = b.run().await.expect("slot");
        assert_eq!((s.running(), s.waiting()), (2, 0));
        // Back to one: takes effect once both finish.
        s.set_max_num_seqs(1);
        drop(a);
        drop(b);
        while s.slots.available_permits() != 1 {
            tokio::task::yield_now().await;
        }
        assert!(matches!(s.enter(0).unwrap(), Ticket::Running(_)));
    }
}
