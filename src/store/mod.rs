//! The Postgres store: claiming due rows in `id` order, marking outcomes in one statement
//! per kind, and (in submodules) partition leases and the operator's queries.
//!
//! Invariants:
//! - a row is claimed by `status` above the floor (`floor`), walking the primary key: no
//!   index has a key or predicate on a column a mark changes, so marks are HOT updates;
//!   the floor and the engine's sweep never pass an id that can still commit (ids are
//!   handed out before commit, so a lower id can become visible later);
//! - a claimed row is never behind a *blocker* of its aggregate: a FAILED row (in block
//!   mode, not discarded) or a row waiting for its retry;
//! - marks only touch rows still `PENDING`, so a late mark cannot undo an operator's action.

pub mod admin;
mod claim;
mod clauses;
pub mod doorbell;
mod floor;
pub mod leases;
mod park;
mod pool;
mod tenants;
mod unreadable;

pub use claim::{ClaimedRow, Fresh, Probe, ScanPage, ScanQuery, Scanned};
pub use floor::Floor;

use clauses::{as_is, fetch};
pub(crate) use clauses::{
    blocker_clause, known_time, no_blocker, probe_columns, UNPARKED, UNTAKEN_RETRY,
    WAITING_UNPARKED,
};
pub use pool::{connect_options, pool_options, HOT_SETTINGS};

use std::time::Duration;

use sqlx::PgPool;

use crate::config::{DatabaseConfig, OnFailed};
use crate::model::OutboxRow;
use crate::table::TableName;

/// Number of hash partitions aggregates are spread over (fixed by the lease table).
/// Public only for outbox-relay-tools (the bench waits until every partition is leased).
pub const PARTITIONS: i32 = 256;

/// Why a store call failed; database errors keep their `sqlx::Error` as the source.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database is down, the connection dropped, or the server cannot take the
    /// session or statement now (no judgement on the statement).
    #[error("database unreachable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// The database refused or failed the statement.
    #[error("database error: {0}")]
    Query(#[source] sqlx::Error),
    /// `database.url` does not parse (the text is redacted).
    #[error("database.url is not a valid Postgres URL: {0}")]
    BadUrl(String),
    /// The database answered something the relay's SQL rules out.
    #[error("database error: {0}")]
    Unexpected(&'static str),
}

impl StoreError {
    /// Whether the error means the database is down or the connection dropped.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e),
            sqlx::Error::Database(db)
                if db.code().is_some_and(|c| {
                    c.starts_with("08")
                        || c.starts_with("57P")
                        || c.starts_with("53")
                        || c == "25006"
                }) =>
            {
                // 08xxx connection exceptions, 57P0x admin shutdown / terminated backend /
                // starting up, 53xxx insufficient resources (too many connections, out of
                // memory, disk full), 25006 a read-only session (a standby, mid-failover):
                // the server, not the statement. Recording retries
                // them with backoff instead of giving the rows up (re-published later).
                StoreError::Unavailable(e)
            }
            _ => StoreError::Query(e),
        }
    }
}

/// A rejected or invalid row and what to do with it.
#[derive(Debug, Clone)]
pub struct Rejection {
    pub id: i64,
    pub error: String,
    /// Delay before the next try, if one is left.
    pub retry_in: Duration,
    /// Fail at once, whatever the attempt count (input no retry can fix).
    pub fatal: bool,
}

/// The row's state after a rejection was recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectOutcome {
    pub id: i64,
    pub failed: bool,
    pub attempts: i32,
}

/// Prebuilt statements for the configured table (identifiers quoted, data bound).
#[derive(Debug)]
struct Sql {
    claim: String,
    scan: String,
    fetch: String,
    fetch_range: String,
    fetch_raw: String,
    mark_processed: String,
    reject: String,
}

