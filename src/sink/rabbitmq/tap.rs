//! A throw-away consumer for `demo` and the tests: an exclusive, auto-deleted queue bound
//! to an exchange, read with auto-ack. `close` it before the runtime ends (a dropped
//! connection is closed by lapin in the background, which fails once the runtime is gone).

use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, Consumer};

use crate::secret::Secret;
use crate::sink::SinkError;

/// One message as it arrived.
#[derive(Debug, Clone)]
pub struct Received {
    pub message_id: Option<String>,
    pub kind: Option<String>,
    pub content_type: Option<String>,
    pub routing_key: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

pub struct Tap {
    conn: Connection,
    channel: Channel,
    consumer: Consumer,
    pub queue: String,
}

impl Tap {
    /// Declare an exclusive queue bound to `exchange` with `binding` and start consuming.
    pub async fn bind(url: &Secret, exchange: &str, binding: &str) -> Result<Self, SinkError> {
        let err = |e: lapin::Error| super::outcome::unavailable(e.to_string());
        let conn = Connection::connect(url.expose(), super::connection_properties())
            .await
            .map_err(err)?;
        let ch = conn.create_channel().await.map_err(err)?;
        let q = ch
            .queue_declare(
                "",
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(err)?;
        let queue = q.name().as_str().to_string();
        ch.queue_bind(
            &queue,
            exchange,
            binding,
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(err)?;
        let consumer = ch
            .basic_consume(
                &queue,
                "outbox-relay-tap",
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(err)?;
        Ok(Self {
            conn,
            channel: ch,
            consumer,
            queue,
        })
    }

    /// Close the channel and the connection, waiting for the broker (bounded).
    pub async fn close(self) {
        super::close_quietly(Some(self.channel), Some(self.conn), "tap done").await;
    }

    /// The next message, or `None` after `timeout` without one.
    pub async fn next(&mut self, timeout: Duration) -> Option<Received> {
        let delivery = tokio::time::timeout(timeout, self.consumer.next())
            .await
            .ok()??
            .ok()?;
        let p = &delivery.properties;
        let headers = header_strings(p);
        Some(Received {
            message_id: p.message_id().as_ref().map(|s| s.as_str().to_string()),
            kind: p.kind().as_ref().map(|s| s.as_str().to_string()),
            content_type: p.content_type().as_ref().map(|s| s.as_str().to_string()),
            routing_key: delivery.routing_key.as_str().to_string(),
            headers,
            body: delivery.data,
        })
    }
}

/// A message's headers as (name, text): long strings as UTF-8, anything else in its
/// debug form (the relay only ever sends long strings).
pub fn header_strings(props: &BasicProperties) -> Vec<(String, String)> {
    props
        .headers()
        .as_ref()
        .map(|t| {
            t.inner()
                .iter()
                .map(|(k, v)| {
                    let v = match v {
                        AMQPValue::LongString(s) => {
                            String::from_utf8_lossy(s.as_bytes()).into_owned()
                        }
                        other => format!("{other:?}"),
                    };
                    (k.as_str().to_string(), v)
                })
                .collect()
        })
        .unwrap_or_default()
}
