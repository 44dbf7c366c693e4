//! The doorbell's advisory locks (migrations 0006, 0008). A relay instance that waits for
//! wake-ups holds them, session-level, on its LISTEN connection: keys (the table's oid,
//! slot 0..[`SLOTS`]) — the insert trigger's function tries the shared lock of one slot,
//! and notifies only when refused — plus slot [`SLOTS`] itself, which
//! only relay instances take, so at most one instance holds the bell at a time.

use sqlx::PgConnection;

use super::{Store, StoreError};

/// Slots the producers spread over (`pg_backend_pid() % 16` in the trigger).
pub const SLOTS: i32 = 16;

/// What an attempt to take the bell found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rung {
    /// This connection holds every slot: every producer commit notifies from now on.
    Held,
    /// Another relay instance holds it (producers notify; this one hears them too).
    Covered,
    /// A producer transaction holds a slot (it decided not to notify and has not ended):
    /// nothing is held; try again shortly.
    Busy,
}

impl Store {
    /// The doorbell's first lock key: the table's oid as a 32-bit integer (as the trigger's
    /// `TG_RELID::int4`).
    pub async fn doorbell_key(&self) -> Result<i32, StoreError> {
        Ok(self.wake_names().await?.1)
    }
}

/// Try to take the bell on `conn` (never waits for a lock).
pub async fn ring(conn: &mut PgConnection, key: i32) -> Result<Rung, StoreError> {
    let first: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
        .bind(key)
        .bind(SLOTS)
        .fetch_one(&mut *conn)
        .await?;
    if !first {
        return Ok(Rung::Covered);
    }
    let got: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM generate_series(0, $2 - 1) s WHERE pg_try_advisory_lock($1, s)",
    )
    .bind(key)
    .bind(SLOTS)
    .fetch_one(&mut *conn)
    .await?;
    if got == i64::from(SLOTS) {
        return Ok(Rung::Held);
    }
    unring(conn).await?;
    Ok(Rung::Busy)
}

/// Let the bell go: producers stop notifying (the connection holds no other advisory lock).
pub async fn unring(conn: &mut PgConnection) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_unlock_all()")
        .execute(conn)
        .await?;
    Ok(())
}
