//! RabbitMQ stopped in the middle of a run (`rabbitmqctl stop_app`, then `start_app`):
//! nothing is lost, no row spends an attempt, `/readyz` and `/livez` stay 200 while
//! `outbox_relay_broker_up` drops to 0 and comes back to 1 — also on an idle relay, which
//! learns of the outage from its probe, not from a publish. Disruptive: runs in the
//! serial phase of `scripts/test.sh`, and always restarts the app it stopped.

use std::time::{Duration, Instant};

use outbox_relay_testkit::{
    db::*,
    faults::{rabbitmqctl, StartAppOnDrop},
    order::*,
    rabbit::*,
    relay_proc::*,
    wait::*,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_stopped_mid_run_loses_nothing_and_spends_no_attempts() {
    let table = TestTable::new("rstop").await;
    let mut broker = TestBroker::new("rstop").await;
    let relay = RelayProc::start(&relay_env(&table.name, &broker.exchange));
    let producer = table.produce_aside(6_000, 60, 4);
    table
        .wait_processed_over(300, Duration::from_secs(30))
        .await;
    wait_for(Duration::from_secs(10), "broker_up = 1", || async {
        (relay.metric("outbox_relay_broker_up").await == Some(1.0)).then_some(())
    })
    .await;

    let guard = StartAppOnDrop;
    rabbitmqctl(&["stop_app"]);
    assert_outage_ridden_out(&relay, &table, Duration::from_secs(30)).await;
    let stuck = table.count("PROCESSED").await;
    rabbitmqctl(&["start_app"]);
    drop(guard);
    rabbitmqctl(&["await_startup"]);

    producer.await.unwrap();
    table
        .wait_status("PROCESSED", 6_000, Duration::from_secs(120))
        .await;
    wait_for(Duration::from_secs(30), "broker_up = 1 again", || async {
        (relay.metric("outbox_relay_broker_up").await == Some(1.0)).then_some(())
    })
    .await;
    table.assert_no_attempts("no row's attempts grew").await;
    broker.reconnect().await;
    let n = broker.depth().await as usize;
    let got = broker.take(n, Duration::from_secs(30)).await;
    let unique: std::collections::HashSet<_> = got.iter().map(|g| g.message_id.clone()).collect();
    assert_eq!(
        unique.len(),
        6_000,
        "nothing lost (stopped at {stuck} processed)"
    );
    let dups = assert_order(&got, &table.index().await);
    println!("RabbitMQ stop/start at {stuck} processed: {dups} duplicates");
    assert_eq!(
        relay.metric("outbox_relay_published_total").await,
        Some(6_000.0),
        "published_total = rows relayed"
    );
    drop(relay);
    broker.cleanup().await;
    table.cleanup().await;
}

/// `/readyz` answers 200 (it never follows the broker, SPEC §6).
async fn assert_ready(relay: &RelayProc, when: &str) {
    assert_eq!(
        relay.get("/readyz").await.map(|r| r.0),
        Some(200),
        "/readyz {when}"
    );
}

/// RabbitMQ stopped while the relay has nothing to send: `broker_up` drops to 0 within a
/// few seconds (no publish tells it) and is 1 again soon after `start_app`; `/readyz`
/// stays 200 throughout; a row written after the restart is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_stopped_while_idle_shows_in_broker_up() {
    const BROKER_UP: &str = "outbox_relay_broker_up";
    let table = TestTable::new("ridle").await;
    let mut broker = TestBroker::new("ridle").await;
    let relay = RelayProc::start(&relay_env(&table.name, &broker.exchange));
    wait_for(
        Duration::from_secs(20),
        "broker_up = 1 at start",
        || async { (relay.metric(BROKER_UP).await == Some(1.0)).then_some(()) },
    )
    .await;
    assert_ready(&relay, "at start").await;
    assert_eq!(table.total().await, 0, "the relay is idle: nothing to send");

    let guard = StartAppOnDrop;
    let stopped = Instant::now();
    rabbitmqctl(&["stop_app"]);
    wait_for(
        Duration::from_secs(10),
        "broker_up = 0 on an idle relay while RabbitMQ is stopped",
        || async {
            assert_ready(&relay, "while RabbitMQ is stopped").await;
            (relay.metric(BROKER_UP).await == Some(0.0)).then_some(())
        },
    )
    .await;
    let seen_down = stopped.elapsed();
    assert_eq!(
        relay.get("/livez").await.map(|r| r.0),
        Some(200),
        "alive while waiting for the broker"
    );
    // Down it stays while RabbitMQ is stopped (the reconnects fail).
    let hold = Instant::now() + Duration::from_secs(3);
    wait_for(Duration::from_secs(10), "3 s of outage", || async {
        assert_eq!(relay.metric(BROKER_UP).await, Some(0.0), "still stopped");
        assert_ready(&relay, "while RabbitMQ is stopped").await;
        (Instant::now() >= hold).then_some(())
    })
    .await;

    let started = Instant::now();
    rabbitmqctl(&["start_app"]);
    drop(guard);
    rabbitmqctl(&["await_startup"]);
    wait_for(
        Duration::from_secs(20),
        "broker_up = 1 after start_app",
        || async {
            assert_ready(&relay, "after start_app").await;
            (relay.metric(BROKER_UP).await == Some(1.0)).then_some(())
        },
    )
    .await;
    let seen_up = started.elapsed();

    broker.reconnect().await;
    let got = row_written_now_is_delivered(&table, &broker).await;
    assert_eq!(got.kind, "order.created");
    assert_eq!(table.max_attempts_seen().await, 0);
    assert_ready(&relay, "at the end").await;
    println!(
        "idle relay: broker_up 0 after {seen_down:?} (stop_app), 1 after {seen_up:?} (start_app)"
    );
    drop(relay);
    broker.cleanup().await;
    table.cleanup().await;
}
