//! The AWS side unavailable in the middle of a run, for SQS and for SNS (a topic with a
//! queue subscribed): a TCP proxy between the relay (the binary, `sink.kind = sqs | sns`)
//! and the emulator first freezes (requests
//! time out), then drops every connection while frozen, then thaws. moto keeps its state
//! in memory, so it is never restarted: the proxy is the outage. Nothing is lost, no row
//! spends an attempt, `outbox_relay_broker_up` drops to 0 and comes back, and each
//! aggregate's first deliveries stay in order. A collector consumes the queue meanwhile,
//! and the load is modest with a standard queue: moto answers slower the deeper a queue
//! is (a FIFO queue 500 deep takes over a second per batch), so a deep queue would make
//! every publish time out whether the proxy passes or not. Serial phase (`faults_*`), though it
//! disturbs only its own proxy.

use std::time::Duration;

use outbox_relay_testkit::{aws::*, db::*, faults::*, relay_proc::*, wait::*};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqs_unreachable_mid_run_loses_nothing_and_spends_no_attempts() {
    require_emulator();
    let queue = TestQueue::new("faws", false).await;
    let (proxy, via_proxy) = proxy().await;
    let env = sqs_env(&via_proxy, &queue.url);
    ride_out("SQS", &proxy, env, &queue).await;
    queue.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sns_unreachable_mid_run_loses_nothing_and_spends_no_attempts() {
    require_emulator();
    let topic = TestTopic::new("fawsn", false).await;
    let (proxy, via_proxy) = proxy().await;
    let env = sns_env(&via_proxy, &topic.arn);
    ride_out("SNS", &proxy, env, &topic.queue).await;
    topic.delete().await;
}

/// A proxy to the emulator, and the endpoint URL through it.
async fn proxy() -> (Proxy, String) {
    let upstream = aws_endpoint()
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let proxy = Proxy::start(&upstream).await;
    let via_proxy = format!("http://127.0.0.1:{}", proxy.port);
    (proxy, via_proxy)
}

/// Relay a steady load through `proxy` (`sink`: the relay's env for the service, which
/// delivers into `queue`), freeze it, cut it, thaw it: nothing lost, no attempts spent.
async fn ride_out(service: &str, proxy: &Proxy, sink: Vec<(String, String)>, queue: &TestQueue) {
    let table = TestTable::new("faws").await;
    let mut env = relay_env(&table.name, "unused");
    env.extend(sink);
    env.push(("OUTBOX_RELAY__RELAY__LEASE_TIMEOUT".into(), "10s".into()));
    env.push(("OUTBOX_RELAY__RELAY__PUBLISH_TIMEOUT".into(), "5s".into()));
    // Consumed while it fills: moto slows down with queue depth.
    let collector = Collector::start(queue);
    let relay = RelayProc::start(&env);
    let producer = Producer::start(&table.pool, &table.name, 20, 2, Duration::from_millis(20));
    table
        .wait_processed_over(200, Duration::from_secs(60))
        .await;
    wait_for(Duration::from_secs(10), "broker_up = 1", || async {
        (relay.metric("outbox_relay_broker_up").await == Some(1.0)).then_some(())
    })
    .await;

    proxy.freeze();
    wait_for(
        Duration::from_secs(60),
        "broker_up = 0 while the proxy is frozen",
        || async { (relay.metric("outbox_relay_broker_up").await == Some(0.0)).then_some(()) },
    )
    .await;
    let stuck = table.count("PROCESSED").await;
    assert_eq!(
        relay.get("/livez").await.map(|r| r.0),
        Some(200),
        "alive while waiting for the service"
    );
    proxy.drop_all();
    assert_eq!(
        table.max_attempts_seen().await,
        0,
        "an outage spends no attempts"
    );
    proxy.thaw();

    let (committed, errors) = producer.stop().await;
    assert_eq!(errors, 0);
    table
        .wait_status("PROCESSED", committed as i64, Duration::from_secs(120))
        .await;
    wait_for(Duration::from_secs(30), "broker_up = 1 again", || async {
        (relay.metric("outbox_relay_broker_up").await == Some(1.0)).then_some(())
    })
    .await;
    assert_eq!(table.max_attempts_seen().await, 0, "no row's attempts grew");
    let got = collector
        .finish(committed as usize, Duration::from_secs(60))
        .await;
    let db = table.rows().await;
    let mut ledger = Ledger::load(
        &format!("{service} unreachable mid-run"),
        &table.pool,
        &table.name,
    )
    .await;
    ledger.delivered(
        got.iter()
            .filter_map(|m| m.attribute("event_id").map(str::to_string)),
    );
    let t = ledger.settle();
    assert_eq!(t.failed, 0);
    let dups = assert_fifo_order(&db, &got);
    println!(
        "{service} outage at {stuck} processed: {committed} committed, all delivered, {dups} duplicates"
    );
    drop(relay);
    table.cleanup().await;
}
