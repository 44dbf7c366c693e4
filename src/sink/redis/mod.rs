//! Redis sink (redis-rs, one multiplexed connection): mode `stream` appends each row as
//! a stream entry (`XADD`, the reply is the confirm), mode `pubsub` publishes one JSON
//! envelope (`PUBLISH`, confirmed only when at least one subscriber received it). `send`
//! builds the command and returns its confirm; the commands of many outstanding confirms
//! are pipelined on the one connection.
//!
//! Invariants:
//! - the connection's driver task is ours (spawned here, aborted by `close`, by a
//!   reconnect and on drop), so `close` abandons every outstanding reply: nothing the
//!   engine gave up on can still be written afterwards;
//! - an argument longer than the server's `proto-max-bulk-len` (read at connect with
//!   `CONFIG GET`, 512 MB when that is not allowed) is rejected before it is sent: the
//!   server would close the connection under every other message;
//! - any error that is not the server's judgement of the command (I/O, timeout,
//!   `LOADING`, `OOM`, …) marks the connection broken, so the engine reconnects.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;

mod config;
mod errors;
pub mod tap;
pub mod wire;

use super::{decided, Confirm, Sink, SinkError};
use crate::model::Message;
use crate::secret::Secret;
pub use config::{RedisConfig, RedisMode};
use errors::{classify, unavailable};

pub struct RedisSink {
    client: redis::Client,
    url: Secret,
    mode: RedisMode,
    key: String,
    dead_letter_key: Option<String>,
    max_len: Option<u64>,
    timeout: Duration,
    link: Option<Link>,
}

/// One open connection: the handle commands are sent through, the driver task that
/// owns the socket, and whether a command has seen the connection fail.
struct Link {
    conn: MultiplexedConnection,
    driver: tokio::task::JoinHandle<()>,
    broken: Arc<AtomicBool>,
    max_bulk_len: u64,
}

impl Link {
    fn up(&self) -> bool {
        !self.driver.is_finished() && !self.broken.load(Ordering::Relaxed)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // The socket goes with the driver: every reply still outstanding fails.
        self.driver.abort();
    }
}

/// What a confirm needs to send its command and judge the reply.
struct Out {
    conn: MultiplexedConnection,
    broken: Arc<AtomicBool>,
    max_bulk_len: u64,
}

impl Out {
    /// `e` as a `SinkError`; an error that is not about the message marks the
    /// connection broken.
    fn failed(broken: &AtomicBool, what: &str, e: &redis::RedisError) -> SinkError {
        let out = classify(what, e);
        if out.is_retryable() {
            broken.store(true, Ordering::Relaxed);
        }
        out
    }
}

impl RedisSink {
    pub fn new(cfg: &RedisConfig, timeout: Duration) -> Result<Self, SinkError> {
        let client = redis::Client::open(cfg.url.expose())
            .map_err(|e| unavailable(format!("redis.url {}: {e}", cfg.url)))?;
        Ok(Self {
            client,
            url: cfg.url.clone(),
            mode: cfg.mode,
            key: cfg.key.clone(),
            dead_letter_key: cfg.dead_letter_key.clone(),
            max_len: cfg.max_len,
            timeout,
            link: None,
        })
    }

    async fn open(&mut self) -> Result<(), SinkError> {
        self.link = None;
        let t = self.timeout;
        let made = tokio::time::timeout(
            t,
            self.client
                .create_multiplexed_tokio_connection_with_response_timeout(t),
        )
        .await
        .map_err(|_| unavailable(format!("no answer from {} within {t:?}", self.url)))?
        .map_err(|e| unavailable(format!("cannot connect to {}: {e}", self.url)))?;
        let (mut conn, driver) = made;
        let driver = tokio::spawn(driver);
        let max_bulk_len = match max_bulk_len(&mut conn).await {
            Ok(n) => n,
            Err(e) => {
                driver.abort();
                return Err(e);
            }
        };
        self.link = Some(Link {
            conn,
            driver,
            broken: Arc::new(AtomicBool::new(false)),
            max_bulk_len,
        });
        Ok(())
    }

    /// The open connection (opened anew if there is none or it broke).
    async fn out(&mut self) -> Result<Out, SinkError> {
        if !self.link.as_ref().is_some_and(Link::up) {
            self.open().await?;
        }
        let link = self
            .link
            .as_ref()
            .ok_or_else(|| unavailable("not connected"))?;
        Ok(Out {
            conn: link.conn.clone(),
            broken: link.broken.clone(),
            max_bulk_len: link.max_bulk_len,
        })
    }

