//! Kafka sink (rdkafka): an idempotent producer with `acks=all`, the SPEC §2 mapping
//! (topic = `destination` or the `kafka.topic` template, key = `aggregate_id`, headers,
//! payload JSON as the value), a whole wave in flight at once.
//!
//! Invariants:
//! - a message is `Ok(())` only from its own successful delivery report; the producer is
//!   always idempotent with `acks=all` (`props` refuses properties that weaken it);
//! - a wave is enqueued in the given order and all its reports are awaited before
//!   `publish` returns, so the relay's waves keep per-aggregate order;
//! - every enqueued message gets a result: its report, or `Unavailable` once the wait for
//!   it ends — then the producer is dropped (purging its queue) so no stale copy is sent
//!   behind a later row of the same aggregate; the relay re-publishes (a duplicate, never
//!   a loss);
//! - a topic named by a row is never created: a missing one fails its rows (`Rejected`),
//!   found with a metadata probe rather than by waiting out `message.timeout.ms`;
//! - a fatal producer error (idempotence state lost) drops the producer; the next
//!   `publish` creates a fresh one. Errors never print secret property values.

pub mod errors;
pub mod props;
pub mod tap;
pub mod wire;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;

use super::{Sink, SinkError};
use crate::config::KafkaConfig;
use crate::model::Message;
pub use props::{validate_properties, PropertyError};
pub use tap::{tap_for_demo, DemoTap};
use wire::headers;
pub use wire::{check_topic_name, topic_from_template};

/// How long a topic found by a metadata probe is trusted without asking again.
const TOPIC_CACHE_TTL: Duration = Duration::from_secs(30);
/// Slack past `message.timeout.ms` before we stop waiting for a delivery report
/// (librdkafka scans for timed-out messages about once a second).
const REPORT_GRACE: Duration = Duration::from_secs(5);

/// The relay's Kafka publisher (invariants in the module doc).
pub struct KafkaSink {
    config: ClientConfig,
    /// The user's properties, kept to scrub secret values from error texts.
    properties: BTreeMap<String, String>,
    brokers: String,
    topic_template: String,
    dead_letter_topic: Option<String>,
    /// Metadata probes and the connect check.
    timeout: Duration,
    /// Longest wait for one wave's delivery reports.
    report_wait: Duration,
    producer: Option<FutureProducer>,
    /// Topics seen to exist, and when.
    known_topics: HashMap<String, Instant>,
}

impl KafkaSink {
    /// Validate the configuration and create the producer (it connects in the
    /// background). `timeout` (relay.publish_timeout) becomes `message.timeout.ms`
    /// unless `kafka.properties` sets it.
    pub fn new(cfg: &KafkaConfig, timeout: Duration) -> Result<Self, SinkError> {
        let config_err = |e: PropertyError| SinkError::Rejected(e.to_string());
        let config = props::producer_config(cfg, timeout).map_err(config_err)?;
        let message_timeout =
            props::message_timeout(&cfg.properties, timeout).map_err(config_err)?;
        let template_check = cfg.topic.replace("{aggregate_type}", "x");
        if let Err(why) = check_topic_name(&template_check) {
            return Err(SinkError::Rejected(format!(
                "config key `kafka.topic`: {:?} does not make valid topic names: {why}",
                cfg.topic
            )));
        }
        if let Some(dlt) = &cfg.dead_letter_topic {
            if let Err(why) = check_topic_name(dlt) {
                return Err(SinkError::Rejected(format!(
                    "config key `kafka.dead_letter_topic`: {why}"
                )));
            }
        }
        let mut sink = Self {
            config,
            properties: cfg.properties.clone(),
            brokers: crate::config::redact_url(cfg.brokers.trim()),
            topic_template: cfg.topic.clone(),
            dead_letter_topic: cfg.dead_letter_topic.clone(),
            timeout,
            report_wait: message_timeout.unwrap_or(timeout).max(timeout) + REPORT_GRACE,
            producer: None,
            known_topics: HashMap::new(),
        };
        let _producer = sink.ensure_producer()?;
        Ok(sink)
    }

