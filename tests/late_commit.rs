//! A row that commits after a later row of its aggregate was already sent — possible only
//! when producers switch the order lock off (`outboxrelay.order_lock = off`) and then do
//! not serialize the aggregate themselves — is still delivered, and counted in
//! `outbox_relay_late_rows_total` (SPEC's metric; README "Late commits", issue #11). And
//! with the order lock on, a row still open when a later row of another aggregate went
//! out is not passed by the sweep, even when its transaction's xid is newer than every
//! ended one (so no snapshot lists it as running; the horizon waits for the table's
//! writers, `store::floor::the_probe_lists_every_open_writer_of_the_table`).

use std::time::Duration;

use outbox_relay_testkit::{db::*, rabbit::*, relay_proc::*};
use sqlx::{Connection, PgConnection};

/// Insert one row of aggregate `agg` in an open transaction with the order lock off.
async fn insert_unlocked(conn: &mut PgConnection, table: &str, agg: &str) -> i64 {
    sqlx::query("BEGIN").execute(&mut *conn).await.unwrap();
    sqlx::query("SET LOCAL outboxrelay.order_lock = off")
        .execute(&mut *conn)
        .await
        .unwrap();
    insert_row(&mut *conn, table, agg).await.unwrap()
}

/// The ids of the first `n` messages in the queue, in arrival order.
async fn delivered(table: &TestTable, broker: &TestBroker, n: usize) -> Vec<i64> {
    let got = broker.take(n, Duration::from_secs(10)).await;
    let index = table.index().await;
    got.iter().map(|g| index[&g.message_id].0).collect()
}

/// A table and broker with a relay running on them, and two producer connections.
async fn relay_and_producers(
    name: &str,
) -> (TestTable, TestBroker, RelayProc, PgConnection, PgConnection) {
    let (table, broker) = table_and_broker(name).await;
    let relay = RelayProc::start(&relay_env(&table.name, &broker.exchange));
    relay.ready().await;
    let url = outbox_relay_testkit::pg_url();
    let first = PgConnection::connect(&url).await.unwrap();
    let second = PgConnection::connect(&url).await.unwrap();
    (table, broker, relay, first, second)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_committed_behind_a_sent_one_is_delivered_and_counted() {
    let (table, broker, relay, mut first, mut second) = relay_and_producers("late_commit").await;
    // x draws its id first and stays open; y, drawn after it, commits and goes out.
    let x = insert_unlocked(&mut first, &table.name, "late-agg").await;
    let y = insert_unlocked(&mut second, &table.name, "late-agg").await;
    assert!(x < y);
    sqlx::query("COMMIT").execute(&mut second).await.unwrap();
    table
        .wait_status("PROCESSED", 1, Duration::from_secs(30))
        .await;
    assert_eq!(table.row(y).await.0, "PROCESSED");
    wait_metric(
        &relay,
        "outbox_relay_late_rows_total",
        Duration::from_secs(5),
        |v| v == 0.0,
    )
    .await;
    sqlx::query("COMMIT").execute(&mut first).await.unwrap();
    table
        .wait_status("PROCESSED", 2, Duration::from_secs(30))
        .await;
    wait_metric(
        &relay,
        "outbox_relay_late_rows_total",
        Duration::from_secs(10),
        |v| v == 1.0,
    )
    .await;
    assert_eq!(
        delivered(&table, &broker, 2).await,
        vec![y, x],
        "y went out first, x when it committed"
    );
    drop(relay);
    broker.cleanup_with(&table).await;
}

/// T took its xid after U did but drew its id (for aggregate a) before U drew its own
/// (aggregate b); U commits and goes out while T is open. A snapshot then has xmin =
/// xmax = U's xid + 1: T's xid shows nowhere. The sweep must not pass T's id: when T
/// commits, its row goes out, and before the row aggregate a writes after it. (End to
/// end, this does not always set the trap: any write ending with a newer xid in between
/// — the relay's own heartbeat — lists T again; `store::floor::the_probe_lists_every_…`
/// checks the probe's side of it deterministically.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_open_producer_newer_than_every_ended_transaction_is_not_passed() {
    let (table, broker, relay, mut u, mut t) = relay_and_producers("late_xid").await;
    let xid = |c: &'static str| format!("SELECT pg_current_xact_id()::text::bigint /* {c} */");
    sqlx::query("BEGIN").execute(&mut u).await.unwrap();
    let ux: i64 = sqlx::query_scalar(&xid("u"))
        .fetch_one(&mut u)
        .await
        .unwrap();
    sqlx::query("BEGIN").execute(&mut t).await.unwrap();
    let tx: i64 = sqlx::query_scalar(&xid("t"))
        .fetch_one(&mut t)
        .await
        .unwrap();
    assert!(tx > ux);
    let open = insert_row(&mut t, &table.name, "late-xid-a").await.unwrap();
    let sent = insert_row(&mut u, &table.name, "late-xid-b").await.unwrap();
    assert!(open < sent);
    sqlx::query("COMMIT").execute(&mut u).await.unwrap();
    table
        .wait_status("PROCESSED", 1, Duration::from_secs(30))
        .await;
    assert_eq!(table.row(sent).await.0, "PROCESSED");
    sqlx::query("COMMIT").execute(&mut t).await.unwrap();
    let after = insert_row(&table.pool, &table.name, "late-xid-a")
        .await
        .unwrap();
    table
        .wait_status("PROCESSED", 3, Duration::from_secs(30))
        .await;
    assert_eq!(delivered(&table, &broker, 3).await, vec![sent, open, after]);
    let late = relay.metric("outbox_relay_late_rows_total").await;
    assert_eq!(late.unwrap_or(0.0), 0.0, "nothing went out of order");
    drop(relay);
    broker.cleanup_with(&table).await;
}
