//! Parked rows: a `PENDING` row behind a `FAILED` row of its aggregate (block mode) gets
//! `next_attempt_at = 'infinity'` and so leaves `outbox_pending_idx`: claims stop reading
//! it again and again. It stays `PENDING` (and a blocker of the rows after it) until the
//! blocker is replayed or discarded, which un-parks its aggregate in the same transaction.
//!
//! Race with an operator: parking locks the `FAILED` blockers it relies on (`FOR SHARE
//! SKIP LOCKED`, re-checked at their latest version), so a replay or discard either
//! commits first (its blocker is no longer `FAILED` and nothing is parked behind it) or
//! waits for the parking to commit and then, in a statement of its own, un-parks what was
//! parked.

use sqlx::{PgConnection, Postgres, Transaction};

use super::{Store, StoreError};

impl Store {
    /// Park those of `ids` (with their aggregate hashes) that are `PENDING`, not parked,
    /// and behind a `FAILED`, non-discarded row of their aggregate. Returns how many.
    pub async fn park(&self, ids: &[i64], hashes: &[i32]) -> Result<u64, StoreError> {
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
                   AND b.status = 'FAILED' AND b.discarded_at IS NULL
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
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected())
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
pub(super) async fn unpark_behind(
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