    /// `XADD <key> [MAXLEN ~ n] * <fields…>` as a confirm, or why it cannot be sent.
    fn xadd(
        out: Out,
        key: String,
        max_len: Option<u64>,
        fields: Vec<(&'static str, String)>,
    ) -> Result<Confirm, SinkError> {
        let sizes = std::iter::once(("the stream key", key.len()))
            .chain(fields.iter().map(|(n, v)| (*n, v.len())));
        if let Some(why) = wire::too_big(sizes, out.max_bulk_len) {
            return Err(SinkError::Rejected(why));
        }
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&key);
        if let Some(n) = max_len {
            cmd.arg("MAXLEN").arg("~").arg(n);
        }
        cmd.arg("*");
        for (name, value) in fields {
            cmd.arg(name).arg(value);
        }
        let Out {
            mut conn, broken, ..
        } = out;
        Ok(Box::pin(async move {
            match cmd.query_async::<redis::Value>(&mut conn).await {
                Ok(_) => Ok(()),
                Err(e) => Err(Out::failed(
                    &broken,
                    &format!("XADD to stream key {key:?}"),
                    &e,
                )),
            }
        }))
    }

    /// `PUBLISH <channel> <envelope>` as a confirm: 0 receivers is a rejection.
    fn publish(out: Out, channel: String, body: String) -> Result<Confirm, SinkError> {
        let sizes = [
            ("the channel name", channel.len()),
            ("the message", body.len()),
        ];
        if let Some(why) = wire::too_big(sizes, out.max_bulk_len) {
            return Err(SinkError::Rejected(why));
        }
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(&channel).arg(body);
        let Out {
            mut conn, broken, ..
        } = out;
        Ok(Box::pin(async move {
            match cmd.query_async::<i64>(&mut conn).await {
                Ok(0) => Err(SinkError::Rejected(format!(
                    "no subscriber on channel {channel:?}: PUBLISH reached 0 receivers (redis.mode = \"pubsub\" delivers only to subscribers connected at that moment)"
                ))),
                Ok(_) => Ok(()),
                Err(e) => Err(Out::failed(
                    &broken,
                    &format!("PUBLISH to channel {channel:?}"),
                    &e,
                )),
            }
        }))
    }
}

/// The server's `proto-max-bulk-len`; its default when `CONFIG GET` is not allowed
/// (ACLs, a renamed command, a managed service). A connection error is an error.
async fn max_bulk_len(conn: &mut MultiplexedConnection) -> Result<u64, SinkError> {
    let reply = redis::cmd("CONFIG")
        .arg("GET")
        .arg("proto-max-bulk-len")
        .query_async::<HashMap<String, String>>(conn)
        .await;
    match reply {
        Ok(map) => Ok(map
            .get("proto-max-bulk-len")
            .and_then(|v| v.parse().ok())
            .unwrap_or(wire::DEFAULT_MAX_BULK_LEN)),
        // Lost connection or timeout: the server is not there.
        Err(e) if e.is_io_error() => Err(classify("CONFIG GET proto-max-bulk-len", &e)),
        // Refused (NOPERM, unknown or renamed command) or an unexpected reply shape.
        Err(_) => Ok(wire::DEFAULT_MAX_BULK_LEN),
    }
}

impl Sink for RedisSink {
    async fn connect(&mut self) -> Result<(), SinkError> {
        self.out().await.map(|_| ())
    }

    async fn send(&mut self, m: &Message) -> Result<Confirm, SinkError> {
        let out = self.out().await?;
        let key = wire::target(&self.key, m);
        match self.mode {
            RedisMode::Stream => Self::xadd(out, key, self.max_len, wire::stream_fields(m)),
            RedisMode::Pubsub => Self::publish(out, key, wire::envelope(m)),
        }
    }

    /// `XADD` to `redis.dead_letter_key` (in both modes: a dead letter is kept), the
    /// stream entry's fields plus `last_error`.
    async fn dead_letter(
        &mut self,
        message: &Message,
        error: &str,
    ) -> Result<Option<Confirm>, SinkError> {
        let Some(template) = self.dead_letter_key.clone() else {
            return Ok(None);
        };
        let out = self.out().await?;
        let key = wire::key_from_template(&template, &message.aggregate_type);
        let mut fields = wire::stream_fields(message);
        fields.push(("last_error", error.to_string()));
        Self::xadd(out, key, None, fields)
            .map(Some)
            .map_err(|e| match e {
                SinkError::Rejected(why) => {
                    SinkError::Rejected(format!("not dead-lettered: {why}"))
                }
                other => other,
            })
    }

    fn is_connected(&self) -> bool {
        self.link.as_ref().is_some_and(Link::up)
    }

    /// A `PING` on the publishing connection, answered within `within`.
    fn probe(&self, within: Duration) -> Confirm {
        let Some(link) = self.link.as_ref().filter(|l| l.up()) else {
            return decided(Err(unavailable("not connected")));
        };
        let (mut conn, broken) = (link.conn.clone(), link.broken.clone());
        Box::pin(async move {
            let ping = redis::cmd("PING");
            match tokio::time::timeout(within, ping.query_async::<redis::Value>(&mut conn)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(Out::failed(&broken, "PING", &e)),
                Err(_) => Err(unavailable(format!(
                    "no answer to a PING within {within:?}"
                ))),
            }
        })
    }

    async fn close(&mut self) {
        self.link = None;
    }
}
