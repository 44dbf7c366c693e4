//! RabbitMQ sink (lapin): publisher confirms, `mandatory`, persistent messages, the SPEC §2
//! mapping, many publishes in flight per call.
//!
//! Invariants:
//! - only `Confirmation::Ack(None)` counts as delivered (`Ack(Some(returned))` is an
//!   unroutable message, `NotRequested` would mean confirms are off — never accepted);
//! - every message not confirmed when the connection or channel breaks is reported as not
//!   delivered; lapin's own recovery is not used — we reconnect ourselves;
//! - a channel closed by the broker because of one message (unknown exchange 404, message
//!   too large 406) fails that message only: the unconfirmed rest is re-sent one at a time
//!   on a fresh channel, which pins the error on the message that causes it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

pub mod tap;

use super::{Sink, SinkError};
use crate::config::{RabbitmqConfig, Secret};
use crate::model::Message;

/// How long an exchange found by a passive declare is trusted without asking again.
const EXCHANGE_CACHE_TTL: Duration = Duration::from_secs(30);
/// Longest AMQP short string (exchange names, routing keys, the `type` property).
const SHORT_STRING_MAX: usize = 255;

pub struct RabbitSink {
    url: Secret,
    ca_pem: Option<String>,
    exchange: String,
    dead_letter_exchange: Option<String>,
    timeout: Duration,
    conn: Option<Connection>,
    channel: Option<Channel>,
    /// Exchanges named by rows' `destination` and when they were last seen to exist.
    known_exchanges: HashMap<String, Instant>,
}

/// What happened to one publish of a wave.
enum Sent {
    Confirmed,
    Rejected(String),
    /// Channel or connection broke before a confirm arrived.
    Broken(lapin::Error),
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
                .map_err(|e| {
                    SinkError::Unavailable(format!(
                        "cannot declare {key} {name:?}: {}",
                        describe(&e)
                    ))
                })?;
        }
        self.conn = Some(conn);
        self.channel = Some(channel);
        Ok(())
    }

    async fn drop_connection(&mut self) {
        self.channel = None;
        if let Some(conn) = self.conn.take() {
            // Bounded: a stalled broker must not stall shutdown or reconnect.
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                conn.close(320, "outbox-relay reconnect"),
            )
            .await;
        }
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
        }
        self.channel
            .clone()
            .ok_or_else(|| unavailable("no channel"))
    }

    /// Check that each non-default destination exchange exists, with a passive declare on
    /// a throw-away channel (a 404 closes that channel, not the publishing one).
    async fn probe_destinations(
        &mut self,
        messages: &[Message],
    ) -> Result<HashMap<String, String>, SinkError> {
        let mut missing = HashMap::new();
        let now = Instant::now();
        let mut to_check: Vec<String> = messages
            .iter()
            .filter_map(|m| m.destination.clone())
            .filter(|d| *d != self.exchange && d.len() <= SHORT_STRING_MAX)
            .filter(|d| {
                self.known_exchanges
                    .get(d)
                    .is_none_or(|t| now.duration_since(*t) > EXCHANGE_CACHE_TTL)
            })
            .collect();
        to_check.sort();
        to_check.dedup();
        for name in to_check {
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
                    &name,
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
                    self.known_exchanges.insert(name, now);
                    let _ = probe.close(200, "probe done").await;
                }
                Err(lapin::Error::ProtocolError(e)) if e.get_id() == 404 => {
                    missing.insert(
                        name.clone(),
                        format!(
                            "exchange {name:?} does not exist (RabbitMQ 404 NOT_FOUND); the relay never declares a row's destination"
                        ),
                    );
                }
                Err(e) => return Err(unavailable(describe(&e))),
            }
        }
        Ok(missing)
    }

    /// Publish all messages on one channel, then await every confirm.
    async fn publish_wave(&self, channel: &Channel, messages: &[&Message]) -> Vec<Sent> {
        // Each `basic_publish` future takes its delivery tag and queues its frames on its
        // first poll, then waits until lapin's I/O thread has written them. Awaiting them
        // one by one costs a thread hand-off per message; `join_all` polls them in order
        // (so tags and frames keep the wave's order) and waits for the writes together.
        let frames: Vec<_> = messages.iter().map(|m| self.frame(m)).collect();
        let pending = futures::future::join_all(frames.into_iter().map(
            |(exchange, routing_key, props, body)| {
                channel.basic_publish(
                    exchange,
                    routing_key,
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    body,
                    props,
                )
            },
        ))
        .await;
        let confirms = pending.into_iter().map(|sent| async move {
            match sent {
                Err(e) => Sent::Broken(e),
                Ok(confirm) => match confirm.await {
                    Ok(Confirmation::Ack(None)) => Sent::Confirmed,
                    Ok(Confirmation::Ack(Some(ret))) | Ok(Confirmation::Nack(Some(ret))) => Sent::Rejected(format!(
                        "unroutable: no queue is bound to exchange {:?} for routing key {:?} (returned {} {})",
                        ret.delivery.exchange.as_str(),
                        ret.delivery.routing_key.as_str(),
                        ret.reply_code,
                        ret.reply_text.as_str()
                    )),
                    Ok(Confirmation::Nack(None)) => Sent::Rejected("the broker nacked the message".into()),
                    Ok(Confirmation::NotRequested) => {
                        Sent::Rejected("publisher confirms are not enabled on the channel".into())
                    }
                    Err(e) => Sent::Broken(e),
                },
            }
        });
        futures::future::join_all(confirms).await
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
        self.open().await
    }

    async fn publish(&mut self, messages: &[Message]) -> Vec<Result<(), SinkError>> {
        let mut results: Vec<Option<Result<(), SinkError>>> = vec![None; messages.len()];
        let channel = match self.ensure_channel().await {
            Ok(c) => c,
            Err(e) => return vec![Err(e); messages.len()],
        };
        let missing = match self.probe_destinations(messages).await {
            Ok(m) => m,
            Err(e) => return vec![Err(e); messages.len()],
        };
        let mut todo: Vec<usize> = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            if let Some(why) = self.too_long(m) {
                results[i] = Some(Err(SinkError::Rejected(why)));
                continue;
            }
            match m.destination.as_ref().and_then(|d| missing.get(d)) {
                Some(why) => results[i] = Some(Err(SinkError::Rejected(why.clone()))),
                None => todo.push(i),
            }
        }
        let wave: Vec<&Message> = todo.iter().map(|&i| &messages[i]).collect();
        let outcome = tokio::time::timeout(self.timeout, self.publish_wave(&channel, &wave)).await;
        let sent = match outcome {
            Ok(sent) => sent,
            Err(_) => {
                // A stalled broker (alarm, network freeze): nothing unconfirmed is trusted.
                self.drop_connection().await;
                let why = unavailable(format!("no publisher confirm within {:?}", self.timeout));
                for &i in &todo {
                    results[i] = Some(Err(why.clone()));
                }
                return finish(results);
            }
        };
        let mut broken = Vec::new();
        for (&i, s) in todo.iter().zip(sent) {
            match s {
                Sent::Confirmed => results[i] = Some(Ok(())),
                Sent::Rejected(why) => results[i] = Some(Err(SinkError::Rejected(why))),
                Sent::Broken(e) => broken.push((i, e)),
            }
        }
        if !broken.is_empty() {
            self.isolate(messages, broken, &mut results).await;
        }
        finish(results)
    }

    async fn dead_letter(&mut self, message: &Message, error: &str) -> Result<bool, SinkError> {
        let Some(dlx) = self.dead_letter_exchange.clone() else {
            return Ok(false);
        };
        if let Some(why) = self.too_long(message) {
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
        let confirm = channel
            .basic_publish(
                &dlx,
                routing_key,
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                body,
                props,
            )
            .await
            .map_err(|e| unavailable(describe(&e)))?;
        match tokio::time::timeout(self.timeout, confirm).await {
            Ok(Ok(Confirmation::Ack(None))) => Ok(true),
            Ok(Ok(other)) => Err(SinkError::Rejected(format!(
                "dead-letter exchange {dlx:?} did not accept the message ({other:?})"
            ))),
            Ok(Err(e)) => Err(SinkError::Rejected(format!(
                "dead-letter exchange {dlx:?}: {}",
                describe(&e)
            ))),
            Err(_) => Err(unavailable("no confirm from the dead-letter exchange")),
        }
    }

    async fn close(&mut self) {
        self.drop_connection().await;
    }
}

