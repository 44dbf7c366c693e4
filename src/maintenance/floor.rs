//! The claim floor (schema 5, `store::Floor`): on each tick the leader raises it past
//! the rows settled since, never past the horizon it learns from its own snapshots (the
//! engine's `Horizon`, fed one probe per tick). One primary-key walk from the old floor
//! to the first pending row: every row is read once by it, however long the table.

use crate::relay::Horizon;
use crate::store::Store;

/// Probe, then raise the floor as far as the horizon allows.
pub(super) async fn raise(store: &Store, horizon: &mut Horizon) {
    let probe = match store.probe().await {
        Ok(p) => p,
        Err(e) => return tracing::debug!(error = %e, "floor probe failed"),
    };
    horizon.observe(&probe);
    // The raise's statements start after the probe's: what its list settled holds.
    if let Err(e) = store.raise_floor(horizon.settled()).await {
        tracing::debug!(error = %e, "raising the claim floor failed");
    }
}
