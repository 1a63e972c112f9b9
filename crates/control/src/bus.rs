//! Instance changes, pushed to subscribers as they happen (the SSE stream
//! reads from here; nothing polls the database for it).

use gpufleet_store::InstanceRecord;
use serde::Serialize;
use tokio::sync::broadcast;

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

/// Broadcast channel of changes. Slow subscribers lag and are told so.
#[derive(Clone)]
pub struct Bus {
    tx: broadcast::Sender<InstanceChange>,
}

impl Bus {
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity);
        Self { tx }
    }
    pub fn publish(&self, kind: ChangeKind, instance: InstanceRecord) {
        // No subscribers is fine.
        let _ = self.tx.send(InstanceChange { kind, instance });
    }
    pub fn subscribe(&self) -> broadcast::Receiver<InstanceChange> {
        self.tx.subscribe()
    }
}
