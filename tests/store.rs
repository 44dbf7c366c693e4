//! Store tests on a fresh database per test (`#[sqlx::test]`): claiming by status in id
//! order, blockers scoped to their aggregate, parking, marks, leases, replay/discard, the
//! claim floor, which errors mean the server cannot serve now.

use std::time::Duration;

use outbox_relay::config::OnFailed;
use outbox_relay::store::{Rejection, Store};
use outbox_relay::table::TableName;
use sqlx::PgPool;

async fn store(pool: PgPool) -> Store {
    let table = TableName::parse("outbox").unwrap();
    let mut conn = pool.acquire().await.unwrap();
    outbox_relay::migrate::migrate(&mut conn, &table)
        .await
        .unwrap();
    outbox_relay::migrate::check_schema(&mut conn, &table)
        .await
        .unwrap();
    Store::from_pool(pool, table)
}

/// Insert one row of `agg` (through the pool, or inside an open transaction).
async fn insert<'c>(ex: impl sqlx::PgExecutor<'c>, agg: &str) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('order', $1, 'e', '{\"a\": 1}') RETURNING id",
    )
    .bind(agg)
    .fetch_one(ex)
    .await
    .unwrap()
}

fn ids(rows: &[outbox_relay::model::OutboxRow]) -> Vec<i64> {
    rows.iter().map(|r| r.id).collect()
}

fn reject(id: i64, retry_in: Duration) -> Rejection {
    Rejection {
        id,
        error: format!("rejected {id}"),
        retry_in,
        fatal: false,
    }
}

#[sqlx::test(migrations = false)]
async fn claims_pending_rows_in_id_order_and_respects_limit(pool: PgPool) {
    let s = store(pool.clone()).await;
    let a = insert(&pool, "a").await;
    let b = insert(&pool, "b").await;
    let c = insert(&pool, "a").await;
    assert_eq!(
        ids(&s.claim(None, 10, OnFailed::Block).await.unwrap()),
        vec![a, b, c]
    );
    assert_eq!(
        ids(&s.claim(None, 2, OnFailed::Block).await.unwrap()),
        vec![a, b]
    );
    assert_eq!(s.mark_processed(&[a, b]).await.unwrap(), 2);
    assert_eq!(
        ids(&s.claim(None, 10, OnFailed::Block).await.unwrap()),
        vec![c]
    );
    // A late mark of an already-processed row changes nothing.
    assert_eq!(s.mark_processed(&[a]).await.unwrap(), 0);
}

#[sqlx::test(migrations = false)]
async fn a_row_in_backoff_holds_back_only_its_aggregate(pool: PgPool) {
    let s = store(pool.clone()).await;
    let a1 = insert(&pool, "a").await;
    let b1 = insert(&pool, "b").await;
    let a2 = insert(&pool, "a").await;
    let out = s
        .reject(&[reject(a1, Duration::from_secs(3600))], 5, OnFailed::Block)
        .await
        .unwrap();
    assert_eq!((out[0].failed, out[0].attempts), (false, 1));
    assert_eq!(
        ids(&s.claim(None, 10, OnFailed::Block).await.unwrap()),
        vec![b1],
        "a1 waits, a2 behind it"
    );
    // Due again: the aggregate moves in order.
    sqlx::query("UPDATE outbox SET next_attempt_at = now() - interval '1 second' WHERE id = $1")
        .bind(a1)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(
        ids(&s.claim(None, 10, OnFailed::Block).await.unwrap()),
        vec![a1, b1, a2]
    );
}

