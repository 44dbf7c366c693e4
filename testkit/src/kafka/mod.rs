//! Kafka side of the tests: the one reader (`read`: a consumer on explicitly assigned
//! partitions, read until enough distinct events arrived or the topic went quiet), a
//! background collector that survives a broker restart, topic creation and removal
//! (`TestTopics`), the Kafka sink config, and a private tansu broker.

mod collect;
mod tansu;
mod topics;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use outbox_relay::sink::kafka::KafkaConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message as _};
use rdkafka::ClientConfig;

use crate::hex_id;

pub use collect::KafkaCollector;
pub use tansu::Tansu;
pub use topics::TestTopics;

/// One Kafka record as a consumer saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub headers: Vec<(String, String)>,
    pub payload: String,
}

impl Received {
    /// The record `msg` as text.
    pub fn of(msg: &BorrowedMessage<'_>) -> Received {
        let headers = msg
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key.to_string(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        Received {
            topic: msg.topic().to_string(),
            partition: msg.partition(),
            offset: msg.offset(),
            key: msg.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            headers,
            payload: msg
                .payload()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .unwrap_or_default(),
        }
    }

    pub fn header(&self, k: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }
}

/// A consumer reading every partition of `topics` from the beginning. Partitions are
/// assigned explicitly (no consumer-group join, whose rebalance can outlast a test's
/// deadline on a loaded machine); the metadata lookup is retried for up to 30 s.
pub async fn consumer(brokers: &str, topics: &[&str]) -> StreamConsumer {
    use rdkafka::{Offset, TopicPartitionList};
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("kt-{}", hex_id()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .unwrap();
    let topics: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut tpl = TopicPartitionList::new();
        for topic in &topics {
            loop {
                let parts: Vec<i32> = c
                    .fetch_metadata(Some(topic), Duration::from_secs(5))
                    .map(|md| {
                        md.topics()
                            .iter()
                            .filter(|t| t.name() == topic && t.error().is_none())
                            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                            .collect()
                    })
                    .unwrap_or_default();
                if !parts.is_empty() {
                    for p in parts {
                        tpl.add_partition_offset(topic, p, Offset::Beginning)
                            .unwrap();
                    }
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "topic {topic:?} has no partitions"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        c.assign(&tpl).unwrap();
        c
    })
    .await
    .unwrap()
}

/// When [`read`] stops.
#[derive(Debug, Clone, Copy)]
pub struct ReadUntil {
    /// Distinct `event_id`s wanted.
    pub distinct: usize,
    /// `None`: stop as soon as `distinct` arrived, panic at `within`, and a consumer
    /// error fails the test. `Some(q)`: read on until nothing new came for `q`; at
    /// `within`, return what arrived; consumer errors are printed and ridden out.
    pub quiet: Option<Duration>,
    pub within: Duration,
}

/// Read from `consumer` until `until` says stop. Records in arrival order (per
/// partition, that is log order), duplicates kept.
pub async fn read(consumer: &StreamConsumer, until: ReadUntil) -> Vec<Received> {
    let ReadUntil {
        distinct: want,
        quiet,
        within,
    } = until;
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    let mut distinct = HashSet::new();
    let mut last_new = Instant::now();
    let mut errors = 0usize;
    loop {
        if distinct.len() >= want && quiet.is_none_or(|q| last_new.elapsed() >= q) {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            assert!(
                quiet.is_some(),
                "timed out after {within:?} reading Kafka; got {} records",
                out.len()
            );
            break;
        }
        let next = tokio::time::timeout(left.min(Duration::from_millis(500)), consumer.recv());
        let Ok(msg) = next.await else {
            continue;
        };
        let msg = match msg {
            Ok(m) => m,
            Err(e) if quiet.is_some() => {
                errors += 1;
                if errors <= 5 {
                    eprintln!("reading Kafka: consumer error: {e}");
                }
                continue;
            }
            Err(e) => panic!("consumer error: {e}"),
        };
        let r = Received::of(&msg);
        if let Some(id) = r.header("event_id") {
            distinct.insert(id.to_string());
            last_new = Instant::now();
        }
        out.push(r);
    }
    out
}

/// Read until `want` distinct `event_id`s arrived (duplicates are kept in the result);
/// panic after `within`.
pub async fn read_events(
    consumer: &StreamConsumer,
    within: Duration,
    want: usize,
) -> Vec<Received> {
    let quiet = None;
    read(
        consumer,
        ReadUntil {
            distinct: want,
            quiet,
            within,
        },
    )
    .await
}

/// Read `topics` from the beginning until nothing new arrived for `quiet` (after at
/// least `min` distinct event ids) or `within` passed. Returns the `event_id` headers in
/// arrival order (per partition, that is log order).
pub async fn kafka_drain(
    brokers: &str,
    topics: &[&str],
    min: usize,
    quiet: Duration,
    within: Duration,
) -> Vec<String> {
    let c = consumer(brokers, topics).await;
    let until = ReadUntil {
        distinct: min,
        quiet: Some(quiet),
        within,
    };
    read(&c, until)
        .await
        .iter()
        .filter_map(|r| r.header("event_id").map(str::to_string))
        .collect()
}

/// Distinct event ids among `records`.
pub fn event_ids(records: &[Received]) -> HashMap<String, Received> {
    let mut m = HashMap::new();
    for r in records {
        if let Some(id) = r.header("event_id") {
            m.entry(id.to_string()).or_insert_with(|| r.clone());
        }
    }
    m
}

/// Create `topic` (retrying while the broker starts), as an operator would.
pub async fn kafka_create_topic(brokers: &str, topic: &str, partitions: i32, within: Duration) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    let deadline = Instant::now() + within;
    loop {
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(5)));
        let res = admin
            .create_topics(
                &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
                &opts,
            )
            .await;
        match res {
            Ok(r) => match &r[0] {
                Ok(_) => return,
                Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => return,
                Err(e) if Instant::now() > deadline => panic!("create topic {topic}: {e:?}"),
                Err(_) => {}
            },
            Err(e) if Instant::now() > deadline => panic!("create topic {topic}: {e}"),
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The Kafka sink's config for `brokers`, default topic `outbox.{aggregate_type}`.
pub fn kafka_config(brokers: &str, props: &[(&str, &str)]) -> KafkaConfig {
    KafkaConfig {
        brokers: brokers.into(),
        topic: "outbox.{aggregate_type}".into(),
        dead_letter_topic: None,
        properties: props
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}
