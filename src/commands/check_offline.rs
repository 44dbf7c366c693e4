//! `outbox-relay check --offline`: the configuration loaded and validated exactly as
//! `run` loads it (defaults → `--config` file → `OUTBOX_RELAY__*` env, the same checks,
//! then the sink's own configuration checks) with no network connection at all. A
//! `*_file` secret whose file is not there is listed as unchecked, not a failure (the
//! Secret volume exists only in the pod); no secret value is ever printed. Exit 0 with a
//! short summary, or 2 with the message `run` would give, naming the key.

use std::path::Path;

use crate::config::{Loaded, MissingFiles, OnFailed, SecretFile, Settings, SinkKind, ENV_PREFIX};
use crate::secret;
use crate::sink::aws::{SnsSink, SqsSink};
use crate::sink::kafka::KafkaSink;
use crate::sink::nats::NatsSink;
use crate::sink::rabbitmq::RabbitSink;
use crate::sink::redis::RedisSink;
use crate::wiring::AppError;

/// `outbox-relay [--config FILE] check --offline`.
pub fn check_offline(file: Option<&Path>) -> Result<(), AppError> {
    let Loaded { settings, files } = Settings::load_with(file, MissingFiles::Unchecked)?;
    sink_config(&settings)?;
    for line in summary(&settings, &files, file) {
        // Nothing here holds a secret value; scrubbed all the same.
        println!("{}", secret::scrub(&line));
    }
    Ok(())
}

/// What building the sink checks before it would connect: RabbitMQ reads
/// `rabbitmq.ca_file`; Kafka checks its properties and topic names, and asks
/// librdkafka about each property (no client is created).
fn sink_config(settings: &Settings) -> Result<(), AppError> {
    let timeout = settings.relay.effective_publish_timeout();
    match settings.sink.kind {
        SinkKind::Rabbitmq => drop(RabbitSink::new(&settings.rabbitmq, timeout)?),
        SinkKind::Kafka => KafkaSink::check_offline(&settings.kafka, timeout)?,
        SinkKind::Nats => drop(NatsSink::new(&settings.nats, timeout)?),
        SinkKind::Redis => drop(RedisSink::new(&settings.redis, timeout)?),
        SinkKind::Sqs => drop(SqsSink::new(&settings.sqs, timeout)?),
        SinkKind::Sns => drop(SnsSink::new(&settings.sns, timeout)?),
    }
    Ok(())
}

/// The summary lines: where the config came from, what it sets up, and each secret's
/// source (a path or "inline", never a value).
fn summary(settings: &Settings, files: &[SecretFile], file: Option<&Path>) -> Vec<String> {
    let source = match file {
        Some(path) => format!("--config {}", path.display()),
        None => "defaults".to_string(),
    };
    let mut env: Vec<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| k.starts_with(&format!("{ENV_PREFIX}__")))
        .collect();
    env.sort();
    let env = if env.is_empty() {
        "no env overrides".to_string()
    } else {
        format!("env {}", env.join(", "))
    };
    let target = match settings.sink.kind {
        SinkKind::Rabbitmq => format!("exchange {}", settings.rabbitmq.exchange),
        SinkKind::Kafka => format!("topic {}", settings.kafka.topic),
        SinkKind::Nats => format!("subject {}", settings.nats.subject),
        SinkKind::Redis => format!(
            "{} {}",
            match settings.redis.mode {
                crate::sink::redis::RedisMode::Stream => "stream key",
                crate::sink::redis::RedisMode::Pubsub => "channel",
            },
            settings.redis.key
        ),
        SinkKind::Sqs => format!("queue {}", settings.sqs.queue_url),
        SinkKind::Sns => format!("topic {}", settings.sns.topic_arn),
    };
    let relay = &settings.relay;
    let on_failed = match relay.on_failed {
        OnFailed::Block => "block",
        OnFailed::Skip => "skip",
    };
    let mut out = vec![
        format!("config: valid ({source}, {env}); offline: no connection attempted"),
        format!(
            "  table {}, sink {} ({target}), http.listen {}",
            settings.database.table, settings.sink.kind, settings.http.listen
        ),
        format!(
            "  relay: batch_size {}, lease_timeout {:?}, shutdown_timeout {:?}, on_failed {on_failed}",
            relay.batch_size, relay.lease_timeout, relay.shutdown_timeout
        ),
    ];
    let mut inline = vec!["database.url"];
    if settings.sink.kind == SinkKind::Rabbitmq {
        inline.push("rabbitmq.url");
    }
    if settings.sink.kind == SinkKind::Nats {
        inline.push("nats.url");
    }
    if settings.sink.kind == SinkKind::Redis {
        inline.push("redis.url");
    }
    for key in inline {
        if !files.iter().any(|f| f.supplies == key) {
            out.push(format!("  {key}: not from a file; valid (value not shown)"));
        }
    }
    for f in files {
        let state = if f.read {
            "read"
        } else {
            "unchecked: file not present here"
        };
        out.push(format!(
            "  {}: from {} {} ({state})",
            f.supplies,
            f.key,
            f.path.display()
        ));
    }
    let unchecked = files.iter().filter(|f| !f.read).count();
    if unchecked > 0 {
        out.push(format!(
            "  {unchecked} secret file(s) unchecked: their values were not validated"
        ));
    }
    out
}
