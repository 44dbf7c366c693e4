//! NATS JetStream for the tests: the server (`nats_url`, `TEST_NATS_URL`), a unique
//! stream per test capturing `<name>.>` (`TestStream`, deleted by `delete`), every
//! message a stream holds in stream order (`Stored`), the per-aggregate order check on
//! them, the relay env for the NATS sink, and the server's stop/start (`NatsStartOnDrop`).

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::jetstream::{self, stream};
use futures::StreamExt;
use outbox_relay::secret::Secret;
use outbox_relay::sink::nats::NatsConfig;

use crate::db::DbRow;
use crate::order::{check, Delivery, OrderReport};
use crate::relay_proc::fault_env;
use crate::{hex_id, wait::wait_for};

/// The test NATS server (`TEST_NATS_URL`, default the local one).
pub fn nats_url() -> String {
    std::env::var("TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// A JetStream context on the test server.
pub async fn jetstream() -> jetstream::Context {
    let client = async_nats::connect(nats_url())
        .await
        .unwrap_or_else(|e| panic!("no NATS server at {} ({e})", nats_url()));
    jetstream::new(client)
}

/// `[nats]` settings for the test server with `subject` as the template.
pub fn nats_config(subject: &str) -> NatsConfig {
    NatsConfig {
        url: Secret::new(nats_url()),
        subject: subject.to_string(),
        ..NatsConfig::default()
    }
}

/// Relay env for the NATS sink on `table`, default subject template `subject`, with fast
/// test timings plus `extra` overrides (last one wins).
pub fn nats_env(table: &str, subject: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = fault_env(table, "unused", &[]);
    env.push(("OUTBOX_RELAY__SINK__KIND".into(), "nats".into()));
    env.push(("OUTBOX_RELAY__NATS__URL".into(), nats_url()));
    env.push(("OUTBOX_RELAY__NATS__SUBJECT".into(), subject.into()));
    for (k, v) in extra {
        env.push((k.to_string(), v.to_string()));
    }
    env
}

/// One message as the stream holds it.
#[derive(Debug, Clone)]
pub struct Stored {
    pub sequence: u64,
    pub subject: String,
    /// Every header (name, value), sorted.
    pub headers: Vec<(String, String)>,
    pub payload: String,
}

impl Stored {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A stream with a unique name capturing `<name>.>`; delete it with `delete` (deleted on
/// drop if the test panics first).
pub struct TestStream {
    pub name: String,
    js: jetstream::Context,
}

impl TestStream {
    pub async fn new(prefix: &str) -> Self {
        let name = format!("{prefix}_{}", hex_id());
        let js = jetstream().await;
        js.create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![format!("{name}.>")],
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("create stream {name}: {e}"));
        Self { name, js }
    }

    /// `<name>.{aggregate_type}.{event_type}`: a template this stream captures.
    pub fn template(&self) -> String {
        format!("{}.{{aggregate_type}}.{{event_type}}", self.name)
    }

    /// Messages stored so far.
    pub async fn count(&self) -> u64 {
        let mut s = self.js.get_stream(&self.name).await.expect("get stream");
        s.info().await.expect("stream info").state.messages
    }

    /// Every message the stream holds, in stream order.
    pub async fn messages(&self) -> Vec<Stored> {
        let mut s = self.js.get_stream(&self.name).await.expect("get stream");
        let state = s.info().await.expect("stream info").state.clone();
        if state.messages == 0 {
            return Vec::new();
        }
        let consumer = s
            .create_consumer(pull::OrderedConfig {
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .expect("ordered consumer");
        let mut msgs = consumer.messages().await.expect("messages");
        let mut out = Vec::with_capacity(state.messages as usize);
        while out.len() < state.messages as usize {
            let m = tokio::time::timeout(Duration::from_secs(30), msgs.next())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "read {} of {} messages of {}",
                        out.len(),
                        state.messages,
                        self.name
                    )
                })
                .expect("message stream ended")
                .expect("message");
            let sequence = m.info().map(|i| i.stream_sequence).unwrap_or(0);
            let mut headers: Vec<(String, String)> = m
                .headers
                .as_ref()
                .map(|h| {
                    h.iter()
                        .flat_map(|(k, vs)| {
                            let k: &str = k.as_ref();
                            vs.iter()
                                .map(move |v| (k.to_string(), v.as_str().to_string()))
                        })
                        .collect()
                })
                .unwrap_or_default();
            headers.sort();
            out.push(Stored {
                sequence,
                subject: m.subject.to_string(),
                headers,
                payload: String::from_utf8_lossy(&m.payload).into_owned(),
            });
            if sequence >= state.last_sequence {
                break;
            }
        }
        out
    }

    /// Wait until the stream holds `n` messages.
    pub async fn wait_count(&self, n: u64, within: Duration) {
        wait_for(
            within,
            &format!("{n} messages in {}", self.name),
            || async { (self.count().await >= n).then_some(()) },
        )
        .await;
    }

    pub async fn delete(&self) {
        let _ = self.js.delete_stream(&self.name).await;
    }
}

impl Drop for TestStream {
    /// `delete` when the test panicked before it.
    fn drop(&mut self) {
        let name = self.name.clone();
        crate::teardown::after_panic(format!("stream {name}"), async move {
            if let Ok(client) = async_nats::connect(nats_url()).await {
                let _ = jetstream::new(client).delete_stream(&name).await;
            }
        });
    }
}

/// The stream's messages against the table's rows: per aggregate, first arrivals in `id`
/// order (messages of other tables are skipped).
pub fn nats_order(db: &[DbRow], got: &[Stored]) -> OrderReport {
    let id_of: HashMap<&str, (i64, &str)> = db
        .iter()
        .map(|r| (r.event_id.as_str(), (r.id, r.aggregate_id.as_str())))
        .collect();
    check(got.iter().map(|m| {
        let event = m.header("event_id").expect("event_id header");
        Delivery {
            event,
            row: id_of.get(event).copied(),
            partition: None,
        }
    }))
}

/// The command that starts the local nats-server the way the machine runs it.
const NATS_START: [&str; 14] = [
    "--start",
    "--oknodo",
    "--background",
    "--exec",
    "/usr/sbin/nats-server",
    "--",
    "-a",
    "127.0.0.1",
    "-p",
    "4222",
    "-js",
    "-sd",
    "/var/lib/nats-server",
    "-l",
];

/// Stop the local nats-server (`start-stop-daemon --stop`), waiting until it is gone.
pub fn stop_nats() {
    let ok = std::process::Command::new("start-stop-daemon")
        .args([
            "--stop",
            "--oknodo",
            "--retry",
            "10",
            "--exec",
            "/usr/sbin/nats-server",
        ])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "stop nats-server");
}

/// Start the local nats-server (a no-op when it runs) and wait for its port.
pub fn start_nats() -> bool {
    let ok = std::process::Command::new("start-stop-daemon")
        .args(NATS_START)
        .arg("/var/log/nats-server.log")
        .status()
        .is_ok_and(|s| s.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        if std::net::TcpStream::connect("127.0.0.1:4222").is_ok() {
            return ok;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Starts the local nats-server again when dropped, whatever happened to the test.
pub struct NatsStartOnDrop;

impl Drop for NatsStartOnDrop {
    fn drop(&mut self) {
        if !start_nats() {
            eprintln!("could not restart nats-server: start it by hand");
        }
    }
}
