//! Redis under attack (serial phase: these stop the local server or change its config,
//! and always put it back). Redis stopped in the middle of a run: nothing is lost (every
//! event reaches a consumer reading the stream), no row spends an attempt, all end
//! PROCESSED, and `outbox_relay_broker_up` follows the outage. And a message over the
//! server's `proto-max-bulk-len` fails on its own, before it is sent.
//!
//! The server keeps nothing on disk, so the consumer is a background `XREAD` collector.
//! The relay reaches Redis through the testkit proxy, frozen just before the server
//! stops: what reached the server before the stop is read by the collector before the
//! stop, so the ledger's "nothing lost" does not depend on a race with the collector.

use std::time::Duration;

use outbox_relay::sink::redis::{RedisMode, RedisSink};
use outbox_relay_testkit::{
    db::*,
    faults::{settle, Ledger, Proxy},
    inproc::*,
    redis::*,
    relay_proc::*,
    wait::*,
};
use redis::AsyncCommands;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_stopped_mid_run_loses_nothing_and_spends_no_attempts() {
    let keys = TestKeys::new("stop");
    let key = keys.key("order");
    let table = TestTable::new("rdstop").await;
    let collector = StreamCollector::start(&key).await;
    let proxy = Proxy::start("127.0.0.1:6379").await;
    let via_proxy = format!("redis://127.0.0.1:{}", proxy.port);
    let relay = RelayProc::start(&keys.env(
        &table.name,
        RedisMode::Stream,
        &[("OUTBOX_RELAY__REDIS__URL", &via_proxy)],
    ));
    let producer = table.produce_aside(5_000, 50, 4);
    wait_until(Duration::from_secs(60), "relaying under way", || async {
        table.count("PROCESSED").await > 300
    })
    .await;
    wait_metric(
        &relay,
        "outbox_relay_broker_up",
        Duration::from_secs(10),
        |v| v == 1.0,
    )
    .await;

    let guard = RedisStartOnDrop;
    proxy.freeze();
    let conn = redis_conn().await;
    wait_until(
        Duration::from_secs(30),
        "the collector has read every entry the server got",
        || {
            let (mut conn, key) = (conn.clone(), key.clone());
            let read = collector.len();
            async move {
                let len: usize = conn.xlen(&key).await.expect("XLEN");
                len == read
            }
        },
    )
    .await;
    drop(conn);
    redis_stop();
    proxy.thaw();
    wait_metric(
        &relay,
        "outbox_relay_broker_up",
        Duration::from_secs(30),
        |v| v == 0.0,
    )
    .await;
    assert_eq!(
        relay.get("/readyz").await.map(|r| r.0),
        Some(200),
        "readiness does not follow the broker"
    );
    assert_eq!(
        table.max_attempts_seen().await,
        0,
        "an unreachable Redis spends no attempts"
    );
    let down_at = table.count("PROCESSED").await;

    redis_start();
    drop(guard);
    producer.await.expect("producer");
    settle(&table, Duration::from_secs(120)).await;
    assert!(table.count("PROCESSED").await > down_at);
    assert_eq!(table.count("PROCESSED").await, 5_000, "all PROCESSED");
    assert_eq!(
        table.max_attempts_seen().await,
        0,
        "no attempt spent over the outage"
    );
    wait_until(
        Duration::from_secs(30),
        "the consumer got every event",
        || async {
            let got: std::collections::HashSet<String> = collector
                .got
                .lock()
                .expect("collector lock")
                .iter()
                .map(event_id)
                .collect();
            got.len() >= 5_000
        },
    )
    .await;
    wait_metric(
        &relay,
        "outbox_relay_broker_up",
        Duration::from_secs(30),
        |v| v == 1.0,
    )
    .await;
    let mut ledger = Ledger::load("Redis stopped mid-run", &table.pool, &table.name).await;
    ledger.delivered(collector.stop().iter().map(event_id));
    let t = ledger.settle();
    assert_eq!(t.failed, 0);
    drop(relay);
    keys.cleanup().await;
    table.cleanup().await;
}

/// With `proto-max-bulk-len` at its 1 MB minimum, a 1.5 MB payload is rejected before it
/// is sent (the server would close the connection under every other message), FAILED
/// after `max_attempts` with an error naming the limit; the rows around it go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_over_proto_max_bulk_len_fails_alone() {
    let keys = TestKeys::new("bulk");
    let table = TestTable::new("rdbulk").await;
    let _restore = BulkLenOnDrop;
    let mut conn = redis_conn().await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("proto-max-bulk-len")
        .arg("1048576")
        .query_async(&mut conn)
        .await
        .expect("CONFIG SET");
    let mut big = Row::new("big", 0);
    big.payload = serde_json::json!({ "blob": "x".repeat(1_500_000) });
    table
        .insert_rows(&[Row::new("a", 0), big, Row::new("b", 0), Row::new("a", 1)])
        .await;

    let sink = RedisSink::new(&keys.config(RedisMode::Stream), Duration::from_secs(5))
        .expect("valid Redis config");
    relay_until(&table, sink, relay_config("5s"), 3, 1).await;
    let (failed, e) = table.the_failed().await;
    assert_eq!(failed.aggregate_id, "big");
    assert!(
        e.contains("payload is") && e.contains("proto-max-bulk-len = 1048576"),
        "{e}"
    );
    assert_eq!(stream_entries(&keys.key("order")).await.len(), 3);
    keys.cleanup().await;
    table.cleanup().await;
}
