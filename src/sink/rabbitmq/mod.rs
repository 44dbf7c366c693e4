//! RabbitMQ sink (lapin): publisher confirms, `mandatory`, persistent messages, the SPEC §2
//! mapping; `send` queues one publish and returns its confirm, so the engine keeps many
//! outstanding on one channel.
//!
//! Invariants:
//! - only an ack counts as delivered, and only when no `basic.return` with the message's
//!   id came in on its channel (lapin may attach a return to a neighbour's confirm:
//!   `returns.rs`); `NotRequested` would mean confirms are off — never accepted;
//! - a message RabbitMQ could not take whole (names over 255 bytes, a content header
//!   larger than `frame_max`, a body over `max_message_size`, a destination exchange that
//!   does not exist) is rejected before it is sent: sending it would close the channel or
//!   the connection under every other message;
//! - every message not confirmed when the connection or channel breaks comes back
//!   `Unavailable`; lapin's own recovery is not used — the engine reconnects, and finds a
//!   message that breaks the channel by sending it alone.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use lapin::options::{
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

mod config;
mod outcome;
mod returns;
pub mod tap;

use super::{Confirm, Sink, SinkError};
use crate::model::Message;
use crate::secret::Secret;
pub use config::RabbitmqConfig;
use outcome::{broken, describe, judge, unavailable};
use returns::Returns;

/// How long an exchange found by a passive declare is trusted without asking again.
const EXCHANGE_CACHE_TTL: Duration = Duration::from_secs(30);
/// Longest AMQP short string (exchange names, routing keys, the `type` property).
const SHORT_STRING_MAX: usize = 255;
/// RabbitMQ's default `frame_max` (used before a connection has negotiated one).
const DEFAULT_FRAME_MAX: u32 = 131_072;
/// RabbitMQ's default `max_message_size` (128 MiB).
const MAX_MESSAGE_SIZE: usize = 134_217_728;

pub struct RabbitSink {
    url: Secret,
    ca_pem: Option<String>,
    exchange: String,
    dead_letter_exchange: Option<String>,
    timeout: Duration,
    conn: Option<Connection>,
    channel: Option<Channel>,
    /// The returns of the current channel (replaced with the channel).
    returns: Returns,
    /// Exchanges named by rows' `destination` and when they were last seen to exist.
    known_exchanges: HashMap<String, Instant>,
}

