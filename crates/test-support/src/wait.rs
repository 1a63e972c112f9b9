//! Waits on conditions over state, each with a deadline: a test never sleeps
//! a fixed time and hopes.
//!
//! The deadline is wall-clock time ([`std::time::Instant`]), so a test with
//! tokio's clock paused still waits for work done on other threads (the
//! database's, a child process).

use std::future::Future;
use std::time::{Duration, Instant};

/// The first pause between two polls; it doubles up to [`MAX_POLL`].
const FIRST_POLL: Duration = Duration::from_millis(10);
/// The longest pause between two polls.
const MAX_POLL: Duration = Duration::from_millis(50);

/// Polls `probe` until it yields a value and returns it; fails the test
/// (panics, naming `what`) once `timeout` has passed.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut pause = FIRST_POLL;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MAX_POLL);
    }
}

/// Polls `check` until it holds; fails the test once `timeout` has passed.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(what, timeout, || {
        let holds = check();
        async move { holds.await.then_some(()) }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn returns_the_first_value() {
        let polls = AtomicU32::new(0);
        let got = wait_for("the third poll", Duration::from_secs(5), || async {
            let n = polls.fetch_add(1, Ordering::SeqCst) + 1;
            (n == 3).then_some(n)
        })
        .await;
        assert_eq!(got, 3);
    }

    #[tokio::test]
    #[should_panic(expected = "timed out after 50ms waiting for never")]
    async fn fails_at_the_deadline() {
        wait_until("never", Duration::from_millis(50), || async { false }).await;
    }
}
