//! Parked rows: a `PENDING` row behind a `FAILED` row of its aggregate (block mode) or
//! behind a retry not yet due gets `next_attempt_at = 'infinity'` and so falls below the
//! claim floor: claims stop reading it again and again. It stays `PENDING` (and a blocker
//! of the rows after it) until its blocker is released — replayed or discarded by an
//! operator, or, for a retry, marked `PROCESSED` or (skip mode) `FAILED` — which un-parks
//! its aggregate in the same transaction and lowers the floor below what it un-parked.
//!
//! Race with the releaser: parking locks the blockers it relies on (`FOR SHARE SKIP
//! LOCKED`, re-checked at their latest version), so a release either commits first (the
//! row is no longer a blocker and nothing is parked behind it) or waits for the parking to
//! commit and then, in a statement of its own, un-parks what was parked.

use sqlx::{PgConnection, Postgres, Transaction};

use super::{Store, StoreError};
use crate::config::OnFailed;

impl Store {
    /// Park those of `ids` (with their aggregate hashes) that are `PENDING`, not parked,
    /// and behind a retry not yet due or (block mode) a `FAILED`, non-discarded row of
    /// their aggregate. Returns how many.
    pub async fn park(
        &self,
        ids: &[i64],
        hashes: &[i32],
        on_failed: OnFailed,
    ) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let tbl = self.table().ident();
        let done = sqlx::query(&format!(
            "WITH b AS (
                 SELECT b.id, b.aggregate_type, b.aggregate_id
                 FROM {tbl} b
                 WHERE hashtext(b.aggregate_type || '/' || b.aggregate_id) = ANY($2)
                   AND b.next_attempt_at IS NOT NULL
                   AND ((b.status = 'FAILED' AND b.discarded_at IS NULL AND $3)
                        OR (b.status = 'PENDING' AND b.next_attempt_at > now()
                            AND b.next_attempt_at < 'infinity'))
                 FOR SHARE SKIP LOCKED)
             UPDATE {tbl} p SET next_attempt_at = 'infinity'
             WHERE p.id = ANY($1) AND p.status = 'PENDING' AND p.next_attempt_at IS NULL
               AND EXISTS (SELECT 1 FROM b
                           WHERE b.aggregate_type = p.aggregate_type
                             AND b.aggregate_id = p.aggregate_id
                             AND b.id < p.id)"
        ))
        .bind(ids)
        .bind(hashes)
        .bind(on_failed == OnFailed::Block)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected())
    }

    /// Mark confirmed rows that had been retried (`attempts > 0`: rows may be parked
    /// behind them) `PROCESSED` and un-park what waits behind them, in one transaction.
    /// Returns how many were marked.
    pub async fn mark_released(&self, ids: &[i64]) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut tx = self.pool().begin().await?;
        let marked: Vec<i64> =
            sqlx::query_scalar(&format!("{} RETURNING id", self.sql.mark_processed))
                .bind(ids)
                .fetch_all(&mut *tx)
                .await?;
        self.release_in(&mut tx, &marked, &[]).await?;
        tx.commit().await?;
        Ok(marked.len() as u64)
    }

    /// Inside a transaction that released `ids` (no longer blockers) and re-opened
    /// `reopened`: un-park the rows behind `ids` and lower the floor below the lowest row
    /// un-parked or re-opened.
    pub(super) async fn release_in(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        ids: &[i64],
        reopened: &[i64],
    ) -> Result<(), StoreError> {
        let mut opened = unpark_behind(tx, &self.table().ident(), ids).await?;
        opened.extend_from_slice(reopened);
        super::floor::lower(tx, &self.table().floor(), &opened).await
    }

    /// Un-park up to `limit` parked rows whose blockers are all gone (a safety net: the
    /// release that should have un-parked them did not, e.g. a rejection recorded late
    /// by an instance that had lost the partition made a row a blocker again after its
    /// new holder sent it). Rows parked behind parked rows only count as orphans too.
    /// Lowers the floor below what it un-parks, in the same transaction. Returns how many.
    pub async fn unpark_orphans(&self, on_failed: OnFailed, limit: i64) -> Result<u64, StoreError> {
        let tbl = self.table().ident();
        // Rows parked behind parked rows only are orphans too: parked rows do not count.
        let no_blocker = super::no_blocker(&tbl, "p", "$1", super::WAITING_UNPARKED);
        let mut tx = self.pool().begin().await?;
        let ids: Vec<i64> = sqlx::query_scalar(&format!(
            "WITH o AS (
                 SELECT p.id FROM {tbl} p
                 WHERE p.next_attempt_at = 'infinity' AND p.status = 'PENDING'
                   AND {no_blocker}
                 ORDER BY p.id LIMIT $2
                 FOR UPDATE SKIP LOCKED)
             UPDATE {tbl} t SET next_attempt_at = NULL FROM o
             WHERE t.id = o.id AND t.next_attempt_at = 'infinity' AND t.status = 'PENDING'
             RETURNING t.id"
        ))
        .bind(on_failed == OnFailed::Block)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        super::floor::lower(&mut tx, &self.table().floor(), &ids).await?;
        tx.commit().await?;
        Ok(ids.len() as u64)
    }

    /// Un-park every parked row (at the start of a run with `on_failed = "skip"`, where
    /// nothing blocks on a `FAILED` row), lowering the floor below them. Returns how many.
    pub async fn unpark_all(&self) -> Result<u64, StoreError> {
        let mut tx = self.pool().begin().await?;
        let ids: Vec<i64> = sqlx::query_scalar(&format!(
            "UPDATE {} SET next_attempt_at = NULL
             WHERE next_attempt_at = 'infinity' AND status = 'PENDING'
             RETURNING id",
            self.table().ident()
        ))
        .fetch_all(&mut *tx)
        .await?;
        super::floor::lower(&mut tx, &self.table().floor(), &ids).await?;
        tx.commit().await?;
        Ok(ids.len() as u64)
    }
}

/// Inside an operator's transaction, after its replay/discard of `ids`: un-park the rows
/// parked behind them (a statement of its own, so it sees parking that committed while
/// the first statement waited for the blockers' locks). Returns the ids un-parked.
async fn unpark_behind(
    tx: &mut Transaction<'_, Postgres>,
    tbl: &str,
    ids: &[i64],
) -> Result<Vec<i64>, StoreError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let conn: &mut PgConnection = tx;
    let done = sqlx::query_scalar(&format!(
        "UPDATE {tbl} p SET next_attempt_at = NULL
         FROM {tbl} f
         WHERE f.id = ANY($1)
           AND hashtext(p.aggregate_type || '/' || p.aggregate_id)
               = hashtext(f.aggregate_type || '/' || f.aggregate_id)
           AND p.aggregate_type = f.aggregate_type AND p.aggregate_id = f.aggregate_id
           AND p.next_attempt_at = 'infinity' AND p.status = 'PENDING'
         RETURNING p.id"
    ))
    .bind(ids)
    .fetch_all(conn)
    .await?;
    Ok(done)
}
