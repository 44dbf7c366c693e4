//! The `[kafka]` config section: its keys, their defaults, a `Debug` that hides secret
//! properties, and its validation (run by `Settings` when `sink.kind = "kafka"`),
//! including the check of `kafka.properties` against the relay's guarantees
//! (`validate_properties`), which the producer configuration (`props`) applies again.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

use crate::checks::{invalid, ConfigError};
use crate::secret::{is_secret_property, redact_url};

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    #[serde(default = "default_brokers")]
    pub brokers: String,
    #[serde(default = "default_topic")]
    pub topic: String,
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    /// Passed to librdkafka as-is (after `<name>_file` entries are read into `<name>`).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

fn default_brokers() -> String {
    "localhost:9092".into()
}

fn default_topic() -> String {
    "outbox.{aggregate_type}".into()
}

impl fmt::Debug for KafkaConfig {
    /// Secret properties (`sasl.password`, `ssl.key.password`, …) print as `***`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let properties: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let shown = if is_secret_property(k) {
                    "***"
                } else {
                    v.as_str()
                };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &redact_url(&self.brokers))
            .field("topic", &self.topic)
            .field("dead_letter_topic", &self.dead_letter_topic)
            .field("properties", &properties)
            .finish()
    }
}

impl KafkaConfig {
    /// Check every value of the section, naming the key of the first bad one. A
    /// `properties."<name>_file"` whose file is not there (`check --offline`) supplied
    /// no `<name>`, so there is nothing of it to check here.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.brokers.trim().is_empty() {
            return Err(invalid("kafka.brokers", "must not be empty"));
        }
        if self.topic.trim().is_empty() {
            return Err(invalid("kafka.topic", "must not be empty"));
        }
        validate_properties(&self.properties).map_err(|e| ConfigError::Property(e.to_string()))
    }
}

/// A `kafka.properties` entry the relay cannot accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PropertyError {
    /// The full config key, e.g. `kafka.properties.acks`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for PropertyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "config key `{}`: {}", self.key, self.message)
    }
}

impl std::error::Error for PropertyError {}

pub(super) fn refuse(name: &str, message: impl Into<String>) -> PropertyError {
    PropertyError {
        key: format!("kafka.properties.{name}"),
        message: message.into(),
    }
}

/// The partitioner the relay sets: the Java client's default, so the relay and the
/// service's other producers put a key on the same partition.
pub(super) const PARTITIONER: &str = "murmur2_random";

/// Check `kafka.properties` against the relay's guarantees (SPEC §3.1): an idempotent
/// producer with `acks=all`, the same key → partition mapping as ever (per-aggregate
/// order lives in one partition), and no transactions (the relay does not drive them).
pub fn validate_properties(props: &BTreeMap<String, String>) -> Result<(), PropertyError> {
    for (name, value) in props {
        let v = value.trim().to_ascii_lowercase();
        match name.as_str() {
            "enable.idempotence" if !matches!(v.as_str(), "true" | "1" | "yes" | "on") => {
                return Err(refuse(
                    name,
                    format!("the relay requires an idempotent producer (enable.idempotence=true) for at-least-once delivery in order; got {value:?}"),
                ));
            }
            "acks" | "request.required.acks" if !matches!(v.as_str(), "all" | "-1") => {
                return Err(refuse(
                    name,
                    format!("the relay marks a row PROCESSED only after acks=all (or -1); got {value:?}"),
                ));
            }
            // `murmur2` places every non-empty key exactly as `murmur2_random` does.
            "partitioner" if !matches!(v.as_str(), PARTITIONER | "murmur2") => {
                return Err(refuse(
                    name,
                    format!("the relay keeps each aggregate's events in order on one partition with the {PARTITIONER} partitioner (the Java client's default); another partitioner ({value:?}) would move keys to other partitions and break that order; remove this property"),
                ));
            }
            "transactional.id" => {
                return Err(refuse(
                    name,
                    "the relay does not use Kafka transactions; remove this property",
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A `kafka.properties` map of `kv` (also for the `props` tests).
    pub(in crate::sink::kafka) fn props(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn guarantees_cannot_be_weakened() {
        let e = validate_properties(&props(&[("enable.idempotence", "false")])).unwrap_err();
        assert_eq!(e.key, "kafka.properties.enable.idempotence");
        assert!(e
            .to_string()
            .contains("`kafka.properties.enable.idempotence`"));
        let e = validate_properties(&props(&[("acks", "1")])).unwrap_err();
        assert_eq!(e.key, "kafka.properties.acks");
        let e = validate_properties(&props(&[("request.required.acks", "0")])).unwrap_err();
        assert_eq!(e.key, "kafka.properties.request.required.acks");
        assert!(
            validate_properties(&props(&[("acks", "all"), ("enable.idempotence", "true")])).is_ok()
        );
        assert!(validate_properties(&props(&[("acks", "-1")])).is_ok());
        assert!(validate_properties(&props(&[("transactional.id", "x")])).is_err());
        for p in ["random", "consistent_random", "fnv1a", "Murmur2_Random2"] {
            let e = validate_properties(&props(&[("partitioner", p)])).unwrap_err();
            assert_eq!(e.key, "kafka.properties.partitioner");
        }
        assert!(validate_properties(&props(&[("partitioner", "murmur2_random")])).is_ok());
    }
}
