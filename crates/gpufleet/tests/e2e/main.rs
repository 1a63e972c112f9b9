//! End-to-end tests: the real `gpufleet up` with the Mock provider, real
//! agents and engines (see `tests/common`). One test binary, so the build
//! links once; each test runs its own control plane on its own port, data
//! directory and loopback IP range.

#[path = "../common/mod.rs"]
mod common;

mod bad_input;
mod canary;
mod cli;
mod crash;
mod deployments;
mod lifecycle;
mod limits;
mod metrics_cli;
mod router;
mod scaleway;
mod shutdown;
mod sick_engines;
mod spend;
mod teams_cli;
