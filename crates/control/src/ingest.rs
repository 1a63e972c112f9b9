//! Heartbeat ingestion: validation, then the batching writer.
//!
//! Request handlers hand each validated heartbeat to [`HeartbeatWriter`]: a
//! task fed by a bounded channel that writes whatever is queued (up to
//! `ingest.batch_max`, waiting at most `ingest.linger_ms` for company) in one
//! store transaction ([`Store::record_heartbeats`]) and answers each caller
//! on its own oneshot, so every agent still learns whether its heartbeat was
//! applied. A full queue answers `Unavailable` at once (HTTP 503; agents
//! retry) rather than letting requests pile up. Batches land in the store's
//! staging tables; a mover task beside the writer moves them to the indexed
//! sample tables (`Store::compact_staging_part`), one staging partition at
//! a time, each once per `compact_interval_ms` (back to back once
//! `compact_heartbeats` are staged). On SQLite the two share the writer's
//! connection and take turns; on PostgreSQL the mover has its own, so
//! batches are not held up by moves. Both run on the writer's own thread.

use crate::bus::InstanceChange;
use crate::config::IngestConfig;
use crate::telemetry::Telemetry;
use crate::validate::GpuCountContext;
use crate::ControlError;
use chrono::{DateTime, Utc};
use gpufleet_domain::InstanceId;
use gpufleet_domain::InstanceStatus;
use gpufleet_proto::Heartbeat;
use gpufleet_store::{
    Backend, HeartbeatOutcome, IngestSession, InstanceRecord, Store, STAGING_PARTS,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::broadcast;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio_util::sync::CancellationToken;

/// The batch a heartbeat was in could not be written (logged once, by the writer).
#[derive(Debug, Clone, Copy)]
struct WriteFailed;

struct Job {
    hb: Heartbeat,
    received_at: DateTime<Utc>,
    reply: oneshot::Sender<Result<HeartbeatOutcome, WriteFailed>>,
}

/// Feeds the writer task; cheap to clone. The task ends when every handle
/// is dropped, or at [`HeartbeatWriter::stop`].
#[derive(Clone)]
pub(crate) struct HeartbeatWriter {
    tx: mpsc::Sender<Job>,
    stop: CancellationToken,
    /// Becomes true (or loses its sender) when the writer has finished.
    done: watch::Receiver<bool>,
}

impl HeartbeatWriter {
    /// Start the writer task (needs a Tokio runtime).
    pub(crate) fn spawn(store: Store, config: &IngestConfig, telemetry: Arc<Telemetry>) -> Self {
        let (tx, rx) = mpsc::channel(config.queue_capacity.max(1));
        let stop = CancellationToken::new();
        let (done_tx, done) = watch::channel(false);
        let writer = Writer {
            stop: stop.clone(),
            session: Arc::new(tokio::sync::Mutex::new(IngestSession::new(store))),
            batch_max: config.batch_max.max(1),
            linger: Duration::from_millis(config.linger_ms),
            compact_heartbeats: config.compact_heartbeats.max(1),
            compact_interval: Duration::from_millis(config.compact_interval_ms),
            telemetry,
        };
        // Its own thread and runtime: a busy API (thousands of ready tasks)
        // must not delay the wake-ups between the batch's statements.
        let thread = std::thread::Builder::new()
            .name("heartbeat-writer".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => {
                        rt.block_on(writer.run(rx));
                        let _ = done_tx.send(true);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start the heartbeat writer's runtime")
                    }
                }
            });
        if let Err(e) = thread {
            tracing::error!(error = %e, "cannot start the heartbeat writer thread");
        }
        HeartbeatWriter { tx, stop, done }
    }

    /// Stop taking heartbeats, write those queued, move what is staged,
    /// close the writer's connection; returns when it has.
    pub(crate) async fn stop(&self) {
        self.stop.cancel();
        let mut done = self.done.clone();
        // An error: the writer is gone already (its sender dropped).
        let _ = done.wait_for(|d| *d).await;
    }

    /// Queue `hb` and wait for its outcome.
    pub(crate) async fn write(
        &self,
        hb: Heartbeat,
        received_at: DateTime<Utc>,
    ) -> Result<HeartbeatOutcome, ControlError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .try_send(Job {
                hb,
                received_at,
                reply,
            })
            .map_err(|e| ControlError::Unavailable {
                message: match e {
                    mpsc::error::TrySendError::Full(_) => {
                        "too many heartbeats queued; retry shortly".into()
                    }
                    mpsc::error::TrySendError::Closed(_) => {
                        "the control plane is shutting down; retry shortly".into()
                    }
                },
            })?;
        match answer.await {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(WriteFailed)) | Err(_) => Err(ControlError::Unavailable {
                message: "heartbeats could not be stored; retry shortly".into(),
            }),
        }
    }
}

