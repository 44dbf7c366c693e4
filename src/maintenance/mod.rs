//! Table-wide maintenance, run by one instance at a time (river's leader-only
//! maintenance): the holder of partition 0's lease is the leader. Each service is a file:
//! `gauges` (the backlog gauges), `floor` (raising the claim floor), `orphans` (un-parking
//! rows no blocker holds any more) and `retention` (deleting old `PROCESSED` rows). One loop
//! asks every 2 s whether this instance leads (one primary-key lookup) and tells both, so
//! leadership follows the lease with no election of its own.

mod floor;
mod gauges;
mod orphans;
mod retention;

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::OnFailed;
use crate::metrics as m;
use crate::store::Store;

/// How often leadership is checked and the backlog gauges refreshed.
const TICK: Duration = Duration::from_secs(2);
/// How often (in ticks: 30 s) the leader looks for orphaned parked rows.
const ORPHANS_EVERY_TICKS: u32 = 15;
/// How often the leader runs retention.
const RETENTION_EVERY: Duration = Duration::from_secs(30);

/// Run the maintenance services while leading, until `cancel` fires: the gauges on each
/// tick, retention in a task of its own (a long sweep must not stall the gauges) that
/// starts as soon as this instance leads and then every 30 s while it does. Non-leaders
/// report backlog gauges of 0.
pub async fn run(
    store: Store,
    instance: String,
    retention: Duration,
    on_failed: OnFailed,
    cancel: CancellationToken,
) {
    let (leading, watch) = tokio::sync::watch::channel(false);
    let sweeper = tokio::spawn(retention::run(
        store.clone(),
        retention,
        RETENTION_EVERY,
        watch,
        cancel.clone(),
    ));
    let mut horizon = crate::relay::Horizon::default();
    let mut ticks: u32 = 0;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        let leads = leads(&store, &instance).await;
        leading.send_replace(leads);
        if leads {
            floor::raise(&store, &mut horizon).await;
            gauges::refresh(&store).await;
            if ticks.is_multiple_of(ORPHANS_EVERY_TICKS) {
                orphans::release(&store, on_failed).await;
            }
            ticks = ticks.wrapping_add(1);
        } else {
            gauges::not_leading();
        }
    }
    let _ = sweeper.await;
}

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
