//! A row that commits after a later row of its aggregate was already sent — possible only
//! when producers switch the order lock off (`outboxrelay.order_lock = off`) and then do
//! not serialize the aggregate themselves — is still delivered, and counted in
//! `outbox_relay_late_rows_total` (SPEC's metric; README "Late commits", issue #11).

use std::time::Duration;

use outbox_relay_testkit::{db::insert_row, rabbit::*, relay_proc::*};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_committed_behind_a_sent_one_is_delivered_and_counted() {
    let (table, broker) = table_and_broker("late_commit").await;
    let relay = RelayProc::start(&relay_env(&table.name, &broker.exchange));
    relay.ready().await;
    let url = outbox_relay_testkit::pg_url();
    let (mut first, mut second) = (
        PgConnection::connect(&url).await.unwrap(),
        PgConnection::connect(&url).await.unwrap(),
    );
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
    let got = broker.take(2, Duration::from_secs(10)).await;
    let index = table.index().await;
    let order: Vec<i64> = got.iter().map(|g| index[&g.message_id].0).collect();
    assert_eq!(order, vec![y, x], "y went out first, x when it committed");
    drop(relay);
    broker.cleanup_with(&table).await;
}