impl RabbitSink {
    pub fn new(cfg: &RabbitmqConfig, timeout: Duration) -> Result<Self, SinkError> {
        let ca_pem = match &cfg.ca_file {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|e| {
                SinkError::Unavailable(format!("rabbitmq.ca_file {}: {e}", path.display()))
            })?),
            None => None,
        };
        Ok(Self {
            url: cfg.url.clone(),
            ca_pem,
            exchange: cfg.exchange.clone(),
            dead_letter_exchange: cfg.dead_letter_exchange.clone(),
            timeout,
            conn: None,
            channel: None,
            returns: Returns::default(),
            known_exchanges: HashMap::new(),
        })
    }

    fn connected(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| c.status().connected())
            && self
                .channel
                .as_ref()
                .is_some_and(|c| c.status().connected())
    }

    async fn open(&mut self) -> Result<(), SinkError> {
        self.drop_connection().await;
        let props = connection_properties().with_connection_name("outbox-relay".into());
        let tls = lapin::tcp::OwnedTLSConfig {
            identity: None,
            cert_chain: self.ca_pem.clone(),
        };
        let connect = Connection::connect_with_config(self.url.expose(), props, tls);
        let conn = tokio::time::timeout(self.timeout, connect)
            .await
            .map_err(|_| {
                unavailable(format!(
                    "no answer from {} within {:?}",
                    self.url, self.timeout
                ))
            })?
            .map_err(|e| {
                unavailable(format!("cannot connect to {}: {}", self.url, describe(&e)))
            })?;
        let channel = new_confirm_channel(&conn).await?;
        // The configured exchanges are ours to declare (durable topic); rows'
        // destinations never are.
        let configured = [
            ("rabbitmq.exchange", Some(&self.exchange)),
            (
                "rabbitmq.dead_letter_exchange",
                self.dead_letter_exchange.as_ref(),
            ),
        ];
        for (key, name) in configured {
            let Some(name) = name else { continue };
            declare_exchange(&channel, name).await.map_err(|e| {
                SinkError::Unavailable(format!("cannot declare {key} {name:?}: {}", describe(&e)))
            })?;
        }
        self.conn = Some(conn);
        self.channel = Some(channel);
        self.returns = Returns::default();
        Ok(())
    }

    /// Close the channel, then the connection, waiting for the broker (bounded). Dropped
    /// unclosed, lapin closes the channel behind the closing connection and logs an ERROR.
    async fn drop_connection(&mut self) {
        let (channel, conn) = (self.channel.take(), self.conn.take());
        close_quietly(channel, conn, "outbox-relay closing").await;
    }

    /// Make sure the publishing channel is open (the connection may still be fine after
    /// the broker closed just the channel).
    async fn ensure_channel(&mut self) -> Result<Channel, SinkError> {
        let conn_ok = self.conn.as_ref().is_some_and(|c| c.status().connected());
        if !conn_ok {
            self.open().await?;
        } else if !self
            .channel
            .as_ref()
            .is_some_and(|c| c.status().connected())
        {
            let conn = self
                .conn
                .as_ref()
                .ok_or_else(|| unavailable("no connection"))?;
            self.channel = Some(new_confirm_channel(conn).await?);
            self.returns = Returns::default();
        }
        self.channel
            .clone()
            .ok_or_else(|| unavailable("no channel"))
    }

    /// Check that a row's destination exchange exists, with a passive declare on a
    /// throw-away channel (a 404 closes that channel, not the publishing one). `Ok(Some)`
    /// says why it cannot be used; found exchanges are trusted for a while.
    async fn check_destination(&mut self, name: &str) -> Result<Option<String>, SinkError> {
        let now = Instant::now();
        if name == self.exchange
            || self
                .known_exchanges
                .get(name)
                .is_some_and(|t| now.duration_since(*t) <= EXCHANGE_CACHE_TTL)
        {
            return Ok(None);
        }
        let conn = self
            .conn
            .as_ref()
            .ok_or_else(|| unavailable("no connection"))?;
        let probe = conn
            .create_channel()
            .await
            .map_err(|e| unavailable(describe(&e)))?;
        let res = probe
            .exchange_declare(
                name,
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        match res {
            Ok(()) => {
                self.known_exchanges.insert(name.to_string(), now);
                let _ = probe.close(200, "probe done").await;
                Ok(None)
            }
            Err(lapin::Error::ProtocolError(e)) if e.get_id() == 404 => Ok(Some(format!(
                "exchange {name:?} does not exist (RabbitMQ 404 NOT_FOUND); the relay never declares a row's destination"
            ))),
            Err(e) => Err(unavailable(describe(&e))),
        }
    }

    /// A message RabbitMQ could not take whole: its content header (properties and
    /// headers) must fit in one frame of the negotiated `frame_max`, and its body within
    /// the broker's `max_message_size`. Sending it anyway would close the connection.
    fn too_big(&self, m: &Message) -> Option<String> {
        let frame_max = self
            .conn
            .as_ref()
            .map_or(DEFAULT_FRAME_MAX, |c| c.configuration().frame_max());
        let header = content_header_size(m);
        if frame_max > 0 && header > frame_max as usize {
            return Some(format!(
                "message properties and headers take {header} bytes encoded, more than RabbitMQ's frame size limit (frame_max = {frame_max} bytes): the AMQP content header must fit in one frame; make `headers` smaller"
            ));
        }
        if m.payload.len() > MAX_MESSAGE_SIZE {
            return Some(format!(
                "payload is {} bytes, more than RabbitMQ's default max_message_size ({MAX_MESSAGE_SIZE} bytes)",
                m.payload.len()
            ));
        }
        None
    }

    /// AMQP short strings (exchange, routing key, `type`) hold at most 255 bytes; a longer
    /// one would make an undecodable frame and RabbitMQ would close the whole connection
    /// (501 FRAME_ERROR), stalling every row. Such a message is rejected on its own instead.
    fn too_long(&self, m: &Message) -> Option<String> {
        let exchange = m.destination.as_deref().unwrap_or(&self.exchange);
        let routing_key = m.routing_key.as_deref().unwrap_or(&m.event_type);
        [
            ("exchange name (destination)", exchange),
            ("event_type (the message type)", m.event_type.as_str()),
            ("routing key", routing_key),
        ]
        .into_iter()
        .find(|(_, v)| v.len() > SHORT_STRING_MAX)
        .map(|(what, v)| {
            format!(
                "{what} is {} bytes long; RabbitMQ allows at most {SHORT_STRING_MAX} (AMQP short string)",
                v.len()
            )
        })
    }

    fn frame<'m>(&'m self, m: &'m Message) -> (&'m str, &'m str, BasicProperties, &'m [u8]) {
        let exchange = m.destination.as_deref().unwrap_or(&self.exchange);
        let routing_key = m.routing_key.as_deref().unwrap_or(&m.event_type);
        let mut headers = FieldTable::default();
        for (k, v) in &m.headers {
            headers.insert(
                ShortString::from(k.clone()),
                AMQPValue::LongString(LongString::from(v.clone())),
            );
        }
        for (k, v) in [
            ("event_type", &m.event_type),
            ("aggregate_type", &m.aggregate_type),
            ("aggregate_id", &m.aggregate_id),
        ] {
            headers.insert(
                ShortString::from(k),
                AMQPValue::LongString(LongString::from(v.clone())),
            );
        }
        let props = BasicProperties::default()
            .with_message_id(ShortString::from(m.event_id.to_string()))
            .with_type(ShortString::from(m.event_type.clone()))
            .with_content_type(ShortString::from("application/json"))
            .with_timestamp(u64::try_from(m.created_at.timestamp()).unwrap_or(0))
            .with_delivery_mode(2)
            .with_headers(headers);
        (exchange, routing_key, props, m.payload.as_bytes())
    }
}

