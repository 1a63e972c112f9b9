//! Who knows the requests in flight to each instance (the OpenAI router), so
//! that draining waits for them rather than for the engine's last heartbeat.

use gpufleet_domain::InstanceId;
use std::sync::{Arc, RwLock};

/// Requests in flight per instance, as counted by whoever sends them.
pub trait TrafficSource: Send + Sync {
    /// Requests sent to `id` and not finished yet.
    fn in_flight(&self, id: InstanceId) -> u64;
}

/// Where the traffic source, once set (by the router, after the control
/// plane is built), is found by the terminator. Cheap to clone.
#[derive(Clone, Default)]
pub(crate) struct TrafficSlot(Arc<RwLock<Option<Arc<dyn TrafficSource>>>>);

impl TrafficSlot {
    pub(crate) fn set(&self, source: Arc<dyn TrafficSource>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Some(source);
    }

    /// Requests in flight to `id` per the traffic source; `None` without one.
    pub(crate) fn in_flight(&self, id: InstanceId) -> Option<u64> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|t| t.in_flight(id))
    }
}
