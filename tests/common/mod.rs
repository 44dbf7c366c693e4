//! Shared helpers for the integration tests: unique tables, exchanges and queues on the
//! machine's real Postgres and RabbitMQ, producers that write the way an order service
//! does, the relay binary as a child process, and waits on conditions with deadlines.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{Connection, ExchangeKind};
use outbox_relay::table::TableName;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection as _, PgPool};
use tokio::process::{Child, Command};

pub fn pg_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

pub fn amqp_url() -> String {
    std::env::var("TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{:08x}", rand::random::<u32>())
}

/// Poll `check` until it returns `Some`, or panic with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A migrated outbox table with a unique name, dropped by `cleanup`.
pub struct TestTable {
    pub name: String,
    pub pool: PgPool,
}

impl TestTable {
    pub async fn new(prefix: &str) -> Self {
        let t = Self::unmigrated(prefix).await;
        let mut conn = sqlx::PgConnection::connect(&pg_url())
            .await
            .expect("connect postgres");
        outbox_relay::migrate::migrate(&mut conn, &TableName::parse(&t.name).unwrap())
            .await
            .expect("migrate");
        t
    }

    /// A unique name, nothing created (for the "not migrated" test).
    pub async fn unmigrated(prefix: &str) -> Self {
        let pool = PgPoolOptions::new()
            .max_connections(10)
            .connect(&pg_url())
            .await
            .expect("connect postgres");
        Self {
            name: unique(prefix),
            pool,
        }
    }

    pub async fn cleanup(&self) {
        for sql in [
            format!("DROP TABLE IF EXISTS \"{}\" CASCADE", self.name),
            format!("DROP TABLE IF EXISTS \"{}_relay_leases\"", self.name),
            format!("DROP TABLE IF EXISTS \"{}_relay_members\"", self.name),
            format!("DROP TABLE IF EXISTS \"{}_relay_migrations\"", self.name),
            format!("DROP TABLE IF EXISTS \"{}_demo_orders\"", self.name),
            format!("DROP FUNCTION IF EXISTS \"{}_notify\"() CASCADE", self.name),
            format!("DROP FUNCTION IF EXISTS \"{}_insert\"() CASCADE", self.name),
        ] {
            let _ = sqlx::query(&sql).execute(&self.pool).await;
        }
    }

    /// Insert one row; returns its id.
    pub async fn insert(
        &self,
        agg: &str,
        event_type: &str,
        destination: Option<&str>,
        headers: serde_json::Value,
    ) -> i64 {
        sqlx::query_scalar(&format!(
            "INSERT INTO \"{}\" (aggregate_type, aggregate_id, event_type, destination, payload, headers)
             VALUES ('order', $1, $2, $3, $4, $5) RETURNING id",
            self.name
        ))
        .bind(agg)
        .bind(event_type)
        .bind(destination)
        .bind(serde_json::json!({"aggregate": agg, "type": event_type}))
        .bind(headers)
        .fetch_one(&self.pool)
        .await
        .expect("insert")
    }

    /// Run set-up SQL with the table's triggers off, for rows in relay-owned states
    /// (PROCESSED, FAILED, …) that the insert guard of schema 3 would reset to PENDING.
    pub async fn setup_sql(&self, sql: &str) {
        sqlx::raw_sql(&format!(
            "BEGIN; SET LOCAL session_replication_role = replica; {sql}; COMMIT;"
        ))
        .execute(&self.pool)
        .await
        .expect("set-up SQL");
    }

