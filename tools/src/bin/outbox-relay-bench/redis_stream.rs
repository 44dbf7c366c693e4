//! Redis side of the bench (stream mode): a unique stream key per phase, the bare
//! pipelined `XADD` ceiling sending the entries the relay sends, the arrivals reader
//! (`XREAD`) for the latency phase, the textbook publisher, and teardown.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use futures::stream::{FuturesUnordered, StreamExt};
use outbox_relay::model::Message;
use outbox_relay::sink::redis::wire::stream_fields;
use redis::aio::MultiplexedConnection;
use redis::streams::{StreamReadOptions, StreamReadReply};
use redis::AsyncCommands;
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::pg::{NaivePublisher, NaiveRow};
use crate::rabbit::Arrivals;

pub struct Redis {
    pub url: String,
    client: redis::Client,
    conn: MultiplexedConnection,
    prefix: String,
    /// Every stream key handed out, deleted by `teardown`.
    keys: std::sync::Mutex<Vec<String>>,
}

/// The `XADD` of one entry, exactly as the relay's stream mode builds it.
fn xadd(key: &str, m: &Message) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(key).arg("*");
    for (name, value) in stream_fields(m) {
        cmd.arg(name).arg(value);
    }
    cmd
}

fn message(event_id: Uuid, aggregate_id: &str, event_type: &str, payload: &str) -> Message {
    Message {
        id: 0,
        event_id,
        aggregate_type: "order".into(),
        aggregate_id: aggregate_id.into(),
        event_type: event_type.into(),
        destination: None,
        routing_key: None,
        payload: payload.into(),
        headers: vec![("traceparent".into(), crate::pg::TRACEPARENT.into())],
        created_at: chrono::Utc::now(),
        attempts: 0,
    }
}

impl Redis {
    pub async fn setup(url: &str, prefix: &str) -> Result<Self> {
        let client = redis::Client::open(url).context("Redis URL")?;
        let conn = client
            .get_multiplexed_async_connection()
            .await
            .with_context(|| format!("no Redis at {url}"))?;
        Ok(Self {
            url: url.to_string(),
            client,
            conn,
            prefix: prefix.to_string(),
            keys: Default::default(),
        })
    }

    /// A new stream key for `phase`.
    pub fn key(&self, phase: &str) -> String {
        let key = format!("{}_{phase}", self.prefix);
        self.keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(key.clone());
        key
    }

    pub async fn len(&self, key: &str) -> Result<u64> {
        Ok(self.conn.clone().xlen(key).await?)
    }

    pub async fn teardown(&self) {
        let keys = std::mem::take(
            &mut *self
                .keys
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        if !keys.is_empty() {
            let _: Result<i64, _> = self.conn.clone().del(keys).await;
        }
    }

    /// The raw broker ceiling: `n` entries like the relay's, pipelined on one
    /// multiplexed connection, at most `window` unanswered at any time. Returns seconds.
    pub async fn ceiling(
        &self,
        key: &str,
        n: u64,
        payload: &str,
        aggregates: u32,
        window: usize,
    ) -> Result<f64> {
        let started = Instant::now();
        let mut inflight = FuturesUnordered::new();
        let (mut sent, mut acked) = (0u64, 0u64);
        while acked < n {
            while sent < n && inflight.len() < window {
                let agg = format!("order-{}", sent % u64::from(aggregates));
                let cmd = xadd(
                    key,
                    &message(Uuid::new_v4(), &agg, "order.created", payload),
                );
                let mut conn = self.conn.clone();
                inflight.push(async move { cmd.query_async::<redis::Value>(&mut conn).await });
                sent += 1;
            }
            match inflight.next().await {
                Some(Ok(_)) => acked += 1,
                Some(Err(e)) => bail!("raw publisher: XADD failed: {e}"),
                None => break,
            }
        }
        Ok(started.elapsed().as_secs_f64())
    }

    /// Read `key` from its start and note when each `event_id` arrived.
    pub async fn arrivals(&self, key: &str) -> Result<(Arrivals, tokio::task::JoinHandle<()>)> {
        let mut conn = self.client.get_multiplexed_async_connection().await?;
        let seen: Arrivals = Arc::new(Mutex::new(HashMap::new()));
        let (s, key) = (seen.clone(), key.to_string());
        let task = tokio::spawn(async move {
            let mut last = "0-0".to_string();
            let opts = StreamReadOptions::default().block(500).count(5000);
            loop {
                let Ok(reply) = conn
                    .xread_options::<_, _, StreamReadReply>(&[&key], &[&last], &opts)
                    .await
                else {
                    return;
                };
                let at = Instant::now();
                let mut s = s.lock().await;
                for e in reply.keys.into_iter().flat_map(|k| k.ids) {
                    if let Some(id) = e
                        .get::<String>("event_id")
                        .and_then(|v| Uuid::parse_str(&v).ok())
                    {
                        s.entry(id).or_insert(at);
                    }
                    last = e.id;
                }
            }
        });
        Ok((seen, task))
    }

    pub fn naive(&self, key: &str) -> NaiveRedis {
        NaiveRedis {
            conn: self.conn.clone(),
            key: key.to_string(),
        }
    }
}

pub struct NaiveRedis {
    conn: MultiplexedConnection,
    key: String,
}

impl NaivePublisher for NaiveRedis {
    async fn publish_one(&mut self, row: &NaiveRow) -> Result<()> {
        let m = message(
            row.event_id,
            &row.aggregate_id,
            &row.event_type,
            &row.payload,
        );
        xadd(&self.key, &m)
            .query_async::<redis::Value>(&mut self.conn)
            .await
            .context("naive relay: XADD")?;
        Ok(())
    }
}
