//! Changes, pushed to subscribers as they happen (the SSE stream, the
//! router's pools, the agents' token cache read from here; nothing polls the
//! database for them).
//!
//! Every replica publishes its own writes at once. On PostgreSQL,
//! [`follow_database`] also publishes every other replica's: triggers
//! `NOTIFY` each committed lifecycle write and API key change, the listener
//! reads the instance back and publishes it here (and wakes the reconciler
//! that acts on its new status). After the listener's connection was lost it
//! reads back everything changed meanwhile. The bus publishes each instance's
//! generations in order and each at most once, whichever way it arrived.

use crate::driver::{TaskName, Waker};
use gpufleet_domain::{InstanceId, InstanceStatus};
use gpufleet_store::{DbChange, InstanceRecord, Store};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    Created,
    Updated,
}

/// One instance changed; carries the instance as stored after the change.
#[derive(Debug, Clone)]
pub struct InstanceChange {
    pub kind: ChangeKind,
    pub instance: InstanceRecord,
}

/// An API key changed (was revoked or deleted) on some replica: caches of
/// it must go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyChange {
    /// The key with this SHA-256 hex digest.
    Key(String),
    /// Any key may have changed (changes may have been missed).
    All,
}

/// Broadcast channels of changes. Slow subscribers lag and are told so.
#[derive(Clone)]
pub struct Bus {
    tx: broadcast::Sender<InstanceChange>,
    keys: broadcast::Sender<KeyChange>,
    /// The newest generation published of each instance.
    seen: Arc<Mutex<HashMap<InstanceId, i64>>>,
}

impl Bus {
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity);
        let (keys, _) = broadcast::channel(256);
        Self {
            tx,
            keys,
            seen: Arc::default(),
        }
    }

    /// Publish `instance` unless this generation (or a newer one) already
    /// was; whether it was news.
    pub fn publish(&self, kind: ChangeKind, instance: InstanceRecord) -> bool {
        if !self.is_news(instance.id, instance.generation) {
            return false;
        }
        // No subscribers is fine.
        let _ = self.tx.send(InstanceChange { kind, instance });
        true
    }

    pub fn subscribe(&self) -> broadcast::Receiver<InstanceChange> {
        self.tx.subscribe()
    }

    pub fn publish_key(&self, change: KeyChange) {
        let _ = self.keys.send(change);
    }

    pub fn subscribe_keys(&self) -> broadcast::Receiver<KeyChange> {
        self.keys.subscribe()
    }

    /// Whether `generation` of `id` is newer than anything published;
    /// records it if so.
    fn is_news(&self, id: InstanceId, generation: i64) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        match seen.get(&id) {
            Some(&g) if g >= generation => false,
            _ => {
                seen.insert(id, generation);
                true
            }
        }
    }

    fn published(&self, id: InstanceId) -> Option<i64> {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .copied()
    }
}

/// Generation of a freshly inserted instance.
const FIRST_GENERATION: i64 = 1;

/// How far back the catch-up read after a lost connection looks, before the
/// last change seen (clocks of replicas differ a little).
const CATCH_UP_MARGIN: chrono::Duration = chrono::Duration::seconds(30);

/// Publish the changes every replica commits (PostgreSQL), until `stop`.
/// Returns at once on SQLite (one replica: its own writes are all there is).
pub async fn follow_database(
    store: Store,
    bus: Bus,
    tasks: Waker,
    stop: CancellationToken,
) -> Result<(), gpufleet_store::StoreError> {
    if store.backend() != gpufleet_store::Backend::Postgres {
        return Ok(());
    }
    let mut listener = store.listen().await?;
    tokio::spawn(async move {
        let mut last_seen = chrono::Utc::now();
        loop {
            let changes = tokio::select! {
                _ = stop.cancelled() => return,
                c = listener.recv_batch(BATCH) => c,
            };
            // Instances announced with a generation not yet published, read
            // back in one query per batch.
            let mut wanted: Vec<InstanceId> = Vec::new();
            for change in changes {
                match change {
                    DbChange::Instance { id, generation } => {
                        if bus.published(id).is_none_or(|g| g < generation) && !wanted.contains(&id)
                        {
                            wanted.push(id);
                        }
                    }
                    DbChange::ApiKey { key_hash } => bus.publish_key(KeyChange::Key(key_hash)),
                    DbChange::Resumed => {
                        bus.publish_key(KeyChange::All);
                        match store
                            .instances_updated_since(last_seen - CATCH_UP_MARGIN)
                            .await
                        {
                            Ok(list) => {
                                tracing::info!(
                                    instances = list.len(),
                                    "change listener back: caught up"
                                );
                                for rec in list {
                                    last_seen = last_seen.max(rec.updated_at);
                                    publish_remote(&bus, &tasks, rec);
                                }
                            }
                            Err(e) => tracing::warn!(error = %e, "catch-up read failed"),
                        }
                    }
                }
            }
            match store.get_instances(&wanted).await {
                Ok(mut list) => {
                    list.sort_by_key(|r| r.updated_at);
                    for rec in list {
                        last_seen = last_seen.max(rec.updated_at);
                        publish_remote(&bus, &tasks, rec);
                    }
                }
                Err(e) => {
                    tracing::warn!(instances = wanted.len(), error = %e, "reading changed instances failed")
                }
            }
        }
    });
    Ok(())
}

/// Notifications handled together at most (one read of their instances).
const BATCH: usize = 256;

/// Publish another replica's change and wake the reconciler that acts on
/// the instance's new status (if this replica runs it).
fn publish_remote(bus: &Bus, tasks: &Waker, rec: InstanceRecord) {
    let kind = if rec.generation == FIRST_GENERATION {
        ChangeKind::Created
    } else {
        ChangeKind::Updated
    };
    let wake = match rec.status {
        InstanceStatus::Provisioning => Some(TaskName::Provisioner),
        InstanceStatus::Booting => Some(TaskName::BootWatcher),
        InstanceStatus::Starting | InstanceStatus::Ready | InstanceStatus::Unhealthy => {
            Some(TaskName::Health)
        }
        InstanceStatus::Draining | InstanceStatus::Terminating => Some(TaskName::Terminator),
        InstanceStatus::Failed => Some(TaskName::FailedCleanup),
        InstanceStatus::Terminated | InstanceStatus::Archived => None,
    };
    if bus.publish(kind, rec) {
        if let Some(name) = wake {
            tasks.wake(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishes_each_generation_once_and_in_order() {
        let bus = Bus::new(16);
        let mut rx = bus.subscribe();
        let id = InstanceId::new();
        assert!(bus.is_news(id, 2));
        assert!(!bus.is_news(id, 2));
        assert!(!bus.is_news(id, 1));
        assert!(bus.is_news(id, 3));
        assert_eq!(bus.published(id), Some(3));
        assert!(rx.try_recv().is_err());
    }
}