    /// `n` rows over `aggregates` aggregates, written by `producers` concurrent producers,
    /// one row per transaction; each aggregate is written by one producer, so its rows
    /// commit in id order (as with a locked business row).
    pub async fn produce(&self, n: usize, aggregates: usize, producers: usize) {
        let mut tasks = Vec::new();
        for p in 0..producers {
            let pool = self.pool.clone();
            let name = self.name.clone();
            tasks.push(tokio::spawn(async move {
                let mine: Vec<usize> = (0..aggregates).filter(|a| a % producers == p).collect();
                let count = (0..n).filter(|i| i % producers == p).count();
                for i in 0..count {
                    let agg = format!("agg-{}", mine[i % mine.len()]);
                    let mut tx = pool.begin().await.expect("begin");
                    sqlx::query(&format!(
                        "INSERT INTO \"{name}\" (aggregate_type, aggregate_id, event_type, payload, headers)
                         VALUES ('order', $1, 'order.created', $2, $3)"
                    ))
                    .bind(&agg)
                    .bind(serde_json::json!({"orderId": agg, "seq": i, "total": 59.98}))
                    .bind(serde_json::json!({"traceparent": format!("00-{i:032x}-{p:016x}-01"), "correlation_id": format!("c-{p}-{i}")}))
                    .execute(&mut *tx)
                    .await
                    .expect("insert");
                    tx.commit().await.expect("commit");
                }
            }));
        }
        for t in tasks {
            t.await.expect("producer");
        }
    }

    pub async fn count(&self, status: &str) -> i64 {
        sqlx::query_scalar(&format!(
            "SELECT count(*) FROM \"{}\" WHERE status = $1",
            self.name
        ))
        .bind(status)
        .fetch_one(&self.pool)
        .await
        .expect("count")
    }

    pub async fn total(&self) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM \"{}\"", self.name))
            .fetch_one(&self.pool)
            .await
            .expect("count")
    }

    pub async fn wait_status(&self, status: &str, n: i64, timeout: Duration) {
        wait_for(
            timeout,
            &format!("{n} rows {status} in {}", self.name),
            || async { (self.count(status).await >= n).then_some(()) },
        )
        .await
    }

    /// (status, attempts, last_error) of one row.
    pub async fn row(&self, id: i64) -> (String, i32, Option<String>) {
        sqlx::query_as(&format!(
            "SELECT status, attempts, last_error FROM \"{}\" WHERE id = $1",
            self.name
        ))
        .bind(id)
        .fetch_one(&self.pool)
        .await
        .expect("row")
    }

    pub async fn max_attempts_seen(&self) -> i32 {
        sqlx::query_scalar(&format!(
            "SELECT coalesce(max(attempts), 0) FROM \"{}\"",
            self.name
        ))
        .fetch_one(&self.pool)
        .await
        .expect("attempts")
    }

    /// event_id → (id, aggregate_id) of every row.
    pub async fn index(&self) -> HashMap<String, (i64, String)> {
        let rows: Vec<(i64, uuid::Uuid, String)> = sqlx::query_as(&format!(
            "SELECT id, event_id, aggregate_id FROM \"{}\"",
            self.name
        ))
        .fetch_all(&self.pool)
        .await
        .expect("index");
        rows.into_iter()
            .map(|(id, e, a)| (e.to_string(), (id, a)))
            .collect()
    }
}

/// A unique durable exchange with one queue bound to `#`, deleted by `cleanup`.
pub struct TestBroker {
    pub exchange: String,
    pub queue: String,
    conn: Connection,
    channel: lapin::Channel,
}

