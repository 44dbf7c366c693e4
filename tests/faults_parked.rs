//! Parked rows cost nothing per claim (issue #11, schema 3; schema 5: claims walk the
//! primary key above the floor): 200 000 PENDING rows behind 2 000 FAILED rows are
//! parked by the relay and fall below the floor; rows of other
//! aggregates written at 100 rows/s meanwhile are relayed while the claims read only them
//! (the index entries the claims read, counted by Postgres, not a clock), and `replay` of
//! one blocker releases its parked rows in id order. The latency of the other rows is
//! printed for the record, not asserted. And (schema 5) a retry waiting for an hour holds
//! back neither the claim floor nor the rest: the rows behind it park, and go out after it
//! once it does.
//! In the serial phase of `scripts/test.sh` (a `faults_` binary): it loads the database.

use std::time::{Duration, Instant};

use outbox_relay_testkit::{db::*, rabbit::*, relay_proc::*, wait::*};

const BLOCKERS: i64 = 2_000;
const BEHIND: i64 = 100;
const OTHERS: usize = 1_000;

/// Index entries returned so far by scans of the primary key (claims walk it above
/// the floor; fetches and marks look rows up in it too).
async fn claim_index_reads(table: &TestTable) -> i64 {
    sqlx::query_scalar(
        "SELECT idx_tup_read FROM pg_stat_user_indexes
         WHERE relname = $1 AND indexrelname = $1 || '_pkey'",
    )
    .bind(&table.name)
    .fetch_one(&table.pool)
    .await
    .unwrap()
}

/// Rows behind blockers that are not parked yet.
async fn unparked_behind(table: &TestTable) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{}\"
         WHERE aggregate_id LIKE 'blocked-%' AND status = 'PENDING'
           AND next_attempt_at IS DISTINCT FROM 'infinity'",
        table.name
    ))
    .fetch_one(&table.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parked_rows_cost_other_aggregates_nothing_and_replay_releases_them_in_order() {
    let table = TestTable::new("parked").await;
    let broker = TestBroker::new("parked").await;
    let t = table.name.clone();
    // 2 000 FAILED rows, each with 100 PENDING rows of its aggregate behind it (set up
    // with the insert guard off, as the relay would have left them).
    for chunk in 0..(BLOCKERS / 500) {
        let (lo, hi) = (chunk * 500, chunk * 500 + 499);
        table.setup_sql(&format!(
            "INSERT INTO \"{t}\" (aggregate_type, aggregate_id, event_type, payload, status, attempts, last_error, next_attempt_at)
             SELECT 'order', 'blocked-' || a, 'order.created', jsonb_build_object('seq', 0),
                    'FAILED', 3, 'set up as failed', 'infinity'
             FROM generate_series({lo}, {hi}) a ORDER BY a;
             INSERT INTO \"{t}\" (aggregate_type, aggregate_id, event_type, payload)
             SELECT 'order', 'blocked-' || a, 'order.created', jsonb_build_object('seq', s)
             FROM generate_series({lo}, {hi}) a, generate_series(1, {BEHIND}) s ORDER BY s, a"
        ))
        .await;
    }
    sqlx::raw_sql(&format!("VACUUM ANALYZE \"{t}\""))
        .execute(&table.pool)
        .await
        .unwrap();

    let relay = RelayProc::start(&relay_env(&t, &broker.exchange));
    let started = Instant::now();
    // Parking 200 000 rows (a claim's worth at a time, the debug relay) took 150–175 s on
    // a slow 2-core host (2026-12-07): one run in three missed a 180 s deadline there.
    wait_for(
        Duration::from_secs(420),
        "all rows behind FAILED rows parked",
        || async { (unparked_behind(&table).await == 0).then_some(()) },
    )
    .await;
    eprintln!(
        "parked {} rows in {:.1} s",
        BLOCKERS * BEHIND,
        started.elapsed().as_secs_f64()
    );

    // Dead index entries left by the parking updates are gone, as autovacuum would make
    // them in time.
    sqlx::raw_sql(&format!("VACUUM \"{t}\""))
        .execute(&table.pool)
        .await
        .unwrap();
    let reads_before = claim_index_reads(&table).await;

    // Other aggregates at 100 rows/s for 10 s.
    let t0 = Instant::now();
    for i in 0..OTHERS {
        let due = t0 + Duration::from_millis(10 * i as u64);
        tokio::time::sleep_until(due.into()).await;
        table
            .insert(
                &format!("free-{}", i % 50),
                "order.paid",
                None,
                serde_json::json!({}),
            )
            .await;
    }
    table
        .wait_status("PROCESSED", OTHERS as i64, Duration::from_secs(60))
        .await;
    let (p50, p99): (f64, f64) = sqlx::query_as(&format!(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms),
                percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)
         FROM (SELECT extract(epoch FROM processed_at - created_at) * 1000 AS ms
               FROM \"{t}\" WHERE aggregate_id LIKE 'free-%') x"
    ))
    .fetch_one(&table.pool)
    .await
    .unwrap();
    eprintln!("other rows behind 200 000 parked ones: commit -> PROCESSED p50 {p50:.1} ms, p99 {p99:.1} ms");
    // Every sweep claim walks the primary key from its low water mark; were the parked
    // rows above it, each claim would read 200 000 entries (hundreds of claims run in these 10 s).
    // Statistics reach the view within seconds; a parking-phase remainder arriving late
    // is far below the bound.
    let reads = claim_index_reads(&table).await - reads_before;
    eprintln!(
        "claim index entries read while relaying {OTHERS} other rows: {reads} ({:.1} per row)",
        reads as f64 / OTHERS as f64
    );
    assert!(
        reads < (BLOCKERS * BEHIND) * 5,
        "claims read {reads} index entries for {OTHERS} rows: parked rows are being scanned"
    );
    assert_eq!(
        unparked_behind(&table).await,
        0,
        "parked rows stayed parked"
    );
    broker.take(OTHERS, Duration::from_secs(30)).await;

    // Replay one blocker: it and its 100 parked rows go out, in id order.
    let blocker: i64 = sqlx::query_scalar(&format!(
        "SELECT id FROM \"{t}\" WHERE aggregate_id = 'blocked-7' AND status = 'FAILED'"
    ))
    .fetch_one(&table.pool)
    .await
    .unwrap();
    let (code, out, err) = run_cmd(
        &relay_env(&t, &broker.exchange),
        &["replay", "--id", &blocker.to_string()],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let got = broker
        .take(BEHIND as usize + 1, Duration::from_secs(60))
        .await;
    let index = table.index().await;
    let ids: Vec<i64> = got
        .iter()
        .map(|g| index.get(&g.message_id).expect("a row of the table").0)
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "in id order: {ids:?}");
    assert_eq!(ids.first(), Some(&blocker));
    assert!(got
        .iter()
        .all(|g| g.headers.get("aggregate_id").map(String::as_str) == Some("blocked-7")));
    let (status, _, _) = table.row(blocker).await;
    assert_eq!(status, "PROCESSED");
    let left: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{t}\" WHERE aggregate_id = 'blocked-7' AND status = 'PENDING'"
    ))
    .fetch_one(&table.pool)
    .await
    .unwrap();
    assert_eq!(left, 0);
    drop(relay);
    broker.cleanup().await;
    table.cleanup().await;
}

