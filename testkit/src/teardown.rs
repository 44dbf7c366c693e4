//! What a failing test leaves behind: a test's table, exchange and queue, stream, keys,
//! queue or topic are removed by the test's own last lines, which a panic skips. Each of
//! those types runs its removal again from `Drop` while the thread is panicking
//! (`after_panic`): on a thread of its own, with a runtime of its own (the test's runtime
//! may be a current-thread one, busy unwinding), bounded in time.

use std::future::Future;
use std::time::Duration;

/// How long one removal may take before the panicking test goes on unwinding.
const WITHIN: Duration = Duration::from_secs(20);

/// Run `removal` to completion (or for at most 20 s) if this thread is unwinding from a
/// panic; do nothing otherwise (a test that ends normally removed what it made). `what`
/// names the thing in the message printed when the removal could not finish.
pub(crate) fn after_panic<F>(what: String, removal: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    if !std::thread::panicking() {
        return;
    }
    let done = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        match runtime {
            // The timer is made inside the runtime: it needs its time driver.
            Ok(rt) => {
                rt.block_on(async move { tokio::time::timeout(WITHIN, removal).await.is_ok() })
            }
            Err(_) => false,
        }
    })
    .join()
    .unwrap_or(false);
    if !done {
        eprintln!("teardown: could not remove {what} after the test failed: remove it by hand");
    }
}