/// A connection to the store shared by the writer and the mover (SQLite:
/// one writer at a time anyway, and one connection keeps the pages both
/// write in its cache), or each's own (PostgreSQL: a move is one statement
/// that staging need not wait for).
type Session = Arc<tokio::sync::Mutex<IngestSession>>;

/// Heartbeats staged and not moved yet (an estimate: re-read from the store
/// after each full round of moves), and a wake-up for the mover.
#[derive(Default)]
struct Staged {
    count: AtomicU64,
    added: Notify,
}

/// The writer task's settings and store.
struct Writer {
    stop: CancellationToken,
    session: Session,
    batch_max: usize,
    linger: Duration,
    compact_heartbeats: usize,
    compact_interval: Duration,
    telemetry: Arc<Telemetry>,
}

impl Writer {
    async fn run(self, mut rx: mpsc::Receiver<Job>) {
        let store = self.session.lock().await.store().clone();
        let staged = Arc::new(Staged::default());
        // Whatever a previous run left staged (what fails stays counted).
        let left = compact_all(&self.session, &self.telemetry).await;
        staged.count.store(left, Ordering::Relaxed);
        let mover_session = match store.backend() {
            Backend::Sqlite => self.session.clone(),
            Backend::Postgres => Arc::new(tokio::sync::Mutex::new(IngestSession::new(store))),
        };
        let mover_stop = CancellationToken::new();
        let mover = tokio::spawn(
            Mover {
                session: mover_session.clone(),
                staged: staged.clone(),
                compact_heartbeats: self.compact_heartbeats as u64,
                compact_interval: self.compact_interval,
                telemetry: self.telemetry.clone(),
            }
            .run(mover_stop.clone()),
        );

        let mut jobs: Vec<Job> = Vec::with_capacity(self.batch_max);
        let mut stopping = false;
        loop {
            let received = tokio::select! {
                biased;
                _ = self.stop.cancelled(), if !stopping => {
                    // Take no more; what is queued is still received below.
                    rx.close();
                    stopping = true;
                    continue;
                }
                n = rx.recv_many(&mut jobs, self.batch_max) => n,
            };
            if received == 0 {
                // Every sender is gone (or stopped) and nothing is queued.
                break;
            }
            if jobs.len() < self.batch_max && !self.linger.is_zero() {
                // Give concurrent heartbeats a moment to join this batch.
                let deadline = tokio::time::Instant::now() + self.linger;
                while jobs.len() < self.batch_max {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(j)) => jobs.push(j),
                        Ok(None) | Err(_) => break,
                    }
                }
            }
            let applied = self.flush(&mut jobs).await as u64;
            if applied > 0 {
                // The mover waits on its schedule; it needs waking only
                // when it idles (nothing staged) or a backlog begins.
                let before = staged.count.fetch_add(applied, Ordering::Relaxed);
                let backlog = self.compact_heartbeats as u64;
                if before == 0 || (before < backlog && before + applied >= backlog) {
                    staged.added.notify_one();
                }
            }
        }
        mover_stop.cancel();
        let _ = mover.await;
        if staged.count.load(Ordering::Relaxed) > 0 {
            compact_all(&self.session, &self.telemetry).await;
        }
        self.session.lock().await.close().await;
        mover_session.lock().await.close().await;
    }

    /// Write `jobs` in one transaction and answer each; how many were applied.
    async fn flush(&self, jobs: &mut Vec<Job>) -> usize {
        let (batch, replies): (Vec<_>, Vec<_>) = jobs
            .drain(..)
            .map(|j| ((j.hb, j.received_at), j.reply))
            .unzip();
        self.telemetry.ingest_batch_size.observe(batch.len() as f64);
        let started = std::time::Instant::now();
        let result = self.session.lock().await.record_heartbeats(&batch).await;
        tracing::trace!(
            heartbeats = batch.len(),
            us = started.elapsed().as_micros() as u64,
            "heartbeat batch written"
        );
        match result {
            Ok(outcomes) => {
                let applied = outcomes
                    .iter()
                    .filter(|o| **o == HeartbeatOutcome::Applied)
                    .count();
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    // The caller may have gone away (client disconnected): fine.
                    let _ = reply.send(Ok(outcome));
                }
                applied
            }
            Err(e) => {
                // Handled here: logged once; each caller answers 503.
                tracing::error!(
                    error = &e as &dyn std::error::Error,
                    heartbeats = batch.len(),
                    "writing a batch of heartbeats failed"
                );
                for reply in replies {
                    let _ = reply.send(Err(WriteFailed));
                }
                0
            }
        }
    }
}

