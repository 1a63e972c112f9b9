//! Runs reconcilers: each periodically and whenever it is woken, never two
//! activations of one reconciler at once, and keeps each one's last status.
//!
//! With [`Tasks::with_leases`] (every `gpufleet up`), a reconciler runs only
//! on the replica that holds its lease in the database (one lease per
//! reconciler, so work spreads over replicas). The lease is renewed while
//! the reconciler runs and while it idles; a replica that stops renewing
//! (killed, stalled, cut off from the database) loses it after its TTL and
//! another replica takes over. Every lifecycle write an activation makes
//! carries the lease's fencing token ([`current_fence`]): once the lease has
//! changed hands, the old holder's writes are refused, so nothing is done
//! twice.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use gpufleet_store::{Fence, Store};

tokio::task_local! {
    /// The fence of the lease under which the current activation runs.
    static FENCE: Fence;
}

/// The fencing token writes of the running activation must carry (`None`
/// outside a leased activation: API commands, agents, tests).
pub fn current_fence() -> Option<Fence> {
    FENCE.try_with(Clone::clone).ok()
}

/// Leases in the database, shared by every replica on it.
#[derive(Clone)]
pub struct Leases {
    pub store: Store,
    /// This replica's name in the leases table (unique per process).
    pub holder: String,
    /// How long a lease lasts unless renewed: the longest a dead holder's
    /// work waits for another replica.
    pub ttl: Duration,
}

impl Leases {
    /// A holder name for this process: host, pid and a random suffix.
    pub fn holder_name() -> String {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "host".into());
        format!(
            "{host}:{}:{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        )
    }
}

/// The lease of one reconciler as this replica last saw it.
struct Held {
    fence: Fence,
    /// Renew once this passes (a third of the TTL after it was granted).
    renew_at: Instant,
}

/// What one activation did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct TaskReport {
    /// Instances (or machines) looked at.
    pub examined: u32,
    /// Of those, how many it changed or acted upon.
    pub acted: u32,
    /// Errors met (each also on the instance's timeline where one applies).
    pub errors: Vec<String>,
}

impl TaskReport {
    pub fn error(&mut self, e: impl std::fmt::Display) {
        self.errors.push(e.to_string());
    }
}

/// The reconcilers, one variant each: what [`Waker::wake`] takes and what
/// the driver keys them by. Ordered (and listed) by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskName {
    Provisioner,
    BootWatcher,
    Health,
    Terminator,
    FailedCleanup,
    OrphanReaper,
    MetricsRollup,
    Deployments,
}

impl TaskName {
    pub const ALL: [TaskName; 8] = [
        TaskName::Provisioner,
        TaskName::BootWatcher,
        TaskName::Health,
        TaskName::Terminator,
        TaskName::FailedCleanup,
        TaskName::OrphanReaper,
        TaskName::MetricsRollup,
        TaskName::Deployments,
    ];

    /// The name in task statuses (`GET /api/v1/system/tasks`) and metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            TaskName::Provisioner => "provisioner",
            TaskName::BootWatcher => "boot_watcher",
            TaskName::Health => "health",
            TaskName::Terminator => "terminator",
            TaskName::FailedCleanup => "failed_cleanup",
            TaskName::OrphanReaper => "orphan_reaper",
            TaskName::MetricsRollup => "metrics_rollup",
            TaskName::Deployments => "deployments",
        }
    }
}

impl Ord for TaskName {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl PartialOrd for TaskName {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl std::fmt::Display for TaskName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A background concern: looks at the whole world, does one bounded batch of
/// idempotent work, reports. No inline retries: the next activation retries.
#[async_trait]
pub trait Reconciler: Send + Sync + 'static {
    fn name(&self) -> TaskName;
    async fn activate(&self) -> TaskReport;
}

/// Last known state of one reconciler.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct TaskStatus {
    pub name: String,
    pub period_ms: u64,
    pub runs: u64,
    pub running: bool,
    pub last_started_at: Option<DateTime<Utc>>,
    pub last_finished_at: Option<DateTime<Utc>>,
    pub last_duration_ms: Option<u64>,
    pub last_report: Option<TaskReport>,
    /// Activations whose report held errors.
    pub runs_with_errors: u64,
    /// Whether this replica holds the reconciler's lease (runs it); with
    /// several replicas exactly one does.
    #[serde(default = "default_true")]
    pub leader: bool,
}

