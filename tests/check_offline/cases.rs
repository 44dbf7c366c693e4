//! The bad configurations `check --offline` is tried with: each one's edits to a valid
//! config, the key its error must name, and whether loading the config finds it.

use std::path::PathBuf;

use super::{quoted, Dir};

/// One bad config: its edits, a key the error must name, and whether loading the config
/// finds it (then `run` fails the same way before connecting to anything) or building
/// the sink does (after the config loaded).
pub(super) struct Bad {
    pub(super) edits: Vec<(&'static str, &'static str, String)>,
    pub(super) key: &'static str,
    pub(super) at_load: bool,
}

impl Bad {
    pub(super) fn config(&self, dir: &Dir) -> PathBuf {
        let edits: Vec<(&str, &str, &str)> = self
            .edits
            .iter()
            .map(|(s, k, v)| (*s, *k, &v[..]))
            .collect();
        dir.config(&edits)
    }
}

pub(super) fn bad_cases(dir: &Dir) -> Vec<Bad> {
    let mysql = dir.file("mysql-url", "mysql://relay:my-Pw-1@db.example/app");
    let at_load = |s: &'static str, k: &'static str, v: &str, key: &'static str| Bad {
        edits: vec![(s, k, v.to_string())],
        key,
        at_load: true,
    };
    let kafka = |k: &'static str, v: &str, key: &'static str, at_load: bool| Bad {
        edits: vec![
            ("sink", "kind", "\"kafka\"".into()),
            (kafka_section(k), k, v.into()),
        ],
        key,
        at_load,
    };
    let nats = |k: &'static str, v: &str, key: &'static str| Bad {
        edits: vec![("sink", "kind", "\"nats\"".into()), ("nats", k, v.into())],
        key,
        at_load: true,
    };
    let redis = |k: &'static str, v: &str, key: &'static str| Bad {
        edits: vec![("sink", "kind", "\"redis\"".into()), ("redis", k, v.into())],
        key,
        at_load: true,
    };
    vec![
        redis("url", "\"http://u:pw@h:6379\"", "redis.url"),
        redis("mode", "\"list\"", "redis.mode"),
        redis("key", "\"outbox.{event_type}\"", "redis.key"),
        redis("dead_letter_key", "\"\"", "redis.dead_letter_key"),
        redis("max_len", "0", "redis.max_len"),
        at_load("relay", "batch_size", "0", "relay.batch_size"),
        at_load("relay", "batch_sise", "5", "batch_sise"),
        at_load("relays", "batch_size", "5", "relays"),
        at_load("database", "table", "\"bad name;\"", "database.table"),
        at_load(
            "relay",
            "shutdown_timeout",
            "\"20 parsecs\"",
            "relay.shutdown_timeout",
        ),
        at_load(
            "relay",
            "publish_timeout",
            "\"40s\"",
            "relay.publish_timeout",
        ),
        at_load("sink", "kind", "\"pulsar\"", "sink.kind"),
        at_load("http", "listen", "\"everywhere\"", "http.listen"),
        at_load("database", "url_file", &quoted(&mysql), "database.url"),
        at_load(
            "rabbitmq",
            "ca_file",
            "\"/nonexistent/ca.pem\"",
            "rabbitmq.ca_file",
        ),
        kafka(
            "partitioner",
            "\"random\"",
            "kafka.properties.partitioner",
            true,
        ),
        kafka(
            "topic",
            "\"bad topic/{aggregate_type}\"",
            "kafka.topic",
            false,
        ),
        kafka(
            "\"no.such.property\"",
            "\"1\"",
            "kafka.properties.no.such.property",
            false,
        ),
        nats(
            "url",
            "\"amqp://relay:nats-Pw-1@nats.example:4222\"",
            "nats.url",
        ),
        nats("subject", "\"outbox.*.{event_type}\"", "nats.subject"),
        nats("subject", "\"outbox..{event_type}\"", "nats.subject"),
        nats(
            "dead_letter_subject",
            "\"dead letters\"",
            "nats.dead_letter_subject",
        ),
        nats("ca_file", "\"/nonexistent/ca.pem\"", "nats.ca_file"),
        aws("sqs", &[], "sqs.queue_url"),
        aws("sqs", &[("queue_url", "\"orders\"")], "sqs.queue_url"),
        aws(
            "sqs",
            &[
                (
                    "queue_url",
                    "\"https://sqs.eu-west-1.amazonaws.com/1/orders\"",
                ),
                ("endpoint_url", "\"localhost:5000\""),
            ],
            "sqs.endpoint_url",
        ),
        aws(
            "sns",
            &[("topic_arn", "\"arn:aws:sqs:eu-west-1:1:orders\"")],
            "sns.topic_arn",
        ),
    ]
}

/// `sink.kind = kind` with `[kind]` keys `kv`: a bad value found at load.
fn aws(kind: &'static str, kv: &[(&'static str, &str)], key: &'static str) -> Bad {
    let mut edits = vec![("sink", "kind", format!("{kind:?}"))];
    edits.extend(kv.iter().map(|(k, v)| (kind, *k, v.to_string())));
    Bad {
        edits,
        key,
        at_load: true,
    }
}

/// `topic` belongs to `[kafka]`, everything else here to `[kafka.properties]`.
fn kafka_section(key: &str) -> &'static str {
    if key == "topic" {
        "kafka"
    } else {
        "kafka.properties"
    }
}
