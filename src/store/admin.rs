//! Operator queries: status counts and backlog, recent failures, blocked aggregates,
//! replay, discard, and retention of old `PROCESSED` rows.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::unreadable::sendable;
use super::{known_time, Store, StoreError};

/// Rows above the floor the backlog gauge reads one by one before it estimates the rest
/// (`Store::pending_gauge_within`).
const GAUGE_EXACT_ROWS: i64 = 10_000;
/// Ids the backlog gauge looks up beyond its exact rows to estimate the rest.
const GAUGE_SAMPLES: i64 = 200;

/// The gauge's first statement: pending rows read (and parked), rows read, the last id
/// read, the table's highest id, the oldest pending `created_at` seen, the database's clock.
type GaugeRow = (
    i64,
    i64,
    Option<i64>,
    i64,
    Option<DateTime<Utc>>,
    DateTime<Utc>,
);

/// Counts per status and backlog age (what `status` and the backlog gauges report).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Backlog {
    pub pending: i64,
    pub processed: i64,
    pub failed: i64,
    pub discarded: i64,
    /// Seconds since the oldest `PENDING` row was created (0 when none).
    pub oldest_pending_age_seconds: f64,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct FailedRow {
    pub id: i64,
    pub event_id: uuid::Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    /// `None` for a time the relay cannot represent (`store::known_time`).
    pub created_at: Option<DateTime<Utc>>,
    pub discarded: bool,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct BlockedAggregate {
    pub aggregate_type: String,
    pub aggregate_id: String,
    /// The FAILED row holding the aggregate back.
    pub failed_id: i64,
    /// Later rows of the aggregate waiting behind it.
    pub waiting: i64,
}

impl Store {
    /// Counts per status and the oldest pending age. Uses the partial indexes for
    /// pending/failed; the PROCESSED count is an estimate-free `count(*)` bounded by
    /// retention.
    pub async fn backlog(&self) -> Result<Backlog, StoreError> {
        let tbl = self.table().ident();
        // Rows with a time the relay cannot represent are left out of the age (they fail
        // when claimed); Postgres cannot subtract an infinite one.
        let created_at = known_time("created_at");
        let row: (i64, i64, i64, i64, Option<f64>) = sqlx::query_as(&format!(
            "SELECT count(*) FILTER (WHERE status = 'PENDING'),
                    count(*) FILTER (WHERE status = 'PROCESSED'),
                    count(*) FILTER (WHERE status = 'FAILED' AND discarded_at IS NULL),
                    count(*) FILTER (WHERE status = 'FAILED' AND discarded_at IS NOT NULL),
                    extract(epoch FROM now() - min({created_at}) FILTER (WHERE status = 'PENDING'))::float8
             FROM {tbl}"
        ))
        .fetch_one(self.pool())
        .await?;
        Ok(Backlog {
            pending: row.0,
            processed: row.1,
            failed: row.2,
            discarded: row.3,
            oldest_pending_age_seconds: row.4.unwrap_or(0.0).max(0.0),
        })
    }

    /// Pending count and oldest pending age for the periodic gauges, at a bounded cost
    /// whatever the backlog (`GAUGE_EXACT_ROWS`): see `pending_gauge_within`.
    pub async fn pending_gauge(&self) -> Result<(i64, f64), StoreError> {
        self.pending_gauge_within(GAUGE_EXACT_ROWS).await
    }

    /// Pending count and oldest pending age, reading at most `exact` rows above the floor
    /// (primary key, in id order, whatever their status) plus the parked rows below it
    /// (blockers index). When there are more, the rest (ids above the last row read, up
    /// to the table's highest) is estimated from `GAUGE_SAMPLES` ids drawn at random there
    /// and looked up by primary key: the share that is a `PENDING` row (ids are not dense:
    /// the order lock draws a second one per insert, rolled-back inserts leave gaps). So a
    /// backlog of millions, or rows processed above a floor an open transaction holds
    /// back, cost what `exact` rows and a few hundred lookups cost, not a scan of all of
    /// them every tick. The oldest age is the oldest `created_at` among the pending rows
    /// read, sampled and parked (ids follow time: the first pending rows are the oldest).
    pub async fn pending_gauge_within(&self, exact: i64) -> Result<(i64, f64), StoreError> {
        let tbl = self.table().ident();
        let floor = self.table().floor();
        let created_at = known_time("created_at");
        let row: GaugeRow = sqlx::query_as(&format!(
            "WITH f AS (SELECT floor FROM {floor} WHERE singleton),
                      a AS (SELECT id, status, {created_at} AS created_at FROM {tbl}
                            WHERE id > (SELECT floor FROM f) ORDER BY id LIMIT $1),
                      p AS (SELECT count(*) AS n, min({created_at}) AS oldest FROM {tbl}
                            WHERE next_attempt_at IS NOT NULL AND id <= (SELECT floor FROM f)
                              AND status = 'PENDING')
                 SELECT (SELECT count(*) FROM a WHERE status = 'PENDING') + p.n,
                        (SELECT count(*) FROM a), (SELECT max(id) FROM a),
                        (SELECT coalesce(max(id), 0) FROM {tbl}),
                        least((SELECT min(created_at) FROM a WHERE status = 'PENDING'), p.oldest),
                        now()
                 FROM p"
        ))
        .bind(exact)
        .fetch_one(self.pool())
        .await?;
        let (mut pending, read, last, top, mut oldest, now) = row;
        if let Some(last) = last.filter(|l| read >= exact && top > *l) {
            let sampled = known_time("o.created_at");
            let (hits, first): (i64, Option<DateTime<Utc>>) = sqlx::query_as(&format!(
                "WITH r AS MATERIALIZED (
                     SELECT ($1 + 1 + floor(random() * ($2 - $1)))::bigint AS id
                     FROM generate_series(1, $3))
                 SELECT count(*), min({sampled}) FROM r JOIN {tbl} o ON o.id = r.id
                 WHERE o.status = 'PENDING'"
            ))
            .bind(last)
            .bind(top)
            .bind(GAUGE_SAMPLES)
            .fetch_one(self.pool())
            .await?;
            pending += ((top - last) as f64 * hits as f64 / GAUGE_SAMPLES as f64).round() as i64;
            oldest = oldest.into_iter().chain(first).min();
        }
        let age = oldest.map_or(0.0, |t| (now - t).num_milliseconds() as f64 / 1e3);
        Ok((pending, age.max(0.0)))
    }

    /// The most recent FAILED rows, newest first.
    pub async fn recent_failures(&self, limit: i64) -> Result<Vec<FailedRow>, StoreError> {
        let tbl = self.table().ident();
        let created_at = known_time("created_at");
        let [aggregate_type, aggregate_id, event_type] =
            ["aggregate_type", "aggregate_id", "event_type"].map(sendable);
        Ok(sqlx::query_as(&format!(
            "SELECT id, event_id, {aggregate_type} AS aggregate_type, {aggregate_id} AS aggregate_id,
                    {event_type} AS event_type, attempts, last_error,
                    {created_at} AS created_at, discarded_at IS NOT NULL AS discarded
             FROM {tbl} WHERE status = 'FAILED'
             ORDER BY id DESC LIMIT $1"
        ))
        .bind(limit)
        .fetch_all(self.pool())
        .await?)
    }

    /// Aggregates held back by a FAILED, non-discarded row (block mode), with how many
    /// later rows wait behind it.
    pub async fn blocked_aggregates(
        &self,
        limit: i64,
    ) -> Result<Vec<BlockedAggregate>, StoreError> {
        let tbl = self.table().ident();
        let [aggregate_type, aggregate_id] = ["f.aggregate_type", "f.aggregate_id"].map(sendable);
        Ok(sqlx::query_as(&format!(
            "SELECT {aggregate_type} AS aggregate_type, {aggregate_id} AS aggregate_id,
                    min(f.id) AS failed_id,
                    (SELECT count(*) FROM {tbl} p
                     WHERE p.aggregate_type = f.aggregate_type AND p.aggregate_id = f.aggregate_id
                       AND p.status = 'PENDING' AND p.id > min(f.id)) AS waiting
             FROM {tbl} f
             WHERE f.next_attempt_at IS NOT NULL AND f.status = 'FAILED' AND f.discarded_at IS NULL
             GROUP BY f.aggregate_type, f.aggregate_id
             ORDER BY failed_id LIMIT $1"
        ))
        .bind(limit)
        .fetch_all(self.pool())
        .await?)
    }

    /// FAILED (not discarded) rows back to `PENDING` with `attempts = 0`, and the rows
    /// parked behind them un-parked. Returns the ids replayed.
    pub async fn replay(&self, ids: Option<&[i64]>) -> Result<Vec<i64>, StoreError> {
        let tbl = self.table().ident();
        let sql = format!(
            "UPDATE {tbl} SET status = 'PENDING', attempts = 0, next_attempt_at = NULL
             WHERE next_attempt_at IS NOT NULL
               AND status = 'FAILED' AND discarded_at IS NULL AND ($1::bigint[] IS NULL OR id = ANY($1))
             RETURNING id"
        );
        self.release_blockers(&sql, ids).await
    }

    /// Give FAILED rows up for good: they stay `FAILED` for audit but no longer hold back
    /// their aggregate. Returns the ids changed.
    pub async fn discard(&self, ids: &[i64]) -> Result<Vec<i64>, StoreError> {
        let tbl = self.table().ident();
        let sql = format!(
            "UPDATE {tbl} SET discarded_at = now(), next_attempt_at = NULL
             WHERE status = 'FAILED' AND discarded_at IS NULL AND id = ANY($1)
             RETURNING id"
        );
        self.release_blockers(&sql, Some(ids)).await
    }

    /// Run `sql` (an UPDATE of FAILED rows bound to `ids`, returning their ids) and
    /// un-park the rows behind the rows it changed, in one transaction that also lowers
    /// the floor below every row it re-opened.
    async fn release_blockers(
        &self,
        sql: &str,
        ids: Option<&[i64]>,
    ) -> Result<Vec<i64>, StoreError> {
        let mut tx = self.pool().begin().await?;
        let done: Vec<i64> = sqlx::query_scalar(sql)
            .bind(ids)
            .fetch_all(&mut *tx)
            .await?;
        self.release_in(&mut tx, &done, &done).await?;
        tx.commit().await?;
        Ok(done)
    }

    /// Retention, one step: look at up to `examine` rows after id `after` (in id order)
    /// and delete those `PROCESSED` more than `older_than` ago. Ids follow time, so the
    /// walk from the oldest row stops at the first row created after the cutoff.
    pub async fn delete_processed(
        &self,
        older_than: Duration,
        after: i64,
        examine: i64,
    ) -> Result<RetentionStep, StoreError> {
        let tbl = self.table().ident();
        let (deleted, last, examined, young): (i64, Option<i64>, i64, bool) =
            sqlx::query_as(&format!(
                "WITH w AS (
                     SELECT id, status = 'PROCESSED' AND processed_at < now() - $1 * interval '1 millisecond' AS old,
                            created_at >= now() - $1 * interval '1 millisecond' AS young
                     FROM {tbl} WHERE id > $2 ORDER BY id LIMIT $3),
                 d AS (
                     DELETE FROM {tbl} t USING w
                     WHERE t.id = w.id AND w.old AND t.status = 'PROCESSED'
                     RETURNING t.id)
                 SELECT (SELECT count(*) FROM d), (SELECT max(id) FROM w), (SELECT count(*) FROM w),
                        coalesce((SELECT bool_or(young) FROM w), false)"
            ))
            .bind(i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX))
            .bind(after)
            .bind(examine)
            .fetch_one(self.pool())
            .await?;
        Ok(RetentionStep {
            deleted: u64::try_from(deleted).unwrap_or(0),
            next: last.unwrap_or(after),
            done: young || examined < examine,
        })
    }
}

/// What one retention step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionStep {
    pub deleted: u64,
    /// Where the next step starts (the last id looked at).
    pub next: i64,
    /// The walk reached rows too young, or the end of the table.
    pub done: bool,
}