    /// The topic a message goes to (SPEC §2).
    pub fn topic_for(&self, m: &Message) -> String {
        match &m.destination {
            Some(d) => d.clone(),
            None => topic_from_template(&self.topic_template, &m.aggregate_type),
        }
    }

    fn ensure_producer(&mut self) -> Result<FutureProducer, SinkError> {
        if let Some(p) = &self.producer {
            return Ok(p.clone());
        }
        let producer: FutureProducer = self.config.create().map_err(|e| {
            let why = match &e {
                KafkaError::ClientConfig(_, desc, key, _) => {
                    let key = match key.as_str() {
                        "bootstrap.servers" | "metadata.broker.list" => "kafka.brokers".into(),
                        k => format!("kafka.properties.{k}"),
                    };
                    format!("config key `{key}`: librdkafka refused it: {desc}")
                }
                other => format!(
                    "config keys `kafka.brokers` / `kafka.properties`: librdkafka refused the configuration: {other}"
                ),
            };
            SinkError::Rejected(props::scrub(&why, &self.properties))
        })?;
        self.producer = Some(producer.clone());
        Ok(producer)
    }

    /// Drop the producer off the async runtime: its `Drop` purges and flushes (bounded)
    /// and joins its polling thread.
    async fn drop_producer(&mut self) {
        if let Some(p) = self.producer.take() {
            let _ = tokio::task::spawn_blocking(move || drop(p)).await;
        }
    }

    fn unavailable(&self, why: impl AsRef<str>) -> SinkError {
        SinkError::Unavailable(props::scrub(why.as_ref(), &self.properties))
    }

    /// Which of `topics` are missing (with the reason), probing those not seen lately.
    /// A probe that cannot reach the broker makes that topic's rows `Unavailable`.
    async fn probe_topics(
        &mut self,
        producer: &FutureProducer,
        topics: &[&str],
    ) -> HashMap<String, SinkError> {
        let now = Instant::now();
        let mut to_check: Vec<String> = topics
            .iter()
            .filter(|t| {
                !matches!(self.known_topics.get(**t), Some(seen) if now.duration_since(*seen) <= TOPIC_CACHE_TTL)
            })
            .map(|t| t.to_string())
            .collect();
        to_check.sort();
        to_check.dedup();
        let mut verdicts = HashMap::new();
        if to_check.is_empty() {
            return verdicts;
        }
        let p = producer.clone();
        let timeout = self.timeout;
        let probed = tokio::task::spawn_blocking(move || {
            // After one probe fails to reach the broker, the others would only wait out
            // the same timeout: they share its error.
            let mut unreachable: Option<KafkaError> = None;
            let mut out = Vec::with_capacity(to_check.len());
            for t in to_check {
                if let Some(e) = &unreachable {
                    out.push((t, Err(e.clone())));
                    continue;
                }
                let res = p.client().fetch_metadata(Some(&t), timeout).map(|md| {
                    md.topics().iter().find(|mt| mt.name() == t).map(|mt| {
                        (
                            mt.error().map(RDKafkaErrorCode::from),
                            mt.partitions().len(),
                        )
                    })
                });
                if let Err(e) = &res {
                    unreachable = Some(e.clone());
                }
                out.push((t, res));
            }
            out
        })
        .await;
        let probed = match probed {
            Ok(p) => p,
            Err(e) => {
                for t in topics {
                    verdicts.insert(
                        t.to_string(),
                        self.unavailable(format!("metadata probe failed: {e}")),
                    );
                }
                return verdicts;
            }
        };
        for (topic, res) in probed {
            match res {
                Ok(Some((None, n))) if n > 0 => {
                    self.known_topics.insert(topic, now);
                }
                // Exists but not ready (leader election, creation in progress): let the
                // producer wait for it; not cached.
                Ok(Some((None, _))) => {}
                Ok(Some((Some(code), _))) if errors::is_unavailable(code) => {}
                Ok(Some((Some(code), _))) => {
                    let v = errors::classify_code(code, &topic, 0);
                    verdicts.insert(topic, v);
                }
                Ok(None) => {
                    let v = errors::classify_code(RDKafkaErrorCode::UnknownTopic, &topic, 0);
                    verdicts.insert(topic, v);
                }
                Err(e) => {
                    let v = self.unavailable(format!(
                        "cannot fetch metadata for topic {topic:?} from {}: {e}",
                        self.brokers
                    ));
                    verdicts.insert(topic, v);
                }
            }
        }
        verdicts
    }

