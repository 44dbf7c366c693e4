//! A reader for `demo` and the tests: a stream read with `XREAD` from the entries added
//! after the tap was made (mode `stream`; after a lost connection it reconnects and goes
//! on from the last entry it read), or a channel subscription made before anything is
//! published (mode `pubsub`). Both hand back what arrived as `Received`.

use std::collections::VecDeque;
use std::time::Duration;

use futures::StreamExt;
use redis::aio::{MultiplexedConnection, PubSubStream};
use redis::streams::{StreamRangeReply, StreamReadOptions, StreamReadReply};
use redis::AsyncCommands;

use super::errors::unavailable;
use super::RedisMode;
use crate::secret::Secret;
use crate::sink::{Arrival, SinkError};

/// One entry or message as it arrived.
#[derive(Debug, Clone)]
pub enum Received {
    /// A stream entry: its key, id and fields (field order as sent).
    Entry {
        key: String,
        id: String,
        fields: Vec<(String, String)>,
    },
    /// A pub/sub message on `channel`.
    Message { channel: String, body: String },
}

impl Received {
    /// A stream entry's field (`None` for a pub/sub message or a missing field).
    pub fn field(&self, name: &str) -> Option<&str> {
        match self {
            Received::Entry { fields, .. } => fields
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str()),
            Received::Message { .. } => None,
        }
    }

    /// The event as the demo prints it.
    pub fn arrival(&self) -> Arrival {
        match self {
            Received::Entry { key, id, fields } => Arrival {
                event_id: self.field("event_id").unwrap_or_default().to_string(),
                aggregate_id: self.field("aggregate_id").unwrap_or_default().to_string(),
                summary: std::iter::once(format!("  stream key     {key}\n  entry id       {id}"))
                    .chain(fields.iter().map(|(n, v)| format!("  {n:<14} {v}")))
                    .collect::<Vec<_>>()
                    .join("\n"),
            },
            Received::Message { channel, body } => {
                let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
                let text = |k: &str| v[k].as_str().unwrap_or_default().to_string();
                Arrival {
                    event_id: text("event_id"),
                    aggregate_id: text("aggregate_id"),
                    summary: format!("  channel {channel}\n  message {body}"),
                }
            }
        }
    }
}

/// One per tap: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
enum Source {
    Stream {
        client: redis::Client,
        /// `None` after a failed read, until a reconnect succeeds.
        conn: Option<MultiplexedConnection>,
        key: String,
        last_id: String,
    },
    Channel(PubSubStream),
}

pub struct Tap {
    source: Source,
    buffered: VecDeque<Received>,
}

/// How long a stream tap waits before it reconnects after a failed read.
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);

fn err(e: redis::RedisError) -> SinkError {
    unavailable(e.to_string())
}

impl Tap {
    /// A tap on `key` (mode `stream`: entries added from now on) or on channel `key`
    /// (mode `pubsub`: subscribed when this returns).
    pub async fn open(url: &Secret, mode: RedisMode, key: &str) -> Result<Self, SinkError> {
        let client = redis::Client::open(url.expose()).map_err(err)?;
        let source = match mode {
            RedisMode::Stream => {
                let mut conn = client
                    .get_multiplexed_async_connection()
                    .await
                    .map_err(err)?;
                let last: StreamRangeReply =
                    conn.xrevrange_count(key, "+", "-", 1).await.map_err(err)?;
                let last_id = last.ids.first().map_or("0-0".to_string(), |e| e.id.clone());
                Source::Stream {
                    client,
                    conn: Some(conn),
                    key: key.to_string(),
                    last_id,
                }
            }
            RedisMode::Pubsub => {
                let mut pubsub = client.get_async_pubsub().await.map_err(err)?;
                pubsub.subscribe(key).await.map_err(err)?;
                Source::Channel(pubsub.into_on_message())
            }
        };
        Ok(Self {
            source,
            buffered: VecDeque::new(),
        })
    }

    /// The next entry or message, or `None` after `timeout` without one (or after a
    /// failed read: see `try_next`).
    pub async fn next(&mut self, timeout: Duration) -> Option<Received> {
        self.try_next(timeout).await.ok().flatten()
    }

    /// The next entry or message, `Ok(None)` after `timeout` without one, or why the
    /// read failed (a stream tap then reconnects on the next call, after a short pause).
    pub async fn try_next(&mut self, timeout: Duration) -> Result<Option<Received>, SinkError> {
        if let Some(r) = self.buffered.pop_front() {
            return Ok(Some(r));
        }
        match &mut self.source {
            Source::Stream {
                client,
                conn,
                key,
                last_id,
            } => {
                let c = match conn {
                    Some(c) => c,
                    None => {
                        tokio::time::sleep(RECONNECT_PAUSE.min(timeout)).await;
                        conn.insert(
                            client
                                .get_multiplexed_async_connection()
                                .await
                                .map_err(err)?,
                        )
                    }
                };
                let block = usize::try_from(timeout.as_millis())
                    .unwrap_or(usize::MAX)
                    .max(1);
                let opts = StreamReadOptions::default().block(block).count(1000);
                let reply: StreamReadReply = match c
                    .xread_options(&[key.as_str()], &[last_id.as_str()], &opts)
                    .await
                {
                    Ok(r) => r,
                    Err(e) => {
                        *conn = None;
                        return Err(err(e));
                    }
                };
                for sk in reply.keys {
                    for entry in sk.ids {
                        *last_id = entry.id.clone();
                        let mut fields: Vec<(String, String)> = entry
                            .map
                            .iter()
                            .map(|(n, v)| {
                                let v = redis::from_redis_value::<String>(v).unwrap_or_default();
                                (n.clone(), v)
                            })
                            .collect();
                        fields.sort_by_key(|(n, _)| field_rank(n));
                        self.buffered.push_back(Received::Entry {
                            key: sk.key.clone(),
                            id: entry.id,
                            fields,
                        });
                    }
                }
                Ok(self.buffered.pop_front())
            }
            Source::Channel(stream) => match tokio::time::timeout(timeout, stream.next()).await {
                Err(_) => Ok(None),
                Ok(None) => Err(unavailable("the subscription's connection closed")),
                Ok(Some(msg)) => Ok(Some(Received::Message {
                    channel: msg.get_channel_name().to_string(),
                    body: msg.get_payload::<String>().unwrap_or_default(),
                })),
            },
        }
    }
}

/// Fields in the order the relay writes them (`HashMap` order otherwise).
fn field_rank(name: &str) -> (usize, String) {
    let order = [
        "event_id",
        "event_type",
        "aggregate_type",
        "aggregate_id",
        "payload",
        "headers",
        "last_error",
    ];
    let rank = order.iter().position(|n| *n == name).unwrap_or(order.len());
    (rank, name.to_string())
}
