//! Operations (SPEC §6): `/metrics` after relaying N rows, `/livez` and `/readyz`,
//! retention of old `PROCESSED` rows, secrets from files, and no password in any log
//! line or error message.

use std::time::Duration;

use outbox_relay_testkit::{amqp_url, db::*, pg_url, rabbit::*, relay_proc::*, unique, wait::*};

const SPEC_METRICS: [&str; 8] = [
    "outbox_relay_published_total",
    "outbox_relay_failed_total",
    "outbox_relay_retries_total",
    "outbox_relay_pending_rows",
    "outbox_relay_oldest_pending_age_seconds",
    "outbox_relay_publish_latency_seconds",
    "outbox_relay_broker_up",
    "outbox_relay_database_up",
];

/// The engine's bounds in use show on `/metrics`: while a backlog drains through a window
/// of two unconfirmed messages and ten claimed rows, no scrape shows more, some scrape
/// shows messages out, and all three gauges fall back to 0 once everything is relayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_window_in_use_shows_on_metrics_within_its_bounds() {
    let (table, broker) = table_and_broker("gauges").await;
    table.produce(3_000, 30, 4).await;
    let mut env = relay_env(&table.name, &broker.exchange);
    for (k, v) in [
        ("OUTBOX_RELAY__RELAY__MAX_IN_FLIGHT", "2"),
        ("OUTBOX_RELAY__RELAY__BATCH_SIZE", "10"),
    ] {
        env.push((k.into(), v.into()));
    }
    let relay = RelayProc::start(&env);
    // One scrape for the three, so that they describe the same moment.
    let gauges = || {
        relay.metrics([
            "outbox_relay_in_flight_messages",
            "outbox_relay_window_rows",
            "outbox_relay_window_bytes",
        ])
    };
    wait_for(
        Duration::from_secs(60),
        "a scrape with messages out",
        || async {
            let [out, rows, bytes] = gauges().await?;
            assert!(out <= 2.0, "{out} messages out, max_in_flight 2");
            assert!(rows <= 10.0, "{rows} rows held, window of 10");
            assert!(rows >= out, "{rows} rows held, {out} of them out");
            (out > 0.0 && bytes > 0.0).then_some(())
        },
    )
    .await;
    table
        .wait_status("PROCESSED", 3_000, Duration::from_secs(120))
        .await;
    wait_for(Duration::from_secs(10), "the gauges back to 0", || async {
        (gauges().await? == [0.0; 3]).then_some(())
    })
    .await;
    drop(relay);
    broker.cleanup_with(&table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_count_what_was_relayed_and_probes_answer() {
    let (table, broker) = table_and_broker("metrics").await;
    let relay = RelayProc::start(&relay_env(&table.name, &broker.exchange));
    wait_for(Duration::from_secs(20), "/readyz 200", || async {
        (relay.get("/readyz").await.map(|r| r.0) == Some(200)).then_some(())
    })
    .await;
    assert_eq!(relay.get("/livez").await.map(|r| r.0), Some(200));
    table.produce(1_234, 20, 4).await;
    let missing = unique("nope");
    table
        .insert(
            "m-fail",
            "order.created",
            Some(&missing),
            serde_json::json!({}),
        )
        .await;
    table
        .wait_status("PROCESSED", 1_234, Duration::from_secs(60))
        .await;
    table
        .wait_status("FAILED", 1, Duration::from_secs(30))
        .await;
    wait_for(
        Duration::from_secs(10),
        "published_total = 1234",
        || async {
            (relay.metric("outbox_relay_published_total").await == Some(1_234.0)).then_some(())
        },
    )
    .await;
    let (code, body) = relay.get("/metrics").await.unwrap();
    assert_eq!(code, 200);
    for name in SPEC_METRICS {
        assert!(body.contains(name), "/metrics has {name}:\n{body}");
    }
    assert!(
        body.contains("outbox_relay_publish_latency_seconds_bucket"),
        "latency is a histogram"
    );
    assert_eq!(relay.metric("outbox_relay_failed_total").await, Some(1.0));
    assert_eq!(
        relay.metric("outbox_relay_retries_total").await,
        Some(2.0),
        "max_attempts 3 = 2 retries, then FAILED"
    );
    assert_eq!(relay.metric("outbox_relay_broker_up").await, Some(1.0));
    assert_eq!(relay.metric("outbox_relay_database_up").await, Some(1.0));
    wait_for(
        Duration::from_secs(10),
        "pending gauge back to 0",
        || async { (relay.metric("outbox_relay_pending_rows").await == Some(0.0)).then_some(()) },
    )
    .await;
    drop(relay);
    broker.cleanup_with(&table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retention_deletes_only_old_processed_rows() {
    let (table, broker) = table_and_broker("retain").await;
    let t = &table.name;
    // 30 old PROCESSED, 20 recent PROCESSED, 10 old FAILED, 5 old discarded FAILED.
    table
        .setup_sql(&format!(
            "INSERT INTO \"{t}\" (aggregate_type, aggregate_id, event_type, payload, status, processed_at, created_at)
         SELECT 'order', g::text, 'order.created', '{{}}', 'PROCESSED', now() - interval '3 hours', now() - interval '3 hours'
         FROM generate_series(1, 30) g"
        ))
        .await;
    table
        .setup_sql(&format!(
            "INSERT INTO \"{t}\" (aggregate_type, aggregate_id, event_type, payload, status, processed_at)
         SELECT 'order', g::text, 'order.created', '{{}}', 'PROCESSED', now() - interval '10 minutes'
         FROM generate_series(1, 20) g"
        ))
        .await;
    table
        .setup_sql(&format!(
            "INSERT INTO \"{t}\" (aggregate_type, aggregate_id, event_type, payload, status, created_at, discarded_at)
         SELECT 'order', 'f' || g, 'order.created', '{{}}', 'FAILED', now() - interval '3 hours',
                CASE WHEN g > 10 THEN now() - interval '3 hours' END
         FROM generate_series(1, 15) g"
        ))
        .await;
    let mut env = relay_env(&table.name, &broker.exchange);
    env.push(("OUTBOX_RELAY__RELAY__RETENTION".into(), "1h".into()));
    let relay = RelayProc::start(&env);
    wait_for(
        Duration::from_secs(30),
        "old PROCESSED rows deleted",
        || async { (table.count("PROCESSED").await == 20).then_some(()) },
    )
    .await;
    assert_eq!(
        table.count("FAILED").await,
        15,
        "FAILED and discarded rows are kept"
    );
    assert_eq!(table.total().await, 35);
    drop(relay);
    broker.cleanup_with(&table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn passwords_never_appear_in_logs_or_errors() {
    let (table, broker) = table_and_broker("secret").await;
    // Wrong RabbitMQ password: the relay keeps running (no attempts spent) and logs why.
    let mut env = relay_env(&table.name, &broker.exchange);
    env.push((
        "OUTBOX_RELAY__RABBITMQ__URL".into(),
        "amqp://guest:Wr0ng-Rabbit-Pw@127.0.0.1:5672/%2f".into(),
    ));
    table
        .insert("s1", "order.created", None, serde_json::json!({}))
        .await;
    let relay = RelayProc::start(&env);
    wait_for(
        Duration::from_secs(20),
        "the relay logged the broker failure",
        || async { relay.logs().contains("broker").then_some(()) },
    )
    .await;
    let (code, out, err) = run_cmd(&env, &["check"]).await;
    assert_eq!(code, 2, "check fails on a wrong broker password");
    let logs = relay.logs();
    drop(relay);
    for text in [&out, &err, &logs] {
        assert!(
            !text.contains("Wr0ng-Rabbit-Pw"),
            "password leaked:\n{text}"
        );
    }
    assert!(
        err.contains("***") || err.contains("guest"),
        "the error still says which URL: {err}"
    );

    // Wrong database credentials (unknown role): exit 2, password not printed.
    let mut env = relay_env(&table.name, &broker.exchange);
    env.push((
        "OUTBOX_RELAY__DATABASE__URL".into(),
        "postgres://no_such_role:Db-S3cret-Pw@127.0.0.1:5432/test".into(),
    ));
    for cmd in ["run", "check", "status", "migrate"] {
        let (code, out, err) = run_cmd(&env, &[cmd]).await;
        assert_eq!(code, 2, "{cmd}: {err}");
        assert!(
            !out.contains("Db-S3cret-Pw") && !err.contains("Db-S3cret-Pw"),
            "{cmd} leaked:\n{err}"
        );
    }
    broker.cleanup_with(&table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn urls_can_come_from_secret_files() {
    let (table, broker) = table_and_broker("files").await;
    let dir = tempfile::tempdir().unwrap();
    let db_file = dir.path().join("database-url");
    let mq_file = dir.path().join("rabbitmq-url");
    std::fs::write(&db_file, format!("{}\n", pg_url())).unwrap();
    std::fs::write(&mq_file, amqp_url()).unwrap();
    let mut env = relay_env(&table.name, &broker.exchange);
    env.retain(|(k, _)| k != "OUTBOX_RELAY__DATABASE__URL" && k != "OUTBOX_RELAY__RABBITMQ__URL");
    env.push((
        "OUTBOX_RELAY__DATABASE__URL".into(),
        "postgres://wrong@127.0.0.1:1/nope".into(),
    ));
    env.push((
        "OUTBOX_RELAY__DATABASE__URL_FILE".into(),
        db_file.display().to_string(),
    ));
    env.push((
        "OUTBOX_RELAY__RABBITMQ__URL_FILE".into(),
        mq_file.display().to_string(),
    ));
    let (code, out, err) = run_cmd(&env, &["check"]).await;
    assert_eq!(code, 0, "{out}{err}");
    env.push((
        "OUTBOX_RELAY__RABBITMQ__URL_FILE".into(),
        "/nonexistent/secret".into(),
    ));
    let (code, _, err) = run_cmd(&env, &["check"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("rabbitmq.url_file"), "{err}");
    broker.cleanup_with(&table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_tls_is_configured_through_the_url() {
    let (table, broker) = table_and_broker("tls").await;
    let ssl_on: bool = sqlx::query_scalar("SELECT current_setting('ssl') = 'on'")
        .fetch_one(&table.pool)
        .await
        .unwrap();
    assert!(
        ssl_on,
        "this test needs a Postgres with ssl = on (Debian's default)"
    );
    let mut env = relay_env(&table.name, &broker.exchange);
    env.push((
        "OUTBOX_RELAY__DATABASE__URL".into(),
        format!("{}?sslmode=require", pg_url()),
    ));
    let (code, out, err) = run_cmd(&env, &["check"]).await;
    assert_eq!(code, 0, "{out}{err}");
    // The relay works over TLS end to end.
    table
        .insert("tls-1", "order.created", None, serde_json::json!({}))
        .await;
    let relay = RelayProc::start(&env);
    table
        .wait_status("PROCESSED", 1, Duration::from_secs(30))
        .await;
    drop(relay);
    // A CA that does not exist is an error that names it (proof the TLS settings are used).
    let mut env = relay_env(&table.name, &broker.exchange);
    env.push((
        "OUTBOX_RELAY__DATABASE__URL".into(),
        format!(
            "{}?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
            pg_url()
        ),
    ));
    let (code, _, err) = run_cmd(&env, &["check"]).await;
    assert_eq!(code, 2, "{err}");
    broker.cleanup_with(&table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn demo_refuses_an_outbox_with_rows_it_did_not_write_unless_forced() {
    let (table, broker) = table_and_broker("demoforce").await;
    table
        .insert("live-1", "order.paid", None, serde_json::json!({}))
        .await;
    let env = relay_env(&table.name, &broker.exchange);
    let (code, out, err) = run_cmd(&env, &["demo", "--events", "20"]).await;
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("--force") && err.contains(&table.name),
        "says why and what to do: {err}"
    );
    assert_eq!(table.total().await, 1, "nothing written");
    let (code, out, err) = run_cmd(&env, &["demo", "--events", "20", "--force"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(table.total().await, 21);
    // A table holding only the demo's own rows needs no --force.
    table
        .setup_sql(&format!(
            "DELETE FROM \"{}\" WHERE aggregate_id = 'live-1'",
            table.name
        ))
        .await;
    let (code, out, err) = run_cmd(&env, &["demo", "--events", "20"]).await;
    assert_eq!(code, 0, "{out}{err}");
    broker.cleanup_with(&table).await;
}

/// Backlog gauges and retention run on one replica at a time (the holder of partition
/// 0): two relays over one table whose broker is unreachable (rows stay PENDING); one says
/// it leads and reports the backlog, the other reports 0. Kill the leader: the survivor
/// takes partition 0 over and reports the backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn maintenance_runs_on_the_leader_only_and_moves_with_partition_0() {
    let table = TestTable::new("leader").await;
    for i in 0..25 {
        table
            .insert(
                &format!("l-{i}"),
                "order.created",
                None,
                serde_json::json!({}),
            )
            .await;
    }
    let mut env = relay_env(&table.name, "amq.topic");
    for (k, v) in env.iter_mut() {
        if k == "OUTBOX_RELAY__RABBITMQ__URL" {
            *v = "amqp://guest:guest@127.0.0.1:1/%2f".into();
        }
    }
    let relays = [RelayProc::start(&env), RelayProc::start(&env)];
    let leader_of = |body: &str| -> Option<f64> {
        body.lines()
            .find(|l| l.starts_with("outbox_relay_maintenance_leader{"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    let leader = wait_for(Duration::from_secs(30), "one leader reporting 25", || {
        let relays = &relays;
        async move {
            let mut seen = Vec::new();
            for r in relays {
                let (_, body) = r.get("/metrics").await?;
                seen.push((
                    leader_of(&body)?,
                    r.metric("outbox_relay_pending_rows").await?,
                ));
            }
            match (seen[0], seen[1]) {
                ((1.0, 25.0), (0.0, 0.0)) => Some(0),
                ((0.0, 0.0), (1.0, 25.0)) => Some(1),
                _ => None,
            }
        }
    })
    .await;
    let [a, b] = relays;
    let (gone, survivor) = if leader == 0 { (a, b) } else { (b, a) };
    drop(gone);
    wait_for(
        Duration::from_secs(30),
        "the survivor leads and reports 25",
        || {
            let s = &survivor;
            async move {
                let (_, body) = s.get("/metrics").await?;
                let leads = leader_of(&body)? == 1.0;
                (leads && s.metric("outbox_relay_pending_rows").await? == 25.0).then_some(())
            }
        },
    )
    .await;
    drop(survivor);
    table.cleanup().await;
}

/// The daemon runs in-process (`app::run` with a listener on an ephemeral port and a
/// shutdown token): ready, relays, and returns once the token is cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_daemon_runs_in_process_on_an_ephemeral_port() {
    let (table, broker) = table_and_broker("inproc").await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    let toml = format!(
        "[database]\nurl = \"{}\"\ntable = \"{}\"\n[rabbitmq]\nurl = \"{}\"\nexchange = \"{}\"\n\
         [relay]\npoll_interval = \"100ms\"\nshutdown_timeout = \"5s\"\n",
        pg_url(),
        table.name,
        amqp_url(),
        broker.exchange
    );
    std::fs::write(&config, toml).unwrap();
    let settings = outbox_relay::config::Settings::load(Some(&config)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let daemon = tokio::spawn(outbox_relay::app::run(settings, listener, shutdown.clone()));
    wait_for(Duration::from_secs(20), "/readyz 200", || async {
        (http_get(port, "/readyz").await.map(|r| r.0) == Some(200)).then_some(())
    })
    .await;
    table.produce(50, 5, 2).await;
    table
        .wait_status("PROCESSED", 50, Duration::from_secs(30))
        .await;
    shutdown.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(10), daemon)
        .await
        .expect("the daemon stops within shutdown_timeout")
        .expect("the daemon task does not panic");
    assert!(stopped.is_ok(), "{stopped:?}");
    broker.cleanup_with(&table).await;
}

#[path = "operations/roles.rs"]
mod roles;
