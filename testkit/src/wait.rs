//! The one wait of the tests: poll a condition every 50 ms until it holds, or panic
//! naming what was awaited once the deadline passed. Nothing sleeps to dodge a race.

use std::future::Future;
use std::time::{Duration, Instant};

/// Poll `check` until it returns `Some`, or panic with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// [`wait_for`] with a yes/no condition.
pub async fn wait_until<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(within, what, || {
        let holds = cond();
        async move { holds.await.then_some(()) }
    })
    .await
}
