//! Operator queries: status counts and backlog, recent failures, blocked aggregates,
//! replay, discard, and retention of old `PROCESSED` rows.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{Store, StoreError};

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
    pub created_at: DateTime<Utc>,
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
        let row: (i64, i64, i64, i64, Option<f64>) = sqlx::query_as(&format!(
            "SELECT count(*) FILTER (WHERE status = 'PENDING'),
                    count(*) FILTER (WHERE status = 'PROCESSED'),
                    count(*) FILTER (WHERE status = 'FAILED' AND discarded_at IS NULL),
                    count(*) FILTER (WHERE status = 'FAILED' AND discarded_at IS NOT NULL),
                    extract(epoch FROM now() - min(created_at) FILTER (WHERE status = 'PENDING'))::float8
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

    /// Pending count and oldest pending age only, from the pending index (cheap enough
    /// for a periodic gauge refresh).
    pub async fn pending_gauge(&self) -> Result<(i64, f64), StoreError> {
        let tbl = self.table().ident();
        // Two index scans: the claim's index (not parked) and the blockers' (parked).
        let row: (i64, Option<f64>) = sqlx::query_as(&format!(
            "SELECT sum(n)::bigint, extract(epoch FROM now() - min(oldest))::float8 FROM (
                 SELECT count(*) AS n, min(created_at) AS oldest FROM {tbl} o
                 WHERE o.status = 'PENDING' AND {unparked}
                 UNION ALL
                 SELECT count(*), min(created_at) FROM {tbl}
                 WHERE status = 'PENDING' AND next_attempt_at = 'infinity') x",
            unparked = super::UNPARKED
        ))
        .fetch_one(self.pool())
        .await?;
        Ok((row.0, row.1.unwrap_or(0.0).max(0.0)))
    }

    /// The most recent FAILED rows, newest first.
    pub async fn recent_failures(&self, limit: i64) -> Result<Vec<FailedRow>, StoreError> {
        let tbl = self.table().ident();
        Ok(sqlx::query_as(&format!(
            "SELECT id, event_id, aggregate_type, aggregate_id, event_type, attempts, last_error,
                    created_at, discarded_at IS NOT NULL AS discarded
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
        Ok(sqlx::query_as(&format!(
            "SELECT f.aggregate_type, f.aggregate_id, min(f.id) AS failed_id,
                    (SELECT count(*) FROM {tbl} p
                     WHERE p.aggregate_type = f.aggregate_type AND p.aggregate_id = f.aggregate_id
                       AND p.status = 'PENDING' AND p.id > min(f.id)) AS waiting
             FROM {tbl} f
             WHERE f.status = 'FAILED' AND f.discarded_at IS NULL
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
             WHERE status = 'FAILED' AND discarded_at IS NULL AND ($1::bigint[] IS NULL OR id = ANY($1))
             RETURNING id"
        );
        self.release_blockers(&sql, ids).await
    }

    /// Give FAILED rows up for good: they stay `FAILED` for audit but no longer hold back
    /// their aggregate. Returns the ids changed.
    pub async fn discard(&self, ids: &[i64]) -> Result<Vec<i64>, StoreError> {
        let tbl = self.table().ident();
        let sql = format!(
            "UPDATE {tbl} SET discarded_at = now()
             WHERE status = 'FAILED' AND discarded_at IS NULL AND id = ANY($1)
             RETURNING id"
        );
        self.release_blockers(&sql, Some(ids)).await
    }

    /// Run `sql` (an UPDATE of FAILED rows bound to `ids`, returning their ids) and
    /// un-park the rows behind the rows it changed, in one transaction.
    async fn release_blockers(
        &self,
        sql: &str,
        ids: Option<&[i64]>,
    ) -> Result<Vec<i64>, StoreError> {
        let tbl = self.table().ident();
        let mut tx = self.pool().begin().await?;
        let done: Vec<i64> = sqlx::query_scalar(sql)
            .bind(ids)
            .fetch_all(&mut *tx)
            .await?;
        super::park::unpark_behind(&mut tx, &tbl, &done).await?;
        tx.commit().await?;
        Ok(done)
    }

    /// Delete up to `limit` `PROCESSED` rows processed more than `older_than` ago. One
    /// short statement per call; callers loop while it returns `limit`.
    pub async fn delete_processed(
        &self,
        older_than: Duration,
        limit: i64,
    ) -> Result<u64, StoreError> {
        let tbl = self.table().ident();
        let done = sqlx::query(&format!(
            "DELETE FROM {tbl} WHERE id IN (
                 SELECT id FROM {tbl}
                 WHERE status = 'PROCESSED' AND processed_at < now() - $1 * interval '1 millisecond'
                 ORDER BY processed_at LIMIT $2
                 FOR UPDATE SKIP LOCKED)"
        ))
        .bind(i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX))
        .bind(limit)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected())
    }
}
