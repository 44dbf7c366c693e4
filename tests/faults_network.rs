//! The path to RabbitMQ attacked while the relay publishes: a network freeze (a TCP proxy
//! stops forwarding but keeps the sockets open), a network cut (the proxy closes every
//! connection), RabbitMQ's memory alarm blocking the publishing connection, and RabbitMQ
//! stopped while publisher confirms are outstanding. For each: committed = delivered,
//! 0 lost, per-aggregate order of first deliveries, duplicates counted, no attempt spent.
//! Disruptive (serial phase): the alarm and the app are always restored.

use std::time::{Duration, Instant};

use outbox_relay_testkit::{amqp_url, db::*, faults::*, rabbit::*, relay_proc::*, wait::*};

fn proxied_amqp_url(port: u16) -> String {
    let url = amqp_url();
    url.replace("127.0.0.1:5672", &format!("127.0.0.1:{port}"))
        .replace("localhost:5672", &format!("127.0.0.1:{port}"))
}

/// How long the queue must stay quiet before the ledger is read.
const QUIET: Duration = Duration::from_secs(3);

/// Freeze or cut the relay's path to RabbitMQ `rounds` times while rows keep coming.
async fn proxy_attack(prefix: &str, attack: &str, cut: bool) {
    let table = TestTable::new(prefix).await;
    let broker = TestBroker::new(prefix).await;
    let proxy = Proxy::start("127.0.0.1:5672").await;
    let url = proxied_amqp_url(proxy.port);
    let env = fault_env(
        &table.name,
        &broker.exchange,
        &[("OUTBOX_RELAY__RABBITMQ__URL", url.as_str())],
    );
    let (relay, producer) = attack_through_proxy(&proxy, &table, env, attack, cut).await;
    let Outcome { commits, .. } = conclude(attack, relay, producer, table, broker, QUIET).await;
    println!(
        "{attack}: producers committed {commits} (+3000 up front); proxy saw {} connections",
        proxy.connections.load(std::sync::atomic::Ordering::SeqCst)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn network_freeze_times_out_reconnects_and_loses_nothing() {
    proxy_attack(
        "fnetfreeze",
        "network freeze x3 (proxy stalls, sockets open)",
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn network_cut_reconnects_and_loses_nothing() {
    proxy_attack(
        "fnetcut",
        "network cut x3 (proxy closes every connection)",
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_alarm_blocks_then_releases_without_loss_or_attempts() {
    let table = TestTable::new("fmemalarm").await;
    let broker = TestBroker::new("fmemalarm").await;
    let relay = RelayProc::start(&fault_env(
        &table.name,
        &broker.exchange,
        &[("OUTBOX_RELAY__RELAY__PUBLISH_TIMEOUT", "2s")],
    ));
    table.produce(3_000, 40, 4).await;
    let producer = Producer::start(&table.pool, &table.name, 40, 2, Duration::from_millis(3));
    table
        .wait_processed_over(300, Duration::from_secs(30))
        .await;

    let guard = WatermarkOnDrop;
    rabbitmqctl(&["-q", "set_vm_memory_high_watermark", "0"]);
    // Publishing connections are blocked: confirms stop, the relay times out.
    wait_broker_up(&relay, false, Duration::from_secs(30)).await;
    let stuck = table.count("PROCESSED").await;
    // Stay blocked across a few publish timeouts and reconnects.
    let blocked_until = Instant::now() + Duration::from_secs(6);
    wait_for(Duration::from_secs(10), "6s under the alarm", || async {
        (Instant::now() >= blocked_until).then_some(())
    })
    .await;
    let moved = table.count("PROCESSED").await - stuck;
    table
        .assert_no_attempts("a blocked broker spends no attempt")
        .await;
    assert_eq!(relay.get("/livez").await.map(|r| r.0), Some(200));
    rabbitmqctl(&["-q", "set_vm_memory_high_watermark", "0.4"]);
    drop(guard);

    wait_broker_up(&relay, true, Duration::from_secs(60)).await;
    let attack = "RabbitMQ memory alarm (watermark 0) for 6s";
    let Outcome { commits, .. } = conclude(attack, relay, producer, table, broker, QUIET).await;
    println!("alarm at {stuck} processed ({moved} marked while blocked); producers committed {commits} (+3000)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_stopped_with_confirms_outstanding_loses_nothing() {
    let table = TestTable::new("fconfirms").await;
    let mut broker = TestBroker::new("fconfirms").await;
    // Large batches of many aggregates: each wave has hundreds of confirms in flight.
    table.produce(6_000, 400, 8).await;
    let relay = RelayProc::start(&fault_env(
        &table.name,
        &broker.exchange,
        &[("OUTBOX_RELAY__RELAY__BATCH_SIZE", "1000")],
    ));
    let producer = Producer::start(&table.pool, &table.name, 400, 8, Duration::ZERO);
    for round in 0..2 {
        let at = table.count("PROCESSED").await + 1_000;
        wait_for(Duration::from_secs(60), "heavy publishing", || async {
            (table.count("PROCESSED").await > at).then_some(())
        })
        .await;
        let guard = StartAppOnDrop;
        rabbitmqctl(&["-q", "stop_app"]);
        let stuck = table.count("PROCESSED").await;
        wait_broker_up(&relay, false, Duration::from_secs(30)).await;
        table
            .assert_no_attempts("an outage spends no attempt")
            .await;
        rabbitmqctl(&["-q", "start_app"]);
        rabbitmqctl(&["-q", "await_startup"]);
        drop(guard);
        println!("round {round}: RabbitMQ stopped at {stuck} processed");
        broker.reconnect().await;
    }
    let attack = "RabbitMQ stop_app x2 with confirms outstanding";
    let Outcome { commits, .. } = conclude(attack, relay, producer, table, broker, QUIET).await;
    println!("producers committed {commits} (+6000 up front)");
}
