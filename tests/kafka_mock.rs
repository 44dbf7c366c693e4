//! The Kafka sink against librdkafka's mock cluster (no external broker): per-message
//! permanent errors, a broker outage that spends no attempts, `broker_up` following an
//! outage while the relay is idle, and the dead-letter topic.

use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_relay::sink::kafka::KafkaSink;
use outbox_relay_testkit::{
    db::*, hex_id, inproc::*, kafka::*, order::assert_kafka_order, wait::*,
};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

/// A one-broker mock cluster with a unique topic `kt-…` of `partitions` partitions, and a
/// fresh table.
async fn mock_cluster(
    partitions: i32,
) -> (
    MockCluster<'static, DefaultProducerContext>,
    String,
    TestTable,
) {
    let cluster = MockCluster::new(1).unwrap();
    let topic = format!("kt-{}", hex_id());
    cluster.create_topic(&topic, partitions, 1).unwrap();
    (cluster, topic, TestTable::new("kt").await)
}

fn sink(cfg: &outbox_relay::sink::kafka::KafkaConfig) -> (CountingSink<KafkaSink>, Arc<Counts>) {
    let counts = Arc::new(Counts::default());
    let inner = KafkaSink::new(cfg, Duration::from_secs(2)).expect("valid Kafka config");
    (
        CountingSink {
            inner,
            counts: counts.clone(),
        },
        counts,
    )
}

/// A message over `message.max.bytes` and a broker-side INVALID_RECORD each fail only
/// their own row, with a readable `last_error`; everything else is PROCESSED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_errors_fail_only_their_row() {
    let (cluster, topic, table) = mock_cluster(3).await;

    let mut rows = Vec::new();
    for seq in 0..3 {
        for a in 0..10 {
            rows.push(Row::new(&format!("agg-{a}"), seq).to(&topic));
        }
    }
    let mut big = Row::new("big", 0).to(&topic);
    big.payload = serde_json::json!({ "blob": "x".repeat(20_000) });
    rows.insert(5, big);
    table.insert_rows(&rows).await;

    let cfg = kafka_config(
        &cluster.bootstrap_servers(),
        &[("message.max.bytes", "10000")],
    );
    let (sink, _counts) = sink(&cfg);
    let relay = Running::start(table.store(), sink, relay_config("2s"));
    wait_until(
        Duration::from_secs(30),
        "30 rows PROCESSED and the big one FAILED",
        || async {
            table.count_where("status = 'PROCESSED'").await == 30
                && table.count_where("status = 'FAILED'").await == 1
        },
    )
    .await;

    for r in table.rows().await {
        if r.aggregate_id == "big" {
            assert_eq!(r.status, "FAILED");
            assert_eq!(r.attempts, 3);
            let e = r.last_error.unwrap();
            assert!(
                e.contains("too large") && e.contains(&topic),
                "last_error: {e}"
            );
        } else {
            assert_eq!(
                (r.status.as_str(), r.attempts, r.processed),
                ("PROCESSED", 0, true),
                "{r:?}"
            );
        }
    }
    let c = consumer(&cluster.bootstrap_servers(), &[&topic]).await;
    let got = read_events(&c, Duration::from_secs(30), 30).await;
    assert_eq!(event_ids(&got).len(), 30);

    // Broker-side verdict: the next Produce request is refused with INVALID_RECORD.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD],
    );
    table
        .insert_rows(&[Row::new("invalid", 0).to(&topic)])
        .await;
    wait_until(
        Duration::from_secs(30),
        "the row refused once is PROCESSED on retry",
        || async {
            table
                .count_where("aggregate_id = 'invalid' AND status = 'PROCESSED'")
                .await
                == 1
        },
    )
    .await;
    let r = table
        .rows()
        .await
        .into_iter()
        .find(|r| r.aggregate_id == "invalid")
        .unwrap();
    assert_eq!(r.attempts, 1, "one rejection counted: {r:?}");
    let e = r.last_error.unwrap_or_default();
    assert!(
        e.contains("InvalidRecord") && e.contains(&topic),
        "last_error: {e}"
    );

    relay.stop(Duration::from_secs(30)).await;
    table.drop_all().await;
}

/// The broker goes away and comes back: rows wait PENDING with `attempts = 0`, then all
/// arrive, in order per aggregate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_spends_no_attempts() {
    let (cluster, topic, table) = mock_cluster(4).await;
    let cfg = kafka_config(&cluster.bootstrap_servers(), &[]);
    let (sink, counts) = sink(&cfg);
    let relay = Running::start(table.store(), sink, relay_config("1s"));

    // Warm up (the topic is known to the sink), then take the broker down.
    table.insert_rows(&[Row::new("warm", 0).to(&topic)]).await;
    wait_until(Duration::from_secs(20), "warm-up row PROCESSED", || async {
        table.count_where("status = 'PROCESSED'").await == 1
    })
    .await;
    cluster.broker_down(1).unwrap();

    let rows: Vec<Row> = (0..20)
        .flat_map(|seq| (0..10).map(move |a| (a, seq)))
        .map(|(a, seq)| Row::new(&format!("agg-{a}"), seq).to(&topic))
        .collect();
    table.insert_rows(&rows).await;
    let before = counts.get().2;
    // Liveness bound only: the relay probes an outage by reconnecting with backoff (up to
    // 10 s apart), so twenty "unavailable" answers take about a minute to gather.
    wait_until(
        Duration::from_secs(120),
        "publishes answered Unavailable during the outage",
        || async { counts.get().2 >= before + 20 },
    )
    .await;
    assert_eq!(
        table
            .count_where("status = 'PENDING' AND attempts = 0")
            .await,
        200
    );
    assert_eq!(counts.get().1, 0, "no rejection during an outage");

    cluster.broker_up(1).unwrap();
    wait_until(
        Duration::from_secs(90),
        "all rows PROCESSED after the broker is back",
        || async { table.count_where("status = 'PROCESSED'").await == 201 },
    )
    .await;
    assert_eq!(
        table
            .count_where("attempts <> 0 OR last_error IS NOT NULL")
            .await,
        0
    );

    let db = table.rows().await;
    let c = consumer(&cluster.bootstrap_servers(), &[&topic]).await;
    let got = read_events(&c, Duration::from_secs(30), 201).await;
    let ids = event_ids(&got);
    for r in &db {
        assert!(ids.contains_key(&r.event_id), "lost: {r:?}");
    }
    assert_kafka_order(&db, &got);

    relay.stop(Duration::from_secs(30)).await;
    table.drop_all().await;
}

