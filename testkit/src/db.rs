//! The outbox table of a test (`TestTable`): a unique, migrated table on the test
//! database, rows written the way a producer writes them, and reads of what the relay did
//! to them. Dropped by `cleanup` (or `drop_all`) at the end of the test, or when the test
//! panics before it (`Drop`).

use std::collections::HashMap;
use std::time::Duration;

use outbox_relay::store::Store;
use outbox_relay::table::TableName;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection as _, PgPool};

use crate::wait::wait_for;
use crate::{pg_url, unique};

mod rows;
mod scratch;
pub use rows::{DbRow, Row};
pub use scratch::ScratchDb;

/// One producer row of aggregate `agg` (type `order`) written through `ex` (a pool, a
/// connection, or a transaction the caller keeps open); returns its id.
pub async fn insert_row<'c>(
    ex: impl sqlx::PgExecutor<'c>,
    table: &str,
    agg: &str,
) -> sqlx::Result<i64> {
    sqlx::query_scalar(&format!(
        "INSERT INTO \"{table}\" (aggregate_type, aggregate_id, event_type, payload)
         VALUES ('order', $1, 'order.updated', $2) RETURNING id"
    ))
    .bind(agg)
    .bind(serde_json::json!({ "orderId": agg }))
    .fetch_one(ex)
    .await
}

/// A migrated outbox table with a unique name, dropped by `cleanup` (or, if the test
/// panics first, when the value is dropped).
pub struct TestTable {
    pub name: String,
    pub pool: PgPool,
}

impl Drop for TestTable {
    fn drop(&mut self) {
        let statements = self.drop_statements();
        crate::teardown::after_panic(format!("table {}", self.name), async move {
            let Ok(mut conn) = sqlx::PgConnection::connect(&pg_url()).await else {
                return;
            };
            let _ = sqlx::query("SET lock_timeout = '10s'")
                .execute(&mut conn)
                .await;
            for sql in statements {
                let _ = sqlx::query(&sql).execute(&mut conn).await;
            }
        });
    }
}

impl TestTable {
    pub async fn new(prefix: &str) -> Self {
        let t = Self::unmigrated(prefix).await;
        let mut conn = sqlx::PgConnection::connect(&pg_url())
            .await
            .expect("connect postgres");
        outbox_relay::migrate::migrate(&mut conn, &TableName::parse(&t.name).unwrap())
            .await
            .expect("migrate");
        t
    }

    /// A unique name, nothing created (for the "not migrated" test).
    pub async fn unmigrated(prefix: &str) -> Self {
        let pool = PgPoolOptions::new()
            .max_connections(10)
            .connect(&pg_url())
            .await
            .expect("connect postgres");
        Self {
            name: unique(prefix),
            pool,
        }
    }

    /// Drop the table and what `migrate` made beside it; errors are ignored.
    pub async fn cleanup(&self) {
        for sql in self.drop_statements() {
            let _ = sqlx::query(&sql).execute(&self.pool).await;
        }
    }

    /// Drop the table and what `migrate` made beside it (every drop must succeed), then
    /// close the pool.
    pub async fn drop_all(self) {
        for sql in self.drop_statements() {
            sqlx::query(&sql).execute(&self.pool).await.unwrap();
        }
        self.pool.close().await;
    }

    fn drop_statements(&self) -> Vec<String> {
        let mut out = outbox_relay::migrate::drop_statements(&self.name);
        out.push(format!(
            "DROP TABLE IF EXISTS \"{}_demo_orders\"",
            self.name
        ));
        out
    }

    /// The relay's store on this table.
    pub fn store(&self) -> Store {
        Store::from_pool(
            self.pool.clone(),
            TableName::parse(&self.name).expect("table name"),
        )
    }