/// The stored claim floor of `table`.
async fn floor(table: &TestTable) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT floor FROM \"{}_relay_floor\" WHERE singleton",
        table.name
    ))
    .fetch_one(&table.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_waiting_an_hour_holds_back_neither_the_floor_nor_its_neighbours() {
    let table = TestTable::new("parkretry").await;
    let broker = TestBroker::new("parkretry").await;
    let nowhere = format!("{}_nowhere", broker.exchange);
    broker.declare_unbound(&nowhere).await;
    let mut env = relay_env(&table.name, &broker.exchange);
    env.push(("OUTBOX_RELAY__RELAY__BACKOFF_INITIAL".into(), "1h".into()));
    env.push(("OUTBOX_RELAY__RELAY__BACKOFF_MAX".into(), "1h".into()));
    let relay = RelayProc::start(&env);
    // a1 cannot be routed: rejected once, it waits an hour; a2 and a3 are behind it.
    let a1 = table
        .insert(
            "held",
            "order.created",
            Some(&nowhere),
            serde_json::json!({}),
        )
        .await;
    let a2 = table
        .insert("held", "order.paid", None, serde_json::json!({}))
        .await;
    wait_for(
        Duration::from_secs(30),
        "a1 rejected once and a2 parked",
        || async {
            let parked: bool = sqlx::query_scalar(&format!(
                "SELECT coalesce(next_attempt_at = 'infinity', false) FROM \"{}\" WHERE id = $1",
                table.name
            ))
            .bind(a2)
            .fetch_one(&table.pool)
            .await
            .unwrap();
            (table.row(a1).await.1 == 1 && parked).then_some(())
        },
    )
    .await;
    for i in 0..200 {
        table
            .insert(
                &format!("free-{i}"),
                "order.paid",
                None,
                serde_json::json!({}),
            )
            .await;
    }
    let a3 = table
        .insert("held", "order.shipped", None, serde_json::json!({}))
        .await;
    table
        .wait_status("PROCESSED", 200, Duration::from_secs(60))
        .await;
    let free = broker.take(200, Duration::from_secs(30)).await;
    assert_eq!(free.len(), 200, "the other aggregates flowed");
    // The leader raises the floor past the waiting retry and the rows parked behind it.
    wait_for(
        Duration::from_secs(30),
        "the floor past every row of the held aggregate",
        || async { (floor(&table).await >= a3).then_some(()) },
    )
    .await;

    // Fixed by hand and due now: a1 goes out, then the rows parked behind it, in order.
    table
        .setup_sql(&format!(
            "UPDATE \"{}\" SET destination = NULL, next_attempt_at = now() WHERE id = {a1}",
            table.name
        ))
        .await;
    let got = broker.take(3, Duration::from_secs(30)).await;
    let index = table.index().await;
    let ids: Vec<i64> = got
        .iter()
        .map(|g| index.get(&g.message_id).expect("a row of the table").0)
        .collect();
    assert_eq!(ids, vec![a1, a2, a3]);
    table
        .wait_status("PROCESSED", 203, Duration::from_secs(30))
        .await;
    drop(relay);
    broker.delete_exchange(&nowhere).await;
    broker.cleanup().await;
    table.cleanup().await;
}
