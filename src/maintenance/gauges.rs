//! The backlog gauges (`outbox_relay_pending_rows`, `…_oldest_pending_age_seconds`):
//! measured every 2 s by the leader only (one indexed query, never per scrape), so N
//! replicas cost the database one count, not N; the others report 0, so `sum()` and
//! `max()` over replicas both give the table's figure.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::metrics as m;
use crate::store::Store;

/// Refresh the backlog gauges until `cancel` fires.
pub async fn gauges(store: Store, instance: String, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        if !super::leads(&store, &instance).await {
            metrics::gauge!(m::PENDING_ROWS).set(0.0);
            metrics::gauge!(m::OLDEST_PENDING_AGE).set(0.0);
            continue;
        }
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
}