impl Sql {
    fn new(t: &TableName) -> Self {
        let tbl = t.ident();
        let blocker = blocker_clause(&tbl);
        let untaken = no_blocker(&tbl, "o", "$2", UNTAKEN_RETRY);
        let unparked = UNPARKED;
        let floor_tbl = t.floor();
        let probe = probe_columns(&tbl, "$7");
        let created_at = known_time("o.created_at");
        let fresh_cap = claim::FRESH_IDS + 1;
        Self {
            // `s` examines at most $4 pending ids after $1 (no payloads), walking the
            // primary key; `d` adds the retries that fell due at or below $1 (below the
            // floor: a waiting retry does not hold it), through `outbox_due_idx`. `w`
            // and `e` leave out the hashes in $5 (skipped for the rest of a sweep) and the
            // `aggregate_type`s in $8 (a tenant's burst passed over), or keep only the
            // hashes in $6 and the types in $9 (a refill). One row comes back: each list as three arrays
            // (ids, hashes, sizes: a row per pending id cost the relay ~4 000
            // instructions each to receive and decode, the arrays a few dozen), the last
            // id `s` examined and how many, the horizon probe (the table's highest visible
            // id, the transactions writing to it), the first ids examined with no retry
            // schedule (one more than `FRESH_IDS`, to tell a cut list; a bounded top-N, not
            // an ordered aggregate of a skipping scan's up to 100 000 rows), the stored
            // floor and its epoch.
            scan: format!(
                "WITH s AS (
                     SELECT o.id, hashtext(o.aggregate_type || '/' || o.aggregate_id) AS hash,
                            (pg_column_size(o.payload) + pg_column_size(o.headers)
                             + octet_length(o.aggregate_id))::bigint AS size,
                            o.next_attempt_at IS NULL AS fresh,
                            o.aggregate_type = ANY($8::text[]) AS skip_type,
                            o.aggregate_type = ANY($9::text[]) AS only_type
                     FROM {tbl} o
                     WHERE o.status = 'PENDING' AND {unparked} AND o.id > $1
                       AND ($2::int[] IS NULL
                            OR (hashtext(o.aggregate_type || '/' || o.aggregate_id) & 255) = ANY($2))
                     ORDER BY o.id
                     LIMIT $4),
                 d AS (
                     SELECT o.id, hashtext(o.aggregate_type || '/' || o.aggregate_id) AS hash,
                            (pg_column_size(o.payload) + pg_column_size(o.headers)
                             + octet_length(o.aggregate_id))::bigint AS size,
                            o.aggregate_type = ANY($8::text[]) AS skip_type,
                            o.aggregate_type = ANY($9::text[]) AS only_type
                     FROM {tbl} o
                     WHERE o.next_attempt_at <= now() AND o.status = 'PENDING' AND o.id <= $1
                       AND ($2::int[] IS NULL
                            OR (hashtext(o.aggregate_type || '/' || o.aggregate_id) & 255) = ANY($2))
                     ORDER BY o.next_attempt_at
                     LIMIT $3),
                 w AS (
                     SELECT id, hash, size FROM s
                     WHERE ($5::int[] IS NULL OR hash <> ALL($5))
                       AND skip_type IS NOT TRUE
                       AND (($6::int[] IS NULL AND $9::text[] IS NULL)
                            OR hash = ANY($6) OR only_type)
                     ORDER BY id
                     LIMIT $3),
                 e AS (
                     SELECT id, hash, size FROM d
                     WHERE ($5::int[] IS NULL OR hash <> ALL($5))
                       AND skip_type IS NOT TRUE
                       AND (($6::int[] IS NULL AND $9::text[] IS NULL)
                            OR hash = ANY($6) OR only_type))
                 SELECT w.ids, w.hashes, w.sizes, e.ids, e.hashes, e.sizes, x.last, x.examined,
                        {probe},
                        (SELECT array_agg(f.id) FROM (SELECT id FROM s WHERE fresh
                                                      ORDER BY id LIMIT {fresh_cap}) f),
                        (SELECT f.floor FROM {floor_tbl} f WHERE f.singleton),
                        (SELECT f.epoch FROM {floor_tbl} f WHERE f.singleton)
                 FROM (SELECT array_agg(id) AS ids, array_agg(hash) AS hashes,
                              array_agg(size) AS sizes FROM w) w,
                      (SELECT array_agg(id) AS ids, array_agg(hash) AS hashes,
                              array_agg(size) AS sizes FROM e) e,
                      (SELECT coalesce(max(id), $1) AS last, count(*)::int AS examined
                       FROM s) x"
            ),
            fetch: fetch(&tbl, &untaken, &floor_tbl, "o.id = ANY($1)", as_is),
            // The same with the text as bytes, for a fetch Postgres could not send
            // (`unreadable`).
            fetch_raw: fetch(
                &tbl,
                &untaken,
                &floor_tbl,
                "o.id = ANY($1)",
                unreadable::stored_bytes,
            ),
            // The same for ids close together (a drain's claims): one walk of that stretch
            // of the primary key instead of a descent per id (Postgres 15 descends the
            // index once per element of `= ANY`): ~15 times fewer buffer reads. Which ids
            // of the stretch are wanted is a bitmap ($7, bit `id - $5`): one bit test per
            // row, where the hot path's generic plan would search the list of `= ANY` for
            // each (not hashed, ~0.3 ms of a 500-row fetch), and nothing for the planner
            // to estimate element by element. The CASE keeps the bit test inside the range
            // whatever order the filters run in.
            fetch_range: fetch(
                &tbl,
                &untaken,
                &floor_tbl,
                "o.id >= $5 AND o.id <= $6 AND (CASE WHEN o.id >= $5 AND o.id <= $6 \
                 THEN get_bit($7::bytea, (o.id - $5)::int) = 1 END) IS TRUE",
                as_is,
            ),
            claim: format!(
                "SELECT o.id, o.event_id, o.aggregate_type, o.aggregate_id, o.event_type,
                        o.destination, o.routing_key, o.payload::text AS payload, o.headers::text AS headers,
                        o.attempts, {created_at} AS created_at
                 FROM {tbl} o
                 WHERE o.status = 'PENDING' AND {unparked}
                   AND (o.next_attempt_at IS NULL OR o.next_attempt_at <= now())
                   AND o.id > $4
                   AND ($1::int[] IS NULL
                        OR (hashtext(o.aggregate_type || '/' || o.aggregate_id) & 255) = ANY($1))
                   AND {blocker}
                 ORDER BY o.id
                 LIMIT $3"
            ),
            mark_processed: format!(
                "UPDATE {tbl} SET status = 'PROCESSED', processed_at = now(), next_attempt_at = NULL
                 WHERE id = ANY($1) AND status = 'PENDING'"
            ),
            reject: format!(
                "UPDATE {tbl} AS t SET
                    attempts = t.attempts + 1,
                    last_error = r.err,
                    status = CASE WHEN r.fatal OR t.attempts + 1 >= $5 THEN 'FAILED' ELSE 'PENDING' END,
                    next_attempt_at = CASE WHEN r.fatal OR t.attempts + 1 >= $5 THEN 'infinity'::timestamptz
                                           ELSE now() + r.delay_ms * interval '1 millisecond' END
                 FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::bool[]) AS r(id, err, delay_ms, fatal)
                 WHERE t.id = r.id AND t.status = 'PENDING'
                 RETURNING t.id, t.status = 'FAILED' AS failed, t.attempts"
            ),
        }
    }
}

