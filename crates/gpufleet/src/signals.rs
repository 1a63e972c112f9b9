//! Waiting for the signals that ask a process to stop.

use tokio::signal::unix::{signal, SignalKind};

/// Resolves with the signal's name on the first SIGINT or SIGTERM.
pub async fn shutdown_signal() -> &'static str {
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        tracing::error!("cannot install signal handlers; only ctrl-c is honoured");
        let _ = tokio::signal::ctrl_c().await;
        return "SIGINT";
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}
