//! A partition lost and regained while one of its aggregates still has a message out, in
//! process against the real Postgres with a recording sink: the aggregate is dropped from
//! memory only when that message comes back, and the sweep, which passed over its rows
//! meanwhile, must not take a later row of it before the rows it dropped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use outbox_relay_testkit::{db::*, recording::*, wait::*};

/// When the relay's leases other than `p`'s run out (each renewal moves it on).
async fn renewed_until(table: &TestTable, p: i32) -> DateTime<Utc> {
    sqlx::query_scalar(&format!(
        "SELECT max(lease_until) FROM \"{}_relay_leases\" WHERE partition <> $1",
        table.name
    ))
    .bind(p)
    .fetch_one(&table.pool)
    .await
    .expect("leases")
}

/// Wait until the relay has renewed its leases after now: that renewal read the lease
/// table as it is now (the engine takes its outcome in right after).
async fn a_renewal(table: &TestTable, p: i32) {
    let was = renewed_until(table, p).await;
    wait_until(Duration::from_secs(10), "a lease renewal", || async {
        renewed_until(table, p).await > was
    })
    .await;
}

async fn row(table: &TestTable, agg: &str) -> i64 {
    table.insert(agg, "e", None, serde_json::json!({})).await
}

/// Set partition `p`'s lease: to a thief for an hour, or free.
async fn set_lease(table: &TestTable, p: i32, owner: Option<&str>) {
    sqlx::query(&format!(
        "UPDATE \"{}_relay_leases\" SET owner = $2,
            lease_until = CASE WHEN $2 IS NULL THEN '-infinity'::timestamptz
                               ELSE now() + interval '1 hour' END
         WHERE partition = $1",
        table.name
    ))
    .bind(p)
    .bind(owner)
    .execute(&table.pool)
    .await
    .expect("set lease");
}

/// Window of 4 rows, 2 in flight (lease_timeout 8 s). x1 (out, its confirm held) and x2 of aggregate "x" are in
/// memory when x's partition is stolen (x is doomed: dropped when x1 comes back) and then
/// handed back. While x1 is out the sweep passes over x's rows; once x1 is confirmed and
/// x2 has left memory, x3 must not go out before x2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregate_dropped_after_its_partition_came_back_keeps_its_order() {
    with_table("eng_regain", |table| async move {
        let x1 = row(&table, "x").await;
        let x2 = row(&table, "x").await;
        for i in 1..=4 {
            row(&table, &format!("o{i}")).await;
        }
        let x3 = row(&table, "x").await;
        for i in 5..=8 {
            row(&table, &format!("o{i}")).await;
        }
        let holding = Arc::new(AtomicBool::new(true));
        let hold = holding.clone();
        let sink = RecordingSink::new(hold_if(move |_, _| hold.load(Ordering::SeqCst)));
        let mut c = cfg();
        c.max_in_flight = 2;
        c.batch_size = 4;
        // x1 stays out for two lease renewals (every lease_timeout / 4): its confirm must
        // not time out meanwhile.
        c.lease_timeout = Duration::from_secs(8);
        c.publish_timeout = Duration::from_millis(7500);
        let (relay, ledger) = start_recorded(&table, sink, c);
        let out = ledger.wait_held(2, "two rows out").await;
        assert!(out.iter().any(|h| h.0 == x1), "x1 is out: {out:?}");

        let p = partition_of(&table, "x").await;
        // Stolen: the next renewal finds it gone (x is doomed, x1 being out); handed
        // back: the one after takes it again.
        set_lease(&table, p, Some("thief")).await;
        a_renewal(&table, p).await;
        set_lease(&table, p, None).await;
        wait_until(Duration::from_secs(10), "x's partition back", || async {
            owners(&table).await[&p]
                .as_deref()
                .is_some_and(|o| o != "thief")
        })
        .await;

        // The other row out comes back: the sweep moves on, passing over x's rows.
        let other = out.iter().find(|h| h.0 != x1).map(|h| h.0).unwrap();
        assert!(
            ledger
                .release_and_wait(other, Duration::from_secs(10))
                .await
        );
        ledger.wait_held(2, "x1 and the next row out").await;
        // x1 comes back: x leaves memory (x2 with it).
        assert!(ledger.release_and_wait(x1, Duration::from_secs(10)).await);
        holding.store(false, Ordering::SeqCst);
        for (id, _, _) in ledger.held() {
            ledger.release(id, Ok(()));
        }
        table
            .wait_status("PROCESSED", 11, Duration::from_secs(20))
            .await;
        relay.stop(Duration::from_secs(5)).await;
        let first = |id: i64| ledger.sends().iter().position(|s| s.id == id).unwrap();
        assert!(
            first(x2) < first(x3),
            "x2 went out after x3: {:?}",
            ledger.sends().iter().map(|s| s.id).collect::<Vec<_>>()
        );
        assert_clean(&ledger, 2, &rows(&table).await);
    })
    .await;
}
