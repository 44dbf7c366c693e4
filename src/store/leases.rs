//! Partition leases and member heartbeats: Postgres is the only coordinator.
//!
//! Each aggregate hashes into one of `PARTITIONS` partitions; an instance publishes a row
//! only while it holds a live lease on the row's partition, so one aggregate has at most
//! one publisher at a time. Leases are rows `(partition, owner, lease_until)`; a lease
//! nobody renews expires and any live instance may take it.

use std::time::Duration;

use super::{Store, StoreError};

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Store {
    /// Refresh this instance's heartbeat, drop long-dead members, and return the number
    /// of live members (this one included).
    pub async fn heartbeat(&self, instance: &str, ttl: Duration) -> Result<i64, StoreError> {
        let members = self.table().members();
        let mut tx = self.pool().begin().await?;
        sqlx::query(&format!(
            "INSERT INTO {members} (instance, alive_until)
             VALUES ($1, now() + $2 * interval '1 millisecond')
             ON CONFLICT (instance) DO UPDATE SET alive_until = EXCLUDED.alive_until"
        ))
        .bind(instance)
        .bind(millis(ttl))
        .execute(&mut *tx)
        .await?;
        sqlx::query(&format!(
            "DELETE FROM {members} WHERE alive_until < now() - interval '1 hour'"
        ))
        .execute(&mut *tx)
        .await?;
        let live: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {members} WHERE alive_until > now()"
        ))
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(live)
    }

    /// Extend every lease this instance holds; returns the partitions still held.
    pub async fn renew_leases(
        &self,
        instance: &str,
        ttl: Duration,
    ) -> Result<Vec<i32>, StoreError> {
        let mut held: Vec<i32> = sqlx::query_scalar(&format!(
            "UPDATE {} SET lease_until = now() + $2 * interval '1 millisecond'
             WHERE owner = $1 AND lease_until > now()
             RETURNING partition",
            self.table().leases()
        ))
        .bind(instance)
        .bind(millis(ttl))
        .fetch_all(self.pool())
        .await?;
        held.sort_unstable();
        Ok(held)
    }

    /// Take up to `want` partitions that are free or whose lease expired.
    pub async fn acquire_leases(
        &self,
        instance: &str,
        ttl: Duration,
        want: i64,
    ) -> Result<Vec<i32>, StoreError> {
        if want <= 0 {
            return Ok(Vec::new());
        }
        let leases = self.table().leases();
        let got: Vec<i32> = sqlx::query_scalar(&format!(
            "UPDATE {leases} SET owner = $1, lease_until = now() + $2 * interval '1 millisecond'
             WHERE partition IN (
                 SELECT partition FROM {leases}
                 WHERE owner IS NULL OR lease_until <= now()
                 ORDER BY partition
                 LIMIT $3
                 FOR UPDATE SKIP LOCKED)
             RETURNING partition"
        ))
        .bind(instance)
        .bind(millis(ttl))
        .bind(want)
        .fetch_all(self.pool())
        .await?;
        Ok(got)
    }

    /// Hand partitions back (only ones this instance holds).
    pub async fn release_leases(
        &self,
        instance: &str,
        partitions: &[i32],
    ) -> Result<(), StoreError> {
        if partitions.is_empty() {
            return Ok(());
        }
        sqlx::query(&format!(
            "UPDATE {} SET owner = NULL, lease_until = '-infinity'
             WHERE owner = $1 AND partition = ANY($2)",
            self.table().leases()
        ))
        .bind(instance)
        .bind(partitions)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Whether `instance` holds partition 0's lease, which makes it the leader that runs
    /// the table-wide maintenance (retention, backlog gauges). One primary-key lookup.
    pub async fn leads(&self, instance: &str) -> Result<bool, StoreError> {
        Ok(sqlx::query_scalar(&format!(
            "SELECT EXISTS (SELECT 1 FROM {} WHERE partition = 0 AND owner = $1
                            AND lease_until > now())",
            self.table().leases()
        ))
        .bind(instance)
        .fetch_one(self.pool())
        .await?)
    }

    /// Leave the group: release every lease and remove the heartbeat.
    pub async fn leave(&self, instance: &str) -> Result<(), StoreError> {
        let mut tx = self.pool().begin().await?;
        sqlx::query(&format!(
            "UPDATE {} SET owner = NULL, lease_until = '-infinity' WHERE owner = $1",
            self.table().leases()
        ))
        .bind(instance)
        .execute(&mut *tx)
        .await?;
        sqlx::query(&format!(
            "DELETE FROM {} WHERE instance = $1",
            self.table().members()
        ))
        .bind(instance)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }
}