fn default_true() -> bool {
    true
}

/// Wakes reconcilers: the one handle commands, services and reconcilers
/// get (not [`Tasks`]). Cheap to clone; waking a reconciler not started is
/// a no-op.
#[derive(Clone, Default)]
pub struct Waker {
    notifies: Arc<Mutex<BTreeMap<TaskName, Arc<Notify>>>>,
}

impl Waker {
    /// Ask `task` to run soon (coalesces with a pending wake).
    pub fn wake(&self, task: TaskName) {
        let notify = self.lock().get(&task).cloned();
        if let Some(n) = notify {
            n.notify_one();
        }
    }

    pub fn wake_all(&self) {
        for n in self.lock().values() {
            n.notify_one();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<TaskName, Arc<Notify>>> {
        self.notifies.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Runs the reconcilers and reads their statuses. Cheap to clone.
#[derive(Clone, Default)]
pub struct Tasks {
    waker: Waker,
    statuses: Arc<Mutex<BTreeMap<TaskName, TaskStatus>>>,
    metrics: TaskMetrics,
    leases: Option<Leases>,
}

/// Prometheus figures of the reconcilers, by `task` (registered by
/// [`crate::telemetry::Telemetry`]).
#[derive(Clone, Debug)]
pub struct TaskMetrics {
    pub runs: Family<TaskLabels, Counter>,
    /// Errors reported, summed over activations.
    pub errors: Family<TaskLabels, Counter>,
    pub duration: crate::telemetry::HistogramFamily<TaskLabels>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct TaskLabels {
    pub task: &'static str,
}

impl Default for TaskMetrics {
    fn default() -> Self {
        fn buckets() -> Histogram {
            // 100 µs .. ~105 s.
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.0001, 4.0, 11,
            ))
        }
        Self {
            runs: Family::default(),
            errors: Family::default(),
            duration: Family::new_with_constructor(buckets),
        }
    }
}

impl Tasks {
    /// Run each reconciler only while this replica holds its lease.
    pub fn with_leases(mut self, leases: Leases) -> Self {
        self.leases = Some(leases);
        self
    }

    /// This replica's lease holder name, when reconcilers are leased.
    pub fn holder(&self) -> Option<&str> {
        self.leases.as_ref().map(|l| l.holder.as_str())
    }

    /// The handle that wakes these reconcilers.
    pub fn waker(&self) -> Waker {
        self.waker.clone()
    }

    /// Each started reconciler's status, by name.
    pub fn statuses(&self) -> Vec<TaskStatus> {
        self.lock_statuses().values().cloned().collect()
    }

    pub fn metrics(&self) -> &TaskMetrics {
        &self.metrics
    }

    fn lock_statuses(&self) -> std::sync::MutexGuard<'_, BTreeMap<TaskName, TaskStatus>> {
        self.statuses.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(&self, name: TaskName, period: Duration) -> Arc<Notify> {
        let notify = Arc::new(Notify::new());
        self.waker.lock().insert(name, notify.clone());
        self.lock_statuses().insert(
            name,
            TaskStatus {
                name: name.as_str().to_string(),
                period_ms: period.as_millis() as u64,
                runs: 0,
                running: false,
                last_started_at: None,
                last_finished_at: None,
                last_duration_ms: None,
                last_report: None,
                runs_with_errors: 0,
                leader: self.leases.is_none(),
            },
        );
        notify
    }

    fn update(&self, name: TaskName, f: impl FnOnce(&mut TaskStatus)) {
        if let Some(st) = self.lock_statuses().get_mut(&name) {
            f(st);
        }
    }

    /// One activation with its bookkeeping (status, metrics).
    async fn run_once(&self, name: TaskName, r: &dyn Reconciler) {
        self.update(name, |s| {
            s.running = true;
            s.last_started_at = Some(Utc::now());
        });
        let started = Instant::now();
        let report = r.activate().await;
        let took = started.elapsed();
        let labels = TaskLabels {
            task: name.as_str(),
        };
        self.metrics.runs.get_or_create(&labels).inc();
        self.metrics
            .errors
            .get_or_create(&labels)
            .inc_by(report.errors.len() as u64);
        self.metrics
            .duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        if !report.errors.is_empty() {
            tracing::debug!(task = name.as_str(), errors = ?report.errors, "reconciler reported errors");
        }
        self.update(name, |s| {
            s.running = false;
            s.runs += 1;
            s.last_finished_at = Some(Utc::now());
            s.last_duration_ms = Some(took.as_millis() as u64);
            if !report.errors.is_empty() {
                s.runs_with_errors += 1;
            }
            s.last_report = Some(report);
        });
    }

    /// Take or renew `name`'s lease when due; `None` while another replica
    /// holds it (or the database cannot be reached: acting without a lease
    /// is never safe).
    async fn hold(&self, leases: &Leases, name: TaskName, held: Option<Held>) -> Option<Held> {
        if let Some(h) = held {
            if Instant::now() < h.renew_at {
                return Some(h);
            }
        }
        let asked = Instant::now();
        let got = match leases
            .store
            .acquire_lease(name.as_str(), &leases.holder, leases.ttl)
            .await
        {
            Ok(got) => got,
            Err(e) => {
                tracing::warn!(task = name.as_str(), error = %e, "cannot take or renew the lease");
                None
            }
        };
        let leader = got.is_some();
        let was = self
            .lock_statuses()
            .get(&name)
            .map(|s| s.leader)
            .unwrap_or(false);
        if was != leader {
            tracing::info!(task = name.as_str(), holder = %leases.holder, leader,
                "reconciler lease {}", if leader { "taken" } else { "lost" });
        }
        self.update(name, |s| s.leader = leader);
        got.map(|l| Held {
            fence: l.fence(),
            renew_at: asked + leases.ttl / 3,
        })
    }

    /// Renew the lease every third of its TTL while an activation runs
    /// (never returns; dropped when the activation ends). A renewal that
    /// fails leaves the lease to expire: the activation's writes are then
    /// refused by the fence.
    async fn renew_while(&self, leases: &Leases, name: TaskName, fence: Fence) {
        loop {
            tokio::time::sleep(leases.ttl / 3).await;
            match leases
                .store
                .acquire_lease(name.as_str(), &leases.holder, leases.ttl)
                .await
            {
                Ok(Some(l)) if l.token == fence.token => {}
                Ok(_) => {
                    tracing::warn!(task = name.as_str(), "lease lost while running");
                    self.update(name, |s| s.leader = false);
                }
                Err(e) => {
                    tracing::warn!(task = name.as_str(), error = %e, "cannot renew the lease")
                }
            }
        }
    }

    /// Start every reconciler on its own task; returns when `shutdown` is
    /// cancelled and each has finished the activation in hand.
    pub fn spawn_all(
        &self,
        reconcilers: Vec<(Arc<dyn Reconciler>, Duration)>,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let mut set = JoinSet::new();
        for (r, period) in reconcilers {
            let name = r.name();
            let notify = self.register(name, period);
            let tasks = self.clone();
            let shutdown = shutdown.clone();
            set.spawn(async move {
                let mut held: Option<Held> = None;
                // Run at once on start (and on taking a lease).
                let mut due = tokio::time::Instant::now();
                loop {
                    let Some(leases) = &tasks.leases else {
                        tasks.run_once(name, &*r).await;
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = notify.notified() => {}
                            _ = tokio::time::sleep(period) => {}
                        }
                        continue;
                    };
                    let had = held.is_some();
                    held = tasks.hold(leases, name, held).await;
                    let Some(lease) = &held else {
                        // Standby: look again soon, so a dead holder's work
                        // is taken over within the TTL and a bit.
                        let wait = period.min(leases.ttl / 3);
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep(wait) => {}
                        }
                        continue;
                    };
                    if !had {
                        due = tokio::time::Instant::now();
                    }
                    if tokio::time::Instant::now() >= due {
                        let fence = lease.fence.clone();
                        let renewing = tasks.renew_while(leases, name, fence.clone());
                        let started = Instant::now();
                        tokio::select! {
                            _ = FENCE.scope(fence, tasks.run_once(name, &*r)) => {}
                            _ = renewing => {}
                        }
                        if started.elapsed() >= leases.ttl / 3 {
                            // Renewed (or lost) meanwhile: look again now.
                            held = None;
                        }
                        due = tokio::time::Instant::now() + period;
                    }
                    // Idle until due or woken, but renew the lease on time
                    // meanwhile (a period may be longer than the TTL).
                    let renew_at = held.as_ref().map_or_else(Instant::now, |h| h.renew_at);
                    let renew_at = tokio::time::Instant::from_std(renew_at);
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = notify.notified() => due = tokio::time::Instant::now(),
                        _ = tokio::time::sleep_until(due.min(renew_at)) => {}
                    }
                }
                if let Some(leases) = &tasks.leases {
                    // Hand over at once rather than after the TTL.
                    let _ = leases
                        .store
                        .release_lease(name.as_str(), &leases.holder)
                        .await;
                }
            });
        }
        tokio::spawn(async move { while set.join_next().await.is_some() {} })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    struct Counting {
        runs: AtomicU32,
        concurrent: AtomicU32,
        max_concurrent: AtomicU32,
    }

    #[async_trait]
    impl Reconciler for Counting {
        fn name(&self) -> TaskName {
            TaskName::MetricsRollup
        }
        async fn activate(&self) -> TaskReport {
            let now = self.concurrent.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_concurrent.fetch_max(now, Ordering::SeqCst);
            tokio::task::yield_now().await;
            self.concurrent.fetch_sub(1, Ordering::SeqCst);
            let n = self.runs.fetch_add(1, Ordering::SeqCst);
            TaskReport {
                examined: n,
                acted: 0,
                errors: vec![],
            }
        }
    }

    #[test]
    fn task_names_keep_their_strings_and_sort_by_them() {
        let names: Vec<_> = TaskName::ALL.iter().map(|t| t.as_str()).collect();
        assert_eq!(
            names,
            [
                "provisioner",
                "boot_watcher",
                "health",
                "terminator",
                "failed_cleanup",
                "orphan_reaper",
                "metrics_rollup",
                "deployments"
            ]
        );
        let mut sorted = TaskName::ALL;
        sorted.sort();
        let mut by_str = names.clone();
        by_str.sort();
        assert_eq!(sorted.map(|t| t.as_str()).to_vec(), by_str);
    }

    #[tokio::test(start_paused = true)]
    async fn runs_on_wake_and_period_never_concurrently() {
        let r = Arc::new(Counting {
            runs: AtomicU32::new(0),
            concurrent: AtomicU32::new(0),
            max_concurrent: AtomicU32::new(0),
        });
        let tasks = Tasks::default();
        let stop = CancellationToken::new();
        let handle = tasks.spawn_all(vec![(r.clone(), Duration::from_secs(3600))], stop.clone());
        // The first activation happens at start.
        while r.runs.load(Ordering::SeqCst) < 1 {
            tokio::task::yield_now().await;
        }
        let waker = tasks.waker();
        for _ in 0..10 {
            waker.wake(TaskName::MetricsRollup);
        }
        while r.runs.load(Ordering::SeqCst) < 2 {
            tokio::task::yield_now().await;
        }
        // The period elapses (virtual time): another run.
        tokio::time::advance(Duration::from_secs(3601)).await;
        while r.runs.load(Ordering::SeqCst) < 3 {
            tokio::task::yield_now().await;
        }
        assert_eq!(r.max_concurrent.load(Ordering::SeqCst), 1);
        let st = tasks.statuses();
        assert_eq!(st.len(), 1);
        assert!(st[0].runs >= 2);
        assert_eq!(st[0].name, "metrics_rollup");
        stop.cancel();
        handle.await.unwrap();
    }
}