    /// After a wave: a fatal producer error (or a report we gave up waiting for) means
    /// this producer must not be used again.
    async fn retire_if_broken(&mut self, producer: &FutureProducer, gave_up: bool) {
        if let Some((code, why)) = producer.client().fatal_error() {
            tracing::error!(error = %props::scrub(&why, &self.properties), ?code, "fatal Kafka producer error; creating a new producer");
            self.drop_producer().await;
        } else if gave_up {
            tracing::warn!(wait = ?self.report_wait, "delivery reports overdue; dropping the producer so nothing stale is sent later");
            self.drop_producer().await;
        }
    }
}

/// Enqueue one record, waiting out a full local queue until `deadline`.
async fn enqueue(
    producer: &FutureProducer,
    mut record: FutureRecord<'_, str, [u8]>,
    deadline: Instant,
) -> Result<rdkafka::producer::DeliveryFuture, KafkaError> {
    loop {
        match producer.send_result(record) {
            Ok(f) => return Ok(f),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r))
                if Instant::now() < deadline =>
            {
                record = r;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// Await one delivery report until `deadline`. `None` when the wait ran out.
async fn report(
    f: rdkafka::producer::DeliveryFuture,
    deadline: Instant,
) -> Option<Result<(), KafkaError>> {
    match tokio::time::timeout_at(deadline.into(), f).await {
        Ok(Ok(Ok(_))) => Some(Ok(())),
        Ok(Ok(Err((e, _)))) => Some(Err(e)),
        Ok(Err(_canceled)) => Some(Err(KafkaError::Canceled)),
        Err(_) => None,
    }
}

impl Sink for KafkaSink {
    async fn connect(&mut self) -> Result<(), SinkError> {
        let producer = self.ensure_producer()?;
        let timeout = self.timeout;
        let p = producer.clone();
        let md = tokio::task::spawn_blocking(move || {
            p.client()
                .fetch_metadata(None, timeout)
                .map(|md| md.brokers().len())
        })
        .await
        .map_err(|e| self.unavailable(e.to_string()))?;
        match md {
            Ok(n) => tracing::debug!(brokers = n, "Kafka reached"),
            Err(e) => {
                return Err(self.unavailable(format!(
                    "cannot reach Kafka at {} within {timeout:?}: {e}",
                    self.brokers
                )))
            }
        }
        if let Some(dlt) = self.dead_letter_topic.clone() {
            if let Some(v) = self
                .probe_topics(&producer, &[dlt.as_str()])
                .await
                .remove(&dlt)
            {
                tracing::warn!(topic = %dlt, error = %v, "kafka.dead_letter_topic is not usable; failed rows will not be dead-lettered until it is");
            }
        }
        Ok(())
    }

    async fn publish(&mut self, messages: &[Message]) -> Vec<Result<(), SinkError>> {
        let producer = match self.ensure_producer() {
            Ok(p) => p,
            Err(e) => return vec![Err(e); messages.len()],
        };
        let mut results: Vec<Option<Result<(), SinkError>>> = vec![None; messages.len()];
        let topics: Vec<String> = messages.iter().map(|m| self.topic_for(m)).collect();
        let mut valid: Vec<&str> = Vec::with_capacity(topics.len());
        for (i, t) in topics.iter().enumerate() {
            match check_topic_name(t) {
                Ok(()) => valid.push(t),
                Err(why) => results[i] = Some(Err(SinkError::Rejected(why))),
            }
        }
        let verdicts = self.probe_topics(&producer, &valid).await;

        // Enqueue the wave in order; every message that is queued gets a future.
        let deadline = Instant::now() + self.report_wait;
        let mut pending = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            if results[i].is_some() {
                continue;
            }
            let topic = topics[i].as_str();
            if let Some(v) = verdicts.get(topic) {
                results[i] = Some(Err(v.clone()));
                continue;
            }
            let record = FutureRecord::to(topic)
                .key(m.aggregate_id.as_str())
                .payload(m.payload.as_bytes())
                .headers(headers(m, &[]));
            match enqueue(&producer, record, deadline).await {
                Ok(f) => pending.push((i, f)),
                Err(e) => results[i] = Some(Err(errors::classify(&e, topic, m.payload.len()))),
            }
        }

        let reports = futures::future::join_all(
            pending
                .into_iter()
                .map(|(i, f)| async move { (i, report(f, deadline).await) }),
        )
        .await;
        let mut gave_up = false;
        for (i, r) in reports {
            results[i] = Some(match r {
                Some(Ok(())) => Ok(()),
                Some(Err(e)) => {
                    // Timed out inside librdkafka: the broker may have lost this
                    // producer's id (a restart with its state gone answers
                    // UNKNOWN_PRODUCER_ID for ever). Start over with a fresh producer.
                    if e.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageTimedOut) {
                        gave_up = true;
                    }
                    Err(errors::classify(&e, &topics[i], messages[i].payload.len()))
                }
                None => {
                    gave_up = true;
                    Err(self.unavailable(format!(
                        "no delivery report from {} within {:?}",
                        self.brokers, self.report_wait
                    )))
                }
            });
        }
        self.retire_if_broken(&producer, gave_up).await;
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(SinkError::Unavailable("not published".into()))))
            .map(|r| {
                r.map_err(|e| match e {
                    SinkError::Unavailable(w) => self.unavailable(w),
                    SinkError::Rejected(w) => {
                        SinkError::Rejected(props::scrub(&w, &self.properties))
                    }
                })
            })
            .collect()
    }

    async fn dead_letter(&mut self, message: &Message, error: &str) -> Result<bool, SinkError> {
        let Some(dlt) = self.dead_letter_topic.clone() else {
            return Ok(false);
        };
        let producer = self.ensure_producer()?;
        if let Some(v) = self
            .probe_topics(&producer, &[dlt.as_str()])
            .await
            .remove(&dlt)
        {
            return Err(v);
        }
        let original = self.topic_for(message);
        let record = FutureRecord::to(&dlt)
            .key(message.aggregate_id.as_str())
            .payload(message.payload.as_bytes())
            .headers(headers(
                message,
                &[("last_error", error), ("original_topic", original.as_str())],
            ));
        let deadline = Instant::now() + self.report_wait;
        let size = message.payload.len();
        let f = enqueue(&producer, record, deadline)
            .await
            .map_err(|e| errors::classify(&e, &dlt, size))?;
        let r = report(f, deadline).await;
        self.retire_if_broken(&producer, r.is_none()).await;
        match r {
            Some(Ok(())) => Ok(true),
            Some(Err(e)) => Err(errors::classify(&e, &dlt, size)),
            None => Err(self.unavailable(format!(
                "no delivery report for the dead-letter topic {dlt:?} within {:?}",
                self.report_wait
            ))),
        }
    }

    async fn close(&mut self) {
        self.drop_producer().await;
        self.known_topics.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weakening_properties_is_a_config_error() {
        let cfg = KafkaConfig {
            brokers: "127.0.0.1:1".into(),
            topic: "outbox.{aggregate_type}".into(),
            dead_letter_topic: None,
            properties: [("acks".to_string(), "1".to_string())].into(),
        };
        match KafkaSink::new(&cfg, Duration::from_secs(1)) {
            Err(SinkError::Rejected(why)) => {
                assert!(why.contains("kafka.properties.acks"), "{why}")
            }
            Err(other) => panic!("{other:?}"),
            Ok(_) => panic!("acks=1 accepted"),
        }
    }
}
