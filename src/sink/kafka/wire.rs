//! The SPEC §2 mapping for Kafka: topic from `destination` or the `kafka.topic`
//! template, Kafka's topic-name rule, and the record headers.

use rdkafka::message::{Header, OwnedHeaders};

use crate::model::Message;

/// Headers the relay sets itself; a row's `headers` entry of the same name is dropped
/// so consumers never see two values.
const RESERVED_HEADERS: [&str; 4] = ["event_id", "event_type", "aggregate_type", "aggregate_id"];

/// What `kafka.topic` substitutes.
pub const AGGREGATE_TYPE: &str = "{aggregate_type}";

/// `template` with `{aggregate_type}` substituted.
pub fn topic_from_template(template: &str, aggregate_type: &str) -> String {
    template.replace(AGGREGATE_TYPE, aggregate_type)
}

/// Kafka's topic-name rule: 1 to 249 of `[A-Za-z0-9._-]`, not `.` or `..`.
pub fn check_topic_name(t: &str) -> Result<(), String> {
    if t.is_empty() || t.len() > 249 {
        return Err(format!("topic name {t:?} must be 1 to 249 characters long"));
    }
    if t == "." || t == ".." {
        return Err(format!("{t:?} is not a valid topic name"));
    }
    if let Some(c) = t
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "topic name {t:?} contains {c:?}; Kafka allows only letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// Row headers (minus the reserved names), then `event_id`, `event_type`,
/// `aggregate_type`, `aggregate_id`, then `extra`.
pub(crate) fn headers(m: &Message, extra: &[(&str, &str)]) -> OwnedHeaders {
    let mut buf = uuid::Uuid::encode_buffer();
    let event_id = &*m.event_id.hyphenated().encode_lower(&mut buf);
    let mut h = OwnedHeaders::new_with_capacity(m.headers.len() + 4 + extra.len());
    let taken = |k: &str| RESERVED_HEADERS.contains(&k) || extra.iter().any(|(n, _)| *n == k);
    for (k, v) in &m.headers {
        if !taken(k) {
            h = h.insert(Header {
                key: k,
                value: Some(v.as_str()),
            });
        }
    }
    for (k, v) in m
        .identity(event_id)
        .into_iter()
        .chain(extra.iter().copied())
    {
        h = h.insert(Header {
            key: k,
            value: Some(v),
        });
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names() {
        assert_eq!(
            topic_from_template("outbox.{aggregate_type}", "order"),
            "outbox.order"
        );
        assert!(check_topic_name("outbox.order_v1-x").is_ok());
        assert!(check_topic_name("bad topic").unwrap_err().contains("' '"));
        assert!(check_topic_name("").is_err());
        assert!(check_topic_name("..").is_err());
        assert!(check_topic_name(&"a".repeat(250)).is_err());
    }

    #[test]
    fn headers_carry_metadata_once() {
        let mut m = crate::model::sample_row(1, "42").to_message().unwrap();
        m.headers.push(("event_type".into(), "spoofed".into()));
        let h = headers(&m, &[("last_error", "boom")]);
        use rdkafka::message::Headers;
        let all: Vec<(String, String)> = h
            .iter()
            .map(|h| {
                (
                    h.key.to_string(),
                    String::from_utf8_lossy(h.value.unwrap()).into_owned(),
                )
            })
            .collect();
        let get = |k: &str| {
            all.iter()
                .filter(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(get("traceparent"), vec!["00-abc-def-01".to_string()]);
        assert_eq!(get("event_type"), vec!["order.created".to_string()]);
        assert_eq!(get("event_id"), vec![m.event_id.to_string()]);
        assert_eq!(get("aggregate_id"), vec!["42".to_string()]);
        assert_eq!(get("aggregate_type"), vec!["order".to_string()]);
        assert_eq!(get("last_error"), vec!["boom".to_string()]);
    }
}
