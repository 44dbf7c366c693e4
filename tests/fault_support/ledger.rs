//! The ledger: committed rows vs deliveries vs marks for one attack (`Ledger`, `Tally`),
//! and draining a RabbitMQ queue into the list of delivered message ids.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use sqlx::PgPool;

use crate::common::*;

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
        let mut seen: HashSet<&str> = HashSet::new();
        let mut last: HashMap<&str, i64> = HashMap::new();
        let mut duplicates = 0;
        for id in &self.deliveries {
            let row = by_event.get(id.as_str()).unwrap_or_else(|| {
                panic!(
                    "[{}] delivered message {id} is no committed row",
                    self.attack
                )
            });
            if !seen.insert(id.as_str()) {
                duplicates += 1;
                continue;
            }
            let prev = last.insert(row.aggregate.as_str(), row.id).unwrap_or(0);
            assert!(
                prev < row.id,
                "[{}] aggregate {}: row {} was first delivered after row {prev}",
                self.attack,
                row.aggregate,
                row.id
            );
        }
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

/// Everything in `queue` now, waiting until it has been empty for `quiet` (late copies
/// from a broken connection may still land). Message ids in arrival order.
pub async fn drain_queue(queue: &str, quiet: Duration, within: Duration) -> Vec<String> {
    use futures::StreamExt;
    use lapin::options::{BasicConsumeOptions, BasicQosOptions};
    let conn = amqp_connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(2000, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = ch
        .basic_consume(
            queue,
            &unique("drain"),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("consume the test queue");
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    while Instant::now() < deadline {
        match tokio::time::timeout(quiet, consumer.next()).await {
            Ok(Some(Ok(d))) => out.push(
                d.properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_default(),
            ),
            Ok(other) => panic!("consumer of {queue} ended: {other:?}"),
            Err(_) => break, // quiet for `quiet`: drained
        }
    }
    let _ = conn.close(200, "drained").await;
    out
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