    /// Insert one row; returns its id.
    pub async fn insert(
        &self,
        agg: &str,
        event_type: &str,
        destination: Option<&str>,
        headers: serde_json::Value,
    ) -> i64 {
        sqlx::query_scalar(&format!(
            "INSERT INTO \"{}\" (aggregate_type, aggregate_id, event_type, destination, payload, headers)
             VALUES ('order', $1, $2, $3, $4, $5) RETURNING id",
            self.name
        ))
        .bind(agg)
        .bind(event_type)
        .bind(destination)
        .bind(serde_json::json!({"aggregate": agg, "type": event_type}))
        .bind(headers)
        .fetch_one(&self.pool)
        .await
        .expect("insert")
    }

    /// Insert `n` rows server-side, aggregate id given by the SQL expression `agg` over
    /// `g` = 1..=n, in `g` order; returns the highest id inserted.
    pub async fn insert_series(&self, agg: &str, n: i64) -> i64 {
        let max: Option<i64> = sqlx::query_scalar(&format!(
            "WITH ins AS (
               INSERT INTO \"{}\" (aggregate_type, aggregate_id, event_type, payload)
               SELECT 'order', {agg}, 'order.created', jsonb_build_object('seq', g)
               FROM generate_series(1, {n}) g ORDER BY g RETURNING id)
             SELECT max(id) FROM ins",
            self.name
        ))
        .fetch_one(&self.pool)
        .await
        .expect("insert series");
        max.expect("rows inserted")
    }

    /// (PROCESSED rows with id > `after`, whether any row with id <= `after` is PENDING):
    /// how far rows written after a backlog got while the backlog drains.
    pub async fn progress_after(&self, after: i64) -> (i64, bool) {
        sqlx::query_as(&format!(
            "SELECT (SELECT count(*) FROM \"{t}\" WHERE id > $1 AND status = 'PROCESSED'),
                    EXISTS (SELECT 1 FROM \"{t}\" WHERE id <= $1 AND status = 'PENDING')",
            t = self.name
        ))
        .bind(after)
        .fetch_one(&self.pool)
        .await
        .expect("progress")
    }

    /// PENDING rows with id <= `upto`.
    pub async fn pending_upto(&self, upto: i64) -> i64 {
        self.count_where(&format!("id <= {upto} AND status = 'PENDING'"))
            .await
    }

    /// Run set-up SQL with the table's triggers off, for rows in relay-owned states
    /// (PROCESSED, FAILED, …) that the insert guard of schema 3 would reset to PENDING.
    pub async fn setup_sql(&self, sql: &str) {
        sqlx::raw_sql(&format!(
            "BEGIN; SET LOCAL session_replication_role = replica; {sql}; COMMIT;"
        ))
        .execute(&self.pool)
        .await
        .expect("set-up SQL");
    }

    /// `n` rows over `aggregates` aggregates, written by `producers` concurrent producers,
    /// one row per transaction; each aggregate is written by one producer, so its rows
    /// commit in id order (as with a locked business row).
    pub async fn produce(&self, n: usize, aggregates: usize, producers: usize) {
        let mut tasks = Vec::new();
        for p in 0..producers {
            let pool = self.pool.clone();
            let name = self.name.clone();
            tasks.push(tokio::spawn(async move {
                let mine: Vec<usize> = (0..aggregates).filter(|a| a % producers == p).collect();
                let count = (0..n).filter(|i| i % producers == p).count();
                for i in 0..count {
                    let agg = format!("agg-{}", mine[i % mine.len()]);
                    let mut tx = pool.begin().await.expect("begin");
                    sqlx::query(&format!(
                        "INSERT INTO \"{name}\" (aggregate_type, aggregate_id, event_type, payload, headers)
                         VALUES ('order', $1, 'order.created', $2, $3)"
                    ))
                    .bind(&agg)
                    .bind(serde_json::json!({"orderId": agg, "seq": i, "total": 59.98}))
                    .bind(serde_json::json!({"traceparent": format!("00-{i:032x}-{p:016x}-01"), "correlation_id": format!("c-{p}-{i}")}))
                    .execute(&mut *tx)
                    .await
                    .expect("insert");
                    tx.commit().await.expect("commit");
                }
            }));
        }
        for t in tasks {
            t.await.expect("producer");
        }
    }

    /// Wait until more than `n` rows are PROCESSED ("relaying under way").
    pub async fn wait_processed_over(&self, n: i64, within: Duration) {
        crate::wait::wait_until(within, &format!("more than {n} rows PROCESSED"), || async {
            self.count("PROCESSED").await > n
        })
        .await;
    }

    /// `produce(n, aggregates, producers)` in a task of its own, on a second handle of
    /// this table.
    pub fn produce_aside(
        &self,
        n: usize,
        aggregates: usize,
        producers: usize,
    ) -> tokio::task::JoinHandle<()> {
        let t = TestTable {
            name: self.name.clone(),
            pool: self.pool.clone(),
        };
        tokio::spawn(async move { t.produce(n, aggregates, producers).await })
    }

    /// Wait until exactly `processed` rows are PROCESSED and `failed` FAILED.
    pub async fn wait_settled(&self, processed: i64, failed: i64, within: Duration) {
        crate::wait::wait_until(
            within,
            &format!("{processed} PROCESSED, {failed} FAILED"),
            || async {
                self.count("PROCESSED").await == processed && self.count("FAILED").await == failed
            },
        )
        .await;
    }

    /// The first FAILED row (there must be one) and its `last_error`.
    pub async fn the_failed(&self) -> (DbRow, String) {
        let row = self
            .rows()
            .await
            .into_iter()
            .find(|r| r.status == "FAILED")
            .expect("a FAILED row");
        let why = row.last_error.clone().expect("the FAILED row's last_error");
        (row, why)
    }

    /// The scenario of a row sent where it cannot go: the one FAILED row is `typo`'s first,
    /// after 3 attempts, with a `last_error` that mentions each of `mentions`. Returns
    /// it and its `last_error`.
    pub async fn the_typo_failed(&self, mentions: &[&str]) -> (DbRow, String) {
        let (failed, why) = self.the_failed().await;
        assert_eq!((failed.aggregate_id.as_str(), failed.attempts), ("typo", 3));
        assert!(mentions.iter().all(|m| why.contains(m)), "{why}");
        (failed, why)
    }

    /// on_failed = block: the failed aggregate's later row, the `nth` row (from 0), waits.
    pub async fn assert_later_row_waits(&self, nth: usize) {
        assert_eq!(
            self.rows().await[nth].status,
            "PENDING",
            "the aggregate's later row waits"
        );
    }

    /// Every row relayed cleanly: `processed_at` set, no attempt spent, no error.
    pub async fn assert_all_clean(&self) {
        assert_eq!(
            self.count_where("processed_at IS NULL OR attempts <> 0 OR last_error IS NOT NULL")
                .await,
            0
        );
    }

    pub async fn count(&self, status: &str) -> i64 {
        sqlx::query_scalar(&format!(
            "SELECT count(*) FROM \"{}\" WHERE status = $1",
            self.name
        ))
        .bind(status)
        .fetch_one(&self.pool)
        .await
        .expect("count")
    }

    pub async fn total(&self) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM \"{}\"", self.name))
            .fetch_one(&self.pool)
            .await
            .expect("count")
    }

    pub async fn wait_status(&self, status: &str, n: i64, timeout: Duration) {
        wait_for(
            timeout,
            &format!("{n} rows {status} in {}", self.name),
            || async { (self.count(status).await >= n).then_some(()) },
        )
        .await
    }

    /// `wait_status` for each `(status, n)` of `want` in turn, each within `within`.
    pub async fn wait_statuses(&self, want: &[(&str, i64)], within: Duration) {
        for (status, n) in want {
            self.wait_status(status, *n, within).await;
        }
    }

    /// Wait until more than `more` rows beyond those `PROCESSED` now are `PROCESSED`.
    pub async fn wait_progress(&self, more: i64, timeout: Duration, what: &str) {
        let before = self.count("PROCESSED").await;
        wait_for(timeout, what, || async {
            (self.count("PROCESSED").await > before + more).then_some(())
        })
        .await
    }

    /// Wait until no row is `PENDING` any more.
    pub async fn wait_no_pending(&self, timeout: Duration, what: &str) {
        wait_for(timeout, what, || async {
            (self.count("PENDING").await == 0).then_some(())
        })
        .await
    }

    /// (status, attempts, last_error) of one row.
    pub async fn row(&self, id: i64) -> (String, i32, Option<String>) {
        sqlx::query_as(&format!(
            "SELECT status, attempts, last_error FROM \"{}\" WHERE id = $1",
            self.name
        ))
        .bind(id)
        .fetch_one(&self.pool)
        .await
        .expect("row")
    }

    /// No row has spent an attempt (an outage, a stall or a timeout is not the row's
    /// fault); `why` says which.
    pub async fn assert_no_attempts(&self, why: &str) {
        assert_eq!(self.max_attempts_seen().await, 0, "{why}");
    }

    pub async fn max_attempts_seen(&self) -> i32 {
        sqlx::query_scalar(&format!(
            "SELECT coalesce(max(attempts), 0) FROM \"{}\"",
            self.name
        ))
        .fetch_one(&self.pool)
        .await
        .expect("attempts")
    }

    /// event_id → (id, aggregate_id) of every row.
    pub async fn index(&self) -> HashMap<String, (i64, String)> {
        let rows: Vec<(i64, uuid::Uuid, String)> = sqlx::query_as(&format!(
            "SELECT id, event_id, aggregate_id FROM \"{}\"",
            self.name
        ))
        .fetch_all(&self.pool)
        .await
        .expect("index");
        rows.into_iter()
            .map(|(id, e, a)| (e.to_string(), (id, a)))
            .collect()
    }

    /// Insert rows `(aggregate_type, aggregate_id, event_type, destination, payload,
    /// headers)` in the given order (so `id` follows it).
    pub async fn insert_rows(&self, rows: &[Row]) {
        for chunk in rows.chunks(2_000) {
            let col = |f: fn(&Row) -> String| chunk.iter().map(f).collect::<Vec<String>>();
            let dest: Vec<Option<String>> = chunk.iter().map(|r| r.destination.clone()).collect();
            let payload: Vec<serde_json::Value> = chunk.iter().map(|r| r.payload.clone()).collect();
            let headers: Vec<serde_json::Value> = chunk.iter().map(|r| r.headers.clone()).collect();
            sqlx::query(&format!(
                "INSERT INTO \"{}\" (aggregate_type, aggregate_id, event_type, destination, payload, headers)
                 SELECT a, b, c, d, e, f FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::jsonb[])
                      WITH ORDINALITY AS u(a, b, c, d, e, f, n) ORDER BY n",
                self.name
            ))
            .bind(col(|r| r.aggregate_type.clone()))
            .bind(col(|r| r.aggregate_id.clone()))
            .bind(col(|r| r.event_type.clone()))
            .bind(dest)
            .bind(payload)
            .bind(headers)
            .execute(&self.pool)
            .await
            .unwrap();
        }
    }

    /// Every row: id, event_id, aggregate_id, status, attempts, last_error,
    /// processed_at IS NOT NULL, payload::text, headers.
    pub async fn rows(&self) -> Vec<DbRow> {
        sqlx::query_as::<_, DbRow>(&format!(
            "SELECT id, event_id::text AS event_id, aggregate_type, aggregate_id, event_type, status, attempts, last_error,
                    processed_at IS NOT NULL AS processed, payload::text AS payload, headers
             FROM \"{}\" ORDER BY id",
            self.name
        ))
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    pub async fn count_where(&self, cond: &str) -> i64 {
        sqlx::query_scalar(&format!(
            "SELECT count(*) FROM \"{}\" WHERE {cond}",
            self.name
        ))
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }
}