/// Handle to the outbox table.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    /// The scan's, the fetch's and the marks' own connections (`pool::hot`).
    hot: PgPool,
    table: TableName,
    sql: std::sync::Arc<Sql>,
}

impl Store {
    /// Open a pool. Fails fast (within `connect_timeout`) when the database is down.
    pub async fn connect(cfg: &DatabaseConfig, table: TableName) -> Result<Self, StoreError> {
        let opts = connect_options(cfg.url.expose())?.application_name("outbox-relay");
        let pool = pool_options(cfg.max_connections)
            .acquire_timeout(cfg.connect_timeout)
            .connect_with(opts)
            .await
            .map_err(StoreError::from)?;
        Ok(Self::from_pool(pool, table))
    }

    pub fn from_pool(pool: PgPool, table: TableName) -> Self {
        let sql = std::sync::Arc::new(Sql::new(&table));
        let hot = pool::hot(&pool);
        Self {
            pool,
            hot,
            table,
            sql,
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn table(&self) -> &TableName {
        &self.table
    }

    /// Up to `limit` due rows in `id` order from the given partitions (`None` = all),
    /// none of them behind a blocker of its aggregate. Walks the primary key from the
    /// start: for tests and small tables (the engine scans from its sweep's cursor).
    pub async fn claim(
        &self,
        partitions: Option<&[i32]>,
        limit: u32,
        on_failed: OnFailed,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        self.claim_after(0, partitions, limit, on_failed).await
    }

    /// Like `claim`, for rows with `id > after` only (a caller that knows every row at
    /// or below `after` is settled: the benchmark's claim + mark ceiling).
    pub async fn claim_after(
        &self,
        after: i64,
        partitions: Option<&[i32]>,
        limit: u32,
        on_failed: OnFailed,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        // Not a named prepared statement: Postgres would switch it to a *generic* plan
        // after five runs and keep that plan until the next ANALYZE. Cached while the
        // table is empty or unanalyzed (a fresh deployment), that plan probes blockers
        // with a sequential scan per claimed row — seconds per claim once rows pile up
        // (p50 latency 4 s at 2 000 rows/s in the bench). An unnamed statement is
        // planned for every claim with the table's real size (~0.3 ms).
        let rows = sqlx::query_as::<_, OutboxRow>(&self.sql.claim)
            .persistent(false)
            .bind(partitions)
            .bind(on_failed == OnFailed::Block)
            .bind(i64::from(limit))
            .bind(after)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows)
    }

    /// Mark confirmed rows `PROCESSED` in one statement. Returns how many changed.
    pub async fn mark_processed(&self, ids: &[i64]) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let done = sqlx::query(&self.sql.mark_processed)
            .bind(ids)
            .execute(&self.hot)
            .await?;
        Ok(done.rows_affected())
    }

