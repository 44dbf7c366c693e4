//! Retention: the leader deletes `PROCESSED` rows older than `relay.retention`, walking
//! ids from the oldest row 1 000 at a time (one short statement each, a pause between
//! them so producers and the relay are never held up) until it reaches rows created
//! after the cutoff. No index on `processed_at` (it would make marks non-HOT); rows it
//! must keep (FAILED, pending) are read again by each sweep.

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics as m;
use crate::store::Store;

/// While `leading` says so, sweep at once and then every `every`, until `cancel` fires.
pub(super) async fn run(
    store: Store,
    retention: Duration,
    every: Duration,
    mut leading: watch::Receiver<bool>,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = leading.wait_for(|l| *l) => if r.is_err() { return },
        }
        if !sweep(&store, retention, &cancel).await {
            return;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Delete every old row now, a batch at a time. `false` when `cancel` fired meanwhile.
async fn sweep(store: &Store, retention: Duration, cancel: &CancellationToken) -> bool {
    const BATCH: i64 = 1_000;
    let mut after = 0;
    loop {
        match store.delete_processed(retention, after, BATCH).await {
            Ok(step) => {
                metrics::counter!(m::RETENTION_DELETED_TOTAL).increment(step.deleted);
                if step.done {
                    return true;
                }
                after = step.next;
            }
            Err(e) => {
                tracing::debug!(error = %e, "retention delete failed");
                return true;
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return false,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}