impl RabbitSink {
    /// The channel (or connection) broke while messages were unconfirmed. If the
    /// connection is gone, they are all unavailable. If only the channel was closed by
    /// the broker, re-send them one at a time on fresh channels so the message that
    /// closes a channel is rejected alone.
    async fn isolate(
        &mut self,
        messages: &[Message],
        broken: Vec<(usize, lapin::Error)>,
        results: &mut [Option<Result<(), SinkError>>],
    ) {
        for (i, first_err) in broken {
            let channel = match self.ensure_channel().await {
                Ok(c) => c,
                Err(e) => {
                    results[i] = Some(Err(e));
                    continue;
                }
            };
            let single = [&messages[i]];
            let sent =
                tokio::time::timeout(self.timeout, self.publish_wave(&channel, &single)).await;
            results[i] = Some(match sent.ok().and_then(|mut v| v.pop()) {
                Some(Sent::Confirmed) => Ok(()),
                Some(Sent::Rejected(why)) => Err(SinkError::Rejected(why)),
                Some(Sent::Broken(e)) => {
                    let conn_ok = self.conn.as_ref().is_some_and(|c| c.status().connected());
                    match channel_close_reason(&e).or_else(|| channel_close_reason(&first_err)) {
                        Some(reason) if conn_ok => Err(SinkError::Rejected(reason)),
                        _ => Err(unavailable(describe(&e))),
                    }
                }
                None => Err(unavailable(format!(
                    "no publisher confirm within {:?}",
                    self.timeout
                ))),
            });
        }
    }
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

fn finish(results: Vec<Option<Result<(), SinkError>>>) -> Vec<Result<(), SinkError>> {
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(unavailable("not published"))))
        .collect()
}

fn unavailable(why: impl Into<String>) -> SinkError {
    SinkError::Unavailable(crate::config::redact_url(&why.into()))
}

/// A channel-level error the broker raised because of a message (not a connection loss).
fn channel_close_reason(e: &lapin::Error) -> Option<String> {
    match e {
        lapin::Error::ProtocolError(amqp) => Some(format!(
            "RabbitMQ closed the channel: {} {}",
            amqp.get_id(),
            amqp.get_message().as_str()
        )),
        _ => None,
    }
}

fn describe(e: &lapin::Error) -> String {
    match e {
        lapin::Error::ProtocolError(amqp) => {
            format!("{} {}", amqp.get_id(), amqp.get_message().as_str())
        }
        other => other.to_string(),
    }
}
