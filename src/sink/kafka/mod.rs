//! Kafka sink (rdkafka): an idempotent producer with `acks=all`, the SPEC §2 mapping
//! (topic = `destination` or the `kafka.topic` template, key = `aggregate_id`, headers,
//! payload JSON as the value); `send` enqueues one record and returns its delivery
//! report, so the engine keeps many outstanding.
//!
//! Invariants:
//! - a message is `Ok(())` only from its own successful delivery report; the producer is
//!   always idempotent with `acks=all` (`props` refuses properties that weaken it);
//! - a delivery that timed out inside librdkafka, or a fatal producer error, retires the
//!   producer before the next send (dropping it purges its queue, so no stale copy is sent
//!   behind a later row of the same aggregate); `close` does the same for everything
//!   outstanding — the engine re-sends (a duplicate, never a loss);
//! - a topic named by a row is never created: a missing one fails its rows (`Rejected`),
//!   found with a metadata probe rather than by waiting out `message.timeout.ms`;
//! - errors never print secret property values.

mod config;
pub mod errors;
mod props;
pub mod tap;
pub mod wire;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;

use super::{Confirm, Sink, SinkError};
use crate::model::Message;
use crate::secret::redact_url;
pub use config::{validate_properties, KafkaConfig, PropertyError};
// `producer_config` is public only for outbox-relay-tools (the bench's textbook relay
// produces with the relay's own settings); the rest of `props` stays inside the sink.
pub use props::producer_config;
pub use tap::{tap_for_demo, DemoTap};
pub use wire::{check_topic_name, topic_from_template};
use wire::{headers, AGGREGATE_TYPE};

/// Slack past `message.timeout.ms` before the engine stops waiting for a delivery
/// report (librdkafka scans for timed-out messages about once a second).
const REPORT_GRACE: Duration = Duration::from_secs(5);
/// How long a topic found by a metadata probe is trusted without asking again. A probe
/// blocks sending for a round trip, so it is rare; a topic deleted meanwhile fails its
/// rows through librdkafka's own delivery errors.
const TOPIC_CACHE_TTL: Duration = Duration::from_secs(600);

/// The relay's Kafka publisher (invariants in the module doc).
pub struct KafkaSink {
    config: ClientConfig,
    /// The user's properties, kept to scrub secret values from error texts.
    properties: Arc<BTreeMap<String, String>>,
    brokers: String,
    topic_template: Arc<str>,
    /// `topic_template` has nothing to substitute: every message's default topic.
    fixed_topic: bool,
    dead_letter_topic: Option<String>,
    /// Metadata probes and the connect check.
    timeout: Duration,
    /// Longest wait for one delivery report.
    report_wait: Duration,
    producer: Option<FutureProducer>,
    /// Set by a delivery that timed out: the producer must be replaced.
    retire: Arc<AtomicBool>,
    /// The last `connect` reached the cluster (cleared by `close`).
    connected: bool,
    /// Topics seen to exist, and when.
    known_topics: HashMap<String, Instant>,
}

impl KafkaSink {
    /// Validate the configuration and create the producer (it connects in the
    /// background). `timeout` (relay.publish_timeout) becomes `message.timeout.ms`
    /// unless `kafka.properties` sets it.
    pub fn new(cfg: &KafkaConfig, timeout: Duration) -> Result<Self, SinkError> {
        let (config, message_timeout) = props::checked_config(cfg, timeout)?;
        let mut sink = Self {
            config,
            properties: Arc::new(cfg.properties.clone()),
            brokers: redact_url(cfg.brokers.trim()),
            topic_template: Arc::from(cfg.topic.as_str()),
            fixed_topic: !cfg.topic.contains(AGGREGATE_TYPE),
            dead_letter_topic: cfg.dead_letter_topic.clone(),
            timeout,
            report_wait: message_timeout.unwrap_or(timeout).max(timeout) + REPORT_GRACE,
            retire: Arc::new(AtomicBool::new(false)),
            connected: false,
            producer: None,
            known_topics: HashMap::new(),
        };
        let _producer = sink.ensure_producer()?;
        Ok(sink)
    }

    /// The checks `new` makes of the configuration, without creating a producer, so
    /// without any connection (`check --offline`): the relay's own, then librdkafka's
    /// verdict on each property (name and value). The cross-property checks librdkafka
    /// makes only when it creates a client are left to `run`.
    pub fn check_offline(cfg: &KafkaConfig, timeout: Duration) -> Result<(), SinkError> {
        let (config, _) = props::checked_config(cfg, timeout)?;
        config
            .create_native_config()
            .map(drop)
            .map_err(|e| props::config_refused(&e, &cfg.properties))
    }

    /// The topic a message goes to (SPEC §2); a template with nothing to substitute is
    /// shared, not copied for each message.
    pub fn topic_for(&self, m: &Message) -> Arc<str> {
        match &m.destination {
            Some(d) => Arc::from(d.as_str()),
            None if self.fixed_topic => self.topic_template.clone(),
            None => Arc::from(topic_from_template(&self.topic_template, &m.aggregate_type)),
        }
    }