/// Moves staged heartbeats to the indexed tables, one partition at a time,
/// round robin, each once per `compact_interval` (back to back while
/// `compact_heartbeats` or more are staged): short moves, yet each
/// instance's rows still move together.
struct Mover {
    session: Session,
    staged: Arc<Staged>,
    compact_heartbeats: u64,
    compact_interval: Duration,
    telemetry: Arc<Telemetry>,
}

impl Mover {
    async fn run(self, stop: CancellationToken) {
        let tick = self.compact_interval / STAGING_PARTS as u32;
        let mut next_part: i64 = 0;
        let mut due = tokio::time::Instant::now() + tick;
        loop {
            // Wait for the next move: due and something staged, or a backlog.
            loop {
                let n = self.staged.count.load(Ordering::Relaxed);
                let now = tokio::time::Instant::now();
                if n >= self.compact_heartbeats || (n > 0 && now >= due) {
                    break;
                }
                let idle = n == 0;
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = self.staged.added.notified() => {
                        if idle {
                            // Nothing was staged: the schedule starts now.
                            due = tokio::time::Instant::now() + tick;
                        }
                    }
                    _ = tokio::time::sleep_until(due), if !idle => {}
                }
            }
            // A failed move stays staged (readers see it) and is retried
            // on the partition's next turn.
            if let Some(moved) = compact(&self.session, &self.telemetry, next_part).await {
                let _ = self
                    .staged
                    .count
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                        Some(n.saturating_sub(moved))
                    });
            }
            next_part = (next_part + 1) % STAGING_PARTS;
            due = tokio::time::Instant::now() + tick;
            if next_part == 0 {
                // A full round: what others staged (another control plane,
                // a direct store call) shows here.
                if let Ok(n) = self.session.lock().await.store().staged_heartbeats().await {
                    self.staged.count.store(n.max(0) as u64, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Move every partition; how many heartbeats are still staged after.
async fn compact_all(session: &Session, telemetry: &Telemetry) -> u64 {
    for part in 0..STAGING_PARTS {
        compact(session, telemetry, part).await;
    }
    let n = session.lock().await.store().staged_heartbeats().await;
    n.map(|n| n.max(0) as u64).unwrap_or(0)
}

/// Move partition `part`'s staged samples to the indexed tables; how many
/// heartbeats moved, `None` if it failed.
async fn compact(session: &Session, telemetry: &Telemetry, part: i64) -> Option<u64> {
    let mut session = session.lock().await;
    let started = std::time::Instant::now();
    match session.compact_staging_part(part).await {
        Ok(moved) => {
            if moved > 0 {
                telemetry
                    .ingest_compaction_seconds
                    .observe(started.elapsed().as_secs_f64());
            }
            tracing::trace!(
                part,
                moved,
                us = started.elapsed().as_micros() as u64,
                "staged heartbeats compacted"
            );
            Some(moved)
        }
        // Shutting down: the rows stay staged for the next start.
        Err(e) if e.is_closed() => None,
        Err(e) => {
            tracing::error!(
                error = &e as &dyn std::error::Error,
                part,
                "moving staged heartbeats failed; retrying later"
            );
            None
        }
    }
}

/// What heartbeat validation remembers per instance: its catalog GPU count
/// and the GPU count of its last applied heartbeat.
#[derive(Default)]
pub(crate) struct GpuCounts {
    known: Mutex<HashMap<InstanceId, GpuCountContext>>,
}

impl GpuCounts {
    pub(crate) fn get(&self, id: InstanceId) -> Option<GpuCountContext> {
        self.lock().get(&id).copied()
    }
    pub(crate) fn put(&self, id: InstanceId, ctx: GpuCountContext) {
        self.lock().insert(id, ctx);
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<InstanceId, GpuCountContext>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How long a verified agent token is trusted without asking the store.
/// Tokens are revoked when their instance terminates or is cleaned up; the
/// cache drops an instance's tokens when the bus says so, and this bounds
/// the rare race where a heartbeat re-caches a token just before revocation.
pub(crate) const TOKEN_TTL: std::time::Duration = std::time::Duration::from_secs(30);

/// The hot path's memory: verified agent tokens, and each instance's last
/// published record (from the bus), so that a routine heartbeat costs no
/// store reads beyond its batched write.
#[derive(Default)]
pub(crate) struct HotCache {
    tokens: Mutex<HashMap<String, (InstanceId, std::time::Instant)>>,
    records: Mutex<HashMap<InstanceId, InstanceRecord>>,
}

impl HotCache {
    pub(crate) fn tokens(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, (InstanceId, std::time::Instant)>> {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }
    pub(crate) fn records(&self) -> std::sync::MutexGuard<'_, HashMap<InstanceId, InstanceRecord>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keep `rec` unless a newer generation is already there.
    pub(crate) fn remember(&self, rec: &InstanceRecord) {
        let mut records = self.records();
        match records.get(&rec.id) {
            Some(known) if known.generation > rec.generation => {}
            _ => {
                records.insert(rec.id, rec.clone());
            }
        }
    }

    /// Follow the bus: every published change updates the cache; an
    /// instance whose tokens are (about to be) revoked loses its cached
    /// tokens; a lagging receiver forgets everything.
    pub(crate) fn follow(self: Arc<Self>, mut rx: broadcast::Receiver<InstanceChange>) {
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(change) => {
                        let rec = &change.instance;
                        if rec.status.is_terminal()
                            || rec.status == InstanceStatus::Terminating
                            || rec.cleanup_started_at.is_some()
                        {
                            self.tokens().retain(|_, (id, _)| *id != rec.id);
                        }
                        if rec.status == InstanceStatus::Archived {
                            self.records().remove(&rec.id);
                        } else {
                            self.remember(rec);
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        self.records().clear();
                        self.tokens().clear();
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hb() -> Heartbeat {
        serde_json::from_value(serde_json::json!({
            "instance_id": InstanceId::new(),
            "seq": 1,
            "sent_at": Utc::now(),
            "agent_version": "t",
            "agent_uptime_secs": 1,
            "system": {"cpu_pct": 0.0, "load1": 0.0, "load5": 0.0, "load15": 0.0,
                "mem_used_bytes": 0, "mem_total_bytes": 0, "disk_used_bytes": 0,
                "disk_total_bytes": 0, "net_rx_bps": 0.0, "net_tx_bps": 0.0},
            "gpu_source": "simulated",
            "gpus": [],
            "engine": {"status": "starting", "requests_running": 0.0,
                "requests_waiting": 0.0, "restarts": 0}
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn a_full_queue_answers_unavailable_at_once() {
        // A writer whose task has not taken anything yet: one slot.
        let (tx, mut rx) = mpsc::channel(1);
        let (_done_tx, done) = watch::channel(false);
        let writer = HeartbeatWriter {
            tx,
            stop: CancellationToken::new(),
            done,
        };
        let first = tokio::spawn({
            let w = writer.clone();
            async move { w.write(hb(), Utc::now()).await }
        });
        // Wait until the first heartbeat sits in the queue.
        while writer.tx.capacity() > 0 {
            tokio::task::yield_now().await;
        }
        match writer.write(hb(), Utc::now()).await {
            Err(ControlError::Unavailable { message }) => assert!(message.contains("retry")),
            other => panic!("{other:?}"),
        }
        // The queued one gets its answer once the writer replies.
        let job = rx.recv().await.unwrap();
        job.reply.send(Ok(HeartbeatOutcome::Stale)).unwrap();
        assert_eq!(first.await.unwrap().unwrap(), HeartbeatOutcome::Stale);
        // A writer that failed the batch: 503 too.
        let second = tokio::spawn({
            let w = writer.clone();
            async move { w.write(hb(), Utc::now()).await }
        });
        let job = rx.recv().await.unwrap();
        job.reply.send(Err(WriteFailed)).unwrap();
        assert!(matches!(
            second.await.unwrap(),
            Err(ControlError::Unavailable { .. })
        ));
    }
}
