//! The librdkafka configuration of the relay's producer: our defaults, then the user's
//! `kafka.properties` as-is, then the guarantees (idempotence, `acks=all`) that no
//! property may weaken.
//!
//! Invariant: the producer is always idempotent with `acks=all` and places a key with
//! the Java client's partitioner (`murmur2_random`). A property that would turn either
//! off, or move keys to other partitions, is refused before any client is created, with
//! an error naming the key as `kafka.properties.<name>` (`config::validate_properties`,
//! which config validation runs first).
//!
//! Also the configuration checks the sink makes before it creates a producer
//! (`checked_config`: these, then the topic names), which `check --offline` runs alone,
//! and the wording of librdkafka's refusals (`config_refused`).

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::ClientConfig;

use super::check_topic_name;
use super::config::{refuse, validate_properties, KafkaConfig, PropertyError, PARTITIONER};
use crate::secret::{is_secret_property, redact_url};
use crate::sink::SinkError;

/// The message timeout librdkafka will apply: the user's `message.timeout.ms` (or its
/// alias `delivery.timeout.ms`) if set, else `default`. `None` means "never" (0).
pub fn message_timeout(
    props: &BTreeMap<String, String>,
    default: Duration,
) -> Result<Option<Duration>, PropertyError> {
    for name in ["message.timeout.ms", "delivery.timeout.ms"] {
        if let Some(v) = props.get(name) {
            let ms: u64 = v.trim().parse().map_err(|_| {
                refuse(name, format!("must be a number of milliseconds, got {v:?}"))
            })?;
            return Ok((ms > 0).then(|| Duration::from_millis(ms)));
        }
    }
    Ok(Some(default))
}

/// The producer configuration for `cfg`, with `timeout` as the default
/// `message.timeout.ms`.
pub fn producer_config(
    cfg: &KafkaConfig,
    timeout: Duration,
) -> Result<ClientConfig, PropertyError> {
    validate_properties(&cfg.properties)?;
    let mut c = base_config(cfg);
    c.set("client.id", "outbox-relay")
        // Messages arrive one aggregate head at a time; an idempotent producer keeps at
        // most 5 produce requests in flight per broker, so gather a few ms per request.
        .set("linger.ms", "5")
        // Same key → same partition as the Java client's default partitioner.
        .set("partitioner", PARTITIONER)
        // A typo'd `destination` must fail its row, never create a topic (SPEC §2).
        .set("allow.auto.create.topics", "false")
        .set("message.timeout.ms", timeout.as_millis().max(1).to_string());
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    // The guarantees, last: nothing above may have weakened them.
    c.set("enable.idempotence", "true").set("acks", "all");
    if c.get("request.required.acks").is_some() {
        c.set("request.required.acks", "all");
    }
    Ok(c)
}

/// Brokers plus the user's properties (security settings), for the demo's admin and
/// consumer clients: producer-only keys are dropped so librdkafka does not warn.
pub fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = base_config(cfg);
    for (k, v) in &cfg.properties {
        if is_common_property(k) {
            c.set(k, v);
        }
    }
    c
}

fn base_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", cfg.brokers.trim());
    c
}

/// Properties that make sense for any client (connection, security, debugging).
fn is_common_property(k: &str) -> bool {
    [
        "security.",
        "ssl.",
        "sasl.",
        "socket.",
        "broker.",
        "client.",
        "debug",
        "bootstrap.",
        "metadata.",
        "reconnect.",
        "api.version",
        "enable.ssl",
        "log_level",
    ]
    .iter()
    .any(|p| k.starts_with(p))
}

/// Replace the values of secret properties in `text` with `***`.
pub fn scrub(text: &str, props: &BTreeMap<String, String>) -> String {
    let mut out = redact_url(text);
    for (k, v) in props {
        if is_secret_property(k) && !v.is_empty() {
            out = out.replace(v.as_str(), "***");
        }
    }
    out
}

/// The producer configuration `cfg` makes and its message timeout, after the relay's
/// checks of the properties and topic names (what `new` and `check_offline` share).
pub(super) fn checked_config(
    cfg: &KafkaConfig,
    timeout: Duration,
) -> Result<(ClientConfig, Option<Duration>), SinkError> {
    let config_err = |e: PropertyError| SinkError::Rejected(e.to_string());
    let config = producer_config(cfg, timeout).map_err(config_err)?;
    let msg_timeout = message_timeout(&cfg.properties, timeout).map_err(config_err)?;
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
    Ok((config, msg_timeout))
}

/// librdkafka's refusal of the configuration, naming the relay's config key, with no
/// secret property value in it.
pub(super) fn config_refused(e: &KafkaError, properties: &BTreeMap<String, String>) -> SinkError {
    let why = match e {
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
    SinkError::Rejected(scrub(&why, properties))
}

#[cfg(test)]
mod tests {
    use super::super::config::tests::props;
    use super::*;

    fn cfg(kv: &[(&str, &str)]) -> KafkaConfig {
        KafkaConfig {
            brokers: "k:9092".into(),
            topic: "outbox.{aggregate_type}".into(),
            dead_letter_topic: None,
            properties: props(kv),
        }
    }

    #[test]
    fn defaults_then_user_then_guarantees() {
        let c = producer_config(
            &cfg(&[
                ("linger.ms", "20"),
                ("compression.type", "lz4"),
                ("sasl.password", "file-Secret-7d1"),
            ]),
            Duration::from_secs(15),
        )
        .unwrap();
        assert_eq!(c.get("linger.ms"), Some("20"));
        // Secret properties (e.g. read from a `_file`) reach the producer as set.
        assert_eq!(c.get("sasl.password"), Some("file-Secret-7d1"));
        assert_eq!(c.get("compression.type"), Some("lz4"));
        assert_eq!(c.get("enable.idempotence"), Some("true"));
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("message.timeout.ms"), Some("15000"));
        assert_eq!(c.get("bootstrap.servers"), Some("k:9092"));
        let c = producer_config(
            &cfg(&[("message.timeout.ms", "4000")]),
            Duration::from_secs(15),
        )
        .unwrap();
        assert_eq!(c.get("message.timeout.ms"), Some("4000"));
    }

    #[test]
    fn message_timeout_follows_override() {
        let d = Duration::from_secs(15);
        assert_eq!(message_timeout(&props(&[]), d).unwrap(), Some(d));
        assert_eq!(
            message_timeout(&props(&[("delivery.timeout.ms", "2000")]), d).unwrap(),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            message_timeout(&props(&[("message.timeout.ms", "0")]), d).unwrap(),
            None
        );
        assert!(message_timeout(&props(&[("message.timeout.ms", "x")]), d).is_err());
    }

    #[test]
    fn secrets_are_scrubbed() {
        let p = props(&[("sasl.password", "hunter2"), ("sasl.username", "app")]);
        let s = scrub("Invalid value \"hunter2\" for sasl.password (user app)", &p);
        assert!(!s.contains("hunter2"));
        assert!(s.contains("app"));
    }
}
