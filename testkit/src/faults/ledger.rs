//! The ledger: committed rows vs deliveries vs marks for one attack (`Ledger`, `Tally`),
//! and settling a RabbitMQ attack against everything its queue received.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use sqlx::PgPool;

use crate::db::TestTable;
use crate::faults::Producer;
use crate::kafka::kafka_drain;
use crate::order::{self, Delivery};
use crate::rabbit::{drain_queue, TestBroker};
use crate::relay_proc::RelayProc;
use crate::wait::wait_for;

/// One committed row as the ledger sees it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LedgerRow {
    pub id: i64,
    pub event_id: String,
    pub aggregate: String,
    pub status: String,
    pub attempts: i32,
    pub last_error: Option<String>,
}

/// The counts an attack came to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    pub committed: usize,
    /// Distinct committed rows that reached a consumer.
    pub delivered: usize,
    /// Rows marked FAILED (by design: bad input).
    pub failed: usize,
    pub processed: usize,
    pub pending: usize,
    /// Committed rows neither delivered nor FAILED, or PROCESSED without a delivery.
    pub lost: usize,
    /// Deliveries beyond the first of each message.
    pub duplicates: usize,
    /// Rows whose `attempts` grew (broker rejections counted).
    pub rows_with_attempts: usize,
}

/// Committed rows vs deliveries vs marks, for one attack.
pub struct Ledger {
    pub attack: String,
    pub rows: Vec<LedgerRow>,
    /// Message ids (event_ids) in arrival order, duplicates included.
    pub deliveries: Vec<String>,
}

impl Ledger {
    /// Read every committed row of `table` (its final statuses).
    pub async fn load(attack: &str, pool: &PgPool, table: &str) -> Ledger {
        let rows = sqlx::query_as::<_, LedgerRow>(&format!(
            "SELECT id, event_id::text AS event_id, aggregate_type || '/' || aggregate_id AS aggregate,
                    status, attempts, last_error
             FROM \"{table}\" ORDER BY id"
        ))
        .fetch_all(pool)
        .await
        .expect("ledger: read the outbox table");
        Ledger {
            attack: attack.to_string(),
            rows,
            deliveries: Vec::new(),
        }
    }

    pub fn delivered<I: IntoIterator<Item = String>>(&mut self, ids: I) {
        self.deliveries.extend(ids);
    }

    /// Count, print, and assert: nothing lost, no unknown message, per-aggregate order of
    /// first deliveries, no FAILED row delivered, no row left PENDING.
    pub fn settle(&self) -> Tally {
        let by_event: HashMap<&str, &LedgerRow> =
            self.rows.iter().map(|r| (r.event_id.as_str(), r)).collect();
        let report = order::check(self.deliveries.iter().map(|id| {
            let row = by_event.get(id.as_str()).unwrap_or_else(|| {
                panic!(
                    "[{}] delivered message {id} is no committed row",
                    self.attack
                )
            });
            Delivery {
                event: id,
                row: Some((row.id, row.aggregate.as_str())),
                partition: None,
            }
        }));
        let duplicates = report.assert_clean(&format!("[{}] ", self.attack));
        let seen: HashSet<&str> = self.deliveries.iter().map(String::as_str).collect();
        let mut t = Tally {
            committed: self.rows.len(),
            delivered: seen.len(),
            duplicates,
            ..Default::default()
        };
        let mut lost_rows = Vec::new();
        let mut failed_delivered = Vec::new();
        for r in &self.rows {
            let got = seen.contains(r.event_id.as_str());
            match r.status.as_str() {
                "PROCESSED" => t.processed += 1,
                "FAILED" => t.failed += 1,
                _ => t.pending += 1,
            }
            if r.attempts > 0 {
                t.rows_with_attempts += 1;
            }
            if r.status == "FAILED" {
                if got {
                    failed_delivered.push(r.id);
                }
            } else if !got {
                lost_rows.push((r.id, r.status.clone()));
            }
        }
        t.lost = lost_rows.len();
        println!(
            "LEDGER {}: committed={} delivered={} failed={} lost={} duplicates={} (processed={} pending={} rows_with_attempts={})",
            self.attack,
            t.committed,
            t.delivered,
            t.failed,
            t.lost,
            t.duplicates,
            t.processed,
            t.pending,
            t.rows_with_attempts
        );
        assert!(
            lost_rows.is_empty(),
            "[{}] LOST {} rows (id, status), first ones: {:?}",
            self.attack,
            lost_rows.len(),
            &lost_rows[..lost_rows.len().min(10)]
        );
        assert!(
            failed_delivered.is_empty(),
            "[{}] FAILED rows that were delivered: {failed_delivered:?}",
            self.attack
        );
        assert_eq!(
            t.pending, 0,
            "[{}] rows left PENDING at the end",
            self.attack
        );
        assert_eq!(
            t.committed,
            t.delivered + t.failed,
            "[{}] committed = delivered + failed",
            self.attack
        );
        t
    }
}

/// Wait (up to `within`) until `table` has rows and none of them is `PENDING` any more
/// (an empty table would settle trivially).
pub async fn settle(table: &TestTable, within: Duration) {
    wait_for(within, "every committed row settled", || async {
        (table.total().await > 0 && table.count("PENDING").await == 0).then_some(())
    })
    .await;
}

/// The end of a RabbitMQ attack: every row settles, the attack spent no attempt, and the
/// ledger of `table` against everything in the broker's queue (read until quiet for
/// `quiet`) is settled.
pub async fn settle_and_tally(
    attack: &str,
    table: &TestTable,
    broker: &TestBroker,
    quiet: Duration,
) -> Tally {
    settle(table, Duration::from_secs(90)).await;
    assert_eq!(
        table.max_attempts_seen().await,
        0,
        "[{attack}] no attempt spent"
    );
    let mut ledger = Ledger::load(attack, &table.pool, &table.name).await;
    ledger.delivered(drain_queue(&broker.queue, quiet, Duration::from_secs(60)).await);
    ledger.settle()
}

/// What an attack under load ended with: the settled ledger and the producers' counts.
pub struct Outcome {
    pub tally: Tally,
    /// Transactions the producers committed while the attack ran.
    pub commits: u64,
    /// Transactions the producers had to retry (their database was away).
    pub retries: u64,
}

/// The end of a RabbitMQ attack with producers running: stop the producers, settle and
/// tally as `settle_and_tally`, require that no row ended `FAILED`, then stop the relay and
/// remove the test's table and queue.
pub async fn conclude(
    attack: &str,
    relay: RelayProc,
    producer: Producer,
    table: TestTable,
    broker: TestBroker,
    quiet: Duration,
) -> Outcome {
    let (commits, retries) = producer.stop().await;
    let tally = settle_and_tally(attack, &table, &broker, quiet).await;
    assert_eq!(tally.failed, 0, "[{attack}] no row FAILED");
    drop(relay);
    broker.cleanup().await;
    table.cleanup().await;
    Outcome {
        tally,
        commits,
        retries,
    }
}

/// The end of a Kafka attack: the ledger of `table` against `topic` on `brokers`, read
/// from the beginning until every `PROCESSED` row arrived and nothing new came for `quiet`
/// (or `within` passed), settled.
pub async fn tally_kafka(
    attack: &str,
    table: &TestTable,
    brokers: &str,
    topic: &str,
    quiet: Duration,
    within: Duration,
) -> Tally {
    let mut ledger = Ledger::load(attack, &table.pool, &table.name).await;
    let processed = table.count("PROCESSED").await as usize;
    ledger.delivered(kafka_drain(brokers, &[topic], processed, quiet, within).await);
    ledger.settle()
}
