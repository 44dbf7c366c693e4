//! The Kafka sink end to end against a real Kafka-protocol broker (tansu) at
//! 127.0.0.1:9092 — start it with `scripts/kafka-broker.sh`. Not skipped when absent:
//! the test fails and says so.

use std::collections::HashMap;
use std::time::Duration;

use outbox_relay::sink::kafka::{tap::ensure_topic, KafkaSink};
use outbox_relay_testkit::{db::*, hex_id, inproc::*, kafka::*, order::assert_kafka_order};

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
    let topics = TestTopics::new(BROKER, &[&topic]);
    let mut cfg = kafka_config(BROKER, &[]);
    cfg.topic = format!("{prefix}.{{aggregate_type}}");
    ensure_topic(&cfg, &topic, 4)
        .await
        .expect("create the test topic");
    let table = TestTable::new("kt").await;

    table.insert_rows(&Row::grid(200, 50)).await;

    let sink = KafkaSink::new(&cfg, Duration::from_secs(10)).expect("valid Kafka config");
    let within = Duration::from_secs(240);
    let relayed = relay_all(&table, sink, relay_config("10s"), 10_000, within).await;

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
        let want: HashMap<String, String> = r.spec_headers().into_iter().collect();
        let have: HashMap<String, String> = k.headers.iter().cloned().collect();
        assert_eq!(have.len(), k.headers.len(), "no header appears twice");
        assert_eq!(have, want, "headers of {}", r.id);
    }
    assert_kafka_order(&db, &got);
    tokio::task::spawn_blocking(move || drop(c)).await.unwrap();
    topics.delete().await;
    table.drop_all().await;
}

/// On a real broker, a row whose destination topic does not exist fails on its own
/// with a readable error, the others go through, and the topic is not created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_topic_fails_its_row_only() {
    require_broker();
    let topic = format!("kt-{}", hex_id());
    let missing = format!("kt-missing-{}", hex_id());
    let topics = TestTopics::new(BROKER, &[&topic, &missing]);
    let cfg = kafka_config(BROKER, &[]);
    ensure_topic(&cfg, &topic, 1)
        .await
        .expect("create the test topic");
    let table = TestTable::new("kt").await;
    let mut rows = Row::typo_between(Some(topic.as_str()), &missing);
    rows.push(Row::new("typo", 1).to(&topic));
    table.insert_rows(&rows).await;
    let sink = KafkaSink::new(&cfg, Duration::from_secs(10)).unwrap();
    relay_until(&table, sink, relay_config("10s"), 2, 1).await;
    table.the_typo_failed(&[&missing, "does not exist"]).await;
    table.assert_later_row_waits(3).await;
    let admin_view = ensure_topic(&cfg, &missing, 1).await.unwrap();
    assert!(admin_view, "the relay must not have created {missing}");
    topics.delete().await;
    table.drop_all().await;
}
