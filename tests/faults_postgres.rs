//! Postgres attacked under the relay while order-service-like producers keep committing:
//! its backends (pool and LISTEN connection) killed with `pg_terminate_backend` again and
//! again mid-batch, and the whole server restarted mid-run. For each: committed =
//! delivered + failed, 0 lost, per-aggregate order of first deliveries, duplicates
//! counted, no attempt spent. And Postgres stopped under an idle relay: `database_up`
//! follows within seconds, both ways. Disruptive (serial phase); Postgres is always
//! started again.

use std::time::{Duration, Instant};

use outbox_relay_testkit::{db::*, faults::*, pg_url, rabbit::*, relay_proc::*, wait::*};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backends_terminated_mid_batch_lose_nothing() {
    let table = TestTable::new("fpgkill").await;
    let broker = TestBroker::new("fpgkill").await;
    table.produce(4_000, 40, 4).await;
    let relay = RelayProc::start(&fault_env(&table.name, &broker.exchange, &[]));
    let producer = Producer::start(&table.pool, &table.name, 40, 4, Duration::from_millis(2));
    table
        .wait_processed_over(300, Duration::from_secs(30))
        .await;
    wait_for(Duration::from_secs(10), "the relay LISTENs", || async {
        (relay_listeners(&table.pool).await >= 1).then_some(())
    })
    .await;

    let mut killed = 0;
    for round in 0..12 {
        let before = table.count("PROCESSED").await;
        killed += terminate_relay_backends(&table.pool).await;
        // The relay must reconnect and make progress before the next blow.
        wait_for(
            Duration::from_secs(30),
            &format!("progress after kill round {round}"),
            || async { (table.count("PROCESSED").await > before).then_some(()) },
        )
        .await;
    }
    assert!(killed >= 12, "terminated {killed} relay backends");
    wait_for(
        Duration::from_secs(30),
        "the LISTEN connection is back",
        || async { (relay_listeners(&table.pool).await >= 1).then_some(()) },
    )
    .await;
    assert_eq!(relay.get("/livez").await.map(|r| r.0), Some(200));

    let attack = "pg_terminate_backend x12 mid-batch";
    let quiet = Duration::from_secs(2);
    let Outcome {
        commits, retries, ..
    } = conclude(attack, relay, producer, table, broker, quiet).await;
    println!("terminated {killed} relay backends; producers committed {commits} (+4000 up front), {retries} producer retries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_restarted_mid_run_loses_nothing() {
    let table = TestTable::new("fpgrestart").await;
    let broker = TestBroker::new("fpgrestart").await;
    table.produce(4_000, 40, 4).await;
    let relay = RelayProc::start(&fault_env(
        &table.name,
        &broker.exchange,
        &[("OUTBOX_RELAY__DATABASE__CONNECT_TIMEOUT", "2s")],
    ));
    let producer = Producer::start(&table.pool, &table.name, 40, 4, Duration::from_millis(2));
    table
        .wait_processed_over(500, Duration::from_secs(30))
        .await;

    let guard = PgStartOnDrop;
    let t0 = Instant::now();
    assert!(pg_ctlcluster("stop"), "pg_ctlcluster stop");
    wait_metric(
        &relay,
        "outbox_relay_database_up",
        Duration::from_secs(30),
        |v| v == 0.0,
    )
    .await;
    assert_eq!(
        relay.get("/livez").await.map(|r| r.0),
        Some(200),
        "alive while waiting for the database"
    );
    assert!(pg_ctlcluster("start"), "pg_ctlcluster start");
    assert!(wait_pg_ready(Duration::from_secs(60)), "Postgres back");
    drop(guard);
    let outage = t0.elapsed();

    // The test's own pool held connections to the old server: use a fresh one.
    let pool = fresh_pool().await;
    let table = TestTable {
        name: table.name.clone(),
        pool,
    };
    wait_metric(
        &relay,
        "outbox_relay_database_up",
        Duration::from_secs(60),
        |v| v == 1.0,
    )
    .await;
    table
        .wait_progress(0, Duration::from_secs(60), "progress after the restart")
        .await;
    let attack = "Postgres stop/start mid-run";
    let quiet = Duration::from_secs(2);
    let Outcome {
        commits, retries, ..
    } = conclude(attack, relay, producer, table, broker, quiet).await;
    println!(
        "Postgres down for {outage:?}; producers committed {commits} (+4000 up front), {retries} producer retries"
    );
}

/// Wait until the relay reached the database and its loop holds leases: past start-up,
/// where a database error ends the process instead of showing in `database_up`.
async fn wait_idle_loop(relay: &RelayProc) {
    let up = "outbox_relay_database_up";
    wait_metric(relay, up, Duration::from_secs(20), |v| v == 1.0).await;
    let held = "outbox_relay_partitions_held";
    wait_metric(relay, held, Duration::from_secs(20), |v| v > 0.0).await;
}

/// Postgres stopped while the relay has nothing to do: `database_up` drops to 0 within a
/// few seconds and is 1 again soon after the restart; `/readyz` stays 200 (readiness is
/// decided at start); a row written after the restart is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_stopped_while_idle_shows_in_database_up() {
    const DATABASE_UP: &str = "outbox_relay_database_up";
    let table = TestTable::new("fpgidle").await;
    let broker = TestBroker::new("fpgidle").await;
    let relay = RelayProc::start(&fault_env(
        &table.name,
        &broker.exchange,
        &[("OUTBOX_RELAY__DATABASE__CONNECT_TIMEOUT", "2s")],
    ));
    wait_idle_loop(&relay).await;
    assert_eq!(relay.get("/readyz").await.map(|r| r.0), Some(200));

    let guard = PgStartOnDrop;
    let stopped = Instant::now();
    assert!(pg_ctlcluster("stop"), "pg_ctlcluster stop");
    wait_for(
        Duration::from_secs(10),
        "database_up = 0 on an idle relay while Postgres is stopped",
        || async {
            assert_eq!(relay.get("/readyz").await.map(|r| r.0), Some(200));
            (relay.metric(DATABASE_UP).await == Some(0.0)).then_some(())
        },
    )
    .await;
    let seen_down = stopped.elapsed();
    assert_eq!(relay.get("/livez").await.map(|r| r.0), Some(200));
    let started = Instant::now();
    assert!(pg_ctlcluster("start"), "pg_ctlcluster start");
    assert!(wait_pg_ready(Duration::from_secs(60)), "Postgres back");
    drop(guard);
    wait_metric(&relay, DATABASE_UP, Duration::from_secs(20), |v| v == 1.0).await;
    let seen_up = started.elapsed();

    let table = TestTable {
        name: table.name.clone(),
        pool: fresh_pool().await,
    };
    row_written_now_is_delivered(&table, &broker).await;
    assert_eq!(relay.get("/readyz").await.map(|r| r.0), Some(200));
    println!("idle relay: database_up 0 after {seen_down:?} (stop), 1 after {seen_up:?} (start)");
    drop(relay);
    broker.cleanup().await;
    table.cleanup().await;
}

