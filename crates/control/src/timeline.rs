//! Builders for timeline entries.

use chrono::{DateTime, Utc};
use gpufleet_domain::{InstanceId, InstanceStatus};
use gpufleet_store::{NewTimelineEvent, Outcome, TimelineKind};
use serde_json::Value;

pub fn entry(
    id: InstanceId,
    at: DateTime<Utc>,
    kind: TimelineKind,
    action: &str,
    outcome: Outcome,
    message: impl Into<String>,
) -> NewTimelineEvent {
    NewTimelineEvent {
        instance_id: id,
        at,
        kind,
        action: action.to_string(),
        outcome,
        from_status: None,
        to_status: None,
        duration_ms: None,
        error_code: None,
        message: message.into(),
        metadata: Value::Null,
    }
}

pub fn transition(
    id: InstanceId,
    at: DateTime<Utc>,
    from: InstanceStatus,
    to: InstanceStatus,
    message: impl Into<String>,
) -> NewTimelineEvent {
    NewTimelineEvent {
        from_status: Some(from),
        to_status: Some(to),
        ..entry(
            id,
            at,
            TimelineKind::Transition,
            "status.change",
            Outcome::Success,
            message,
        )
    }
}

/// Extra fields on an entry.
pub trait EntryExt {
    fn duration(self, ms: i64) -> Self;
    fn error_code(self, code: &str) -> Self;
    fn meta(self, v: Value) -> Self;
}

impl EntryExt for NewTimelineEvent {
    fn duration(mut self, ms: i64) -> Self {
        self.duration_ms = Some(ms);
        self
    }
    fn error_code(mut self, code: &str) -> Self {
        self.error_code = Some(code.to_string());
        self
    }
    fn meta(mut self, v: Value) -> Self {
        self.metadata = v;
        self
    }
}
