//! The Kafka sink end to end against a real Kafka-protocol broker (tansu) at
//! 127.0.0.1:9092 — start it with `scripts/kafka-broker.sh`. Not skipped when absent:
//! the test fails and says so.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use outbox_relay::sink::kafka::{tap::ensure_topic, KafkaSink};
use outbox_relay_testkit::{
    db::*, hex_id, inproc::*, kafka::*, order::assert_kafka_order, wait::*,
};

const BROKER: &str = "127.0.0.1:9092";

fn require_broker() {
    let addr = BROKER.parse().unwrap();
    if let Err(e) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
        panic!("no Kafka broker at {BROKER} ({e}): run scripts/kafka-broker.sh first");
    }
}

/// 10 000 rows over 50 aggregates: key = aggregate_id, SPEC §2 headers and body, each
/// aggregate in `id` order within its partition, every row PROCESSED with processed_at.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_rows_arrive_in_order() {
    require_broker();
    let prefix = format!("kt-{}", hex_id());
    let topic = format!("{prefix}.order");
    let mut cfg = kafka_config(BROKER, &[]);
    cfg.topic = format!("{prefix}.{{aggregate_type}}");
    ensure_topic(&cfg, &topic, 4)
        .await
        .expect("create the test topic");
    let table = TestTable::new("kt").await;

    let rows: Vec<Row> = (0..200)
        .flat_map(|seq| (0..50).map(move |a| Row::new(&format!("order-{a}"), seq)))
        .collect();
    table.insert_rows(&rows).await;

    let started = Instant::now();
    let sink = KafkaSink::new(&cfg, Duration::from_secs(10)).expect("valid Kafka config");
    let relay = Running::start(table.store(), sink, relay_config("10s"));
    wait_until(
        Duration::from_secs(240),
        "10 000 rows PROCESSED",
        || async { table.count_where("status = 'PROCESSED'").await == 10_000 },
    )
    .await;
    let relayed = started.elapsed();
    relay.stop(Duration::from_secs(30)).await;
    assert_eq!(
        table
            .count_where("processed_at IS NULL OR attempts <> 0 OR last_error IS NOT NULL")
            .await,
        0
    );

    let c = consumer(BROKER, &[&topic]).await;
    let got = read_events(&c, Duration::from_secs(120), 10_000).await;
    println!(
        "relayed 10 000 rows in {relayed:?}; read back {} records",
        got.len()
    );
    let by_event = event_ids(&got);
    let db = table.rows().await;
    assert_eq!(db.len(), 10_000);
    for r in &db {
        let k = by_event
            .get(&r.event_id)
            .unwrap_or_else(|| panic!("lost: {r:?}"));
        assert_eq!(k.topic, topic);
        assert_eq!(k.key.as_deref(), Some(r.aggregate_id.as_str()), "key");
        assert_eq!(k.payload, r.payload, "body is the payload JSON as stored");
        let mut want: HashMap<String, String> = r
            .headers
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        want.insert("event_id".into(), r.event_id.clone());
        want.insert("event_type".into(), r.event_type.clone());
        want.insert("aggregate_type".into(), r.aggregate_type.clone());
        want.insert("aggregate_id".into(), r.aggregate_id.clone());
        let have: HashMap<String, String> = k.headers.iter().cloned().collect();
        assert_eq!(have.len(), k.headers.len(), "no header appears twice");
        assert_eq!(have, want, "headers of {}", r.id);
    }
    assert_kafka_order(&db, &got);
    table.drop_all().await;
}

/// On a real broker, a row whose destination topic does not exist fails on its own
/// with a readable error, the others go through, and the topic is not created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_topic_fails_its_row_only() {
    require_broker();
    let topic = format!("kt-{}", hex_id());
    let missing = format!("kt-missing-{}", hex_id());
    let cfg = kafka_config(BROKER, &[]);
    ensure_topic(&cfg, &topic, 1)
        .await
        .expect("create the test topic");
    let table = TestTable::new("kt").await;
    table
        .insert_rows(&[
            Row::new("a", 0).to(&topic),
            Row::new("typo", 0).to(&missing),
            Row::new("b", 0).to(&topic),
            Row::new("typo", 1).to(&topic),
        ])
        .await;
    let sink = KafkaSink::new(&cfg, Duration::from_secs(10)).unwrap();
    relay_until(&table, sink, relay_config("10s"), 2, 1).await;
    let (failed, why) = table.the_failed().await;
    assert_eq!((failed.aggregate_id.as_str(), failed.attempts), ("typo", 3));
    assert!(
        why.contains(&missing) && why.contains("does not exist"),
        "{why}"
    );
    // on_failed = block: the aggregate's later row waits.
    assert_eq!(table.rows().await[3].status, "PENDING");
    let admin_view = ensure_topic(&cfg, &missing, 1).await.unwrap();
    assert!(admin_view, "the relay must not have created {missing}");
    table.drop_all().await;
}