    /// Record rejections in one statement: `attempts + 1`, `last_error`, the next try or
    /// `FAILED` once `max_attempts` is reached (or at once for `fatal`); a FAILED row's
    /// `next_attempt_at` is 'infinity' (it is a blocker until replayed or discarded). In
    /// skip mode a row that fails holds nothing back: the rows parked behind it while it
    /// waited for its retries are un-parked in the same transaction.
    pub async fn reject(
        &self,
        rejections: &[Rejection],
        max_attempts: u32,
        on_failed: OnFailed,
    ) -> Result<Vec<RejectOutcome>, StoreError> {
        if rejections.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = rejections.iter().map(|r| r.id).collect();
        let errs: Vec<&str> = rejections.iter().map(|r| r.error.as_str()).collect();
        let delays: Vec<i64> = rejections
            .iter()
            .map(|r| i64::try_from(r.retry_in.as_millis()).unwrap_or(i64::MAX))
            .collect();
        let fatal: Vec<bool> = rejections.iter().map(|r| r.fatal).collect();
        let mut tx = self.pool.begin().await?;
        let rows: Vec<(i64, bool, i32)> = sqlx::query_as(&self.sql.reject)
            .bind(&ids)
            .bind(&errs)
            .bind(&delays)
            .bind(&fatal)
            .bind(i32::try_from(max_attempts).unwrap_or(i32::MAX))
            .fetch_all(&mut *tx)
            .await?;
        if on_failed == OnFailed::Skip {
            let failed: Vec<i64> = rows.iter().filter(|r| r.1).map(|r| r.0).collect();
            if !failed.is_empty() {
                self.release_in(&mut tx, &failed, &[]).await?;
            }
        }
        tx.commit().await?;
        Ok(rows
            .into_iter()
            .map(|(id, failed, attempts)| RejectOutcome {
                id,
                failed,
                attempts,
            })
            .collect())
    }

    /// The NOTIFY channel, `relay_wake_<the table's oid>`.
    pub async fn notify_channel(&self) -> Result<String, StoreError> {
        Ok(self.wake_names().await?.0)
    }

    /// The NOTIFY channel and the doorbell's lock key (`store::doorbell`), both from
    /// the table's oid, in one lookup.
    pub async fn wake_names(&self) -> Result<(String, i32), StoreError> {
        let (oid, key): (i64, i32) =
            sqlx::query_as("SELECT to_regclass($1)::oid::bigint, to_regclass($1)::oid::int4")
                .bind(self.table.ident())
                .fetch_one(&self.pool)
                .await?;
        Ok((format!("relay_wake_{oid}"), key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_quote_the_table() {
        let sql = Sql::new(&TableName::parse("app.ev").unwrap());
        assert!(sql.claim.contains("FROM \"app\".\"ev\" o"));
        assert!(sql.mark_processed.contains("= ANY($1)"));
    }
}