/// A message as a consumer got it.
#[derive(Debug, Clone)]
pub struct Got {
    pub message_id: String,
    pub kind: String,
    pub content_type: String,
    pub delivery_mode: u8,
    pub routing_key: String,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

pub async fn amqp_connect() -> Connection {
    Connection::connect(
        &amqp_url(),
        outbox_relay::sink::rabbitmq::connection_properties(),
    )
    .await
    .expect("connect rabbitmq")
}

impl TestBroker {
    pub async fn new(prefix: &str) -> Self {
        let conn = amqp_connect().await;
        let channel = conn.create_channel().await.unwrap();
        let exchange = unique(prefix);
        let queue = format!("{exchange}.q");
        channel
            .exchange_declare(
                &exchange,
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_declare(
                &queue,
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_bind(
                &queue,
                &exchange,
                "#",
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        Self {
            exchange,
            queue,
            conn,
            channel,
        }
    }

    /// A handle on an existing queue (for a consumer in another task).
    pub async fn attach(queue: &str) -> Self {
        let conn = amqp_connect().await;
        let channel = conn.create_channel().await.unwrap();
        Self {
            exchange: String::new(),
            queue: queue.to_string(),
            conn,
            channel,
        }
    }

    /// Open a fresh connection (after the broker was restarted).
    pub async fn reconnect(&mut self) {
        self.conn = amqp_connect().await;
        self.channel = self.conn.create_channel().await.unwrap();
    }

    /// Declare another exchange bound to this queue (an operator "fixing the cause").
    pub async fn add_exchange(&self, name: &str) {
        self.channel
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
            .unwrap();
        self.channel
            .queue_bind(
                &self.queue,
                name,
                "#",
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    }

    pub async fn delete_exchange(&self, name: &str) {
        let _ = self
            .channel
            .exchange_delete(name, ExchangeDeleteOptions::default())
            .await;
    }

    /// Consume until `n` messages arrived, or panic after `timeout`.
    pub async fn take(&self, n: usize, timeout: Duration) -> Vec<Got> {
        let ch = self.conn.create_channel().await.unwrap();
        ch.basic_qos(1000, BasicQosOptions::default())
            .await
            .unwrap();
        let mut consumer = ch
            .basic_consume(
                &self.queue,
                &unique("c"),
                // Manual acks: messages the broker pushed beyond the `n` we take are
                // requeued when the channel closes, not lost with it.
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            let next = tokio::time::timeout(left, consumer.next()).await;
            let Ok(Some(Ok(d))) = next else {
                panic!(
                    "only {} of {n} messages arrived within {timeout:?}",
                    out.len()
                );
            };
            d.ack(BasicAckOptions::default()).await.expect("ack");
            out.push(to_got(&d));
        }
        let _ = ch.close(200, "done").await;
        out
    }

    /// Messages currently in the queue (without consuming).
    pub async fn depth(&self) -> u32 {
        let q = self
            .channel
            .queue_declare(
                &self.queue,
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        q.message_count()
    }

    pub async fn cleanup(&self) {
        let ch = match self.conn.create_channel().await {
            Ok(c) => c,
            Err(_) => amqp_connect().await.create_channel().await.unwrap(),
        };
        let _ = ch
            .queue_delete(&self.queue, QueueDeleteOptions::default())
            .await;
        let _ = ch
            .exchange_delete(&self.exchange, ExchangeDeleteOptions::default())
            .await;
    }
}

fn to_got(d: &lapin::message::Delivery) -> Got {
    let p = &d.properties;
    let headers = outbox_relay::sink::rabbitmq::tap::header_strings(p)
        .into_iter()
        .collect();
    Got {
        message_id: p
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_string())
            .unwrap_or_default(),
        kind: p
            .kind()
            .as_ref()
            .map(|s| s.as_str().to_string())
            .unwrap_or_default(),
        content_type: p
            .content_type()
            .as_ref()
            .map(|s| s.as_str().to_string())
            .unwrap_or_default(),
        delivery_mode: p.delivery_mode().unwrap_or(0),
        routing_key: d.routing_key.as_str().to_string(),
        headers,
        body: d.data.clone(),
    }
}

/// The relay binary as a child process with its own env.
pub struct RelayProc {
    pub child: Child,
    /// The HTTP port the relay bound (`http.listen` port 0), once its log said so.
    port: std::sync::OnceLock<u16>,
    pub log: PathBuf,
}

/// A port free now, for a server that must be told its port before it starts (tansu).
/// The relay is never given one: it binds port 0 and logs the port it got.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_outbox-relay")
}

/// Env for a relay on `table` publishing to `exchange`, with fast test timings.
pub fn relay_env(table: &str, exchange: &str) -> Vec<(String, String)> {
    [
        ("OUTBOX_RELAY__DATABASE__URL", pg_url()),
        ("OUTBOX_RELAY__DATABASE__TABLE", table.to_string()),
        ("OUTBOX_RELAY__RABBITMQ__URL", amqp_url()),
        ("OUTBOX_RELAY__RABBITMQ__EXCHANGE", exchange.to_string()),
        ("OUTBOX_RELAY__RELAY__POLL_INTERVAL", "100ms".into()),
        ("OUTBOX_RELAY__RELAY__BACKOFF_INITIAL", "50ms".into()),
        ("OUTBOX_RELAY__RELAY__BACKOFF_MAX", "200ms".into()),
        ("OUTBOX_RELAY__RELAY__MAX_ATTEMPTS", "3".into()),
        ("OUTBOX_RELAY__RELAY__LEASE_TIMEOUT", "4s".into()),
        ("OUTBOX_RELAY__RELAY__SHUTDOWN_TIMEOUT", "5s".into()),
        ("OUTBOX_RELAY__RELAY__PUBLISH_TIMEOUT", "3s".into()),
        ("RUST_LOG", "info".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

impl RelayProc {
    pub fn start(env: &[(String, String)]) -> Self {
        Self::start_cmd(env, &["run"])
    }

    pub fn start_cmd(env: &[(String, String)], args: &[&str]) -> Self {
        let log = std::env::temp_dir().join(format!("{}.log", unique("relay")));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin())
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("OUTBOX_RELAY__HTTP__LISTEN", "127.0.0.1:0")
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn relay");
        Self {
            child,
            port: std::sync::OnceLock::new(),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    pub fn signal(&self, sig: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The port the relay's HTTP server listens on, from its log line
    /// `http listening on 127.0.0.1:<port>` (`None` until it has bound one).
    pub fn http_port(&self) -> Option<u16> {
        if let Some(p) = self.port.get() {
            return Some(*p);
        }
        let logs = self.logs();
        let (_, rest) = logs.split_once("http listening on 127.0.0.1:")?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let port = digits.parse().ok()?;
        Some(*self.port.get_or_init(|| port))
    }

    /// GET a path on the relay's HTTP port: (status, body); `None` before it listens.
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.http_port()?, path).await
    }

    /// The value of an unlabelled metric, if present.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics").await?;
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }
}

/// Minimal HTTP/1.1 GET over a TCP stream (keeps the test deps small).
/// After an outage: a row written now (aggregate `agg-after`) becomes `PROCESSED` and
/// reaches the broker's queue; returns the message.
pub async fn row_written_now_is_delivered(table: &TestTable, broker: &TestBroker) -> Got {
    table
        .insert("agg-after", "order.created", None, serde_json::json!({}))
        .await;
    table
        .wait_status("PROCESSED", 1, Duration::from_secs(30))
        .await;
    let got = broker.take(1, Duration::from_secs(30)).await;
    assert_eq!(
        got[0].headers.get("aggregate_id").map(String::as_str),
        Some("agg-after")
    );
    got.into_iter().next().expect("one message")
}

pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}

/// Run the binary to completion: (exit code, stdout, stderr).
pub async fn run_cmd(env: &[(String, String)], args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("OUTBOX_RELAY__HTTP__LISTEN", "127.0.0.1:0")
        .output()
        .await
        .expect("run outbox-relay");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Check that, per aggregate, first deliveries come in increasing id order. Returns the
/// number of duplicate deliveries.
pub fn assert_order(got: &[Got], index: &HashMap<String, (i64, String)>) -> usize {
    let mut last: HashMap<&str, i64> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    let mut dups = 0;
    for g in got {
        let (id, agg) = index
            .get(&g.message_id)
            .unwrap_or_else(|| panic!("unknown message_id {}", g.message_id));
        if !seen.insert(g.message_id.clone()) {
            dups += 1;
            continue;
        }
        let prev = last.insert(agg.as_str(), *id).unwrap_or(0);
        assert!(
            prev < *id,
            "aggregate {agg}: row {id} arrived after row {prev}"
        );
    }
    dups
}
