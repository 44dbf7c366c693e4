//! The tenant probe: whether rows of another `aggregate_type` wait behind one type's
//! burst, so the sweep may pass over that type (`relay::tenants`). Walks the primary key
//! as the scan does, off the claim's path, on the pool's connections.

use super::clauses::UNPARKED;
use super::{Store, StoreError};

impl Store {
    /// Whether a pending, unparked row of a type other than `aggregate_type` is among
    /// the first `head` pending rows after id `after`, or among the last `tail` (of
    /// `partitions`, all when `None`): rows written during the burst, or behind it.
    pub async fn other_type_after(
        &self,
        after: i64,
        partitions: Option<&[i32]>,
        aggregate_type: &str,
        head: u32,
        tail: u32,
    ) -> Result<bool, StoreError> {
        let tbl = self.table().ident();
        let walk = |order: &str, limit: &str| {
            format!(
                "EXISTS (
                     SELECT 1 FROM (
                         SELECT o.aggregate_type
                         FROM {tbl} o
                         WHERE o.status = 'PENDING' AND {UNPARKED} AND o.id > $1
                           AND ($2::int[] IS NULL
                                OR (hashtext(o.aggregate_type || '/' || o.aggregate_id) & 255) = ANY($2))
                         ORDER BY o.id {order}
                         LIMIT {limit}) s
                     WHERE s.aggregate_type <> $3)"
            )
        };
        let found: bool = sqlx::query_scalar(&format!(
            "SELECT {} OR {}",
            walk("", "$4"),
            walk("DESC", "$5")
        ))
        .bind(after)
        .bind(partitions)
        .bind(aggregate_type)
        .bind(i64::from(head))
        .bind(i64::from(tail))
        .fetch_one(self.pool())
        .await?;
        Ok(found)
    }
}
