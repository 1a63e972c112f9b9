//! High availability: several `gpufleet up` replicas on one PostgreSQL
//! database sharing a `gpufleet mock-provider` service — background work
//! runs once, changes reach every replica, a dead or partitioned replica's
//! work is taken over, and nothing is done twice (see `chaos` for the
//! SIGKILL storm). Every test needs PostgreSQL (`scripts/test` starts it).

#[path = "../common/mod.rs"]
mod common;

mod chaos;
mod replicas;

/// The tests here each run a cluster of real processes: one at a time, so
/// that on a small machine none starves another's replicas of CPU (a
/// starved replica loses its leases, which is what they test).
pub static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
