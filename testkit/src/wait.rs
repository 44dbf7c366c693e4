//! The one wait of the tests: poll a condition every 50 ms until it holds, or panic
//! naming what was awaited once the deadline passed (`wait_for`, `wait_until`); and
//! `poll_within`, for a test that must see whether something happens within a window.
//! Nothing sleeps to dodge a race.

use std::future::Future;
use std::time::{Duration, Instant};

/// Poll `check` until it returns `Some`, or panic with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    match poll(timeout, Duration::from_millis(50), check).await {
        Some(v) => v,
        None => panic!("timed out after {timeout:?} waiting for {what}"),
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

/// Poll `check` every 20 ms for at most `within`: `Some` as soon as it holds, `None` if it
/// never did.
pub async fn poll_within<T, F, Fut>(within: Duration, check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    poll(within, Duration::from_millis(20), check).await
}

/// Poll `check` every `every` until it returns `Some`, or return `None` once a check at or
/// after `within` has not.
async fn poll<T, F, Fut>(within: Duration, every: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(every).await;
    }
}