/// The value of an unlabelled metric in a Prometheus text rendering.
fn gauge(rendered: &str, name: &str) -> Option<f64> {
    rendered
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// With nothing to send, `outbox_relay_broker_up` still follows the cluster: 0 within
/// seconds of the broker going down (the relay probes it; no publish tells it), 1 once it
/// is back, and the next row goes out. Reads the process's Prometheus recorder, so it
/// needs a process of its own (nextest runs each test in one, as `scripts/test.sh` does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_up_follows_an_outage_while_idle() {
    const BROKER_UP: &str = "outbox_relay_broker_up";
    let metrics = outbox_relay::metrics::install().expect("the only recorder in this process");
    let (cluster, topic, table) = mock_cluster(2).await;
    let cfg = kafka_config(&cluster.bootstrap_servers(), &[]);
    let sink = KafkaSink::new(&cfg, Duration::from_secs(2)).expect("valid Kafka config");
    let relay = Running::start(table.store(), sink, relay_config("2s"));

    table.insert_rows(&[Row::new("warm", 0).to(&topic)]).await;
    wait_until(Duration::from_secs(20), "warm-up row PROCESSED", || async {
        table.count_where("status = 'PROCESSED'").await == 1
    })
    .await;
    wait_until(Duration::from_secs(10), "broker_up = 1", || async {
        gauge(&metrics.render(), BROKER_UP) == Some(1.0)
    })
    .await;

    let t0 = Instant::now();
    cluster.broker_down(1).unwrap();
    wait_until(
        Duration::from_secs(15),
        "broker_up = 0 on an idle relay while the broker is down",
        || async { gauge(&metrics.render(), BROKER_UP) == Some(0.0) },
    )
    .await;
    let seen_down = t0.elapsed();
    let t1 = Instant::now();
    cluster.broker_up(1).unwrap();
    wait_until(Duration::from_secs(30), "broker_up = 1 again", || async {
        gauge(&metrics.render(), BROKER_UP) == Some(1.0)
    })
    .await;
    let seen_up = t1.elapsed();

    table.insert_rows(&[Row::new("after", 0).to(&topic)]).await;
    wait_until(
        Duration::from_secs(30),
        "the row after the outage PROCESSED",
        || async { table.count_where("status = 'PROCESSED'").await == 2 },
    )
    .await;
    assert_eq!(table.count_where("attempts <> 0").await, 0);
    println!("idle relay, Kafka: broker_up 0 after {seen_down:?}, 1 after {seen_up:?}");
    relay.stop(Duration::from_secs(30)).await;
    table.drop_all().await;
}

/// A row that ends FAILED (its destination topic does not exist) is produced to
/// `kafka.dead_letter_topic` with a `last_error` header; the relay creates no topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_row_goes_to_dead_letter_topic() {
    let (cluster, topic, table) = mock_cluster(1).await;
    let dlt = format!("kt-dlt-{}", hex_id());
    let missing = format!("kt-missing-{}", hex_id());
    cluster.create_topic(&dlt, 1, 1).unwrap();
    table
        .insert_rows(&Row::typo_between(Some(topic.as_str()), &missing))
        .await;
    let mut cfg = kafka_config(&cluster.bootstrap_servers(), &[]);
    cfg.dead_letter_topic = Some(dlt.clone());
    let (sink, _counts) = sink(&cfg);
    let relay = Running::start(table.store(), sink, relay_config("2s"));
    table.wait_settled(2, 1, Duration::from_secs(30)).await;
    let (failed, why) = table.the_typo_failed(&[&missing, "does not exist"]).await;

    let c = consumer(&cluster.bootstrap_servers(), &[&dlt]).await;
    let got = read_events(&c, Duration::from_secs(30), 1).await;
    let d = &got[0];
    assert_eq!(d.header("event_id"), Some(failed.event_id.as_str()));
    assert_eq!(d.header("last_error"), Some(why.as_str()));
    assert_eq!(d.header("original_topic"), Some(missing.as_str()));
    assert_eq!(d.key.as_deref(), Some("typo"));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&d.payload).unwrap(),
        serde_json::from_str::<serde_json::Value>(&failed.payload).unwrap()
    );

    relay.stop(Duration::from_secs(30)).await;
    table.drop_all().await;
}