#[sqlx::test(migrations = false)]
async fn failed_rows_block_or_skip_and_replay_discard_release(pool: PgPool) {
    let s = store(pool.clone()).await;
    let a1 = insert(&pool, "a").await;
    let a2 = insert(&pool, "a").await;
    let b1 = insert(&pool, "b").await;
    let out = s
        .reject(&[reject(a1, Duration::ZERO)], 1, OnFailed::Block)
        .await
        .unwrap();
    assert!(out[0].failed, "max_attempts = 1: FAILED at once");
    assert_eq!(
        ids(&s.claim(None, 10, OnFailed::Block).await.unwrap()),
        vec![b1]
    );
    assert_eq!(
        ids(&s.claim(None, 10, OnFailed::Skip).await.unwrap()),
        vec![a2, b1]
    );
    let blocked = s.blocked_aggregates(10).await.unwrap();
    assert_eq!((blocked[0].failed_id, blocked[0].waiting), (a1, 1));

    assert_eq!(s.replay(Some(&[a1])).await.unwrap(), vec![a1]);
    let rows = s.claim(None, 10, OnFailed::Block).await.unwrap();
    assert_eq!(ids(&rows), vec![a1, a2, b1]);
    assert_eq!(rows[0].attempts, 0, "replay resets attempts");

    s.reject(&[reject(a1, Duration::ZERO)], 1, OnFailed::Block)
        .await
        .unwrap();
    assert_eq!(s.discard(&[a1]).await.unwrap(), vec![a1]);
    assert_eq!(
        ids(&s.claim(None, 10, OnFailed::Block).await.unwrap()),
        vec![a2, b1]
    );
    assert!(
        s.replay(None).await.unwrap().is_empty(),
        "a discarded row is not replayed"
    );
    let backlog = s.backlog().await.unwrap();
    assert_eq!(
        (backlog.pending, backlog.failed, backlog.discarded),
        (2, 0, 1)
    );
}

#[sqlx::test(migrations = false)]
async fn fatal_rejections_fail_at_once_with_their_error(pool: PgPool) {
    let s = store(pool.clone()).await;
    let a = insert(&pool, "a").await;
    let r = Rejection {
        id: a,
        error: "headers must be a JSON object".into(),
        retry_in: Duration::ZERO,
        fatal: true,
    };
    let out = s.reject(&[r], 10, OnFailed::Block).await.unwrap();
    assert!(out[0].failed);
    let (status, err): (String, String) =
        sqlx::query_as("SELECT status, last_error FROM outbox WHERE id = $1")
            .bind(a)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        (status.as_str(), err.as_str()),
        ("FAILED", "headers must be a JSON object")
    );
}

#[sqlx::test(migrations = false)]
async fn leases_share_partitions_and_expire(pool: PgPool) {
    let s = store(pool.clone()).await;
    let ttl = Duration::from_secs(30);
    assert_eq!(s.heartbeat("one", ttl).await.unwrap(), 1);
    assert_eq!(s.acquire_leases("one", ttl, 256).await.unwrap().len(), 256);
    assert_eq!(s.heartbeat("two", ttl).await.unwrap(), 2);
    assert!(
        s.acquire_leases("two", ttl, 128).await.unwrap().is_empty(),
        "all held"
    );
    let held = s.renew_leases("one", ttl).await.unwrap();
    s.release_leases("one", &held[128..]).await.unwrap();
    assert_eq!(s.acquire_leases("two", ttl, 128).await.unwrap().len(), 128);
    // "one" dies: its leases lapse and "two" can take them.
    sqlx::query("UPDATE outbox_relay_leases SET lease_until = now() - interval '1 second' WHERE owner = 'one'").execute(&pool).await.unwrap();
    assert!(
        s.renew_leases("one", ttl).await.unwrap().is_empty(),
        "an expired lease is not renewed"
    );
    assert_eq!(s.acquire_leases("two", ttl, 256).await.unwrap().len(), 128);
    // The claim filter only returns rows of the given partitions.
    let a = insert(&pool, "a").await;
    let part: i32 = sqlx::query_scalar("SELECT hashtext('order/a') & 255")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        ids(&s.claim(Some(&[part]), 10, OnFailed::Block).await.unwrap()),
        vec![a]
    );
    let other = (part + 1) % 256;
    assert!(s
        .claim(Some(&[other]), 10, OnFailed::Block)
        .await
        .unwrap()
        .is_empty());
    s.leave("two").await.unwrap();
    assert!(s.renew_leases("two", ttl).await.unwrap().is_empty());
}

