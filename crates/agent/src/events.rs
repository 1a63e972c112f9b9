//! Agent events for the instance timeline, delivered in order with retries.

use std::sync::Arc;
use std::time::Duration;

use gpufleet_domain::InstanceId;
use gpufleet_proto::{AgentEvent, AgentEventKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::client::{chain, CallError, ControlPlane};
use crate::session::{sleep_or_cancel, Session};

const QUEUE: usize = 256;

/// Queues events; a background task sends them.
#[derive(Clone)]
pub struct EventReporter {
    tx: mpsc::Sender<AgentEvent>,
    instance_id: InstanceId,
}

impl EventReporter {
    pub fn new(instance_id: InstanceId) -> (Self, mpsc::Receiver<AgentEvent>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (Self { tx, instance_id }, rx)
    }

    pub fn report(&self, kind: AgentEventKind, message: impl Into<String>) {
        let event = AgentEvent {
            kind,
            message: message.into(),
            at: chrono::Utc::now(),
        };
        tracing::info!(instance_id = %self.instance_id, kind = ?event.kind, message = %event.message, "agent event");
        if self.tx.try_send(event).is_err() {
            tracing::warn!(instance_id = %self.instance_id, ?kind, "event queue full or closed; event dropped");
        }
    }
}

/// Sends queued events one by one, retrying each until it is accepted.
pub async fn deliver(
    mut rx: mpsc::Receiver<AgentEvent>,
    session: Arc<Session>,
    client: ControlPlane,
    instance_id: InstanceId,
    cancel: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            () = cancel.cancelled() => return,
            e = rx.recv() => match e { Some(e) => e, None => return },
        };
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
        loop {
            let Some(token) = session.wait_token(&cancel).await else {
                return;
            };
            match client.event(&token, &event).await {
                Ok(()) => break,
                Err(CallError::Unauthorized) => {
                    tracing::error!(%instance_id, "control plane rejected the agent token (401) when sending an event");
                    session.reject(&token);
                }
                Err(e) => {
                    tracing::warn!(%instance_id, kind = ?event.kind, error = %chain(&e), "cannot send event; will retry")
                }
            }
            if !sleep_or_cancel(backoff.next_delay(), &cancel).await {
                return;
            }
        }
    }
}
