//! The demo's Kafka reader, and topic creation for the demo and the tests: the relay
//! itself never creates a topic. The tap reads only messages produced after it started
//! (each partition assigned at its high watermark), without a consumer group.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Headers, Message as _};
use rdkafka::{Offset, TopicPartitionList};

use super::{props, topic_from_template, KafkaConfig};
use crate::sink::{Arrival, SinkError};

/// How long admin and metadata calls of the demo may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

fn unavailable(cfg: &KafkaConfig, why: impl std::fmt::Display) -> SinkError {
    SinkError::Unavailable(props::scrub(&why.to_string(), &cfg.properties))
}

/// Create `topic` with `partitions` partitions if it does not exist. `Ok(true)` when
/// this call created it. For the demo and the tests; never called by the relay.
pub async fn ensure_topic(
    cfg: &KafkaConfig,
    topic: &str,
    partitions: i32,
) -> Result<bool, SinkError> {
    let admin: Arc<AdminClient<DefaultClientContext>> = Arc::new(
        props::client_config(cfg)
            .create()
            .map_err(|e| unavailable(cfg, format!("cannot create a Kafka admin client: {e}")))?,
    );
    if partition_count(cfg, &admin, topic).await?.is_some() {
        return Ok(false);
    }
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let opts = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT));
    let res = admin
        .create_topics([&new], &opts)
        .await
        .map_err(|e| unavailable(cfg, format!("cannot create topic {topic:?}: {e}")))?;
    let mut created = false;
    for r in res {
        match r {
            Ok(_) => created = true,
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => {
                return Err(unavailable(
                    cfg,
                    format!("cannot create topic {t:?}: {code}"),
                ))
            }
        }
    }
    // Creation is asynchronous in Kafka: wait until the metadata shows its partitions.
    let deadline = tokio::time::Instant::now() + ADMIN_TIMEOUT;
    loop {
        if partition_count(cfg, &admin, topic)
            .await?
            .is_some_and(|n| n > 0)
        {
            return Ok(created);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(unavailable(
                cfg,
                format!("topic {topic:?} not visible after creation"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Partitions of `topic`, `None` if it does not exist.
async fn partition_count<C: rdkafka::client::ClientContext + 'static>(
    cfg: &KafkaConfig,
    admin: &AdminClient<C>,
    topic: &str,
) -> Result<Option<usize>, SinkError> {
    let md =
        tokio::task::block_in_place(|| admin.inner().fetch_metadata(Some(topic), ADMIN_TIMEOUT))
            .map_err(|e| unavailable(cfg, format!("cannot reach Kafka at {}: {e}", cfg.brokers)))?;
    Ok(md
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map(|t| t.partitions().len()))
}

/// The demo's reader: every message produced to the demo's topic after it started.
pub struct DemoTap {
    consumer: Arc<StreamConsumer>,
    topic: String,
}

/// A tap on the topic the demo's `order` events go to (created if missing, 3
/// partitions), reading from the current end of every partition.
pub async fn tap_for_demo(cfg: &KafkaConfig) -> Result<DemoTap, SinkError> {
    let topic = topic_from_template(&cfg.topic, "order");
    if ensure_topic(cfg, &topic, 3).await? {
        tracing::info!(%topic, "created the demo topic");
    }
    let consumer: Arc<StreamConsumer> = Arc::new(
        props::client_config(cfg)
            .set(
                "group.id",
                format!("outbox-relay-demo-{}", uuid::Uuid::new_v4()),
            )
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            // Measure the relay, not the consumer's fetch batching (default 500 ms).
            .set("fetch.wait.max.ms", "10")
            .create()
            .map_err(|e| unavailable(cfg, format!("cannot create a Kafka consumer: {e}")))?,
    );
    let (c, t) = (consumer.clone(), topic.clone());
    let tpl = tokio::task::spawn_blocking(move || -> Result<TopicPartitionList, String> {
        let (consumer, topic) = (c, t);
        let md = consumer
            .fetch_metadata(Some(&topic), ADMIN_TIMEOUT)
            .map_err(|e| e.to_string())?;
        let mut tpl = TopicPartitionList::new();
        for t in md.topics().iter().filter(|t| t.name() == topic) {
            for p in t.partitions() {
                let (_, high) = consumer
                    .fetch_watermarks(&topic, p.id(), ADMIN_TIMEOUT)
                    .map_err(|e| e.to_string())?;
                tpl.add_partition_offset(&topic, p.id(), Offset::Offset(high))
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok(tpl)
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r)
    .map_err(|e| unavailable(cfg, format!("cannot read topic {topic:?}: {e}")))?;
    consumer
        .assign(&tpl)
        .map_err(|e| unavailable(cfg, format!("cannot read topic {topic:?}: {e}")))?;
    Ok(DemoTap { consumer, topic })
}

impl DemoTap {
    /// Close the consumer off the async runtime (its `Drop` leaves the group and joins
    /// librdkafka's threads, blocking).
    pub async fn close(self) {
        let consumer = self.consumer;
        let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
    }

    /// The topic this tap reads.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The next message, or `None` after `timeout` without one.
    pub async fn next(&mut self, timeout: Duration) -> Option<Arrival> {
        let msg = tokio::time::timeout(timeout, self.consumer.recv())
            .await
            .ok()?
            .ok()?;
        let headers: Vec<(String, String)> = msg
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        let v = h.value.map(String::from_utf8_lossy).unwrap_or_default();
                        (h.key.to_string(), v.into_owned())
                    })
                    .collect()
            })
            .unwrap_or_default();
        let header = |k: &str| crate::sink::tap::header(&headers, k);
        let key = msg
            .key()
            .map(String::from_utf8_lossy)
            .unwrap_or_default()
            .into_owned();
        let body = msg
            .payload()
            .map(String::from_utf8_lossy)
            .unwrap_or_default();
        Some(Arrival {
            event_id: header("event_id"),
            aggregate_id: key.clone(),
            summary: format!(
                "  topic        {} (partition {}, offset {})\n  key          {}\n  headers      {:?}\n  body         {}",
                msg.topic(),
                msg.partition(),
                msg.offset(),
                key,
                headers,
                body
            ),
        })
    }
}