/// The path to Postgres frozen (a TCP proxy stops forwarding, sockets stay open) under an
/// idle relay: queries hang rather than fail, and `database_up` still drops to 0 within
/// seconds (its ping is bounded), then comes back to 1 after the thaw; a row written
/// afterwards is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_frozen_while_idle_shows_in_database_up() {
    const DATABASE_UP: &str = "outbox_relay_database_up";
    let table = TestTable::new("fpgfreeze").await;
    let broker = TestBroker::new("fpgfreeze").await;
    let proxy = Proxy::start("127.0.0.1:5432").await;
    let url = pg_url().replace(":5432", &format!(":{}", proxy.port));
    assert_ne!(url, pg_url(), "the relay goes through the proxy");
    let relay = RelayProc::start(&fault_env(
        &table.name,
        &broker.exchange,
        // database.connect_timeout stays at its default (5 s): the ping is bounded on
        // its own.
        &[("OUTBOX_RELAY__DATABASE__URL", url.as_str())],
    ));
    wait_idle_loop(&relay).await;

    let frozen = Instant::now();
    proxy.freeze();
    wait_metric(&relay, DATABASE_UP, Duration::from_secs(10), |v| v == 0.0).await;
    let seen_down = frozen.elapsed();
    assert_eq!(relay.get("/readyz").await.map(|r| r.0), Some(200));
    let thawed = Instant::now();
    proxy.thaw();
    wait_metric(&relay, DATABASE_UP, Duration::from_secs(30), |v| v == 1.0).await;
    let seen_up = thawed.elapsed();

    row_written_now_is_delivered(&table, &broker).await;
    println!("idle relay, path to Postgres frozen: database_up 0 after {seen_down:?}, 1 after {seen_up:?} (thaw)");
    drop(relay);
    broker.cleanup().await;
    table.cleanup().await;
}