    fn ensure_producer(&mut self) -> Result<FutureProducer, SinkError> {
        if let Some(p) = &self.producer {
            return Ok(p.clone());
        }
        let producer: FutureProducer = self
            .config
            .create()
            .map_err(|e| props::config_refused(&e, &self.properties))?;
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

    /// Whether `topic` was seen to exist within `TOPIC_CACHE_TTL`.
    fn seen_lately(&self, topic: &str) -> bool {
        matches!(self.known_topics.get(topic), Some(seen) if seen.elapsed() <= TOPIC_CACHE_TTL)
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
            .filter(|t| !self.seen_lately(t))
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

impl KafkaSink {
    /// The producer to send with: a fresh one after a fatal error or a delivery that
    /// timed out inside librdkafka (the broker may have lost this producer's id).
    async fn producer(&mut self) -> Result<FutureProducer, SinkError> {
        let broken = self.retire.swap(false, Ordering::SeqCst);
        let fatal = self
            .producer
            .as_ref()
            .and_then(|p| p.client().fatal_error());
        if let Some((code, why)) = &fatal {
            tracing::error!(error = %props::scrub(why, &self.properties), ?code, "fatal Kafka producer error; creating a new producer");
        } else if broken && self.producer.is_some() {
            tracing::warn!(
                "a delivery timed out; dropping the producer so nothing stale is sent later"
            );
        }
        if fatal.is_some() || broken {
            self.drop_producer().await;
        }
        self.ensure_producer()
    }

    fn scrubbed(&self, e: SinkError) -> SinkError {
        match e {
            SinkError::Unavailable(w) => self.unavailable(w),
            SinkError::Rejected(w) => SinkError::Rejected(props::scrub(&w, &self.properties)),
        }
    }
}

impl Sink for KafkaSink {
    async fn connect(&mut self) -> Result<(), SinkError> {
        let producer = self.producer().await?;
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
        self.connected = true;
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

    async fn send(&mut self, m: &Message) -> Result<Confirm, SinkError> {
        let producer = self.producer().await?;
        let topic = self.topic_for(m);
        // A topic seen lately exists, so its name is valid: neither is checked again.
        if !self.seen_lately(&topic) {
            check_topic_name(&topic).map_err(SinkError::Rejected)?;
            if let Some(v) = self
                .probe_topics(&producer, &[&*topic])
                .await
                .remove(&*topic)
            {
                return Err(self.scrubbed(v));
            }
        }
        let record = FutureRecord::to(&topic)
            .key(m.aggregate_id.as_str())
            .payload(m.payload.as_bytes())
            .headers(headers(m, &[]));
        let size = m.payload.len();
        let deadline = Instant::now() + self.timeout;
        let f = enqueue(&producer, record, deadline)
            .await
            .map_err(|e| self.scrubbed(errors::classify(&e, &topic, size)))?;
        let (retire, properties) = (self.retire.clone(), self.properties.clone());
        Ok(Box::pin(async move {
            let e = match f.await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err((e, _))) => e,
                Err(_canceled) => KafkaError::Canceled,
            };
            // Timed out inside librdkafka: the broker may have lost this producer's id
            // (a restart with its state gone answers UNKNOWN_PRODUCER_ID for ever).
            if matches!(
                e.rdkafka_error_code(),
                Some(RDKafkaErrorCode::MessageTimedOut)
            ) {
                retire.store(true, Ordering::SeqCst);
            }
            Err(match errors::classify(&e, &topic, size) {
                SinkError::Rejected(w) => SinkError::Rejected(props::scrub(&w, &properties)),
                SinkError::Unavailable(w) => SinkError::Unavailable(props::scrub(&w, &properties)),
            })
        }))
    }

    async fn dead_letter(
        &mut self,
        message: &Message,
        error: &str,
    ) -> Result<Option<Confirm>, SinkError> {
        let Some(dlt) = self.dead_letter_topic.clone() else {
            return Ok(None);
        };
        let producer = self.producer().await?;
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
                &[("last_error", error), ("original_topic", &original)],
            ));
        let deadline = Instant::now() + self.timeout;
        let size = message.payload.len();
        let f = enqueue(&producer, record, deadline)
            .await
            .map_err(|e| self.scrubbed(errors::classify(&e, &dlt, size)))?;
        Ok(Some(Box::pin(async move {
            match f.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((e, _))) => Err(errors::classify(&e, &dlt, size)),
                Err(_) => Err(SinkError::Unavailable(
                    "the producer was closed before the dead-letter topic answered".into(),
                )),
            }
        })))
    }

    fn is_connected(&self) -> bool {
        self.connected && self.producer.is_some() && !self.retire.load(Ordering::SeqCst)
    }

    /// A metadata request for one topic already seen to exist (for every topic only
    /// before any was seen): librdkafka sends it to a broker it is connected to, and
    /// fails it when none is reachable within `within`.
    fn probe(&self, within: Duration) -> Confirm {
        let producer = match &self.producer {
            Some(p) if self.is_connected() => p.clone(),
            _ => return super::decided(Err(self.unavailable("not connected"))),
        };
        let topic = self.known_topics.keys().next().cloned();
        let (brokers, properties) = (self.brokers.clone(), self.properties.clone());
        Box::pin(async move {
            let asked = tokio::task::spawn_blocking(move || {
                producer
                    .client()
                    .fetch_metadata(topic.as_deref(), within)
                    .map(|_| ())
            })
            .await;
            let why = match asked {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => format!("cannot reach Kafka at {brokers} within {within:?}: {e}"),
                Err(e) => format!("metadata probe failed: {e}"),
            };
            Err(SinkError::Unavailable(props::scrub(&why, &properties)))
        })
    }

    fn confirm_timeout(&self, _publish_timeout: Duration) -> Duration {
        // librdkafka answers every message within `message.timeout.ms` (it scans for
        // expired messages about once a second): wait for its own verdict.
        self.report_wait
    }

    async fn close(&mut self) {
        self.drop_producer().await;
        self.connected = false;
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