impl Sink for RabbitSink {
    async fn connect(&mut self) -> Result<(), SinkError> {
        if self.connected() {
            return Ok(());
        }
        self.ensure_channel().await.map(|_| ())
    }

    async fn send(&mut self, m: &Message) -> Result<Confirm, SinkError> {
        if let Some(why) = self.too_long(m) {
            return Err(SinkError::Rejected(why));
        }
        let channel = self.ensure_channel().await?;
        if let Some(why) = self.too_big(m) {
            return Err(SinkError::Rejected(why));
        }
        if let Some(dest) = &m.destination {
            if let Some(why) = self.check_destination(dest).await? {
                return Err(SinkError::Rejected(why));
            }
        }
        let (exchange, routing_key, props, body) = self.frame(m);
        let (exchange, routing_key) = (exchange.to_string(), routing_key.to_string());
        let body = body.to_vec();
        let (id, returns) = (m.event_id.to_string(), self.returns.clone());
        Ok(Box::pin(async move {
            let confirm = publish(channel, exchange, routing_key, body, props).await;
            judge(confirm, &id, &returns).await
        }))
    }

    async fn dead_letter(
        &mut self,
        message: &Message,
        error: &str,
    ) -> Result<Option<Confirm>, SinkError> {
        let Some(dlx) = self.dead_letter_exchange.clone() else {
            return Ok(None);
        };
        if let Some(why) = self.too_long(message).or_else(|| self.too_big(message)) {
            return Err(SinkError::Rejected(format!("not dead-lettered: {why}")));
        }
        let channel = self.ensure_channel().await?;
        let (_, routing_key, props, body) = self.frame(message);
        let mut headers = props.headers().clone().unwrap_or_default();
        headers.insert(
            "last_error".into(),
            AMQPValue::LongString(LongString::from(error.to_string())),
        );
        let props = props.with_headers(headers);
        let (routing_key, body) = (routing_key.to_string(), body.to_vec());
        let (id, returns) = (message.event_id.to_string(), self.returns.clone());
        Ok(Some(Box::pin(async move {
            let confirm = publish(channel, dlx.clone(), routing_key, body, props).await;
            judge(confirm, &id, &returns).await.map_err(|e| match e {
                SinkError::Rejected(why) => SinkError::Rejected(format!(
                    "dead-letter exchange {dlx:?} did not accept the message: {why}"
                )),
                other => other,
            })
        })))
    }

