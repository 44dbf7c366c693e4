//! Retention: the leader deletes `PROCESSED` rows older than `relay.retention`, 1 000
//! rows per short statement, with a pause between statements so producers and the relay
//! are never held up.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::metrics as m;
use crate::store::Store;

/// Delete old rows every 30 s while leading (asking every 2 s while not, so a new
/// leader starts soon) until `cancel` fires.
pub async fn retention(
    store: Store,
    instance: String,
    retention: Duration,
    cancel: CancellationToken,
) {
    const BATCH: i64 = 1_000;
    let mut next = Instant::now();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(next.into()) => {}
        }
        if !super::leads(&store, &instance).await {
            next = Instant::now() + Duration::from_secs(2);
            continue;
        }
        next = Instant::now() + Duration::from_secs(30);
        loop {
            match store.delete_processed(retention, BATCH).await {
                Ok(n) => {
                    metrics::counter!(m::RETENTION_DELETED_TOTAL).increment(n);
                    if n < BATCH as u64 {
                        break;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "retention delete failed");
                    break;
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }
}
