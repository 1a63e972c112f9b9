//! High availability: several `gpufleet up` replicas on one PostgreSQL
//! database sharing a `gpufleet mock-provider` service — background work
//! runs once, changes reach every replica, a dead or partitioned replica's
//! work is taken over, and nothing is done twice (see `chaos` for the
//! SIGKILL storm). Every test needs PostgreSQL (`scripts/test` starts it).

#[path = "../common/mod.rs"]
mod common;

mod chaos;
mod replicas;