    fn is_connected(&self) -> bool {
        self.connected()
    }

    /// A `basic.qos` round trip on the publishing channel (a no-op for a channel that
    /// never consumes). A connection lapin saw close fails at once.
    fn probe(&self, within: Duration) -> Confirm {
        if !self.conn.as_ref().is_some_and(|c| c.status().connected()) {
            return super::decided(Err(unavailable("not connected")));
        }
        let Some(channel) = self.channel.clone().filter(|c| c.status().connected()) else {
            // The connection is up; the next send opens a new channel.
            return super::decided(Ok(()));
        };
        Box::pin(async move {
            match tokio::time::timeout(within, channel.basic_qos(0, BasicQosOptions::default()))
                .await
            {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(broken(&e)),
                Err(_) => Err(unavailable(format!(
                    "no answer to a probe within {within:?}"
                ))),
            }
        })
    }

    async fn close(&mut self) {
        self.drop_connection().await;
    }
}

/// Publish with `mandatory` and wait for the broker's confirm (owned arguments, so the
/// future outlives the sink's borrow).
async fn publish(
    channel: Channel,
    exchange: String,
    routing_key: String,
    body: Vec<u8>,
    props: BasicProperties,
) -> Result<Confirmation, lapin::Error> {
    let options = BasicPublishOptions {
        mandatory: true,
        immediate: false,
    };
    let confirm = channel
        .basic_publish(&exchange, &routing_key, options, &body, props)
        .await?;
    drop(body);
    confirm.await
}

/// Encoded size of a message's AMQP content header frame (properties and headers).
fn content_header_size(m: &Message) -> usize {
    // Per entry: key length byte + key, type byte, value length (4) + value.
    let entry = |k: &str, v: &str| 1 + k.len() + 1 + 4 + v.len();
    let mut table = 4;
    for (k, v) in &m.headers {
        table += entry(k, v);
    }
    for (k, v) in [
        ("event_type", &m.event_type),
        ("aggregate_type", &m.aggregate_type),
        ("aggregate_id", &m.aggregate_id),
    ] {
        table += entry(k, v);
    }
    // Frame envelope 8; class, weight, body size, flags 14; content_type, delivery
    // mode, message_id, timestamp, type.
    8 + 14 + (1 + 16) + 1 + (1 + 36) + 8 + (1 + m.event_type.len()) + table
}

/// Declare `name` the way the relay declares its configured exchanges: a durable topic
/// exchange. Shared by the sink, the tests and the tools, so that theirs are the same.
pub async fn declare_exchange(channel: &Channel, name: &str) -> Result<(), lapin::Error> {
    channel
        .exchange_declare(
            name,
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
}

/// lapin connection properties driven by the current tokio runtime (lapin would
/// otherwise start its own executor threads). Shared by the sink, the tap, the tests
/// and the tools.
pub fn connection_properties() -> ConnectionProperties {
    ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio)
}

async fn new_confirm_channel(conn: &Connection) -> Result<Channel, SinkError> {
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| unavailable(describe(&e)))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| unavailable(describe(&e)))?;
    Ok(channel)
}

/// Close `channel` then `conn` if they are still open, within a second in all (a
/// stalled broker must not stall shutdown or reconnect); errors are moot.
pub(crate) async fn close_quietly(channel: Option<Channel>, conn: Option<Connection>, why: &str) {
    let close = async {
        if let Some(ch) = channel.filter(|c| c.status().connected()) {
            let _ = ch.close(200, why).await;
        }
        if let Some(conn) = conn.filter(|c| c.status().connected()) {
            let _ = conn.close(200, why).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), close).await;
}
