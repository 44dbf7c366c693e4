//! Metric names (SPEC §6) and the Prometheus recorder.

use std::sync::Mutex;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const PUBLISHED_TOTAL: &str = "outbox_relay_published_total";
pub const FAILED_TOTAL: &str = "outbox_relay_failed_total";
pub const RETRIES_TOTAL: &str = "outbox_relay_retries_total";
pub const PENDING_ROWS: &str = "outbox_relay_pending_rows";
pub const OLDEST_PENDING_AGE: &str = "outbox_relay_oldest_pending_age_seconds";
pub const PUBLISH_LATENCY: &str = "outbox_relay_publish_latency_seconds";
pub const BROKER_UP: &str = "outbox_relay_broker_up";
pub const DATABASE_UP: &str = "outbox_relay_database_up";
pub const PARTITIONS_HELD: &str = "outbox_relay_partitions_held";
pub const DEAD_LETTERED_TOTAL: &str = "outbox_relay_dead_lettered_total";
pub const RETENTION_DELETED_TOTAL: &str = "outbox_relay_retention_deleted_total";
/// 1 on the instance that runs retention and measures the backlog gauges (the holder of
/// partition 0), 0 on the others; labelled with the instance's name.
pub const MAINTENANCE_LEADER: &str = "outbox_relay_maintenance_leader";
/// The engine's bounds in use (not SPEC names): messages sent and not yet confirmed
/// (`relay.max_in_flight`), and the claimed rows held in memory and their bytes (twice
/// `max_in_flight` or `batch_size` rows; `relay.max_in_flight_bytes`).
pub const IN_FLIGHT: &str = "outbox_relay_in_flight_messages";
pub const WINDOW_ROWS: &str = "outbox_relay_window_rows";
pub const WINDOW_BYTES: &str = "outbox_relay_window_bytes";

/// Install the global Prometheus recorder and register every SPEC metric at zero, so a
/// scrape shows all names from the first second. Once per process: later calls (a
/// daemon run again in the same process, as tests do) get the same handle.
pub fn install() -> Result<PrometheusHandle, String> {
    static HANDLE: Mutex<Option<PrometheusHandle>> = Mutex::new(None);
    let mut installed = HANDLE
        .lock()
        .map_err(|_| "metrics recorder lock poisoned")?;
    if let Some(h) = installed.as_ref() {
        return Ok(h.clone());
    }
    let handle = install_once()?;
    *installed = Some(handle.clone());
    Ok(handle)
}

fn install_once() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(PUBLISH_LATENCY.into()),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0,
            ],
        )
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())?;
    metrics::describe_counter!(
        PUBLISHED_TOTAL,
        "Rows confirmed by the broker and marked PROCESSED"
    );
    metrics::describe_counter!(FAILED_TOTAL, "Rows that ended FAILED");
    metrics::describe_counter!(RETRIES_TOTAL, "Broker rejections that scheduled a retry");
    metrics::describe_gauge!(
        OLDEST_PENDING_AGE,
        "Age of the oldest PENDING row (measured by the maintenance leader; 0 elsewhere)"
    );
    metrics::describe_histogram!(PUBLISH_LATENCY, "Row commit to broker confirm");
    metrics::describe_gauge!(BROKER_UP, "1 when the broker is reachable");
    metrics::describe_gauge!(DATABASE_UP, "1 when the database is reachable");
    metrics::describe_gauge!(
        MAINTENANCE_LEADER,
        "1 on the instance that measures the backlog gauges and runs retention"
    );
    metrics::counter!(PUBLISHED_TOTAL).absolute(0);
    metrics::counter!(FAILED_TOTAL).absolute(0);
    metrics::counter!(RETRIES_TOTAL).absolute(0);
    metrics::describe_counter!(
        crate::relay::LATE_ROWS_TOTAL,
        "Rows that committed behind a row of their aggregate already sent (out of id order)"
    );
    metrics::counter!(crate::relay::LATE_ROWS_TOTAL).absolute(0);
    metrics::describe_gauge!(
        PENDING_ROWS,
        "PENDING rows in the outbox table (measured by the maintenance leader, estimated past 10 000 rows above the floor; 0 elsewhere)"
    );
    metrics::describe_gauge!(IN_FLIGHT, "Messages sent and not yet confirmed");
    metrics::describe_gauge!(WINDOW_ROWS, "Claimed rows held in memory");
    metrics::describe_gauge!(WINDOW_BYTES, "Bytes of the claimed rows held in memory");
    for gauge in [
        IN_FLIGHT,
        WINDOW_ROWS,
        WINDOW_BYTES,
        PENDING_ROWS,
        OLDEST_PENDING_AGE,
        BROKER_UP,
        DATABASE_UP,
    ] {
        metrics::gauge!(gauge).set(0.0);
    }
    Ok(handle)
}
