//! Redis side of the tests: the test server's URL (`TEST_REDIS_URL`), a sink config
//! with unique keys (`TestKeys`, deleted by `cleanup`), and background readers that
//! collect what arrived — a stream reader that survives a server restart
//! (`StreamCollector`) and a channel subscriber (`Subscriber`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_relay::secret::Secret;
use outbox_relay::sink::redis::tap::{Received, Tap};
use outbox_relay::sink::redis::{RedisConfig, RedisMode};
use redis::AsyncCommands;
use tokio::task::JoinHandle;

use crate::{hex_id, relay_proc::fault_env};

/// The test Redis (`TEST_REDIS_URL`, default the local server).
pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A plain connection to the test Redis (panics when it is not there).
pub async fn redis_conn() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url())
        .expect("TEST_REDIS_URL")
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("no Redis at {} ({e})", redis_url()))
}

/// A unique key prefix for one test; every key the test uses starts with it, and
/// `cleanup` deletes them all.
pub struct TestKeys {
    pub prefix: String,
}

impl TestKeys {
    pub fn new(what: &str) -> Self {
        Self {
            prefix: format!("outbox_relay_test.{what}.{}", hex_id()),
        }
    }

    /// `<prefix>.<name>`.
    pub fn key(&self, name: &str) -> String {
        format!("{}.{name}", self.prefix)
    }

    /// The default key template of this test: `<prefix>.{aggregate_type}`.
    pub fn template(&self) -> String {
        self.key("{aggregate_type}")
    }

    /// A `[redis]` section in `mode` with this test's key template.
    pub fn config(&self, mode: RedisMode) -> RedisConfig {
        serde_json::from_value(serde_json::json!({
            "url": redis_url(),
            "mode": mode.to_string(),
            "key": self.template(),
        }))
        .expect("redis config")
    }

    /// Relay env (child process) for the Redis sink in `mode` on `table`, plus `extra`.
    pub fn env(
        &self,
        table: &str,
        mode: RedisMode,
        extra: &[(&str, &str)],
    ) -> Vec<(String, String)> {
        let mut env = fault_env(table, "unused", &[]);
        for (k, v) in [
            ("OUTBOX_RELAY__SINK__KIND", "redis".to_string()),
            ("OUTBOX_RELAY__REDIS__URL", redis_url()),
            ("OUTBOX_RELAY__REDIS__MODE", mode.to_string()),
            ("OUTBOX_RELAY__REDIS__KEY", self.template()),
        ] {
            env.push((k.to_string(), v));
        }
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        env
    }

    /// Delete every key under the prefix (errors ignored: the server may be gone).
    pub async fn cleanup(&self) {
        delete_under(self.prefix.clone()).await;
    }
}

impl Drop for TestKeys {
    /// `cleanup` when the test panicked before it.
    fn drop(&mut self) {
        let prefix = self.prefix.clone();
        crate::teardown::after_panic(format!("redis keys {prefix}.*"), delete_under(prefix));
    }
}

/// Delete every key under `prefix` (errors ignored).
async fn delete_under(prefix: String) {
    let Ok(client) = redis::Client::open(redis_url()) else {
        return;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return;
    };
    let keys: Vec<String> = conn.keys(format!("{prefix}.*")).await.unwrap_or_default();
    if !keys.is_empty() {
        let _: Result<i64, _> = conn.del(keys).await;
    }
}

/// What a background reader got so far, in arrival order.
pub type Arrived = Arc<Mutex<Vec<Received>>>;

/// Reads `key` continuously with `XREAD` from the moment it starts; after a lost
/// connection (a server restart) it reconnects and goes on (a restarted server without
/// persistence starts the stream anew, with later ids).
pub struct StreamCollector {
    pub got: Arrived,
    task: JoinHandle<()>,
}

impl StreamCollector {
    pub async fn start(key: &str) -> Self {
        let got: Arrived = Arc::default();
        let url = Secret::new(redis_url());
        let mut tap = Tap::open(&url, RedisMode::Stream, key)
            .await
            .expect("open the stream reader");
        let sink = got.clone();
        let task = tokio::spawn(async move {
            loop {
                // A failed read (the server restarting) reconnects on the next call.
                if let Ok(Some(r)) = tap.try_next(Duration::from_millis(500)).await {
                    sink.lock().expect("collector lock").push(r);
                }
            }
        });
        Self { got, task }
    }

