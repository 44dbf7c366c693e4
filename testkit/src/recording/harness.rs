//! The harness around `RecordingSink`: fast in-process timings, starting a relay on a
//! table, a table per scenario dropped even on panic, and reads of rows and leases.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use outbox_relay::config::{OnFailed, RelayConfig};

use outbox_relay::model::Message;

use super::{Ledger, RecordingSink, SendInfo, Step};
use crate::db::TestTable;
use crate::inproc::Running;
use crate::unique;
use crate::wait::wait_for;

/// Fast timings for in-process runs.
pub fn cfg() -> RelayConfig {
    let mut c: RelayConfig =
        serde_json::from_value(serde_json::json!({})).expect("default relay config");
    c.poll_interval = Duration::from_millis(50);
    c.backoff_initial = Duration::from_millis(20);
    c.backoff_max = Duration::from_millis(40);
    c.max_attempts = 3;
    c.lease_timeout = Duration::from_secs(4);
    c.publish_timeout = Duration::from_secs(3);
    c.shutdown_timeout = Duration::from_secs(2);
    c.on_failed = OnFailed::Block;
    c.listen = false;
    c.max_in_flight = 16;
    c
}

/// Start a relay on `table` with `sink`.
pub fn start(table: &TestTable, sink: RecordingSink, cfg: RelayConfig) -> Running {
    let instance = unique(&format!("rec{}", sink.name));
    Running::named(instance, table.store(), sink, cfg)
}

/// Start a relay on `table` with `sink`; returns it with the ledger `sink` records into.
pub fn start_recorded(
    table: &TestTable,
    sink: RecordingSink,
    cfg: RelayConfig,
) -> (Running, Ledger) {
    let ledger = sink.ledger.clone();
    (start(table, sink, cfg), ledger)
}

/// A script that holds the confirm of each send `hold` picks and confirms the rest at once.
pub fn hold_if(
    hold: impl Fn(&Message, &SendInfo) -> bool + Send + Sync + 'static,
) -> impl Fn(&Message, &SendInfo) -> Step + Send + Sync + 'static {
    move |m, info| {
        if hold(m, info) {
            Step::Hold
        } else {
            Step::Confirm
        }
    }
}

/// The engine's logs on the test output when `RUST_LOG` is set (e.g. `outbox_relay=debug`).
pub fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// Run `scenario` on a fresh table; drop the table even if it panicked.
pub async fn with_table<F, Fut>(prefix: &str, scenario: F)
where
    F: FnOnce(Arc<TestTable>) -> Fut,
    Fut: Future<Output = ()>,
{
    init_logs();
    let table = Arc::new(TestTable::new(prefix).await);
    let outcome = AssertUnwindSafe(scenario(table.clone()))
        .catch_unwind()
        .await;
    table.cleanup().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// Every row of the table: (id, aggregate_id), in id order.
pub async fn rows(table: &TestTable) -> Vec<(i64, String)> {
    sqlx::query_as(&format!(
        "SELECT id, aggregate_id FROM \"{}\" ORDER BY id",
        table.name
    ))
    .fetch_all(&table.pool)
    .await
    .expect("rows")
}

/// Insert `per` rows for each aggregate, round-robin (a1 b1 c1 a2 b2 …); returns the ids
/// per aggregate in id order.
pub async fn insert_round_robin(
    table: &TestTable,
    aggs: &[&str],
    per: usize,
) -> HashMap<String, Vec<i64>> {
    let mut out: HashMap<String, Vec<i64>> = HashMap::new();
    for _ in 0..per {
        for a in aggs {
            let id = table.insert(a, "e", None, serde_json::json!({})).await;
            out.entry(a.to_string()).or_default().push(id);
        }
    }
    out
}

/// The lease partition of an aggregate (as the relay computes it).
pub async fn partition_of(table: &TestTable, agg: &str) -> i32 {
    sqlx::query_scalar("SELECT hashtext('order' || '/' || $1) & 255")
        .bind(agg)
        .fetch_one(&table.pool)
        .await
        .expect("partition")
}

/// Owner of every partition (`None` = free or expired).
pub async fn owners(table: &TestTable) -> HashMap<i32, Option<String>> {
    let rows: Vec<(i32, Option<String>)> = sqlx::query_as(&format!(
        "SELECT partition, CASE WHEN lease_until > now() THEN owner END
         FROM \"{}_relay_leases\"",
        table.name
    ))
    .fetch_all(&table.pool)
    .await
    .expect("leases");
    rows.into_iter().collect()
}

/// Partitions with an owner.
pub async fn owned_count(table: &TestTable) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{}_relay_leases\" WHERE owner IS NOT NULL",
        table.name
    ))
    .fetch_one(&table.pool)
    .await
    .expect("leases")
}

/// Wait until `instance` holds every partition.
pub async fn wait_all_leases(table: &TestTable, instance: &str, timeout: Duration) {
    wait_for(
        timeout,
        &format!("{instance} holds all 256 partitions"),
        || async {
            let o = owners(table).await;
            (o.len() == 256 && o.values().all(|v| v.as_deref() == Some(instance))).then_some(())
        },
    )
    .await
}

/// Status of one row.
pub async fn status(table: &TestTable, id: i64) -> String {
    table.row(id).await.0
}

/// Assert no bound or order violations in `ledger` for `rows`.
pub fn assert_clean(ledger: &Ledger, max_in_flight: usize, rows: &[(i64, String)]) {
    let mut bad = ledger.bound_violations(max_in_flight);
    bad.extend(ledger.order_violations(rows));
    assert!(
        bad.is_empty(),
        "{} violation(s):\n{}",
        bad.len(),
        bad.join("\n")
    );
}