#[sqlx::test(migrations = false)]
async fn custom_schema_qualified_table_migrates_and_claims(pool: PgPool) {
    let table = TableName::parse("events.order_outbox").unwrap();
    let mut conn = pool.acquire().await.unwrap();
    outbox_relay::migrate::migrate(&mut conn, &table)
        .await
        .unwrap();
    assert!(
        outbox_relay::migrate::migrate(&mut conn, &table)
            .await
            .unwrap()
            .is_empty(),
        "idempotent"
    );
    outbox_relay::migrate::check_schema(&mut conn, &table)
        .await
        .unwrap();
    sqlx::query("INSERT INTO events.order_outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('order', '1', 'e', '{}')")
        .execute(&pool)
        .await
        .unwrap();
    let s = Store::from_pool(pool.clone(), table);
    assert_eq!(s.claim(None, 10, OnFailed::Block).await.unwrap().len(), 1);
    let channel = s.notify_channel().await.unwrap();
    assert!(channel.starts_with("relay_wake_"));
    // The default table is untouched and unmigrated.
    let err = outbox_relay::migrate::check_schema(&mut conn, &TableName::parse("outbox").unwrap())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("outbox-relay migrate"));
}

#[sqlx::test(migrations = false)]
async fn claim_walks_the_primary_key_and_probes_blockers_through_the_partial_index(pool: PgPool) {
    let _s = store(pool.clone()).await;
    sqlx::query("INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) SELECT 'order', (g % 100)::text, 'e', '{}' FROM generate_series(1, 20000) g")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("ANALYZE outbox").execute(&pool).await.unwrap();
    let plan: Vec<String> = sqlx::query_scalar(
        "EXPLAIN SELECT o.id FROM outbox o WHERE o.id > 100 AND o.status = 'PENDING' AND (o.next_attempt_at IS NULL OR o.next_attempt_at < 'infinity'::timestamptz) AND (o.next_attempt_at IS NULL OR o.next_attempt_at <= now())
           AND NOT EXISTS (SELECT 1 FROM outbox b WHERE hashtext(b.aggregate_type || '/' || b.aggregate_id) = hashtext(o.aggregate_type || '/' || o.aggregate_id) AND b.aggregate_type = o.aggregate_type AND b.aggregate_id = o.aggregate_id AND b.id < o.id
             AND b.next_attempt_at IS NOT NULL AND ((b.status = 'FAILED' AND b.discarded_at IS NULL AND true) OR (b.status = 'PENDING' AND b.next_attempt_at > now())))
           ORDER BY o.id LIMIT 500",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let plan = plan.join("\n");
    assert!(
        plan.contains("outbox_blockers_idx"),
        "blocker probe uses the partial index:\n{plan}"
    );
    assert!(
        plan.contains("outbox_pkey"),
        "claim walks the primary key:\n{plan}"
    );
}

async fn hash(pool: &PgPool, agg: &str) -> i32 {
    sqlx::query_scalar("SELECT hashtext('order/' || $1)")
        .bind(agg)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn scanned(s: &Store) -> Vec<i64> {
    scan_from(s, 0).await.rows.iter().map(|r| r.id).collect()
}

async fn scan_from(s: &Store, after: i64) -> outbox_relay::store::ScanPage {
    s.scan(&outbox_relay::store::ScanQuery {
        after,
        partitions: None,
        limit: 100,
        examine: 100,
        skip: None,
        only: None,
        list_writers: true,
        skip_types: None,
        only_types: None,
    })
    .await
    .unwrap()
}

#[sqlx::test(migrations = false)]
async fn parked_rows_leave_the_scan_and_come_back_in_order(pool: PgPool) {
    let s = store(pool.clone()).await;
    let a1 = insert(&pool, "a").await;
    let a2 = insert(&pool, "a").await;
    let b1 = insert(&pool, "b").await;
    let a3 = insert(&pool, "a").await;
    let (ha, hb) = (hash(&pool, "a").await, hash(&pool, "b").await);
    assert_eq!(
        s.park(&[a2, b1], &[ha, hb], OnFailed::Block).await.unwrap(),
        0,
        "nothing FAILED: nothing parks"
    );
    s.reject(&[reject(a1, Duration::ZERO)], 1, OnFailed::Block)
        .await
        .unwrap();
    assert_eq!(
        s.park(&[a2, a3, b1], &[ha, ha, hb], OnFailed::Block)
            .await
            .unwrap(),
        2,
        "only the rows behind the FAILED row park"
    );
    assert_eq!(scanned(&s).await, vec![b1], "parked rows are not scanned");
    let (pending, _) = s.pending_gauge().await.unwrap();
    assert_eq!(pending, 3, "parked rows still count as PENDING");
    assert_eq!(s.backlog().await.unwrap().pending, 3);

    // Replay of the blocker un-parks its aggregate: everything comes back, in id order.
    assert_eq!(s.replay(Some(&[a1])).await.unwrap(), vec![a1]);
    assert_eq!(scanned(&s).await, vec![a1, a2, b1, a3]);
    assert_eq!(
        ids(&s.claim(None, 10, OnFailed::Block).await.unwrap()),
        vec![a1, a2, b1, a3]
    );

    // Discard likewise; skip mode's start un-parks everything.
    s.reject(&[reject(a1, Duration::ZERO)], 1, OnFailed::Block)
        .await
        .unwrap();
    assert_eq!(
        s.park(&[a2, a3], &[ha, ha], OnFailed::Block).await.unwrap(),
        2
    );
    assert_eq!(s.discard(&[a1]).await.unwrap(), vec![a1]);
    assert_eq!(scanned(&s).await, vec![a2, b1, a3]);
    let a4 = insert(&pool, "a").await;
    s.reject(&[reject(a2, Duration::ZERO)], 1, OnFailed::Block)
        .await
        .unwrap();
    assert_eq!(
        s.park(&[a3, a4], &[ha, ha], OnFailed::Block).await.unwrap(),
        2
    );
    assert_eq!(scanned(&s).await, vec![b1]);
    assert_eq!(s.unpark_all().await.unwrap(), 2);
    assert_eq!(scanned(&s).await, vec![b1, a3, a4]);
}

#[sqlx::test(migrations = false)]
async fn a_producer_with_insert_only_cannot_set_relay_owned_columns(pool: PgPool) {
    let _s = store(pool.clone()).await;
    let role = format!("producer_{}", std::process::id());
    sqlx::raw_sql(&format!(
        "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} NOLOGIN;
         GRANT USAGE ON SCHEMA public TO {role};
         GRANT INSERT ON outbox TO {role};
         GRANT SELECT (id, event_id) ON outbox TO {role};"
    ))
    .execute(&pool)
    .await
    .unwrap();
    let mut tx = pool.begin().await.unwrap();
    sqlx::raw_sql(&format!("SET LOCAL ROLE {role}"))
        .execute(&mut *tx)
        .await
        .unwrap();
    // As the producer: an id of its own is refused (schema 10), with the order lock on or
    // off (off, the trigger draws no id: a named one used to stay, and one far above the
    // sequence moved the relay's floor past every row drawn after it).
    for lock in ["on", "off"] {
        sqlx::raw_sql(&format!(
            "SET LOCAL outboxrelay.order_lock = {lock}; SAVEPOINT named"
        ))
        .execute(&mut *tx)
        .await
        .unwrap();
        let named = sqlx::query(
            "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload)
             VALUES (900000, 'order', 'p', 'e', '{}')",
        )
        .execute(&mut *tx)
        .await
        .unwrap_err();
        let code = named.as_database_error().and_then(|e| e.code());
        assert_eq!(code.as_deref(), Some("428C9"), "order lock {lock}: {named}");
        sqlx::raw_sql("ROLLBACK TO SAVEPOINT named; SET LOCAL outboxrelay.order_lock = on")
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    // Every relay-owned column set.
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload,
                             status, attempts, last_error, processed_at, next_attempt_at, discarded_at)
         VALUES ('order', 'p', 'e', '{}', 'PROCESSED', 9, 'x', now(), 'infinity', now())
         RETURNING id",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let row: (String, i32, Option<String>, bool, bool, bool) = sqlx::query_as(
        "SELECT status, attempts, last_error, processed_at IS NULL, next_attempt_at IS NULL,
                discarded_at IS NULL
         FROM outbox WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    sqlx::raw_sql(&format!(
        "REVOKE ALL ON outbox FROM {role}; REVOKE ALL ON SCHEMA public FROM {role}; DROP ROLE {role};"
    ))
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(row, ("PENDING".into(), 0, None, true, true, true));
}

#[sqlx::test(migrations = false)]
async fn the_order_lock_is_held_to_commit_unless_switched_off(pool: PgPool) {
    let _s = store(pool.clone()).await;
    // Order locks have one 64-bit key (objsubid 1); the doorbell's slots have two keys.
    let held = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 AND pid = pg_backend_pid()";
    // Calls of the trigger function by this session not yet flushed to the statistics
    // (schema 8: one trigger, no WHEN clause, one call per row whatever it decides);
    // compared before and after the insert, as earlier transactions' may be pending too.
    let calls = "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_xact_user_functions WHERE funcname LIKE 'outbox%'";
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SET LOCAL track_functions = 'pl'")
        .execute(&mut *tx)
        .await
        .unwrap();
    let before: i64 = count(&mut tx, calls).await;
    sqlx::query("INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('order', 'a', 'e', '{}'), ('order', 'b', 'e', '{}'), ('order', 'a', 'e', '{}')")
        .execute(&mut *tx)
        .await
        .unwrap();
    let n: i64 = count(&mut tx, held).await;
    assert_eq!(n, 2, "one lock per aggregate written, until commit");
    let n: i64 = count(&mut tx, calls).await;
    assert_eq!(n - before, 3, "the insert trigger's function, once per row");
    tx.commit().await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    for set in [
        "SET LOCAL outboxrelay.order_lock = off",
        "SET LOCAL track_functions = 'pl'",
    ] {
        sqlx::query(set).execute(&mut *tx).await.unwrap();
    }
    let before: i64 = count(&mut tx, calls).await;
    sqlx::query("INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('order', 'a', 'e', '{}')")
        .execute(&mut *tx)
        .await
        .unwrap();
    let n: i64 = count(&mut tx, held).await;
    assert_eq!(
        n, 0,
        "switched off for producers that lock the aggregate themselves"
    );
    let n: i64 = count(&mut tx, calls).await;
    assert_eq!(n - before, 1, "one call, taking no lock");
    // With the lock off, an insert that sets a relay-owned column still has it reset,
    // without the lock.
    let id: i64 = sqlx::query_scalar("INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, status, attempts, next_attempt_at) VALUES ('order', 'c', 'e', '{}', 'PROCESSED', 3, 'infinity') RETURNING id")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    let n: i64 = count(&mut tx, held).await;
    assert_eq!(n, 0, "the guard takes no lock");
    let n: i64 = count(&mut tx, calls).await;
    assert_eq!(n - before, 2, "one call per row");
    tx.commit().await.unwrap();
    let row: (String, i32, bool) = sqlx::query_as(
        "SELECT status, attempts, next_attempt_at IS NULL FROM outbox WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(row, ("PENDING".into(), 0, true));
}

/// A count read on `conn` (inside a test's transaction).
async fn count(conn: &mut sqlx::PgConnection, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(conn).await.unwrap()
}

#[path = "store/floor.rs"]
mod floor;

#[path = "store/gauge.rs"]
mod gauge;

#[path = "store/doorbell.rs"]
mod doorbell;

#[path = "store/errors.rs"]
mod errors;

#[path = "store/types.rs"]
mod types;

/// A retry blocks the rows after it in the fetch, due or not, unless it is read in the
/// same fetch or the caller holds it already (a retry that fell due between a claim's
/// scan and its fetch must not let a later row go first).
#[sqlx::test(migrations = false)]
async fn a_retry_holds_back_the_fetch_of_later_rows_unless_read_with_them_or_held(pool: PgPool) {
    let s = store(pool.clone()).await;
    let a1 = insert(&pool, "r").await;
    let a2 = insert(&pool, "r").await;
    s.reject(&[reject(a1, Duration::ZERO)], 5, OnFailed::Block)
        .await
        .unwrap();
    let fetch = |want: Vec<i64>, held: Vec<i64>| {
        let s = s.clone();
        async move {
            let (rows, _) = s
                .fetch(&want, OnFailed::Block, 1 << 20, None, &held)
                .await
                .unwrap();
            rows.iter().map(|r| r.row.id).collect::<Vec<i64>>()
        }
    };
    assert_eq!(
        fetch(vec![a2], vec![]).await,
        Vec::<i64>::new(),
        "due, not read"
    );
    assert_eq!(fetch(vec![a1, a2], vec![]).await, vec![a1, a2]);
    assert_eq!(
        fetch(vec![a2], vec![a1]).await,
        vec![a2],
        "held ahead of it"
    );
    s.reject(&[reject(a1, Duration::from_secs(3600))], 5, OnFailed::Block)
        .await
        .unwrap();
    assert_eq!(fetch(vec![a1, a2], vec![]).await, Vec::<i64>::new());
    assert_eq!(
        fetch(vec![a2], vec![a1]).await,
        Vec::<i64>::new(),
        "not due"
    );
}

#[path = "store/hot.rs"]
mod hot;
