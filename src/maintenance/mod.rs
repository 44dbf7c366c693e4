//! Table-wide maintenance, run by one instance at a time (river's leader-only
//! maintenance): the holder of partition 0's lease is the leader. Each service is a file:
//! `gauges` (the backlog gauges) and `retention` (deleting old `PROCESSED` rows). Every
//! instance asks on each of its ticks whether it leads (one primary-key lookup), so
//! leadership follows the lease with no election of its own.

mod gauges;
mod retention;

pub use gauges::gauges;
pub use retention::retention;

use crate::metrics as m;
use crate::store::Store;

/// Whether this instance leads now; exported as `outbox_relay_maintenance_leader`.
/// A database error counts as not leading (the tick is skipped).
async fn leads(store: &Store, instance: &str) -> bool {
    let leads = match store.leads(instance).await {
        Ok(l) => l,
        Err(e) => {
            tracing::debug!(error = %e, "maintenance leader check failed");
            false
        }
    };
    metrics::gauge!(m::MAINTENANCE_LEADER, "relay_instance" => instance.to_string())
        .set(if leads { 1.0 } else { 0.0 });
    leads
}
