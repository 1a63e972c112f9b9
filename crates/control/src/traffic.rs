//! Who knows the requests in flight to each instance (the OpenAI router), so
//! that draining waits for them rather than for the engine's last heartbeat.

use gpufleet_domain::InstanceId;

/// Requests in flight per instance, as counted by whoever sends them.
pub trait TrafficSource: Send + Sync {
    /// Requests sent to `id` and not finished yet.
    fn in_flight(&self, id: InstanceId) -> u64;
}
