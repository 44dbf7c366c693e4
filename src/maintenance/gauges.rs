//! The backlog gauges (`outbox_relay_pending_rows`, `…_oldest_pending_age_seconds`):
//! measured on the maintenance tick by the leader only (never per scrape), so N replicas
//! cost the database one measurement, not N; the others report 0, so `sum()` and `max()`
//! over replicas both give the table's figure. The measurement's cost is bounded however
//! long the backlog (`Store::pending_gauge_within`).

use crate::metrics as m;
use crate::store::Store;

/// Measure the backlog and set the gauges (the leader's tick).
pub(super) async fn refresh(store: &Store) {
    match store.pending_gauge().await {
        Ok((pending, age)) => {
            metrics::gauge!(m::PENDING_ROWS).set(pending as f64);
            metrics::gauge!(m::OLDEST_PENDING_AGE).set(age);
            metrics::gauge!(m::DATABASE_UP).set(1.0);
        }
        Err(e) => {
            metrics::gauge!(m::DATABASE_UP).set(0.0);
            tracing::debug!(error = %e, "backlog gauge query failed");
        }
    }
}

/// Report 0 while another instance measures.
pub(super) fn not_leading() {
    metrics::gauge!(m::PENDING_ROWS).set(0.0);
    metrics::gauge!(m::OLDEST_PENDING_AGE).set(0.0);
}
