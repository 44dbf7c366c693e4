//! End to end against the real Postgres and RabbitMQ: the relay binary relays rows
//! committed by concurrent producer transactions, maps them as SPEC §2 says, fails bad
//! rows on their own, survives SIGKILL, shuts down on SIGTERM, and refuses bad config.

use std::time::{Duration, Instant};

use outbox_relay_testkit::{db::*, order::*, rabbit::*, relay_proc::*, unique};

/// (event_id, aggregate_id, event_type, payload, headers, created_at, processed_at)
type RowView = (
    uuid::Uuid,
    String,
    String,
    serde_json::Value,
    serde_json::Value,
    chrono::DateTime<chrono::Utc>,
    Option<chrono::DateTime<chrono::Utc>>,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_rows_from_eight_producers_arrive_mapped_and_processed() {
    let (table, broker) = table_and_broker("e2e").await;
    let relay = RelayProc::start(&relay_env(&table.name, &broker.exchange));
    table.produce(10_000, 200, 8).await;
    let got = broker.take(10_000, Duration::from_secs(120)).await;
    table
        .wait_status("PROCESSED", 10_000, Duration::from_secs(30))
        .await;

    let rows: Vec<RowView> =
        sqlx::query_as(&format!(
            "SELECT event_id, aggregate_id, event_type, payload, headers, created_at, processed_at FROM \"{}\"",
            table.name
        ))
        .fetch_all(&table.pool)
        .await
        .unwrap();
    let by_id: std::collections::HashMap<String, _> =
        rows.iter().map(|r| (r.0.to_string(), r)).collect();
    let mut unique = std::collections::HashSet::new();
    for g in &got {
        let r = by_id
            .get(&g.message_id)
            .expect("message_id is a row's event_id");
        unique.insert(g.message_id.clone());
        assert_eq!(g.kind, r.2, "type = event_type");
        assert_eq!(g.routing_key, r.2, "routing key defaults to event_type");
        assert_eq!(g.content_type, "application/json");
        assert_eq!(g.delivery_mode, 2, "persistent");
        assert_eq!(g.headers["event_type"], r.2);
        assert_eq!(g.headers["aggregate_type"], "order");
        assert_eq!(g.headers["aggregate_id"], r.1);
        for (k, v) in r.4.as_object().unwrap() {
            assert_eq!(g.headers[k], v.as_str().unwrap(), "row header {k} copied");
        }
        let body: serde_json::Value = serde_json::from_slice(&g.body).expect("body is JSON");
        assert_eq!(body, r.3, "body = payload");
        assert!(r.6.is_some(), "processed_at set");
    }
    assert_eq!(unique.len(), 10_000, "every row arrived");
    let dups = assert_order(&got, &table.index().await);
    println!("10000 rows: {} deliveries, {dups} duplicates", got.len());
    drop(relay);
    broker.cleanup_with(&table).await;
}

/// Rows `a<i>` for each `i` in `range`, each on its own aggregate; their ids to `ids`.
async fn insert_plain(table: &TestTable, range: std::ops::Range<usize>, ids: &mut Vec<i64>) {
    for i in range {
        let agg = format!("a{i}");
        ids.push(
            table
                .insert(&agg, "order.created", None, serde_json::json!({}))
                .await,
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_exchange_fails_its_row_only_and_names_the_exchange() {
    let (table, broker) = table_and_broker("noexch").await;
    let missing = unique("missing_exchange");
    let mut ids = Vec::new();
    insert_plain(&table, 0..20, &mut ids).await;
    let bad = table
        .insert(
            "bad",
            "order.created",
            Some(&missing),
            serde_json::json!({}),
        )
        .await;
    insert_plain(&table, 20..40, &mut ids).await;
    let relay = RelayProc::start(&relay_env(&table.name, &broker.exchange));
    table
        .wait_statuses(&[("PROCESSED", 40), ("FAILED", 1)], Duration::from_secs(30))
        .await;
    let (status, attempts, err) = table.row(bad).await;
    assert_eq!(status, "FAILED");
    assert_eq!(attempts, 3, "max_attempts = 3");
    let err = err.unwrap();
    assert!(
        err.contains(&missing),
        "last_error names the exchange: {err}"
    );
    assert_eq!(broker.take(40, Duration::from_secs(10)).await.len(), 40);
    drop(relay);
    broker.cleanup_with(&table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_rows_fail_alone_with_readable_errors() {
    let (table, broker) = table_and_broker("badrow").await;
    let good = table
        .insert("g1", "order.created", None, serde_json::json!({"k": "v"}))
        .await;
    let not_object = table
        .insert("g2", "order.created", None, serde_json::json!(["x"]))
        .await;
    let not_string = table
        .insert("g3", "order.created", None, serde_json::json!({"n": 1}))
        .await;
    let empty_agg = table
        .insert("", "order.created", None, serde_json::json!({}))
        .await;
    let relay = RelayProc::start(&relay_env(&table.name, &broker.exchange));
    table
        .wait_statuses(&[("PROCESSED", 1), ("FAILED", 3)], Duration::from_secs(30))
        .await;
    assert_eq!(table.row(good).await.0, "PROCESSED");
    let e = table.row(not_object).await.2.unwrap();
    assert!(e.contains("headers must be a JSON object"), "{e}");
    let e = table.row(not_string).await.2.unwrap();
    assert!(e.contains("\"n\" holds a number"), "{e}");
    let e = table.row(empty_agg).await.2.unwrap();
    assert!(e.contains("aggregate_id is empty"), "{e}");
    drop(relay);
    broker.cleanup_with(&table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unroutable_message_is_a_rejection() {
    let (table, broker) = table_and_broker("unroute").await;
    // An exchange that exists but has no queue bound: the message is returned (mandatory).
    let lonely = unique("lonely");
    broker.declare_unbound(&lonely).await;
    let bad = table
        .insert("u1", "order.created", Some(&lonely), serde_json::json!({}))
        .await;
    let ok = table
        .insert("u2", "order.created", None, serde_json::json!({}))
        .await;
    let relay = RelayProc::start(&relay_env(&table.name, &broker.exchange));
    table
        .wait_status("FAILED", 1, Duration::from_secs(30))
        .await;
    let (_, attempts, err) = table.row(bad).await;
    assert_eq!(attempts, 3);
    assert!(err.unwrap().contains("unroutable"));
    assert_eq!(table.row(ok).await.0, "PROCESSED");
    broker.delete_exchange(&lonely).await;
    drop(relay);
    broker.cleanup_with(&table).await;
}

/// Under load the broker confirms many messages with one `basic.ack` (multiple), and a
/// `basic.return` is not tied to a delivery tag: the unroutable message must still be the
/// one judged unroutable (by its message id), never a neighbour confirmed in the same ack.
/// One attempt each (and `skip`, so a FAILED row holds nothing back), so a single mix-up
/// shows: a good row FAILED, an unroutable one PROCESSED.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unroutable_messages_among_thousands_are_told_apart() {
    let (table, broker) = table_and_broker("unroute_many").await;
    let lonely = unique("lonely_many");
    broker.declare_unbound(&lonely).await;
    let sql = format!(
        "INSERT INTO \"{}\" (aggregate_type, aggregate_id, event_type, destination, payload)
         SELECT 'order', 'm' || (g % 400), 'order.created',
                CASE WHEN g % 10 = 0 THEN $1 END, '{{}}'
         FROM generate_series(1, 20000) AS g",
        table.name
    );
    sqlx::query(&sql)
        .bind(&lonely)
        .execute(&table.pool)
        .await
        .unwrap();
    let mut env = relay_env(&table.name, &broker.exchange);
    env.push(("OUTBOX_RELAY__RELAY__MAX_ATTEMPTS".into(), "1".into()));
    env.push(("OUTBOX_RELAY__RELAY__ON_FAILED".into(), "skip".into()));
    let relay = RelayProc::start(&env);
    outbox_relay_testkit::wait::wait_until(
        Duration::from_secs(120),
        "20 000 rows settled",
        || async { table.count("PROCESSED").await + table.count("FAILED").await == 20000 },
    )
    .await;
    let wrong: Vec<(i64, Option<String>, String, Option<String>)> = sqlx::query_as(&format!(
        "SELECT id, destination, status, last_error FROM \"{}\"
         WHERE (destination IS NULL) = (status = 'FAILED')
            OR (status = 'FAILED' AND last_error NOT LIKE 'unroutable%')
         ORDER BY id LIMIT 10",
        table.name
    ))
    .fetch_all(&table.pool)
    .await
    .unwrap();
    assert!(wrong.is_empty(), "rows judged wrongly: {wrong:?}");
    broker.delete_exchange(&lonely).await;
    drop(relay);
    broker.cleanup_with(&table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_batch_then_restart_loses_nothing() {
    let (table, broker) = table_and_broker("kill").await;
    table.produce(5_000, 100, 4).await;
    let env = relay_env(&table.name, &broker.exchange);
    let mut relay = RelayProc::start(&env);
    table
        .wait_processed_over(200, Duration::from_secs(90))
        .await;
    relay.signal("KILL");
    let _ = relay.child.wait().await;
    let processed_at_kill = table.count("PROCESSED").await;
    assert!(processed_at_kill < 5_000, "killed mid-run");
    // The killed instance's leases expire (lease_timeout/2); the new one takes over.
    let relay = RelayProc::start(&env);
    table
        .wait_status("PROCESSED", 5_000, Duration::from_secs(180))
        .await;
    let got = broker.take(5_000, Duration::from_secs(90)).await;
    let extra = broker.depth().await as usize;
    let more = broker.take(extra, Duration::from_secs(10)).await;
    let all: Vec<_> = got.into_iter().chain(more).collect();
    let unique: std::collections::HashSet<_> = all.iter().map(|g| g.message_id.clone()).collect();
    assert_eq!(unique.len(), 5_000, "nothing lost");
    let dups = assert_order(&all, &table.index().await);
    println!("SIGKILL at {processed_at_kill} processed: {dups} duplicates re-published");
    drop(relay);
    broker.cleanup_with(&table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_exits_zero_within_shutdown_timeout() {
    let (table, broker) = table_and_broker("term").await;
    table.produce(3_000, 50, 4).await;
    let mut relay = RelayProc::start(&relay_env(&table.name, &broker.exchange));
    table
        .wait_processed_over(100, Duration::from_secs(90))
        .await;
    let t0 = Instant::now();
    relay.signal("TERM");
    let status = tokio::time::timeout(Duration::from_secs(10), relay.child.wait())
        .await
        .expect("exited within shutdown_timeout (5s) + margin")
        .unwrap();
    assert_eq!(status.code(), Some(0), "exit 0; logs:\n{}", relay.logs());
    assert!(
        t0.elapsed() < Duration::from_secs(6),
        "took {:?}",
        t0.elapsed()
    );
    // Leases were handed back: a new relay starts at once and finishes.
    let leases: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{}_relay_leases\" WHERE owner IS NOT NULL AND lease_until > now()",
        table.name
    ))
    .fetch_one(&table.pool)
    .await
    .unwrap();
    assert_eq!(leases, 0, "leases released on shutdown");
    let relay = RelayProc::start(&relay_env(&table.name, &broker.exchange));
    table
        .wait_status("PROCESSED", 3_000, Duration::from_secs(180))
        .await;
    drop(relay);
    broker.cleanup_with(&table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_config_and_unmigrated_database_exit_2() {
    let table = TestTable::unmigrated("unmig").await;
    let mut env = relay_env(&table.name, "x");
    let (code, _, err) = run_cmd(&env, &["run"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("outbox-relay migrate"), "{err}");

    env.push(("OUTBOX_RELAY__RELAY__BATCH_SIZE".into(), "0".into()));
    let (code, _, err) = run_cmd(&env, &["run"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("relay.batch_size"), "{err}");

    let mut env = relay_env(&table.name, "x");
    env.push(("OUTBOX_RELAY__RELAY__POLL_INTERVAL".into(), "soon".into()));
    let (code, _, err) = run_cmd(&env, &["check"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("poll_interval"), "{err}");

    let mut env = relay_env(&table.name, "x");
    env.push(("OUTBOX_RELAY__SINK__KIND".into(), "pigeon".into()));
    let (code, _, err) = run_cmd(&env, &["run"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("sink") && err.contains("kind"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[relay]\non_failed = \"explode\"\n").unwrap();
    let (code, _, err) = run_cmd(
        &relay_env(&table.name, "x"),
        &["run", "--config", file.to_str().unwrap()],
    )
    .await;
    assert_eq!(code, 2);
    assert!(err.contains("relay.on_failed"), "{err}");

    // A wrong password never shows up in the error.
    let mut env = relay_env(&table.name, "x");
    env.push((
        "OUTBOX_RELAY__DATABASE__URL".into(),
        "postgres://nobody:s3cr3t-pw@127.0.0.1:1/test".into(),
    ));
    env.push((
        "OUTBOX_RELAY__DATABASE__CONNECT_TIMEOUT".into(),
        "1s".into(),
    ));
    let (code, out, err) = run_cmd(&env, &["check"]).await;
    assert_eq!(code, 2);
    assert!(
        !err.contains("s3cr3t-pw") && !out.contains("s3cr3t-pw"),
        "{err}"
    );
    table.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrate_is_idempotent_and_keeps_its_own_history() {
    let table = TestTable::unmigrated("mig").await;
    let env = relay_env(&table.name, "x");
    let (code, out, err) = run_cmd(&env, &["migrate"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("applied migrations [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]"),
        "{out}"
    );
    let (code, out, _) = run_cmd(&env, &["migrate"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("up to date"), "{out}");
    let versions: Vec<i64> = sqlx::query_scalar(&format!(
        "SELECT version FROM \"{}_relay_migrations\" ORDER BY 1",
        table.name
    ))
    .fetch_all(&table.pool)
    .await
    .unwrap();
    assert_eq!(versions, vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    // The smallest valid producer write from SPEC §1 works.
    sqlx::query(&format!(
        "INSERT INTO \"{}\" (aggregate_type, aggregate_id, event_type, payload) VALUES ('order', '42', 'order.created', '{{\"orderId\":\"42\",\"total\":59.98}}')",
        table.name
    ))
    .execute(&table.pool)
    .await
    .unwrap();
    table.cleanup().await;
}
