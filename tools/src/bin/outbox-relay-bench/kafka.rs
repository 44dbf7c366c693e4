//! The Kafka side: unique topics (created and deleted here), the raw broker ceiling (a
//! bare rdkafka producer with the relay's own producer settings — idempotent, acks=all —
//! and the same in-flight window), a consumer that timestamps arrivals, and the textbook
//! relay's publish-and-wait.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use outbox_relay::sink::kafka::KafkaConfig;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::pg::{NaivePublisher, NaiveRow};
use crate::rabbit::Arrivals;
use crate::window::{sliding, Load};

pub const PARTITIONS: i32 = 4;

pub fn config(brokers: &str, topic: &str) -> Result<KafkaConfig> {
    Ok(serde_json::from_value(serde_json::json!({
        "brokers": brokers,
        "topic": topic,
    }))?)
}

/// Whether a broker answers on `brokers` (first host) within 3 s.
pub fn reachable(brokers: &str) -> Result<()> {
    use std::net::ToSocketAddrs;
    let first = brokers.split(',').next().unwrap_or_default().trim();
    let addr = first
        .to_socket_addrs()
        .map_err(|e| anyhow!("{first}: {e}"))?
        .next()
        .ok_or_else(|| anyhow!("{first}: no address"))?;
    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|e| anyhow!("nothing listens on {first} ({e})"))?;
    Ok(())
}

pub struct Kafka {
    pub brokers: String,
    pub topics: std::sync::Mutex<Vec<String>>,
}

impl Kafka {
    pub fn new(brokers: &str) -> Self {
        Self {
            brokers: brokers.to_string(),
            topics: Default::default(),
        }
    }

    /// Create a fresh topic of `PARTITIONS` partitions (deleted by `teardown`).
    pub async fn topic(&self, name: &str) -> Result<String> {
        let cfg = config(&self.brokers, name)?;
        outbox_relay::sink::kafka::tap::ensure_topic(&cfg, name, PARTITIONS)
            .await
            .map_err(|e| anyhow!("create topic {name}: {e}"))?;
        self.topics
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(name.to_string());
        Ok(name.to_string())
    }

