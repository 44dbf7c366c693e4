//! Orphaned parked rows: every 30 s the leader un-parks rows parked behind blockers that
//! are gone (`Store::unpark_orphans`), 1 000 per statement. Releases un-park in the same
//! transaction as the blocker's change, so this finds nothing normally; it is the safety
//! net for the rare release that could not (a rejection recorded late by an instance that
//! had already lost the partition). It reads every parked row once per run.

use crate::config::OnFailed;
use crate::store::Store;

/// Un-park what no blocker holds any more.
pub(super) async fn release(store: &Store, on_failed: OnFailed) {
    const BATCH: i64 = 1_000;
    loop {
        match store.unpark_orphans(on_failed, BATCH).await {
            Ok(0) => return,
            Ok(n) => {
                tracing::warn!(rows = n, "un-parked rows whose blockers were gone");
                if n < BATCH as u64 {
                    return;
                }
            }
            Err(e) => return tracing::debug!(error = %e, "un-parking orphaned rows failed"),
        }
    }
}
