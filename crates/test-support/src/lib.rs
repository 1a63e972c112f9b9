//! What gpufleet's test suites share, written once:
//!
//! - [`provider::FakeProvider`]: an in-memory [`Provider`](gpufleet_providers::Provider)
//!   (no processes) with a configurable catalog, counters and recorded
//!   requests; failures are injected by the product's own
//!   [`FaultyProvider`](gpufleet_providers::fault::FaultyProvider) around it.
//! - [`db::TestDb`]: a fresh database per test, SQLite in a temporary
//!   directory or, with `GPUFLEET_TEST_DATABASE=postgres`, a new PostgreSQL
//!   database dropped when the handle drops.
//! - [`wait`]: waits on a condition with a deadline, never fixed sleeps.
//! - [`promtool`]: `promtool check metrics` over an exposition; fails (never
//!   skips) when promtool is missing.
//! - [`e2e`] (feature `e2e`): the end-to-end harness around the real
//!   `gpufleet up` (a child process), its real agents and engines; and
//!   [`cluster`]: several replicas on one fresh PostgreSQL database sharing
//!   a `gpufleet mock-provider`, behind a TCP load balancer, with a proxy
//!   that stalls one replica's database connections (a partition).
//! - [`oidc`] (feature `oidc`, and `e2e`): a small OpenID Connect issuer
//!   (discovery, JWKS, a sign-in form, PKCE-checking token endpoint) with
//!   knobs for negative tests.
//!
//! A dev-dependency only; never part of a shipped binary.

#[cfg(feature = "e2e")]
pub mod cluster;
pub mod db;
#[cfg(feature = "e2e")]
pub mod e2e;
#[cfg(feature = "oidc")]
pub mod oidc;
pub mod promtool;
pub mod provider;
pub mod wait;
