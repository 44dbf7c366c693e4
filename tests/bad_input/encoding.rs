//! A `SQL_ASCII` database stores text bytes as given, UTF-8 or not. Postgres refuses to
//! send a value that is not UTF-8 to the relay's UTF-8 session, and one such row once
//! failed every claim that read it: nothing the instance served moved. Now the row fails
//! alone, naming the column, and the rows around it go out unchanged (non-ASCII UTF-8
//! included); `status` shows the unreadable key escaped.

use std::time::Duration;

use outbox_relay::table::TableName;
use outbox_relay_testkit::{db::ScratchDb, rabbit::TestBroker, relay_proc::*, wait::wait_for};
use sqlx::Connection as _;

/// A bad row: the column that is not UTF-8, and the row's key, event type, payload and
/// headers as bytes.
type BadRow = (
    &'static str,
    &'static [u8],
    &'static [u8],
    &'static [u8],
    &'static [u8],
);

/// Insert a row whose text columns are the given bytes (stored as given: `SQL_ASCII`).
async fn insert(
    db: &ScratchDb,
    key: &[u8],
    event_type: &[u8],
    payload: &[u8],
    headers: &[u8],
) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers)
         VALUES ('order', convert_from($1, 'SQL_ASCII'), convert_from($2, 'SQL_ASCII'),
                 convert_from($3, 'SQL_ASCII')::jsonb, convert_from($4, 'SQL_ASCII')::jsonb)
         RETURNING id",
    )
    .bind(key)
    .bind(event_type)
    .bind(payload)
    .bind(headers)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

async fn status_of(db: &ScratchDb, id: i64) -> (String, i32, String) {
    sqlx::query_as("SELECT status, attempts, coalesce(last_error, '') FROM outbox WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_that_is_not_utf8_in_a_sql_ascii_database_fails_alone() {
    let db = ScratchDb::with_encoding("relay_ascii", "SQL_ASCII").await;
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    outbox_relay::migrate::migrate(&mut conn, &TableName::parse("outbox").unwrap())
        .await
        .unwrap();
    conn.close().await.unwrap();
    let broker = TestBroker::new("ascii").await;

    // Good rows between the bad ones, on four aggregates; one is UTF-8 beyond ASCII.
    let mut good = Vec::new();
    let mut bad = Vec::new();
    let good_row = |i: usize| format!(r#"{{"n": {i}}}"#).into_bytes();
    for i in 0..3 {
        good.push(
            insert(
                &db,
                format!("good-{i}").as_bytes(),
                b"order.created",
                &good_row(i),
                b"{}",
            )
            .await,
        );
    }
    let unicode = insert(
        &db,
        "café-☃".as_bytes(),
        b"order.created",
        r#"{"name": "Zoë ☃"}"#.as_bytes(),
        b"{}",
    )
    .await;
    good.push(unicode);
    let cases: [BadRow; 4] = [
        ("aggregate_id", b"k\xff", b"order.created", b"{}", b"{}"),
        ("event_type", b"bad-event", b"order.\xfe", b"{}", b"{}"),
        (
            "payload",
            b"bad-payload",
            b"order.created",
            b"{\"a\": \"\xfe\"}",
            b"{}",
        ),
        (
            "headers",
            b"bad-headers",
            b"order.created",
            b"{}",
            b"{\"h\": \"x\xc3\"}",
        ),
    ];
    for (i, (column, key, event_type, payload, headers)) in cases.iter().enumerate() {
        bad.push((
            *column,
            insert(&db, key, event_type, payload, headers).await,
        ));
        good.push(
            insert(
                &db,
                format!("good-{}", i % 4).as_bytes(),
                b"order.created",
                &good_row(10 + i),
                b"{}",
            )
            .await,
        );
    }
    // Later rows of the unreadable key wait behind its FAILED row (block mode).
    let behind = [
        insert(&db, b"k\xff", b"order.created", b"{}", b"{}").await,
        insert(&db, b"k\xff", b"order.created", b"{}", b"{}").await,
    ];

    let mut env = relay_env("outbox", &broker.exchange);
    env.push(("OUTBOX_RELAY__DATABASE__URL".into(), db.url.clone()));
    let relay = RelayProc::start(&env);
    wait_for(
        Duration::from_secs(60),
        "the good rows relayed and the bad ones failed",
        || async {
            let (processed, failed): (i64, i64) = sqlx::query_as(
                "SELECT count(*) FILTER (WHERE status = 'PROCESSED'),
                        count(*) FILTER (WHERE status = 'FAILED') FROM outbox",
            )
            .fetch_one(&db.pool)
            .await
            .unwrap();
            (processed == good.len() as i64 && failed == bad.len() as i64).then_some(())
        },
    )
    .await;
    for (column, id) in &bad {
        let (status, attempts, err) = status_of(&db, *id).await;
        println!("{column:<14} {status} {attempts} {err}");
        assert_eq!(
            (status.as_str(), attempts),
            ("FAILED", 1),
            "{column}: {err}"
        );
        assert!(
            err.contains(&format!("{column} (byte 0x")),
            "{column}: {err}"
        );
        assert!(err.contains("not UTF-8"), "{column}: {err}");
    }
    for id in behind {
        assert_eq!(
            status_of(&db, id).await.0,
            "PENDING",
            "row {id} waits behind the failed key"
        );
    }

    let got = broker.take(good.len(), Duration::from_secs(30)).await;
    let zoe = got
        .iter()
        .find(|g| g.headers.get("aggregate_id").map(String::as_str) == Some("café-☃"))
        .expect("the UTF-8 row arrived with its key");
    assert_eq!(String::from_utf8_lossy(&zoe.body), r#"{"name": "Zoë ☃"}"#);
    assert_eq!(broker.depth().await, 0, "only the good rows were published");

    let (code, out, err) = run_cmd(&env, &["status"]).await;
    assert_eq!(code, 0, "status works beside the unreadable rows: {err}");
    assert!(
        out.contains(r"k\377"),
        "the unreadable key shown escaped: {out}"
    );
    assert_eq!(
        relay.get("/livez").await.map(|r| r.0),
        Some(200),
        "the relay is live"
    );
    drop(relay);
    broker.cleanup().await;
    db.drop_all().await;
}
