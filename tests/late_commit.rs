//! A row that commits after a later row of its aggregate was already sent — possible only
//! when producers switch the order lock off (`outboxrelay.order_lock = off`) and then do
//! not serialize the aggregate themselves — is still delivered, and counted in
//! `outbox_relay_late_rows_total` (SPEC's metric; README "Late commits", issue #11).

use std::time::Duration;

use outbox_relay_testkit::{rabbit::*, relay_proc::*};
use sqlx::{Connection, PgConnection};

/// Insert one row of aggregate `agg` in an open transaction with the order lock off.
async fn insert_unlocked(conn: &mut PgConnection, table: &str, agg: &str) -> i64 {
    sqlx::query("BEGIN").execute(&mut *conn).await.unwrap();
    sqlx::query("SET LOCAL outboxrelay.order_lock = off")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query_scalar(&format!(
        "INSERT INTO \"{table}\" (aggregate_type, aggregate_id, event_type, payload)
         VALUES ('order', $1, 'order.created', '{{}}') RETURNING id"
    ))
    .bind(agg)
    .fetch_one(&mut *conn)
    .await
    .unwrap()
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
    let order: Vec<String> = got.iter().map(|g| g.message_id.clone()).collect();
    let event_id = |id: i64| {
        let sql = format!(
            "SELECT event_id::text FROM \"{}\" WHERE id = $1",
            table.name
        );
        let pool = table.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(&sql)
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(
        order,
        vec![event_id(y).await, event_id(x).await],
        "y went out first, x when it committed"
    );
    drop(relay);
    broker.cleanup_with(&table).await;
}