    pub fn len(&self) -> usize {
        self.got.lock().expect("collector lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stop reading; everything read so far.
    pub fn stop(self) -> Vec<Received> {
        self.task.abort();
        let got = self.got.lock().expect("collector lock");
        got.clone()
    }
}

/// A subscriber to one channel, subscribed when `start` returns.
pub struct Subscriber {
    pub got: Arrived,
    task: JoinHandle<()>,
}

impl Subscriber {
    pub async fn start(channel: &str) -> Self {
        let got: Arrived = Arc::default();
        let mut tap = Tap::open(&Secret::new(redis_url()), RedisMode::Pubsub, channel)
            .await
            .expect("subscribe");
        let sink = got.clone();
        let task = tokio::spawn(async move {
            loop {
                if let Some(r) = tap.next(Duration::from_millis(500)).await {
                    sink.lock().expect("subscriber lock").push(r);
                }
            }
        });
        Self { got, task }
    }

    pub fn len(&self) -> usize {
        self.got.lock().expect("subscriber lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Unsubscribe (drop the connection); everything received.
    pub fn stop(self) -> Vec<Received> {
        self.task.abort();
        let got = self.got.lock().expect("subscriber lock");
        got.clone()
    }
}

/// A stream entry's fields as a map (panics on a pub/sub message).
pub fn fields(r: &Received) -> HashMap<String, String> {
    match r {
        Received::Entry { fields, .. } => fields.iter().cloned().collect(),
        Received::Message { .. } => panic!("a pub/sub message, not a stream entry"),
    }
}

/// A stream entry's id (panics on a pub/sub message).
pub fn entry_id(r: &Received) -> &str {
    match r {
        Received::Entry { id, .. } => id,
        Received::Message { .. } => panic!("a pub/sub message, not a stream entry"),
    }
}

/// The event id of an entry or an envelope.
pub fn event_id(r: &Received) -> String {
    r.arrival().event_id
}

/// Every entry of stream `key`, in stream order (`XRANGE - +`).
pub async fn stream_entries(key: &str) -> Vec<Received> {
    let mut conn = redis_conn().await;
    let reply: redis::streams::StreamRangeReply = conn.xrange_all(key).await.expect("XRANGE");
    reply
        .ids
        .into_iter()
        .map(|e| {
            let mut fields: Vec<(String, String)> = e
                .map
                .iter()
                .map(|(n, v)| {
                    let v: String = redis::from_redis_value(v).expect("a string field");
                    (n.clone(), v)
                })
                .collect();
            fields.sort();
            Received::Entry {
                key: key.to_string(),
                id: e.id,
                fields,
            }
        })
        .collect()
}

/// The local Redis' restart command (as `scripts/services.sh` starts it: no persistence).
const REDIS_START: [&str; 15] = [
    "--daemonize",
    "yes",
    "--bind",
    "127.0.0.1",
    "-::1",
    "--port",
    "6379",
    "--save",
    "",
    "--appendonly",
    "no",
    "--dir",
    "/var/lib/redis",
    "--logfile",
    "/var/log/redis/ci.log",
];

/// Whether the local Redis answers `PING`.
pub fn redis_up() -> bool {
    std::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", "6379", "ping"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "PONG")
}

/// Stop the local Redis at once (`SHUTDOWN NOSAVE`: it keeps nothing).
pub fn redis_stop() {
    let _ = std::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", "6379", "shutdown", "nosave"])
        .output();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while redis_up() {
        assert!(std::time::Instant::now() < deadline, "Redis did not stop");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Start the local Redis (if it is not up) and wait until it answers.
pub fn redis_start() {
    if redis_up() {
        return;
    }
    let _ = std::fs::create_dir_all("/var/lib/redis");
    let _ = std::fs::create_dir_all("/var/log/redis");
    let _ = std::process::Command::new("redis-server")
        .args(REDIS_START)
        .status();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !redis_up() {
        assert!(std::time::Instant::now() < deadline, "Redis did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts the local Redis again if it is down, even if the test panics.
pub struct RedisStartOnDrop;
impl Drop for RedisStartOnDrop {
    fn drop(&mut self) {
        redis_start();
    }
}

/// Sets the local Redis' `proto-max-bulk-len` back to its default (512 MB), even if the
/// test panics.
pub struct BulkLenOnDrop;
impl Drop for BulkLenOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", "6379"])
            .args(["config", "set", "proto-max-bulk-len", "536870912"])
            .output();
    }
}
