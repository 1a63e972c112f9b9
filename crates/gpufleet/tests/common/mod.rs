//! The end-to-end harness (`gpufleet_test_support::e2e`) and the binary it
//! runs: only this crate's tests know its path.

#![allow(dead_code)]

pub use gpufleet_test_support::e2e::*;

/// The `gpufleet` binary under test (`TestApp::spawn(BIN)`).
pub const BIN: &str = env!("CARGO_BIN_EXE_gpufleet");

/// Runs `gpufleet <args>` as a user would: a clean environment (none of the
/// caller's `GPUFLEET_*`) plus `env`, with `stdin` written to it; fails the
/// test if it takes over two minutes.
pub async fn run_cli(args: &[&str], env: &[(&str, &str)], stdin: &str) -> std::process::Output {
    use std::process::Stdio;
    use tokio::io::AsyncWriteExt as _;
    let mut cmd = tokio::process::Command::new(BIN);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("GPUFLEET_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("run gpufleet");
    let mut input = child.stdin.take().expect("stdin");
    input
        .write_all(stdin.as_bytes())
        .await
        .expect("write stdin");
    drop(input);
    tokio::time::timeout(
        std::time::Duration::from_secs(120),
        child.wait_with_output(),
    )
    .await
    .unwrap_or_else(|_| panic!("gpufleet {args:?} did not finish within 120 s"))
    .expect("gpufleet output")
}

/// Output bytes as text.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `instances create` of one Mock instance of [`TYPE`] serving [`MODEL`],
/// followed by `extra` (e.g. `--count 2`, `--wait`).
pub fn create_instances_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "instances",
        "create",
        "--provider",
        "mock",
        "--type",
        TYPE,
        "--model",
        MODEL,
    ];
    args.extend_from_slice(extra);
    args
}
