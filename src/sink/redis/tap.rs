//! A reader for `demo` and the tests: a stream read with `XREAD` from the entries added
//! after the tap was made (mode `stream`), or a channel subscription made before
//! anything is published (mode `pubsub`). Both hand back what arrived as `Received`.

use std::collections::VecDeque;
use std::time::Duration;

use futures::StreamExt;
use redis::aio::{MultiplexedConnection, PubSubStream};
use redis::streams::{StreamRangeReply, StreamReadOptions, StreamReadReply};
use redis::AsyncCommands;

use super::errors::unavailable;
use super::RedisMode;
use crate::config::secret::Secret;
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

enum Source {
    Stream {
        conn: MultiplexedConnection,
        key: String,
        last_id: String,
    },
    Channel(PubSubStream),
}

pub struct Tap {
    source: Source,
    buffered: VecDeque<Received>,
}

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
                    conn,
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

    /// The next entry or message, or `None` after `timeout` without one.
    pub async fn next(&mut self, timeout: Duration) -> Option<Received> {
        if let Some(r) = self.buffered.pop_front() {
            return Some(r);
        }
        match &mut self.source {
            Source::Stream { conn, key, last_id } => {
                let block = usize::try_from(timeout.as_millis())
                    .unwrap_or(usize::MAX)
                    .max(1);
                let opts = StreamReadOptions::default().block(block).count(1000);
                let reply: StreamReadReply = conn
                    .xread_options(&[key.as_str()], &[last_id.as_str()], &opts)
                    .await
                    .ok()?;
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
                self.buffered.pop_front()
            }
            Source::Channel(stream) => {
                let msg = tokio::time::timeout(timeout, stream.next()).await.ok()??;
                Some(Received::Message {
                    channel: msg.get_channel_name().to_string(),
                    body: msg.get_payload::<String>().unwrap_or_default(),
                })
            }
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
