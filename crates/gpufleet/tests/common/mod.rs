//! The end-to-end harness (`gpufleet_test_support::e2e`) and the binary it
//! runs: only this crate's tests know its path.

#![allow(dead_code)]

pub use gpufleet_test_support::e2e::*;

/// The `gpufleet` binary under test (`TestApp::spawn(BIN)`).
pub const BIN: &str = env!("CARGO_BIN_EXE_gpufleet");
