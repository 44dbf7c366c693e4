//! The claim floor (schema 5): every `PENDING` row with no `next_attempt_at` (not
//! parked, not waiting for a retry) has an id above it, so claims walk the primary key
//! from there instead of an index on `status` (which would make every mark a non-HOT
//! update); retries that fall due are found through `outbox_due_idx`.
//!
//! Raised by the maintenance leader past settled rows, never past the horizon (an id at
//! or below which no transaction can still commit). Lowered, with `epoch + 1`, in the
//! transaction that re-opens rows below it (replay, un-parking). A raise is a
//! compare-and-set on `epoch`: a lowering that committed after the raise's scan began
//! makes it fail, so a raise never passes a row it could not see re-opened.

use sqlx::{PgConnection, Postgres, Transaction};

use super::{Probe, Store, StoreError};

/// The floor row as read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Floor {
    pub floor: i64,
    pub epoch: i64,
}

impl Store {
    /// The stored floor.
    pub async fn floor(&self) -> Result<Floor, StoreError> {
        let (floor, epoch): (i64, i64) = sqlx::query_as(&format!(
            "SELECT floor, epoch FROM {} WHERE singleton",
            self.table().floor()
        ))
        .fetch_optional(self.pool())
        .await?
        .ok_or(StoreError::Unexpected("the floor table has no row"))?;
        Ok(Floor { floor, epoch })
    }

    /// The horizon probe a scan's summary reports (`Probe`), for a horizon kept outside
    /// the engine.
    pub async fn probe(&self) -> Result<Probe, StoreError> {
        let (top, writers): (i64, Option<Vec<String>>) = sqlx::query_as(&format!(
            "SELECT {}",
            super::probe_columns(&self.table().ident(), "true")
        ))
        .fetch_one(self.pool())
        .await?;
        Ok(Probe { top, writers })
    }

    /// Raise the floor to just below the first pending row with no `next_attempt_at`,
    /// but not past `horizon`. Returns the floor now stored (unchanged when a lowering raced it).
    pub async fn raise_floor(&self, horizon: i64) -> Result<i64, StoreError> {
        let was = self.floor().await?;
        if horizon <= was.floor {
            return Ok(was.floor);
        }
        let tbl = self.table().ident();
        let first: Option<i64> = sqlx::query_scalar(&format!(
            "SELECT o.id FROM {tbl} o
             WHERE o.id > $1 AND o.id <= $2 AND o.status = 'PENDING' AND o.next_attempt_at IS NULL
             ORDER BY o.id LIMIT 1"
        ))
        .bind(was.floor)
        .bind(horizon)
        .fetch_optional(self.pool())
        .await?;
        let to = first.map_or(horizon, |id| id - 1);
        if to <= was.floor {
            return Ok(was.floor);
        }
        let done = sqlx::query(&format!(
            "UPDATE {} SET floor = $1 WHERE singleton AND epoch = $2 AND floor < $1",
            self.table().floor()
        ))
        .bind(to)
        .bind(was.epoch)
        .execute(self.pool())
        .await?;
        Ok(if done.rows_affected() == 1 {
            to
        } else {
            was.floor
        })
    }
}

/// Inside the transaction that re-opens rows (`ids`: replayed, un-parked): lower the
/// floor below the lowest.
pub(super) async fn lower(
    tx: &mut Transaction<'_, Postgres>,
    floor_tbl: &str,
    ids: &[i64],
) -> Result<(), StoreError> {
    let Some(min) = ids.iter().min() else {
        return Ok(());
    };
    let conn: &mut PgConnection = tx;
    sqlx::query(&format!(
        "UPDATE {floor_tbl} SET floor = least(floor, $1 - 1), epoch = epoch + 1 WHERE singleton"
    ))
    .bind(*min)
    .execute(conn)
    .await?;
    Ok(())
}
