//! Wiring shared by `run` (`app`) and the other commands (`commands`): the configured
//! sink as one `AnySink` (the only dispatch over broker kinds), the instance's name,
//! and `AppError`. Neither `app` nor `commands` depends on the other.

mod error;

use std::time::Duration;

pub use error::AppError;

use crate::config::{Settings, SinkKind};
use crate::model::Message;
use crate::sink::aws::{SnsSink, SqsSink};
use crate::sink::kafka::KafkaSink;
use crate::sink::nats::NatsSink;
use crate::sink::rabbitmq::RabbitSink;
use crate::sink::redis::RedisSink;
use crate::sink::{Confirm, Sink, SinkError};

/// The configured sink: one of the concrete ones, dispatched here once so the engine
/// and the commands see a single `Sink`. Built once per process, so the size difference
/// between variants does not matter.
#[allow(clippy::large_enum_variant)]
pub enum AnySink {
    Rabbit(RabbitSink),
    Kafka(KafkaSink),
    Nats(NatsSink),
    Redis(RedisSink),
    Sqs(SqsSink),
    Sns(SnsSink),
}

/// Build the configured sink (not connected yet).
pub fn build_sink(settings: &Settings) -> Result<AnySink, SinkError> {
    let timeout = settings.relay.effective_publish_timeout();
    Ok(match settings.sink.kind {
        SinkKind::Rabbitmq => AnySink::Rabbit(RabbitSink::new(&settings.rabbitmq, timeout)?),
        SinkKind::Kafka => AnySink::Kafka(KafkaSink::new(&settings.kafka, timeout)?),
        SinkKind::Nats => AnySink::Nats(NatsSink::new(&settings.nats, timeout)?),
        SinkKind::Redis => AnySink::Redis(RedisSink::new(&settings.redis, timeout)?),
        SinkKind::Sqs => AnySink::Sqs(SqsSink::new(&settings.sqs, timeout)?),
        SinkKind::Sns => AnySink::Sns(SnsSink::new(&settings.sns, timeout)?),
    })
}

impl Sink for AnySink {
    async fn connect(&mut self) -> Result<(), SinkError> {
        match self {
            AnySink::Rabbit(s) => s.connect().await,
            AnySink::Kafka(s) => s.connect().await,
            AnySink::Nats(s) => s.connect().await,
            AnySink::Redis(s) => s.connect().await,
            AnySink::Sqs(s) => s.connect().await,
            AnySink::Sns(s) => s.connect().await,
        }
    }

    async fn send(&mut self, message: &Message) -> Result<Confirm, SinkError> {
        match self {
            AnySink::Rabbit(s) => s.send(message).await,
            AnySink::Kafka(s) => s.send(message).await,
            AnySink::Nats(s) => s.send(message).await,
            AnySink::Redis(s) => s.send(message).await,
            AnySink::Sqs(s) => s.send(message).await,
            AnySink::Sns(s) => s.send(message).await,
        }
    }

    async fn dead_letter(
        &mut self,
        message: &Message,
        error: &str,
    ) -> Result<Option<Confirm>, SinkError> {
        match self {
            AnySink::Rabbit(s) => s.dead_letter(message, error).await,
            AnySink::Kafka(s) => s.dead_letter(message, error).await,
            AnySink::Nats(s) => s.dead_letter(message, error).await,
            AnySink::Redis(s) => s.dead_letter(message, error).await,
            AnySink::Sqs(s) => s.dead_letter(message, error).await,
            AnySink::Sns(s) => s.dead_letter(message, error).await,
        }
    }

    fn is_connected(&self) -> bool {
        match self {
            AnySink::Rabbit(s) => s.is_connected(),
            AnySink::Kafka(s) => s.is_connected(),
            AnySink::Nats(s) => s.is_connected(),
            AnySink::Redis(s) => s.is_connected(),
            AnySink::Sqs(s) => s.is_connected(),
            AnySink::Sns(s) => s.is_connected(),
        }
    }

    fn probe(&self, within: Duration) -> Confirm {
        match self {
            AnySink::Rabbit(s) => s.probe(within),
            AnySink::Kafka(s) => s.probe(within),
            AnySink::Nats(s) => s.probe(within),
            AnySink::Redis(s) => s.probe(within),
            AnySink::Sqs(s) => s.probe(within),
            AnySink::Sns(s) => s.probe(within),
        }
    }

    fn confirm_timeout(&self, publish_timeout: Duration) -> Duration {
        match self {
            AnySink::Rabbit(s) => s.confirm_timeout(publish_timeout),
            AnySink::Kafka(s) => s.confirm_timeout(publish_timeout),
            AnySink::Nats(s) => s.confirm_timeout(publish_timeout),
            AnySink::Redis(s) => s.confirm_timeout(publish_timeout),
            AnySink::Sqs(s) => s.confirm_timeout(publish_timeout),
            AnySink::Sns(s) => s.confirm_timeout(publish_timeout),
        }
    }

    async fn close(&mut self) {
        match self {
            AnySink::Rabbit(s) => s.close().await,
            AnySink::Kafka(s) => s.close().await,
            AnySink::Nats(s) => s.close().await,
            AnySink::Redis(s) => s.close().await,
            AnySink::Sqs(s) => s.close().await,
            AnySink::Sns(s) => s.close().await,
        }
    }
}

/// A name unique to this process among the relay's instances, in every container:
/// `<POD_NAME or HOSTNAME>-<pid>-<random UUID>`. The UUID makes it unique (the pid is 1 in
/// every container); the pid only helps find the process on a shared host.
pub fn instance_id() -> String {
    let named = |v: Option<String>| v.map(|h| h.trim().to_string()).filter(|h| !h.is_empty());
    let host = named(std::env::var("POD_NAME").ok())
        .or_else(|| named(std::env::var("HOSTNAME").ok()))
        .or_else(|| named(std::fs::read_to_string("/etc/hostname").ok()));
    instance_id_for(host.as_deref(), std::process::id())
}

fn instance_id_for(host: Option<&str>, pid: u32) -> String {
    format!(
        "{}-{pid}-{}",
        host.unwrap_or("relay"),
        uuid::Uuid::new_v4().simple()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_ids_differ_on_the_same_host_and_pid() {
        // Two containers of one pod template: same name prefix, pid 1 in both.
        let a = instance_id_for(Some("order-svc-7d9f"), 1);
        let b = instance_id_for(Some("order-svc-7d9f"), 1);
        assert_ne!(a, b);
        assert!(a.starts_with("order-svc-7d9f-1-"), "{a}");
        let suffix = &a["order-svc-7d9f-1-".len()..];
        assert!(uuid::Uuid::parse_str(suffix).is_ok(), "{a}");
        assert!(instance_id_for(None, 7).starts_with("relay-7-"));
        let own = format!("-{}-", std::process::id());
        assert!(instance_id().contains(&own));
    }
}
