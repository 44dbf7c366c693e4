//! The Redis side (mode `stream`): one stream key per phase, the raw broker ceiling (a
//! bare pipelined `XADD` of the relay's fields with a sliding window of unanswered
//! commands on one multiplexed connection), an `XREAD` reader that timestamps arrivals,
//! and the stream's length after a drain.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use redis::aio::MultiplexedConnection;
use redis::streams::StreamReadReply;
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::pg::TRACE_VALUE;
use crate::rabbit::Arrivals;
use crate::window::{sliding, Created, Load};

pub struct Redis {
    url: String,
    prefix: String,
    client: redis::Client,
    conn: MultiplexedConnection,
    keys: Created,
}

impl Redis {
    pub async fn setup(url: &str, prefix: &str) -> Result<Self> {
        let client = redis::Client::open(url)?;
        let conn = client
            .get_multiplexed_async_connection()
            .await
            .with_context(|| format!("no Redis server at {url}"))?;
        Ok(Self {
            url: url.to_string(),
            prefix: prefix.to_string(),
            client,
            conn,
            keys: Default::default(),
        })
    }

    /// The stream key of `phase` (removed at teardown).
    fn key(&self, phase: &str) -> String {
        let key = format!("{}:{phase}", self.prefix);
        self.keys.add(&key);
        key
    }

    /// The relay's `[redis]` settings for `phase`.
    pub fn relay_env(&self, phase: &str) -> Vec<(String, String)> {
        vec![
            ("OUTBOX_RELAY__REDIS__URL".into(), self.url.clone()),
            ("OUTBOX_RELAY__REDIS__MODE".into(), "stream".into()),
            ("OUTBOX_RELAY__REDIS__KEY".into(), self.key(phase)),
        ]
    }

    /// The raw broker ceiling: `n` entries shaped as the relay writes them, at most
    /// `window` unanswered. Returns seconds.
    pub async fn ceiling(&self, load: &Load<'_>) -> Result<f64> {
        let Load {
            n, payload, window, ..
        } = *load;
        let key = self.key("ceiling");
        let headers = format!("{{\"traceparent\":\"{TRACE_VALUE}\"}}");
        let (key, headers) = (&key, &headers);
        let secs = sliding(n, window, |i| {
            let agg = load.aggregate(i);
            let mut cmd = redis::cmd("XADD");
            cmd.arg(key).arg("*");
            for (f, v) in [
                ("event_id", Uuid::new_v4().to_string().as_str()),
                ("event_type", "order.created"),
                ("aggregate_type", "order"),
                ("aggregate_id", agg.as_str()),
                ("headers", headers.as_str()),
                ("payload", payload),
            ] {
                cmd.arg(f).arg(v);
            }
            let mut conn = self.conn.clone();
            let answer = async move {
                cmd.query_async::<String>(&mut conn)
                    .await
                    .context("raw XADD")?;
                Ok(1)
            };
            std::future::ready(Ok((1, answer)))
        })
        .await?;
        self.delete(key).await;
        Ok(secs)
    }

    /// Read `phase`'s stream from now on and note when each `event_id` arrived.
    pub async fn arrivals(&self, phase: &str) -> Result<(Arrivals, tokio::task::JoinHandle<()>)> {
        let key = self.key(phase);
        let mut conn = self.client.get_multiplexed_async_connection().await?;
        let seen: Arrivals = Arc::new(Mutex::new(HashMap::new()));
        let s = seen.clone();
        let task = tokio::spawn(async move {
            let mut last = "0".to_string(); // the phase's stream is new: read it all
            loop {
                let reply: redis::RedisResult<Option<StreamReadReply>> = redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(1000)
                    .arg("BLOCK")
                    .arg(500)
                    .arg("STREAMS")
                    .arg(&key)
                    .arg(&last)
                    .query_async(&mut conn)
                    .await;
                let Ok(Some(reply)) = reply else { continue };
                let at = Instant::now();
                let mut s = s.lock().await;
                for entry in reply.keys.iter().flat_map(|k| &k.ids) {
                    last.clone_from(&entry.id);
                    let id = entry
                        .get::<String>("event_id")
                        .and_then(|v| Uuid::parse_str(&v).ok());
                    if let Some(id) = id {
                        s.entry(id).or_insert(at);
                    }
                }
            }
        });
        Ok((seen, task))
    }

    /// Entries in `phase`'s stream; the key is deleted afterwards.
    pub async fn count(&self, phase: &str) -> Result<u64> {
        let key = self.key(phase);
        let mut conn = self.conn.clone();
        let n: u64 = redis::cmd("XLEN").arg(&key).query_async(&mut conn).await?;
        self.delete(&key).await;
        Ok(n)
    }

    async fn delete(&self, key: &str) {
        let mut conn = self.conn.clone();
        let _: redis::RedisResult<i64> = redis::cmd("DEL").arg(key).query_async(&mut conn).await;
        self.keys.remove(key);
    }

    pub async fn teardown(&self) {
        for key in self.keys.take() {
            self.delete(&key).await;
        }
    }
}