    pub async fn teardown(&self) {
        let topics: Vec<String> = std::mem::take(
            &mut *self
                .topics
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        if topics.is_empty() {
            return;
        }
        let admin: Result<AdminClient<DefaultClientContext>, _> = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .create();
        if let Ok(admin) = admin {
            let names: Vec<&str> = topics.iter().map(String::as_str).collect();
            let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
            let _ =
                tokio::time::timeout(Duration::from_secs(15), admin.delete_topics(&names, &opts))
                    .await;
        }
    }

    fn producer(&self, topic: &str) -> Result<FutureProducer> {
        let cfg = config(&self.brokers, topic)?;
        let c = outbox_relay::sink::kafka::producer_config(&cfg, Duration::from_secs(30))
            .map_err(|e| anyhow!("{e}"))?;
        Ok(c.create()?)
    }

    /// The raw broker ceiling: `n` messages of `payload` with the relay's producer
    /// settings, at most `window` awaiting their delivery report. Returns seconds.
    pub async fn ceiling(&self, topic: &str, load: &Load<'_>) -> Result<f64> {
        let Load {
            n, payload, window, ..
        } = *load;
        let publisher = self.publisher(topic)?;
        let producer = &publisher.producer;
        sliding(n, window, |i| {
            let id = Uuid::new_v4().to_string();
            let agg = load.aggregate(i);
            let rec = publisher.record(&id, &agg, payload);
            let queued = producer
                .send_result(rec)
                .map_err(|(e, _)| anyhow!("enqueue: {e}"))
                .map(|fut| {
                    let answer = async move {
                        match fut.await {
                            Ok(Ok(_)) => Ok(1),
                            Ok(Err((e, _))) => bail!("raw producer: delivery failed: {e}"),
                            Err(_) => bail!("raw producer: delivery report dropped"),
                        }
                    };
                    (1, answer)
                });
            std::future::ready(queued)
        })
        .await
    }

    /// Read `topic` from the start and note when each `event_id` header arrived.
    pub async fn arrivals(&self, topic: &str) -> Result<(Arrivals, tokio::task::JoinHandle<()>)> {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", format!("bench-{}", Uuid::new_v4()))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "5")
            .set("fetch.min.bytes", "1")
            .create()?;
        consumer.subscribe(&[topic])?;
        let seen: Arrivals = Arc::new(Mutex::new(HashMap::new()));
        let s = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok(m) = consumer.recv().await else {
                    continue;
                };
                let at = Instant::now();
                let id = m.headers().and_then(|h| {
                    h.iter()
                        .find(|x| x.key == "event_id")
                        .and_then(|x| x.value)
                        .and_then(|v| std::str::from_utf8(v).ok())
                        .and_then(|v| Uuid::parse_str(v).ok())
                });
                if let Some(id) = id {
                    s.lock().await.entry(id).or_insert(at);
                }
            }
        });
        Ok((seen, task))
    }

    /// Wait until the consumer of `arrivals` got its partitions (the first message
    /// sent here arrives), so nothing produced afterwards is missed.
    pub async fn warm(&self, topic: &str, seen: &Arrivals) -> Result<()> {
        let producer = self.producer(topic)?;
        let id = Uuid::new_v4();
        let ids = id.to_string();
        let deadline = Instant::now() + Duration::from_secs(30);
        producer
            .send(
                FutureRecord::to(topic)
                    .key("warm")
                    .payload("{}")
                    .headers(headers(&ids, "warm")),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| anyhow!("warm-up message: {e}"))?;
        while !seen.lock().await.contains_key(&id) {
            if Instant::now() > deadline {
                bail!("the Kafka consumer did not receive the warm-up message within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// A bare producer to `topic` with the relay's producer settings: the raw
    /// ceiling's, the textbook relay's and the latency floor's.
    pub fn publisher(&self, topic: &str) -> Result<BareProducer> {
        Ok(BareProducer {
            producer: self.producer(topic)?,
            topic: topic.to_string(),
        })
    }
}

fn headers(event_id: &str, agg: &str) -> OwnedHeaders {
    OwnedHeaders::new_with_capacity(5)
        .insert(Header {
            key: "traceparent",
            value: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        })
        .insert(Header {
            key: "event_id",
            value: Some(event_id),
        })
        .insert(Header {
            key: "event_type",
            value: Some("order.created"),
        })
        .insert(Header {
            key: "aggregate_type",
            value: Some("order"),
        })
        .insert(Header {
            key: "aggregate_id",
            value: Some(agg),
        })
}

/// Sends records shaped as the relay sends them (key = aggregate, SPEC headers).
pub struct BareProducer {
    producer: FutureProducer,
    topic: String,
}

impl BareProducer {
    /// Record `event_id` of aggregate `agg`.
    fn record<'a>(
        &'a self,
        event_id: &'a str,
        agg: &'a str,
        payload: &'a str,
    ) -> FutureRecord<'a, str, str> {
        FutureRecord::to(&self.topic)
            .key(agg)
            .payload(payload)
            .headers(headers(event_id, agg))
    }

    /// Hand record `id` over (the latency floor; its delivery report is not waited for).
    pub fn send(&self, id: Uuid, agg: &str, payload: &str) -> Result<()> {
        let ids = id.to_string();
        self.producer
            .send_result(self.record(&ids, agg, payload))
            .map(drop)
            .map_err(|(e, _)| anyhow!("floor producer: enqueue: {e}"))
    }

    /// Wait until every record handed over was answered (dropping the producer
    /// earlier would lose the ones still lingering).
    pub fn flush(&self) -> Result<()> {
        use rdkafka::producer::Producer as _;
        self.producer
            .flush(Duration::from_secs(15))
            .map_err(|e| anyhow!("floor producer: flush: {e}"))
    }
}

impl NaivePublisher for BareProducer {
    async fn publish_one(&mut self, row: &NaiveRow) -> Result<()> {
        let id = row.event_id.to_string();
        let rec = self.record(&id, &row.aggregate_id, &row.payload);
        self.producer
            .send(rec, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| anyhow!("naive relay: delivery failed: {e}"))?;
        Ok(())
    }
}
